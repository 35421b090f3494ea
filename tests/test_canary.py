"""The canary's routing and its sequential test, on simulated feedback."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from kaizen.bucket import CANARY, Buckets
from server.canary import Arm, CanaryPolicy, Experiment

POLICY = CanaryPolicy(share=0.2, alpha=0.05, margin=0.02, min_feedback=30, max_feedback=3000)


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
    e = Experiment("v2", "v1", policy, started_at=0.0)

    def thumb(mean: float) -> float:
        return 1.0 if rng.random() < (1 + mean) / 2 else -1.0

    for i in range(1, 100_000):
        version, mean = ("v2", canary_mean) if rng.random() < policy.share else ("v1", serving_mean)
        r = thumb(mean)
        for _ in range(events_per_answer):
            e.add(version, r, f"answer-{i}" if unit == "answer" else None)
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
    e = Experiment("v2", "v1", CanaryPolicy(window_s=60.0), started_at=0.0)
    for i in range(10):  # too little evidence for either decision
        e.add("v2", 1.0 if i % 2 else -1.0)
        e.add("v1", 1.0 if i % 2 else -1.0)
    assert e.decide(now=30.0) == ""
    assert e.decide(now=61.0) == "rollback"
    assert "undecided" in e.reason
    evidence = e.evidence()
    assert evidence["arms"]["v2"]["n"] == 10 and evidence["decision"] == "rollback"
