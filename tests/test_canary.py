"""The canary's routing and its sequential test, on simulated feedback."""

from __future__ import annotations

import random

from server.canary import CanaryPolicy, Experiment, in_canary, user_bucket

POLICY = CanaryPolicy(share=0.2, alpha=0.05, margin=0.02, min_feedback=30, max_feedback=3000)


def test_users_are_split_by_share_and_stay_where_they_are():
    users = [f"user-{i}" for i in range(20_000)]
    inside = [u for u in users if in_canary(u, 0.2)]
    assert 0.19 < len(inside) / len(users) < 0.21
    assert all(in_canary(u, 0.2) for u in inside)  # sticky: the same answer every time
    assert user_bucket("alice") == user_bucket("alice")
    # a larger share keeps everyone already inside
    assert all(in_canary(u, 0.3) for u in inside)


def run(canary_mean: float, serving_mean: float, seed: int, policy=POLICY) -> tuple[str, int]:
    """Feed thumbs (±1) to both arms in the canary's share until the test decides."""
    rng = random.Random(seed)
    e = Experiment("v2", "v1", policy, started_at=0.0)

    def thumb(mean: float) -> float:
        return 1.0 if rng.random() < (1 + mean) / 2 else -1.0

    for i in range(1, 100_000):
        if rng.random() < policy.share:
            e.add("v2", thumb(canary_mean))
        else:
            e.add("v1", thumb(serving_mean))
        if e.decide(now=0.0):
            return e.decision, i
    return e.decision, -1


def test_a_worse_canary_is_promoted_at_most_at_the_stated_rate():
    # worse by 0.1, five times the margin: every promotion would be a false one
    decisions = [run(0.0, 0.1, seed)[0] for seed in range(200)]
    assert set(decisions) <= {"promote", "rollback"}
    assert decisions.count("promote") / len(decisions) <= POLICY.alpha


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
