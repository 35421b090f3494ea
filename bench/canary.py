"""`kaizen bench canary`: how often the canary's test promotes a worse version, rolls back a
good one, and how much feedback it takes, over many simulated canaries.

Each run is one canary experiment. `users` users are routed to the canary with
probability `share` (fixed per user, as the server's bucketing does); events arrive one
at a time from a user drawn by activity (uniform, or Zipf for heavy users); each event
is one answer's reward, from the arm's reward distribution shifted by the user's own
taste. Every test looks after every event, as the server does, and stops at its first
decision; a canary that reaches `max_feedback` canary events undecided is rolled back.

Reward shapes (serving arm; the canary's mean is the serving mean + Δ):
- `thumbs`: ±1 thumbs, P(+1) = 0.6;
- `mix`: the shipped reward file's skew: rare −1 (a thumb down), many small implicit
  positives (a click 0.1, a dwell 0.3, a copy 0.5), a few +1; Δ moves mass between −1
  and 0;
- `heavy`: thumbs from users with Zipf(1.1) activity, each with a taste of their own
  (sd 0.3 on the mean), so a heavy user's answers are not independent.

Time: events arrive at `rate` a second in all, so the server's clocks (a user's settle
time, the ramp, the window) become event counts.

Tests:
- `cs_user`: the server's default (`--canary-unit user`): one observation per user per
  arm (the mean of their first `user_answers` rewards, or of those within
  `user_settle_s`), paired across arms in the order they become final, the betting
  confidence sequence on the pairs' differences (`server.canary.BettingCS`, the same
  code), the share ramping from `share` to `max_share`. Its own pass: the ramp
  changes who is routed where.
- `msprt_answer`: the earlier default, the mSPRT (`server.canary.msprt_interval`) with
  one observation per answer (--canary-unit answer), at the fixed `share`;
- `msprt_user`: the same with each user's running mean reward as the observation;
- `z_peek`: a fixed-horizon z interval at 1 − α, looked at after every event (the classic
  mistake the always-valid tests exist to avoid).
The last three run on the same event streams.

`tests/test_bench_canary.py` checks that the vectorised mSPRT and the cs_user pass decide
as `server.canary.Experiment` does on the same events.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

SHAPES = ("thumbs", "mix", "heavy")
TESTS = ("cs_user", "msprt_answer", "msprt_user", "z_peek")
BASELINES = TESTS[1:]
MIN_VARIANCE = 0.01  # server.canary.msprt_interval's floor
MIX_VALUES = np.array([-1.0, 0.0, 0.1, 0.3, 0.5, 1.0])
MIX_PROBS = np.array([0.06, 0.30, 0.22, 0.25, 0.12, 0.05])  # mean 0.147
THUMB_MEAN = 0.2  # P(+1) = 0.6
TASTE_SD = 0.3
ZIPF_S = 1.1


@dataclass(frozen=True)
class Scenario:
    shape: str
    delta: float  # true mean(canary) − mean(serving)


def _draw_rewards(
    rng: np.random.Generator, shape: str, means: np.ndarray, base: float
) -> np.ndarray:
    """One reward per run, each with its own target mean (arm mean + the user's taste);
    `base` is the serving arm's mean, the unshifted mix."""
    if shape == "mix":
        # shift the mix: −d moves d of mass from 0 to −1 (d > 0), or back (d < 0)
        d = np.clip(base - means, -MIX_PROBS[0], MIX_PROBS[1])
        probs = np.tile(MIX_PROBS, (len(means), 1))
        probs[:, 0] += d
        probs[:, 1] -= d
        u = rng.random(len(means))[:, None]
        index = (u > probs.cumsum(1)).sum(1)
        return MIX_VALUES[np.minimum(index, len(MIX_VALUES) - 1)]
    p_up = np.clip((1 + means) / 2, 0.0, 1.0)
    return np.where(rng.random(len(means)) < p_up, 1.0, -1.0)


class _Arms:
    """Running n, Σx, Σx² of the observations of each arm, for every run at once."""

    def __init__(self, runs: int) -> None:
        self.n = np.zeros((runs, 2))
        self.total = np.zeros((runs, 2))
        self.squares = np.zeros((runs, 2))

    def stats(self):
        n = np.maximum(self.n, 1)
        mean = self.total / n
        var = np.where(
            self.n >= 2, (self.squares - self.n * mean**2) / np.maximum(self.n - 1, 1), 0.0
        )
        return self.n, mean, np.maximum(var, 0.0)


def msprt_bounds(n, mean, var, alpha: float, tau: float):
    """Vectorised `server.canary.msprt_interval`: arm 0 is the canary, arm 1 serving."""
    v = np.maximum(var[:, 0], MIN_VARIANCE) / np.maximum(n[:, 0], 1) + np.maximum(
        var[:, 1], MIN_VARIANCE
    ) / np.maximum(n[:, 1], 1)
    t2 = tau * tau
    half = np.sqrt(v * (v + t2) / t2 * (2 * math.log(1 / alpha) + np.log((v + t2) / v)))
    diff = mean[:, 0] - mean[:, 1]
    ok = (n[:, 0] >= 2) & (n[:, 1] >= 2)
    return np.where(ok, diff - half, -np.inf), np.where(ok, diff + half, np.inf)


def z_bounds(n, mean, var, alpha: float):
    v = np.maximum(var[:, 0], MIN_VARIANCE) / np.maximum(n[:, 0], 1) + np.maximum(
        var[:, 1], MIN_VARIANCE
    ) / np.maximum(n[:, 1], 1)
    z = {0.05: 1.959964, 0.1: 1.644854, 0.01: 2.575829}.get(alpha)
    if z is None:
        from statistics import NormalDist

        z = NormalDist().inv_cdf(1 - alpha / 2)
    half = z * np.sqrt(v)
    diff = mean[:, 0] - mean[:, 1]
    ok = (n[:, 0] >= 2) & (n[:, 1] >= 2)
    return np.where(ok, diff - half, -np.inf), np.where(ok, diff + half, np.inf)


def _population(rng: np.random.Generator, scenario: Scenario, runs: int, users: int):
    """Who sends the next event (the activity CDF), each user's taste, and the arms' mean
    rewards (canary, serving)."""
    if scenario.shape == "heavy":
        weights = 1.0 / np.arange(1, users + 1) ** ZIPF_S
        taste = rng.normal(0.0, TASTE_SD, (runs, users))
    else:
        weights = np.ones(users)
        taste = np.zeros((runs, users))
    cdf = np.cumsum(weights / weights.sum())
    base = MIX_PROBS @ MIX_VALUES if scenario.shape == "mix" else THUMB_MEAN
    return cdf, taste, base, np.array([base + scenario.delta, base])


def _steps(policy, rate: float, share: float) -> int:
    """Events in all until the window closes: its time, or max_feedback canary events at
    three times the expected count."""
    return int(min(policy.window_s * rate, policy.max_feedback / max(share, 1e-3) * 3))


def simulate(
    scenario: Scenario, runs: int, users: int, policy, rate: float, seed: int
) -> dict[str, dict[str, np.ndarray]]:
    """The baselines' decisions (+1 promote, −1 rollback, 0 window end) and the canary
    events each had seen then, per run, at the fixed `policy.share`."""
    rng = np.random.default_rng(seed)
    R, U = runs, users
    rows = np.arange(R)
    share, alpha, margin, tau = policy.share, policy.alpha, policy.margin, policy.tau
    min_feedback, max_feedback = policy.min_feedback, policy.max_feedback
    in_canary = rng.random((R, U)) < share  # (R, U) fixed routing
    cdf, taste, base, arm_mean = _population(rng, scenario, R, U)

    answers, per_user = _Arms(R), _Arms(R)
    user_sum = np.zeros((R, U))
    user_cnt = np.zeros((R, U))
    canary_events = np.zeros(R)
    decision = {t: np.zeros(R, dtype=int) for t in BASELINES}
    at = {t: np.zeros(R) for t in BASELINES}
    when = {t: np.zeros(R) for t in BASELINES}
    open_ = {t: np.ones(R, dtype=bool) for t in BASELINES}
    steps = _steps(policy, rate, share)
    for step in range(steps):
        if not any(o.any() for o in open_.values()):
            break
        u = np.minimum(np.searchsorted(cdf, rng.random(R)), U - 1)
        arm = np.where(in_canary[rows, u], 0, 1)
        r = _draw_rewards(rng, scenario.shape, arm_mean[arm] + taste[rows, u], base)
        canary_events += arm == 0
        answers.n[rows, arm] += 1
        answers.total[rows, arm] += r
        answers.squares[rows, arm] += r * r
        old_k = user_cnt[rows, u]
        old_m = np.where(old_k > 0, user_sum[rows, u] / np.maximum(old_k, 1), 0.0)
        user_sum[rows, u] += r
        user_cnt[rows, u] += 1
        new_m = user_sum[rows, u] / user_cnt[rows, u]
        per_user.n[rows, arm] += old_k == 0
        per_user.total[rows, arm] += new_m - old_m
        per_user.squares[rows, arm] += new_m**2 - old_m**2

        stats = {"answer": answers.stats(), "user": per_user.stats()}  # once per step
        for test in BASELINES:
            live = open_[test]
            if not live.any():
                continue
            n, mean, var = stats["user" if test == "msprt_user" else "answer"]
            if test == "z_peek":
                low, high = z_bounds(n, mean, var, alpha)
            else:
                low, high = msprt_bounds(n, mean, var, alpha, tau)
            enough = np.minimum(n[:, 0], n[:, 1]) >= min_feedback
            rollback = live & enough & (high < 0)
            promote = live & enough & ~rollback & (low > -margin)
            window = live & ~rollback & ~promote & (canary_events >= max_feedback)
            for mask, value in ((promote, 1), (rollback, -1), (window, 0)):
                decision[test][mask] = value
                at[test][mask] = canary_events[mask]
                when[test][mask] = (step + 1) / rate
                live &= ~mask
    for test in BASELINES:  # still open when the steps ran out: the window's rollback
        at[test][open_[test]] = canary_events[open_[test]]
        when[test][open_[test]] = steps / rate
    return {
        t: {"decision": decision[t], "canary_events": at[t], "seconds": when[t]} for t in BASELINES
    }


def simulate_cs(
    scenario: Scenario,
    runs: int,
    users: int,
    policy,
    rate: float,
    seed: int,
    trace: list[tuple[int, int, int, float]] | None = None,
) -> dict[str, np.ndarray]:
    """The server's test (`policy.unit` user): its decisions and canary events then.
    `trace` collects run 0's events while it runs, (step, user, arm, reward) with arm 0
    the canary, so that a test can replay them through the server's `Experiment`."""
    from server.canary import PAIR_BLOCK_MAX, BettingCS

    rng = np.random.default_rng(seed)
    R, U = runs, users
    rows = np.arange(R)
    hashed = rng.random((R, U))  # the keyed hash: in the canary while below the share
    cdf, taste, base, arm_mean = _population(rng, scenario, R, U)
    share = np.full(R, policy.share)
    ramped_at = np.zeros(R)
    settle = max(1, int(policy.user_settle_s * rate))  # a user's settle time, in events
    ramp_every = policy.ramp_every_s * rate
    count = np.zeros((R, U, 2), dtype=np.int32)  # a user's rewards on each arm so far
    total = np.zeros((R, U, 2))
    final = np.zeros((R, U, 2), dtype=bool)
    first_of = np.full((R, settle), -1)  # ring: user*2 + arm whose first reward came then
    pairs = BettingCS(  # the CS of Δ at the server's two points, which decide as its grid
        policy.alpha, lo=-2.0, hi=2.0, runs=R, points=(-policy.margin, 0.0), grid=0
    )
    final_y = np.zeros((R, 2 * U))  # the canary's final observations, in order
    served = np.zeros((R, 2 * U + 1))  # running Σ of the serving arm's, in order
    n = np.zeros((R, 2), dtype=np.int64)
    paired = np.zeros((R, 2), dtype=np.int64)  # observations of each arm paired so far
    finals = np.zeros((R, 2))  # Σ final observations per arm
    canary_events = np.zeros(R)
    decision, at, when = np.zeros(R, dtype=int), np.zeros(R), np.zeros(R)
    live = np.ones(R, dtype=bool)

    def finalise(r: np.ndarray, u: np.ndarray, a: np.ndarray) -> None:
        y = total[r, u, a] / count[r, u, a]
        final[r, u, a] = True
        finals[r, a] += y
        c, s = r[a == 0], r[a == 1]  # a run finalises at most one user per call
        final_y[c, n[c, 0]] = y[a == 0]
        served[s, n[s, 1] + 1] = served[s, n[s, 1]] + y[a == 1]
        n[r, a] += 1
        while (ready := np.flatnonzero((n > paired).all(axis=1))).size:  # Experiment._pair
            waiting = n[ready] - paired[ready]
            k = np.clip(waiting[:, 1] // waiting[:, 0], 1, PAIR_BLOCK_MAX)
            start = paired[ready, 1]
            block = (served[ready, start + k] - served[ready, start]) / k
            pairs.add(final_y[ready, paired[ready, 0]] - block, ready)
            paired[ready] += np.stack([np.ones_like(k), k], axis=1)

    steps = _steps(policy, rate, policy.share)
    for step in range(steps):
        if not live.any():
            break
        slot = step % settle  # users whose first reward is `settle` events old
        due = first_of[:, slot]
        r = np.flatnonzero(due >= 0)
        u, a = due[r] // 2, due[r] % 2
        keep = ~final[r, u, a]
        finalise(r[keep], u[keep], a[keep])
        first_of[:, slot] = -1

        u = np.minimum(np.searchsorted(cdf, rng.random(R)), U - 1)
        arm = np.where(hashed[rows, u] < share, 0, 1)
        reward = _draw_rewards(rng, scenario.shape, arm_mean[arm] + taste[rows, u], base)
        canary_events += (arm == 0) & live
        if trace is not None and live[0]:
            trace.append((step, int(u[0]), int(arm[0]), float(reward[0])))
        fresh = ~final[rows, u, arm]
        count[rows, u, arm] += fresh
        total[rows, u, arm] += np.where(fresh, reward, 0.0)
        first_of[fresh & (count[rows, u, arm] == 1), slot] = (u * 2 + arm)[
            fresh & (count[rows, u, arm] == 1)
        ]
        full = np.flatnonzero(fresh & (count[rows, u, arm] >= policy.user_answers))
        finalise(full, u[full], arm[full])

        enough = n.min(axis=1) >= policy.min_feedback
        rollback = live & enough & pairs.rejects_above(0.0)
        promote = live & enough & ~rollback & pairs.rejects_below(-policy.margin)
        window = live & ~rollback & ~promote & (canary_events >= policy.max_feedback)
        for mask, value in ((promote, 1), (rollback, -1), (window, 0)):
            decision[mask] = value
            at[mask] = canary_events[mask]
            when[mask] = (step + 1) / rate
            live &= ~mask
        diff = finals[:, 0] / np.maximum(n[:, 0], 1) - finals[:, 1] / np.maximum(n[:, 1], 1)
        ramp = (
            live
            & (share < policy.max_share)
            & (step - ramped_at >= ramp_every)
            & (n.min(axis=1) >= 1)
            & (diff >= -policy.margin)
        )
        share[ramp] = np.minimum(policy.max_share, 2 * share[ramp])
        ramped_at[ramp] = step
    at[live] = canary_events[live]  # the window's time ran out
    when[live] = steps / rate
    return {"decision": decision, "canary_events": at, "seconds": when, "share": share}


def _median_to_promotion(values: np.ndarray, promoted: np.ndarray) -> float | None:
    """The median over every run, one never promoted counting as infinitely late; None
    (not reached within the window) when fewer than half were promoted. Unlike a median
    over the runs that decided, it cannot look fast by counting only the lucky ones."""
    median = float(np.median(np.where(promoted, values, np.inf)))
    return median if math.isfinite(median) else None


def summarise(
    scenario: Scenario, outcome: dict[str, np.ndarray], margin: float, rate: float
) -> dict:
    d, events = outcome["decision"], outcome["canary_events"]
    runs = len(d)
    promoted = int((d == 1).sum())
    rolled = int((d == -1).sum())
    from bench.learn import wilson

    low, high = wilson(promoted, runs)
    decided = d != 0
    return {
        "promote_rate": round(promoted / runs, 4),
        "promote_ci95": [round(low, 4), round(high, 4)],
        "rollback_rate": round(rolled / runs, 4),
        "undecided_rate": round(1 - decided.mean(), 4),
        "median_canary_events_to_decision": float(np.median(events[decided]))
        if decided.any()
        else None,
        "median_s_to_promotion": round(float(np.median(outcome["seconds"][d == 1])), 1)
        if promoted
        else None,
        "median_canary_events_to_promotion_all_runs": _median_to_promotion(events, d == 1),
        "median_events_to_promotion_all_runs": _median_to_promotion(
            np.round(outcome["seconds"] * rate), d == 1
        ),
        "worse_than_margin": scenario.delta < -margin,
    }


def run(config) -> dict[str, object]:
    from bench.load import say

    margin = config.margin
    if config.deltas:
        deltas = [float(x) for x in config.deltas.split(",")]
    else:
        deltas = [-0.1, -margin - 0.005, -margin, 0.0, margin, 2 * margin]
    shapes = [s.strip() for s in config.shapes.split(",") if s.strip()]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        raise ValueError(f"--shapes: unknown {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    policy = config.policy()
    started = time.monotonic()
    results = []
    for i, shape in enumerate(shapes):
        for j, delta in enumerate(deltas):
            scenario = Scenario(shape, delta)
            say(f"{shape} Δ={delta:+.3f}: {config.runs} canaries")
            seed = config.seed + 1000 * i + j
            outcomes = simulate(scenario, config.runs, config.users, policy, config.rate, seed)
            outcomes["cs_user"] = simulate_cs(
                scenario, config.runs, config.users, policy, config.rate, seed
            )
            results.append(
                {
                    "shape": shape,
                    "delta": delta,
                    **{t: summarise(scenario, outcomes[t], margin, config.rate) for t in TESTS},
                }
            )
    worst = {
        t: max((r[t]["promote_rate"] for r in results if r["delta"] < -margin), default=None)
        for t in TESTS
    }
    return {
        "runs_per_scenario": config.runs,
        "users": config.users,
        "rate_events_per_s": config.rate,
        "policy": {k: v for k, v in asdict(policy).items()},
        "tests": list(TESTS),
        "worst_false_promotion": worst,
        "scenarios": results,
        "wall_s": round(time.monotonic() - started, 1),
    }
