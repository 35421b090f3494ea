"""The canary's routing and its sequential test, on simulated feedback."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from kaizen.bucket import CANARY, Buckets
from server.canary import Arm, BettingCS, CanaryPolicy, Experiment

POLICY = CanaryPolicy(
    share=0.2, alpha=0.05, margin=0.02, unit="answer", min_feedback=30, max_feedback=3000
)


def test_users_are_split_by_share_and_stay_where_they_are():
    buckets = Buckets(bytes(range(32)))
    users = [f"user-{i}" for i in range(20_000)]
    inside = [u for u in users if buckets.in_canary(u, 0.2)]
    assert 0.19 < len(inside) / len(users) < 0.21
    assert all(buckets.in_canary(u, 0.2) for u in inside)  # sticky: the same answer every time
    assert buckets(CANARY, "alice") == Buckets(bytes(range(32)))(CANARY, "alice")
    # a larger share keeps everyone already inside
    assert all(buckets.in_canary(u, 0.3) for u in inside)


def run(
    canary_mean: float,
    serving_mean: float,
    seed: int,
    policy=POLICY,
    events_per_answer: int = 1,
    unit: str = "answer",
) -> tuple[str, int]:
    """Feed thumbs (±1) on answers of both arms, in the canary's share, until the test
    decides; each answer gets `events_per_answer` events of the same sign (a thumb, then
    a copy, a dwell…), keyed by answer or each its own observation (unit "event")."""
    rng = random.Random(seed)
    e = Experiment("v2", "v1", replace(policy, unit=unit), started_at=0.0)

    def thumb(mean: float) -> float:
        return 1.0 if rng.random() < (1 + mean) / 2 else -1.0

    for i in range(1, 100_000):
        version, mean = ("v2", canary_mean) if rng.random() < policy.share else ("v1", serving_mean)
        r = thumb(mean)
        for _ in range(events_per_answer):
            e.add(version, r, answer=f"answer-{i}")
        if e.decide(now=0.0):
            return e.decision, i
    return e.decision, -1


def test_a_worse_canary_is_promoted_at_most_at_the_stated_rate():
    # worse by 0.1, five times the margin: every promotion would be a false one
    decisions = [run(0.0, 0.1, seed)[0] for seed in range(200)]
    assert set(decisions) <= {"promote", "rollback"}
    assert decisions.count("promote") / len(decisions) <= POLICY.alpha


def test_events_on_one_answer_are_one_observation():
    arm = Arm()
    for r in (1.0, 0.5, 0.3):  # a thumb, a copy and a dwell on the same answer
        arm.add(r, "a1")
    arm.add(-1.0, "a2")
    assert (arm.n, arm.events) == (2, 4)
    assert arm.mean == pytest.approx((0.6 - 1.0) / 2)
    assert arm.variance == pytest.approx(((0.6 + 0.2) ** 2 + (-1.0 + 0.2) ** 2) / 1)


def test_counting_each_event_of_an_answer_would_promote_a_worse_canary_too_often():
    # worse by 0.1 again, but every answer gets four events that agree with each other
    policy = replace(POLICY, max_feedback=12_000)
    by_answer = [run(0.0, 0.1, seed, policy, events_per_answer=4)[0] for seed in range(100)]
    by_event = [
        run(0.0, 0.1, seed, policy, events_per_answer=4, unit="event")[0] for seed in range(100)
    ]
    assert by_answer.count("promote") / 100 <= POLICY.alpha
    assert by_event.count("promote") / 100 > 2 * POLICY.alpha


def test_a_better_canary_is_promoted_and_a_much_worse_one_rolled_back_early():
    better = [run(0.4, 0.0, seed) for seed in range(50)]
    assert sum(d == "promote" for d, _ in better) >= 48
    worse = [run(-0.4, 0.2, seed) for seed in range(50)]
    assert all(d == "rollback" for d, _ in worse)
    # …well before the window's end (3,000 canary events, i.e. ~15,000 events in all)
    assert max(n for _, n in worse) < 5_000


def test_an_undecided_canary_is_rolled_back_when_its_window_ends():
    policy = CanaryPolicy(window_s=60.0, user_answers=1)
    e = Experiment("v2", "v1", policy, started_at=0.0)
    for i in range(10):  # too little evidence for either decision
        e.add("v2", 1.0 if i % 2 else -1.0, user=f"c{i}", answer=f"a{i}", now=1.0)
        e.add("v1", 1.0 if i % 2 else -1.0, user=f"s{i}", answer=f"b{i}", now=1.0)
    assert e.decide(now=30.0) == ""
    assert e.decide(now=61.0) == "rollback"
    assert "undecided" in e.reason
    evidence = e.evidence()
    assert evidence["arms"]["v2"]["n"] == 10 and evidence["decision"] == "rollback"


@pytest.mark.parametrize(
    "draw",
    [
        lambda rng, n: (rng.random(n) < 0.1) * 2.0 - 1,  # rare thumbs up
        lambda rng, n: (rng.random(n) < 0.5) * 2.0 - 1,
        lambda rng, n: rng.beta(10, 30, n) * 2 - 1,  # the paper's Beta(10, 30)
    ],
    ids=["bernoulli-0.1", "bernoulli-0.5", "beta-10-30"],
)
def test_the_confidence_sequence_covers_the_mean_at_every_look(draw):
    """Waudby-Smith & Ramdas's own check: over many sequences, how often does the CS
    ever (at any of 500 looks) exclude the true mean? Each side (the lower bound, which
    promotes; the upper one, which rolls back) at most α, with no variance guess. The
    true mean is one of the CS's points, so the check is exact, not a grid step off."""
    rng = np.random.default_rng(0)
    runs, looks = 2000, 500
    truth = draw(rng, runs * 4000).mean()  # by a much larger sample
    cs = BettingCS(alpha=0.05, runs=runs, points=(truth,), grid=0)
    shown = BettingCS(alpha=0.05, runs=20)  # the server's full grid, for its bounds
    missed_low = np.zeros(runs, dtype=bool)
    missed_high = np.zeros(runs, dtype=bool)
    widths = []
    for _t in range(looks):
        values = draw(rng, runs)
        cs.add(values)
        shown.add(values[:20])
        missed_low |= cs.rejects_below(truth)  # the lower bound went above the mean
        missed_high |= cs.rejects_above(truth)
        low, high = shown.bounds()
        widths.append(np.median(high - low))
    assert missed_low.mean() <= 0.05 and missed_high.mean() <= 0.05
    assert widths[-1] < widths[49] < widths[9] < 2.0  # and it narrows as users come in


