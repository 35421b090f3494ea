"""Canary rollout: a new version serves a sticky share of users until a sequential test
says to promote it or roll it back.

Routing: a user is in the canary when the keyed hash of their id (`kaizen.bucket`, a
secret in the registry) falls under the configured share, so nobody can choose an id
that lands in the canary, and the same users see the canary for its whole life, and a
second canary takes the same users. The rest stay on the serving version, in the same
batches (mixed-adapter rows).

Evidence: every feedback event on an answer either version gave since the experiment
started is turned into a reward (the shipped reward file; comments, which need a judge,
count for nothing here). The events are averaged per unit, by default the answer (a
thumb, a copy and a dwell on one answer are one observation, not three independent
ones), or the user, the unit the routing randomises; each version's running mean and
variance are over those unit means.

Decision: an always-valid confidence sequence for the difference of the means,
Δ = mean(canary) − mean(serving), from the normal mixture sequential probability ratio
test (mSPRT: Johari, Pekelis and Walsh, "Always valid inference", 2017). Its interval
covers the true Δ at every look at once with probability ≥ 1 − α, so one may look after
every event and stop the first time it is decisive:

- roll back as soon as the whole interval is below 0 (the canary is worse);
- promote as soon as the whole interval is above −margin (it is not worse by more than
  the margin): a canary worse than that is promoted with probability ≤ α, the stated
  false-promotion rate (under the normal approximation and independent units, which is
  why each arm needs `min_feedback` units before any decision);
- roll back when the window (time or feedback count) ends first: not shown to be good
  enough is not good enough.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Arm:
    """One version's rewards, averaged per unit (an answer or a user), and the running
    mean and variance of those unit means: several events on one answer are one
    observation, not several independent ones. A reward without a unit is its own."""

    n: int = 0  # units
    events: int = 0
    total: float = 0.0  # Σ unit means
    squares: float = 0.0  # Σ unit means²
    units: dict[str, tuple[float, int]] = field(default_factory=dict, repr=False)

    def add(self, reward: float, unit: str | None = None) -> None:
        self.events += 1
        if unit is None:
            self._count(reward, +1)
            return
        total, k = self.units.get(unit, (0.0, 0))
        if k:
            self._count(total / k, -1)
        total, k = total + reward, k + 1
        self.units[unit] = (total, k)
        self._count(total / k, +1)

    def _count(self, value: float, sign: int) -> None:
        self.n += sign
        self.total += sign * value
        self.squares += sign * value * value

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    @property
    def variance(self) -> float:
        if self.n < 2:
            return 0.0
        return max(0.0, (self.squares - self.n * self.mean**2) / (self.n - 1))

    def as_dict(self) -> dict[str, float]:
        return {
            "n": self.n,
            "events": self.events,
            "mean": round(self.mean, 4),
            "std": round(math.sqrt(self.variance), 4),
        }


def msprt_interval(
    canary: Arm, serving: Arm, alpha: float, tau: float, min_variance: float = 0.01
) -> tuple[float, float, float]:
    """(Δ̂, low, high): the always-valid (1 − α) interval for mean(canary) − mean(serving).

    With V the estimate's variance and τ² the mixing variance (the size of effect the test
    is most sensitive to), the mixture likelihood ratio against Δ = Δ₀ stays below 1/α for
    every Δ₀ within Δ̂ ± sqrt(V (V + τ²) / τ² · (2 log(1/α) + log((V + τ²) / V))).
    Each arm's variance is floored at `min_variance` so that a run of equal rewards cannot
    shrink the interval to nothing.
    """
    diff = canary.mean - serving.mean
    if canary.n < 2 or serving.n < 2:
        return diff, -math.inf, math.inf
    v = max(canary.variance, min_variance) / canary.n + max(serving.variance, min_variance) / (
        serving.n
    )
    t2 = tau * tau
    half = math.sqrt(v * (v + t2) / t2 * (2 * math.log(1 / alpha) + math.log((v + t2) / v)))
    return diff, diff - half, diff + half


@dataclass(frozen=True)
class CanaryPolicy:
    share: float = 0.1  # of users routed to the canary; 0 = publish straight to serving
    alpha: float = 0.05  # false-promotion rate
    margin: float = 0.02  # promote when not worse than serving by more than this
    tau: float = 0.2  # mixing scale: the reward difference the test is tuned to find
    unit: str = "answer"  # what one observation is: answer | user | event
    min_feedback: int = 30  # units per arm with rewarded feedback before any decision
    max_feedback: int = 2000  # canary events after which an undecided canary is rolled back
    window_s: float = 3600.0  # …or after this long


@dataclass
class Experiment:
    """One canary against the serving version, from start to decision."""

    canary: str
    serving: str
    policy: CanaryPolicy
    started_at: float = field(default_factory=time.time)
    arms: dict[str, Arm] = field(default_factory=dict)
    decision: str = ""  # "" while running | "promote" | "rollback"
    reason: str = ""
    decided_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.arms = {self.canary: Arm(), self.serving: Arm()}

    def add(self, version: str, reward: float, unit: str | None = None) -> None:
        """One rewarded event on `version`'s answer; `unit` is the answer's or the user's
        id as the policy's unit asks (None: the event is its own unit)."""
        with self._lock:
            arm = self.arms.get(version)
            if arm is not None and not self.decision:
                arm.add(reward, unit)

    def interval(self) -> tuple[float, float, float]:
        p = self.policy
        return msprt_interval(self.arms[self.canary], self.arms[self.serving], p.alpha, p.tau)

    def decide(self, now: float | None = None) -> str:
        """Look at the evidence; return (and remember) "promote", "rollback" or ""."""
        now = time.time() if now is None else now
        with self._lock:
            if self.decision:
                return self.decision
            p = self.policy
            c, s = self.arms[self.canary], self.arms[self.serving]
            diff, low, high = self.interval()
            enough = min(c.n, s.n) >= p.min_feedback
            if enough and high < 0:
                self.settle(
                    "rollback",
                    f"worse than {self.serving}: Δ {diff:+.3f}, "
                    f"interval [{low:+.3f}, {high:+.3f}] below 0",
                    now,
                )
            elif enough and low > -p.margin:
                self.settle(
                    "promote",
                    f"not worse than {self.serving} by more than "
                    f"{p.margin}: Δ {diff:+.3f}, interval [{low:+.3f}, {high:+.3f}]",
                    now,
                )
            elif c.events >= p.max_feedback or now - self.started_at >= p.window_s:
                self.settle(
                    "rollback",
                    f"undecided at the end of the window ({c.events} canary "
                    f"events, {now - self.started_at:.0f} s): Δ {diff:+.3f}, "
                    f"interval [{low:+.3f}, {high:+.3f}]",
                    now,
                )
            return self.decision

    def settle(self, decision: str, reason: str, now: float | None = None) -> None:
        """Record the decision (the test's, or an operator's)."""
        self.decision, self.reason = decision, reason
        self.decided_at = time.time() if now is None else now

    def evidence(self) -> dict[str, object]:
        diff, low, high = self.interval()
        finite = lambda x: round(x, 4) if math.isfinite(x) else None  # noqa: E731
        return {
            "canary": self.canary,
            "against": self.serving,
            "share": self.policy.share,
            "alpha": self.policy.alpha,
            "margin": self.policy.margin,
            "arms": {v: a.as_dict() for v, a in self.arms.items()},
            "diff": round(diff, 4),
            "low": finite(low),
            "high": finite(high),
            "started_at": self.started_at,
            "decision": self.decision,
            "reason": self.reason,
            "decided_at": self.decided_at or None,
        }
