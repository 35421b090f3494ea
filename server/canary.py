"""Canary rollout: a new version serves a sticky share of users until an anytime-valid
test says to promote it or roll it back.

Routing: a user is in the canary when the keyed hash of their id (`kaizen.bucket`, a
secret in the registry) falls under the experiment's current share, so nobody can
choose an id that lands in the canary, the same users see the canary for its whole life,
and a larger share keeps everyone already inside. The rest stay on the serving version,
in the same batches (mixed-adapter rows).

The unit is the user (`--canary-unit user`, the default), the unit the routing
randomises. A user's answers are not independent (one user's taste colours all of
them; a heavy user would otherwise count as hundreds of independent observations), so
each user gives each arm one observation: the mean reward of their first
`user_answers` answers with feedback on that arm's version (events on one answer are
averaged first). It is final at their `user_answers`-th such answer or `user_settle_s`
after their first, whichever comes first: a rule that does not look at the rewards, so
final observations are independent draws from the arm's population of users.

Decision: final observations are paired in the order they become final, each of the
canary's with the mean of the serving version's that became final since the last pair (a
block of k ≥ 1, by count only: `Experiment._pair`), and each pair's difference dᵢ =
y(canary)ᵢ − ȳ(serving block)ᵢ ∈ [−2, 2] is an independent draw with mean Δ =
mean(canary) − mean(serving). A confidence sequence for the mean of the dᵢ, valid at
every look at once for any distribution on [−2, 2] without a variance guess: the hedged
betting CS of Waudby-Smith and Ramdas ("Estimating means of bounded random variables by
betting", JRSS-B 2024; two one-sided capital processes, each a mixture of their
predictable plug-in bets and constant bets on a geometric grid: `BettingCS`), each of
its two bounds at level α over the whole experiment: the lower one, which alone can
promote, fails with probability ≤ α (the stated false-promotion rate), the upper one,
which alone can roll back, with ≤ α (a false rollback), so the interval they make is a
(1 − 2α) confidence sequence. It used to split α between the two (α/2 a side, a
threshold of log 2/α ≈ 3.7 in log-capital instead of log 1/α ≈ 3.0): no decision uses
both bounds, so that halved the promise's own error rate and cost a good version about
a sixth of its users for nothing. Pairing
buys a joint interval: two intervals, one per arm, added up, need about twice the users
for the same width (`kaizen bench canary`: a version better by 0.2 promoted in 67 % of
windows paired against 24 % with one CS per arm, at the same false-promotion rate); the
blocks keep the serving arm's extra users, which a one-to-one pairing discarded, up to
PAIR_BLOCK_MAX = 2 a pair, so that the canary users the ramp brings late still find some.

- roll back as soon as the CS excludes every Δ ≥ 0 (the canary is worse);
- promote as soon as it excludes every Δ ≤ −margin: a canary worse than that is promoted with
  probability ≤ α, the stated false-promotion rate, at any traffic, reward shape or mix
  of heavy and light users;
- both only once each arm has `min_feedback` users, a floor against deciding on a
  handful of people, not a condition of validity;
- roll back when the window (time or canary feedback events) ends first: not shown to
  be good enough is not good enough.

Ramp: the share starts at `share` and doubles every `ramp_every_s` up to `max_share`
while the canary's estimate is not worse than −margin, so a small deployment gets
enough users into the canary to decide within the window; a bad version is caught on
the smaller share first. The README's "How kaizen decides" measures both sides.

`--canary-unit answer` and `event` keep the earlier normal-mixture SPRT (mSPRT: Johari,
Pekelis and Walsh, 2017) on answers or events; it assumes independent observations,
which users who come back break (`kaizen bench canary` measures by how much).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

GRID = 400  # candidate means: a reported bound's resolution is (hi − lo) / GRID
BET_CAP = 0.9  # c: a bet risks at most 90 % of the capital (λ⁺ ≤ c/m, λ⁻ ≤ c/(1 − m))
BETS = 4  # the constant bets: c/m, c/2m, c/4m, c/8m (and c/(1 − m), … below)
PLUG_IN_WEIGHT = 0.5  # of the mixture's prior on the plug-in bets; the rest on the constant ones
PAIR_BLOCK_MAX = 2  # serving observations in one pair's block at most (`Experiment._pair`)


class BettingCS:
    """Anytime-valid confidence sequences for the means of `runs` independent streams of
    observations in [lo, hi], all updated at once (the server keeps one, for the pairs' differences;
    `kaizen bench canary` thousands).

    For every candidate mean m on a grid of [0, 1] (observations rescaled), gamblers bet
    that the mean is above m and below it, each with capital Π (1 + λᵢ⁺(m)(xᵢ − m)) or
    Π (1 − λᵢ⁻(m)(xᵢ − m)): the predictable plug-in bets of Waudby-Smith and Ramdas,
    λᵢ = sqrt(2 log(1/α) / (σ̂²ᵢ₋₁ i log(1 + i))) capped at c/m and c/(1 − m), as in their
    `confseq` package, and BETS constant bets c·2⁻ʲ/m, j = 0…BETS − 1 (and c·2⁻ʲ/(1 − m)
    below). Under mean m each capital is a nonnegative martingale starting at 1, so
    their average under a prior (PLUG_IN_WEIGHT on the plug-in, the rest shared by the
    constant bets) K⁺(m) is one too, and by Ville's inequality it ever reaches 1/α with
    probability ≤ α: the m that K⁺ has not rejected are a (1 − α) lower confidence
    sequence, those K⁻ has not a (1 − α) upper one, and the m neither has a (1 − 2α)
    interval, valid at every n at once, whatever the distribution on [lo, hi]. A
    rejected m stays rejected (the running intersection, also valid).

    Why both (their "diversified Kelly" idea, on a geometric grid, beside the plug-in):
    the plug-in bets large while the observations vary little, so a small deployment's
    canary decides on few users; but it shrinks its bets with every observation, in
    case the stream runs for ever, and pays a log(n) factor in the users a decision
    needs once it takes thousands (a ±1 thumbs reward at 2·margin). A constant bet near
    the Kelly bet Δ/σ² grows the capital at the best rate for that Δ at any n; the
    constant ones span the cap down to 1/8 of it (λ = 0.225 at m = ½; the Kelly bet for
    ±1 thumbs 2·margin above −margin in pairs with blocks of serving users is ≈ 0.17,
    which the grid under a cap of ½ came nearer, README "Each bound at α"). The
    prior costs log 2 ≈ 0.7 in log-capital on the plug-in's side and log(2·BETS) ≈ 2.1
    on a constant bet's, against the 3.0 (log 1/α at α = 0.05) every decision needs
    anyway. Chosen by `kaizen bench canary` (the README's "How kaizen decides"): with
    weight ½ and 4 bets, at the shipped defaults, as many good versions promoted as the
    plug-in alone, within noise; at 20,000 users, ±1 thumbs at 2·margin promoted in a
    fraction of the feedback.

    Why the cap is c = 0.9 and not ½: the pairs' differences span [−2, 2] (4 in the
    grid's units), but a small deployment's users vary far less than that (`bench
    learn`'s: a standard deviation of 0.42–0.54 reward an observation), so the Kelly bet
    for a step of +0.17 is about 4/m, beyond any cap: the largest allowed bet is the one
    that decides, and c = ½ halved it. Any c < 1 keeps every capital positive, so α is
    unchanged. Measured with each bound still at α/2: on differences of mean +0.17 and
    sd 0.55 (the +0.19 steps a `bench learn` run left undecided), 60 pairs decide in
    34 % of runs at c = 0.9 against 4 % at ½, 100 pairs in 69 % against 43 %; `kaizen
    bench canary` at 200 users and a 600 s window:
    heavy users +0.3 promoted in 20 % against 8 %, thumbs unchanged (their single ±1
    observations keep the bets below either cap), false promotion ≤ 1 % throughout.

    Each capital falls as m rises (K⁺) or rises with it (K⁻), so at every n the m that
    K⁺ rejects are those below some point and the m that K⁻ rejects those above some
    point: the sequence is an interval, and "is every mean ≤ v rejected" is "has K⁺
    rejected v". `points` are means a decision asks about (the canary's −margin and 0):
    they join the grid, and `rejects_below` and `rejects_above` answer exactly there, where
    `bounds()` may be a grid step (0.01 reward for Δ) wider; that step was a sixth of the
    distance a version better by 2·margin must clear. The decisions depend on the
    points' capitals alone, so `grid=0` (only the points, for `kaizen bench canary`'s
    thousands of streams) decides exactly as the server's full grid does; only
    `bounds()` needs the grid.
    """

    def __init__(
        self,
        alpha: float,
        lo: float = -1.0,
        hi: float = 1.0,
        runs: int = 1,
        points=(),
        grid: int = GRID,
    ) -> None:
        self.alpha, self.lo, self.hi = alpha, lo, hi
        exact = np.clip([self._scale(p) for p in points], 0.0, 1.0)
        spaced = np.linspace(0.0, 1.0, grid + 1) if grid else np.array([0.0, 1.0])
        self.m = np.unique(np.concatenate([spaced, exact]))
        fractions = BET_CAP * 0.5 ** np.arange(BETS)
        # at m = 0 (1) any bet up (down) keeps the capital positive: the floor only
        # keeps it finite
        self.bet_up = fractions / np.maximum(self.m, 1e-3)[:, None]  # (m, j)
        self.bet_down = fractions / np.maximum(1.0 - self.m, 1e-3)[:, None]
        self.cap_up, self.cap_down = self.bet_up[:, 0], self.bet_down[:, 0]  # c/m, c/(1 − m)
        size = len(self.m)
        self.log_up = np.zeros((runs, size, BETS))  # log Kⱼ⁺(m) per stream
        self.log_down = np.zeros((runs, size, BETS))
        self.plug_up = np.zeros((runs, size))  # log K⁺(m) of the plug-in bets
        self.plug_down = np.zeros((runs, size))
        self.out_up = np.zeros((runs, size), dtype=bool)  # rejected by K⁺ so far: m < mean
        self.out_down = np.zeros((runs, size), dtype=bool)  # by K⁻: m > mean
        self.n = np.zeros(runs, dtype=np.int64)
        self.total = np.zeros(runs)
        self.sq_dev = np.zeros(runs)
        self.var = np.full(runs, 0.25)  # σ̂²: one prior observation of variance 1/4
        self.threshold = math.log(1 / alpha)  # each side at level α
        self.weights = (math.log(PLUG_IN_WEIGHT), math.log((1 - PLUG_IN_WEIGHT) / BETS))

    def add(self, values, rows=None) -> None:
        """One observation for each of `rows` (all streams when None)."""
        rows = np.arange(len(self.n)) if rows is None else np.asarray(rows)
        x = np.clip(self._scale(np.asarray(values, dtype=float)), 0, 1)
        n = self.n[rows] + 1
        dev = x[:, None] - self.m[None, :]
        bet = np.sqrt(2 * self.threshold / (self.var[rows] * n * np.log1p(n)))[:, None]
        plug_up = self.plug_up[rows] + np.log1p(np.minimum(bet, self.cap_up) * dev)
        plug_down = self.plug_down[rows] + np.log1p(-np.minimum(bet, self.cap_down) * dev)
        up = self.log_up[rows] + np.log1p(self.bet_up * dev[:, :, None])
        down = self.log_down[rows] + np.log1p(-self.bet_down * dev[:, :, None])
        self.plug_up[rows], self.plug_down[rows] = plug_up, plug_down
        self.log_up[rows], self.log_down[rows] = up, down
        self.out_up[rows] |= self._capital(plug_up, up) >= self.threshold
        self.out_down[rows] |= self._capital(plug_down, down) >= self.threshold
        self.n[rows] = n
        self.total[rows] += x
        mean = (0.5 + self.total[rows]) / (n + 1)
        self.sq_dev[rows] += (x - mean) ** 2
        self.var[rows] = (0.25 + self.sq_dev[rows]) / (n + 1)

    def _capital(self, plug: np.ndarray, constant: np.ndarray) -> np.ndarray:
        """log of the prior-weighted capital: PLUG_IN_WEIGHT on the plug-in's, the rest
        shared evenly by the constant bets."""
        w_plug, w_each = self.weights
        return np.logaddexp(w_plug + plug, w_each + np.logaddexp.reduce(constant, axis=-1))

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) per stream, in the observations' units. Each bound is the grid point
        beyond the last candidate still inside, so never tighter than the CS itself; a
        stream with no observation has [lo, hi], and one whose every candidate was
        rejected (probability ≤ α) its running mean twice."""
        inside = ~(self.out_up | self.out_down)
        any_inside = inside.any(axis=1)
        top = len(self.m) - 1
        first = np.argmax(inside, axis=1)
        last = top - np.argmax(inside[:, ::-1], axis=1)
        low = self.m[np.maximum(first - 1, 0)]
        high = self.m[np.minimum(last + 1, top)]
        scale = self.hi - self.lo
        low, high, mean = self.lo + scale * low, self.lo + scale * high, self._mean()
        return np.where(any_inside, low, mean), np.where(any_inside, high, mean)

    def rejects_below(self, value: float) -> np.ndarray:
        """Per stream: whether every candidate mean at or below `value` is rejected, so
        the mean is above it: whether K⁺ has rejected the largest candidate ≤ `value`
        (`value` itself when it is one of the `points`)."""
        k = np.searchsorted(self.m, self._scale(value) + 1e-9, side="right") - 1
        return self.out_up[:, k] if k >= 0 else np.ones(len(self.n), dtype=bool)

    def rejects_above(self, value: float) -> np.ndarray:
        """Per stream: whether every candidate mean at or above `value` is rejected."""
        k = np.searchsorted(self.m, self._scale(value) - 1e-9, side="left")
        return self.out_down[:, k] if k < len(self.m) else np.ones(len(self.n), dtype=bool)

    def _mean(self) -> np.ndarray:
        mean = np.where(self.n > 0, self.total / np.maximum(self.n, 1), 0.5)
        return self.lo + (self.hi - self.lo) * mean

    def _scale(self, value):
        return (value - self.lo) / (self.hi - self.lo)


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


class UserArm:
    """One version's evidence with the user as the unit: each user's first `user_answers`
    answers with feedback on this version (events on one answer averaged), final at the
    last of them or `user_settle_s` after the first, then one observation, kept in order
    until the experiment pairs it with one of the other arm's."""

    def __init__(self, policy: CanaryPolicy) -> None:
        self.policy = policy
        self.unpaired: collections.deque[float] = collections.deque()  # final, in order
        self.events = 0
        self.pending: dict[str, tuple[float, dict[str, list[float]]]] = {}  # user -> …
        self.final: set[str] = set()
        self.finals = Arm()  # running mean and variance of the final observations

    @property
    def n(self) -> int:
        return self.finals.n

    def add(self, reward: float, user: str, answer: str, now: float) -> None:
        self.events += 1
        if user in self.final:
            return
        _, answers = self.pending.setdefault(user, (now, {}))
        answers.setdefault(answer, [0.0, 0])
        answers[answer][0] += reward
        answers[answer][1] += 1
        if len(answers) >= self.policy.user_answers:
            self._finalise(user)

    def settle(self, now: float) -> None:
        """Finalise every user whose first rated answer is `user_settle_s` old."""
        due = [
            u for u, (first, _) in self.pending.items() if now - first >= self.policy.user_settle_s
        ]
        for user in due:
            self._finalise(user)

    def _finalise(self, user: str) -> None:
        _, answers = self.pending.pop(user)
        y = sum(total / k for total, k in answers.values()) / len(answers)
        self.unpaired.append(y)
        self.final.add(user)
        self.finals.add(y)

    @property
    def mean(self) -> float:
        return self.finals.mean

    @property
    def variance(self) -> float:
        return self.finals.variance

    def as_dict(self) -> dict[str, float]:
        return {
            "n": self.n,
            "pending_users": len(self.pending),
            "events": self.events,
            "mean": round(self.mean, 4),
            "std": round(math.sqrt(self.variance), 4),
        }


@dataclass(frozen=True)
class CanaryPolicy:
    share: float = 0.1  # of users routed to the canary at first; 0 = publish straight away
    max_share: float = 0.5  # the ramp doubles the share up to this (= share: no ramp)
    ramp_every_s: float = 120.0  # …every this long, while the canary does not look worse
    alpha: float = 0.05  # false-promotion rate
    margin: float = 0.02  # promote when not worse than serving by more than this
    unit: str = "user"  # what one observation is: user | answer | event
    user_answers: int = 5  # a user's observation: their first this many rated answers…
    user_settle_s: float = 60.0  # …or those rated within this long of their first
    tau: float = 0.2  # unit answer/event: the mSPRT's mixing scale
    min_feedback: int = 10  # units per arm with rewarded feedback before any decision
    max_feedback: int = 4000  # canary events after which an undecided canary is rolled back
    window_s: float = 7200.0  # …or after this long
    supersede_after_s: float = 600.0  # undecided this long: a newer version replaces it


@dataclass
class Experiment:
    """One canary against the serving version, from start to decision."""

    canary: str
    serving: str
    policy: CanaryPolicy
    started_at: float = field(default_factory=time.time)
    arms: dict[str, Arm | UserArm] = field(default_factory=dict)
    share: float = 0.0  # of users in the canary now (the ramp raises it)
    ramped_at: float = 0.0
    decision: str = ""  # "" while running | "promote" | "rollback"
    outcome: str = ""  # the test's finding: "worse" | "not_worse" | "undecided" ("" = operator)
    reason: str = ""
    decided_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        make = (lambda: UserArm(self.policy)) if self.policy.unit == "user" else Arm
        self.arms = {self.canary: make(), self.serving: make()}
        self.pairs = BettingCS(  # unit user: Δ's CS, exact at the two decisions' points
            self.policy.alpha, lo=-2.0, hi=2.0, points=(-self.policy.margin, 0.0)
        )
        self.share = self.share or self.policy.share
        self.ramped_at = self.ramped_at or self.started_at

    def add(
        self,
        version: str,
        reward: float,
        user: str | None = None,
        answer: str | None = None,
        now: float | None = None,
    ) -> None:
        """One rewarded event on `version`'s answer `answer`, given to `user`."""
        with self._lock:
            arm = self.arms.get(version)
            if arm is None or self.decision:
                return
            if isinstance(arm, UserArm):
                arm.add(reward, user or "", answer or "", time.time() if now is None else now)
                self._pair()
            else:
                arm.add(reward, answer if self.policy.unit == "answer" else None)

    def _pair(self) -> None:
        """Each final canary observation against the mean of a block of serving ones, in
        the order they became final: the waiting serving ones shared out evenly among the
        waiting canary ones, at least one and at most PAIR_BLOCK_MAX each. The block's size
        depends only on how many became final in what order, never on their values, so
        each difference is still an independent draw in [−2, 2] with mean Δ, of variance
        (1 + 1/k)σ² (2σ² one to one, 1.5σ² at k = 2, 1.11σ² at 9).

        Why a cap: the ramp sends most canary users late, when a small deployment's
        serving users have all given their one observation. Uncapped, the first canary
        users took every serving observation waiting (k ≈ 9 at share 0.1) and the later
        ones found none left and were never paired: in a `bench learn` run at 200 users,
        v8 (liked 58 % against v0's 11 %) had 92 final canary users and 154 serving ones
        but at most 46 pairs (19 canary users were final against 127 serving six minutes
        in; 27 serving ones became final after that), and stayed undecided for 22 minutes.
        A pair's information is k/(k + 1): 0.67 at k = 2 against 0.9 at 9, so 7 serving
        observations pair 3.5 more canary users instead of adding 0.23 to one.
        `kaizen bench canary` (the README's "How kaizen decides"): at 200 users, +0.5
        promoted in 94 % of windows instead of 74 % (thumbs) and 88 % instead of 75 %
        (heavy); at the shipped 1,000, +0.2 in 75 % instead of 71 %; at 20,000, +0.04
        thumbs after 12,063 events instead of 14,500; false promotion within α
        throughout. Serving observations left over wait in order for later canary users."""
        c, s = self.arms[self.canary], self.arms[self.serving]
        while c.unpaired and s.unpaired:
            k = max(1, min(PAIR_BLOCK_MAX, len(s.unpaired) // len(c.unpaired)))
            block = sum(s.unpaired.popleft() for _ in range(k)) / k
            self.pairs.add([c.unpaired.popleft() - block])

    def interval(self) -> tuple[float, float, float]:
        """(Δ̂, low, high) for Δ = mean(canary) − mean(serving): Δ̂ over every final user,
        the interval from the pairs."""
        c, s = self.arms[self.canary], self.arms[self.serving]
        if isinstance(c, UserArm) and isinstance(s, UserArm):
            low, high = self.pairs.bounds()
            return c.mean - s.mean, float(low[0]), float(high[0])
        p = self.policy
        return msprt_interval(c, s, p.alpha, p.tau)

    def verdict(self) -> tuple[bool, bool]:
        """(worse, not_worse): whether the interval excludes every Δ ≥ 0, and every
        Δ ≤ −margin (unit user: asked of the CS at those exact points)."""
        if self.policy.unit == "user":
            return bool(self.pairs.rejects_above(0.0)[0]), bool(
                self.pairs.rejects_below(-self.policy.margin)[0]
            )
        _, low, high = self.interval()
        return high < 0, low > -self.policy.margin

    def decide(self, now: float | None = None) -> str:
        """Look at the evidence; return (and remember) "promote", "rollback" or ""."""
        now = time.time() if now is None else now
        with self._lock:
            if self.decision:
                return self.decision
            p = self.policy
            c, s = self.arms[self.canary], self.arms[self.serving]
            if isinstance(c, UserArm) and isinstance(s, UserArm):
                c.settle(now)
                s.settle(now)
                self._pair()
            diff, low, high = self.interval()
            worse, not_worse = self.verdict()
            enough = min(c.n, s.n) >= p.min_feedback
            if enough and worse:
                self.settle(
                    "rollback",
                    f"worse than {self.serving}: Δ {diff:+.3f}, "
                    f"interval [{low:+.3f}, {high:+.3f}] excludes 0 and above",
                    now,
                    outcome="worse",
                )
            elif enough and not_worse:
                self.settle(
                    "promote",
                    f"not worse than {self.serving} by more than "
                    f"{p.margin}: Δ {diff:+.3f}, interval [{low:+.3f}, {high:+.3f}]",
                    now,
                    outcome="not_worse",
                )
            elif c.events >= p.max_feedback or now - self.started_at >= p.window_s:
                self.settle(
                    "rollback",
                    f"undecided at the end of the window ({c.events} canary "
                    f"events, {now - self.started_at:.0f} s): Δ {diff:+.3f}, "
                    f"interval [{low:+.3f}, {high:+.3f}]",
                    now,
                    outcome="undecided",
                )
            elif (
                self.share < p.max_share
                and now - self.ramped_at >= p.ramp_every_s
                and min(c.n, s.n) >= 1
                and diff >= -p.margin
            ):
                self.share = min(p.max_share, 2 * self.share)
                self.ramped_at = now
            return self.decision

    def forecast(self, now: float, until: float | None = None) -> float | None:
        """The smallest Δ this canary can still promote by `until` (default: the window's
        end) if traffic keeps its pace: the interval's half-width now, shrunk by
        sqrt(pairs now / pairs then), minus the margin (the ramp only adds users, so this
        errs long). None before one ramp period has passed or with fewer than
        `min_feedback` pairs (unit user only)."""
        elapsed = now - self.started_at
        pairs = int(self.pairs.n[0])
        if self.policy.unit != "user" or elapsed < self.policy.ramp_every_s:
            return None
        if pairs < max(2, self.policy.min_feedback):
            return None
        _, low, high = self.interval()
        end = self.started_at + self.policy.window_s
        then = pairs + pairs / elapsed * max(0.0, min(end, until or end) - now)
        return (high - low) / 2 * math.sqrt(pairs / then) - self.policy.margin

    def on_track(self, now: float, within: float) -> bool:
        """Whether the canary's estimate, if it holds, would be promoted within `within`
        seconds at the pace pairs have come so far: a stale canary that is about to be
        promoted is not worth restarting from nothing for a newer version. Never looks
        at whether the estimate is *right*: promotion is still the test's alone."""
        with self._lock:
            smallest = self.forecast(now, until=now + within)
            return smallest is not None and self.interval()[0] > smallest

    def settle(
        self, decision: str, reason: str, now: float | None = None, outcome: str = ""
    ) -> None:
        """Record the decision (the test's, with what it found; or an operator's)."""
        self.decision, self.reason, self.outcome = decision, reason, outcome
        self.decided_at = time.time() if now is None else now

    def evidence(self) -> dict[str, object]:
        diff, low, high = self.interval()
        finite = lambda x: round(x, 4) if math.isfinite(x) else None  # noqa: E731
        return {
            "canary": self.canary,
            "against": self.serving,
            "unit": self.policy.unit,
            "share": round(self.share, 4),
            "alpha": self.policy.alpha,
            "margin": self.policy.margin,
            "arms": {v: a.as_dict() for v, a in self.arms.items()},
            "pairs": int(self.pairs.n[0]),
            "diff": round(diff, 4),
            "low": finite(low),
            "high": finite(high),
            "started_at": self.started_at,
            "decision": self.decision,
            "outcome": self.outcome,
            "reason": self.reason,
            "decided_at": self.decided_at or None,
        }