def _reward_mix(rng, runs: int, delta: float) -> np.ndarray:
    """The shipped reward mix's skew (rare −1, many small positives); Δ moves mass
    between −1 and 0."""
    values = np.array([-1.0, 0.0, 0.1, 0.3, 0.5, 1.0])
    probs = np.array([0.06 - delta, 0.30 + delta, 0.22, 0.25, 0.12, 0.05])
    return values[np.minimum((rng.random(runs)[:, None] > probs.cumsum()).sum(1), 5)]


def test_the_decisions_are_asked_at_the_exact_points_and_need_no_grid():
    """The canary asks the CS two questions: is every Δ ≤ −margin excluded, is every Δ ≥ 0?
    Asked at those exact points, a good version is promoted no later than the reported
    bound (a grid step wider) would have it, and the points alone (`grid=0`, what
    `kaizen bench canary` runs thousands of) answer exactly as the server's full grid."""
    rng = np.random.default_rng(1)
    runs, looks, margin = 40, 800, 0.02
    for delta in (2 * margin, -0.3):
        full = BettingCS(alpha=0.05, lo=-2.0, hi=2.0, runs=runs, points=(-margin, 0.0))
        bare = BettingCS(alpha=0.05, lo=-2.0, hi=2.0, runs=runs, points=(-margin, 0.0), grid=0)
        exact, by_bounds = np.full(runs, looks), np.full(runs, looks)
        for t in range(looks):
            d = _reward_mix(rng, runs, delta) - _reward_mix(rng, runs, 0.0)
            full.add(d)
            bare.add(d)
            for point in (-margin, 0.0):
                assert (full.rejects_below(point) == bare.rejects_below(point)).all()
                assert (full.rejects_above(point) == bare.rejects_above(point)).all()
            exact = np.where((exact == looks) & full.rejects_below(-margin), t, exact)
            by_bounds = np.where((by_bounds == looks) & (full.bounds()[0] > -margin), t, by_bounds)
        assert (exact <= by_bounds).all()  # never later than the reported bound
        if delta > 0:
            assert (exact < looks).mean() > 0.5  # most are promoted within the looks
            assert (exact < by_bounds).any()
        else:
            low, high = full.bounds()
            assert (high < 0).all() and full.rejects_above(0.0).all()  # clearly worse


