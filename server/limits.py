"""Per-user and per-key rate limits at the door.

Token buckets keyed by identity, never by connection: a user who reconnects (or opens
ten channels) draws on the same bucket; only a restart of the server refills them. A
bucket holds one minute's allowance and refills continuously, so a user may burst up to
the per-minute limit and then goes at the limit's pace. A request over any limit is
refused whole (RESOURCE_EXHAUSTED naming the limit) before anything is generated or
stored, and counted in `kaizen_rate_limited_total{limit}`.

The table of buckets is bounded (least recently used first out): a bucket dropped for
room is refilled, which only ever favours a user who was idle longest.

Server replicas on a Redis buffer share their buckets in Redis (`RedisBuffer.take_tokens`,
one script per call, by Redis' clock): a user whose requests a load balancer spreads over
N replicas gets the limit once, not N times. With the SQLite buffer the buckets are each
server's own.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from kaizen.auth import Principal
from kaizen.buffer.base import user_sha256
from kaizen.errors import ResourceExhausted
from server import metrics

MAX_BUCKETS = 100_000


@dataclass(frozen=True)
class RateLimits:
    user_requests_per_min: float  # Generate + GenerateStream per end user
    key_requests_per_min: float  # the same per API key (a frontend speaks for many users)
    user_feedback_per_min: float  # feedback events per end user
    key_feedback_per_min: float  # feedback events per API key

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not value > 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be positive, got {value}")


class SharedBuckets(Protocol):
    """Token buckets several servers spend from (the Redis buffer)."""

    def take_tokens(self, costs: Sequence[tuple[str, float, float]]) -> tuple[int, float]: ...


class _Bucket:
    __slots__ = ("tokens", "at")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at


class Limiter:
    """Token buckets; `take` spends from several at once, or from none."""

    def __init__(
        self, limits: RateLimits, clock=time.monotonic, shared: SharedBuckets | None = None
    ) -> None:
        self.limits = limits
        self.clock = clock
        self.shared = shared  # the replicas' buckets; None: this server's own, below
        # (what, kind, name): ("requests" | "feedback", "user" | "key", who) -> bucket
        self._buckets: collections.OrderedDict[tuple[str, str, str], _Bucket] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def _bucket(self, key: tuple[str, str, str], per_min: float, now: float) -> _Bucket:
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(per_min, now)
        else:
            bucket.tokens = min(per_min, bucket.tokens + (now - bucket.at) * per_min / 60)
            bucket.at = now
        self._buckets[key] = bucket  # the most recently used last
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return bucket

    def take(self, costs: Mapping[tuple[str, str, str], tuple[float, float]]) -> None:
        """Spend `cost` from each bucket `(what, kind, name)` whose limit is `per_min`
        (costs maps the bucket to (cost, per_min)); all or nothing."""
        if self.shared is not None:
            items = list(costs.items())
            short, left = self.shared.take_tokens(
                [(f"{w}:{k}:{user_sha256(n)}", c, p) for (w, k, n), (c, p) in items]
            )
            if short:
                (what, kind, name), (cost, per_min) = items[short - 1]
                raise _refusal(what, kind, name, cost, per_min, left)
            return
        now = self.clock()
        with self._lock:
            buckets = {k: self._bucket(k, per_min, now) for k, (_, per_min) in costs.items()}
            for (what, kind, name), (cost, per_min) in costs.items():
                left = buckets[(what, kind, name)].tokens
                if left < cost:
                    raise _refusal(what, kind, name, cost, per_min, left)
            for key, (cost, _) in costs.items():
                buckets[key].tokens -= cost

    def _costs(self, what: str, principal: Principal, users: Mapping[str, int]):
        per_user = getattr(self.limits, f"user_{what}_per_min")
        per_key = getattr(self.limits, f"key_{what}_per_min")
        costs = {(what, "user", u): (float(n), per_user) for u, n in users.items() if u}
        if principal.kind == "key":
            costs[(what, "key", principal.name)] = (float(sum(users.values())), per_key)
        return costs

    def request(self, principal: Principal, user: str) -> None:
        """One chat request by `user` through `principal`."""
        self.take(self._costs("requests", principal, {user: 1}))

    def feedback(self, principal: Principal, users: Mapping[str, int]) -> None:
        """Feedback events, counted per user they are for, through `principal`."""
        self.take(self._costs("feedback", principal, users))


def _refusal(
    what: str, kind: str, name: str, cost: float, per_min: float, left: float
) -> ResourceExhausted:
    limit = f"{kind}_{what}_per_min"
    metrics.RATE_LIMITED.labels(limit).inc()
    noun = "requests" if what == "requests" else "feedback events"
    return ResourceExhausted(
        f"{limit}: {kind} {name!r} is over its limit of {per_min:g} {noun} "
        f"a minute (--{limit.replace('_', '-')}); retry in "
        f"{(cost - left) * 60 / per_min:.1f} s"
    )