def test_a_version_at_the_margin_is_rarely_promoted_and_a_good_thumbs_one_is_not_starved():
    """The promise at its edge: a canary exactly −margin worse is promoted (the lower
    bound failing) in at most α of runs, with the skewed mix and with ±1 thumbs. And
    the reason for the constant bets beside the plug-in ones: a version better by
    2·margin on ±1 thumbs needs thousands of pairs, where the plug-in bets alone,
    shrinking as 1/sqrt(n log n), promote 17 % of these runs within 6,000 pairs (the
    shipped mixture: 53 %; at the edge, 3.1 % mix and 3.5 % thumbs)."""
    rng = np.random.default_rng(1)
    margin = 0.02

    def thumbs(runs, delta):
        return (rng.random(runs) < 0.5 + delta / 2) * 2.0 - 1

    def mix(runs, delta):
        return _reward_mix(rng, runs, delta)

    def promoted(draw, delta, runs, looks):
        cs = BettingCS(alpha=0.05, lo=-2.0, hi=2.0, runs=runs, points=(-margin, 0.0), grid=0)
        for _t in range(looks):
            cs.add(draw(runs, delta) - draw(runs, 0.0))
        return cs.rejects_below(-margin).mean()  # ever: a rejection stays

    for draw in (mix, thumbs):
        assert promoted(draw, -margin, 2000, 1500) <= 0.05 + 0.01  # α, ± 2 s.e.
    assert promoted(thumbs, 2 * margin, 500, 6000) > 0.45


def test_a_users_observation_is_their_first_answers_and_final_by_count_or_time():
    policy = CanaryPolicy(unit="user", user_answers=2, user_settle_s=100.0, min_feedback=2)
    e = Experiment("v2", "v1", policy, started_at=0.0)
    canary = e.arms["v2"]
    e.add("v2", 1.0, user="heavy", answer="h1", now=1.0)
    e.add("v2", 0.5, user="heavy", answer="h1", now=2.0)  # a copy on the same answer
    assert canary.n == 0  # one answer so far: still collecting
    e.add("v2", -1.0, user="heavy", answer="h2", now=3.0)
    assert canary.n == 1 and canary.mean == pytest.approx((0.75 - 1.0) / 2)
    for i in range(50):  # a heavy user's later answers add nothing
        e.add("v2", 1.0, user="heavy", answer=f"h{i + 3}", now=4.0)
    assert canary.n == 1 and canary.events == 53
    e.add("v2", 1.0, user="light", answer="l1", now=5.0)
    e.decide(now=50.0)
    assert canary.n == 1  # not yet settled
    e.decide(now=106.0)
    assert canary.n == 2 and canary.mean == pytest.approx((-0.125 + 1.0) / 2)
    assert e.evidence()["arms"]["v2"]["pending_users"] == 0


def test_canary_users_the_ramp_brings_late_are_still_paired_with_serving_ones():
    """A small deployment: 40 serving users are final before the canary's first user,
    and no serving user comes after. Each canary user's pair takes at most two of the
    waiting serving observations, so all 20 canary users are paired; taking every
    waiting one for the first canary user left the other 19 without a pair (and the
    test with one observation instead of twenty)."""
    policy = CanaryPolicy(unit="user", user_answers=1, min_feedback=1000)
    e = Experiment("v2", "v1", policy, started_at=0.0)
    for i in range(40):
        e.add("v1", 0.0, user=f"s{i}", answer=f"b{i}", now=1.0)
    for i in range(20):
        e.add("v2", 1.0, user=f"c{i}", answer=f"a{i}", now=2.0 + i)
    assert e.evidence()["pairs"] == 20
    assert len(e.arms["v1"].unpaired) == 0  # two each: every serving user used


def test_the_ramp_raises_the_share_only_while_the_canary_does_not_look_worse():
    policy = CanaryPolicy(unit="user", user_answers=1, ramp_every_s=10.0, min_feedback=1000)
    good = Experiment("v2", "v1", policy, started_at=0.0)
    bad = Experiment("v2", "v1", policy, started_at=0.0)
    for i in range(5):
        good.add("v2", 1.0, user=f"c{i}", answer=f"a{i}", now=1.0)
        good.add("v1", 0.0, user=f"s{i}", answer=f"b{i}", now=1.0)
        bad.add("v2", -1.0, user=f"c{i}", answer=f"a{i}", now=1.0)
        bad.add("v1", 0.0, user=f"s{i}", answer=f"b{i}", now=1.0)
    shares = []
    for now in (5.0, 11.0, 22.0, 33.0, 44.0):
        good.decide(now=now)
        bad.decide(now=now)
        shares.append((good.share, bad.share))
    assert shares == [(0.1, 0.1), (0.2, 0.1), (0.4, 0.1), (0.5, 0.1), (0.5, 0.1)]


def test_the_window_forecast_says_how_large_a_gain_this_traffic_can_show():
    policy = CanaryPolicy(user_answers=1, ramp_every_s=100.0, window_s=1000.0, min_feedback=5)
    rng = random.Random(1)

    def experiment(users: int) -> Experiment:
        e = Experiment("v2", "v1", policy, started_at=0.0)
        for i in range(users):
            for version in ("v2", "v1"):
                r = 1.0 if rng.random() < 0.6 else -1.0
                e.add(version, r, user=f"{version}-{i}", answer=f"{version}-a{i}", now=50.0)
        return e

    slow, fast = experiment(20), experiment(200)
    assert slow.forecast(now=50.0) is None  # not one ramp period yet
    at_slow, at_fast = slow.forecast(now=200.0), fast.forecast(now=200.0)
    assert at_fast < at_slow  # more users by the window's end: smaller gains show
    assert at_slow > policy.margin  # 20 pairs in 200 s: a 1,000 s window resolves little
    assert Experiment("v2", "v1", replace(policy, unit="answer")).forecast(now=500.0) is None


def test_the_server_runs_the_canary_policy_it_documents():
    # a stray edit once left the server deciding only after 128 users an arm (10 here):
    # at a small deployment's traffic no canary was ever decided
    from server.config import ServeConfig

    assert ServeConfig().canary_policy() == CanaryPolicy()


def test_a_stale_canary_on_track_to_promotion_keeps_its_test_a_flat_one_does_not():
    policy = CanaryPolicy(user_answers=1, ramp_every_s=60.0, min_feedback=10, window_s=7200.0)
    rng = random.Random(0)

    def experiment(delta: float) -> Experiment:
        e = Experiment("v2", "v1", policy, started_at=0.0)
        for i in range(40):  # 40 users an arm in 600 s, thumbs at P(+1) = 0.4
            for version, p in (("v2", 0.4 + delta / 2), ("v1", 0.4)):
                r = 1.0 if rng.random() < p else -1.0
                e.add(version, r, user=f"{version}-{i}", answer=f"{version}-a{i}", now=15.0 * i)
        e.decide(now=600.0)
        return e

    promising, flat = experiment(0.4), experiment(0.0)
    assert not promising.decision and not flat.decision  # neither decided yet
    assert promising.on_track(now=600.0, within=600.0)  # twice the users: promoted
    assert not flat.on_track(now=600.0, within=600.0)
    assert not promising.on_track(now=600.0, within=1.0)  # no time: no new users
    assert not Experiment("v2", "v1", policy, started_at=0.0).on_track(600.0, 600.0)
