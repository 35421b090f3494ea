"""`kaizen bench canary`: the simulation's mSPRT is the server's, and the run reports what
it should."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest

from bench.canary import Scenario, msprt_bounds, simulate, simulate_cs, summarise
from kaizen.cli import main
from server.canary import Arm, CanaryPolicy, Experiment, msprt_interval


@pytest.mark.parametrize("unit", ["answer", "user"])
def test_the_vectorised_bounds_are_the_servers(unit):
    rng = random.Random(3)
    for trial in range(20):
        arms = (Arm(), Arm())
        stats = np.zeros((3, 1, 2))  # n, Σ, Σ² of unit means, per arm
        per_unit: dict[tuple[int, str], list[float]] = {}
        for i in range(rng.randint(3, 80)):
            a = rng.randrange(2)
            r = rng.choice([-1.0, 0.1, 0.3, 0.5, 1.0])
            key = f"u{rng.randrange(6)}" if unit == "user" else f"a{i}"
            arms[a].add(r, key)
            per_unit.setdefault((a, key), []).append(r)
        for (a, _), rewards in per_unit.items():
            m = sum(rewards) / len(rewards)
            stats[:, 0, a] += (1, m, m * m)
        n, total, squares = stats
        mean = total / np.maximum(n, 1)
        var = np.where(n >= 2, (squares - n * mean**2) / np.maximum(n - 1, 1), 0.0)
        low, high = msprt_bounds(n, mean, np.maximum(var, 0), alpha=0.05, tau=0.2)
        _, want_low, want_high = msprt_interval(arms[0], arms[1], 0.05, 0.2)
        assert low[0] == pytest.approx(want_low, rel=1e-9, abs=1e-12), trial
        assert high[0] == pytest.approx(want_high, rel=1e-9, abs=1e-12), trial


def test_the_decision_rule_is_the_experiments():
    """Rollback before promote, only with min_feedback units per arm: as Experiment."""
    policy = CanaryPolicy(
        share=0.1, min_feedback=5, max_feedback=10**6, window_s=1e9, user_answers=1
    )
    for unit in ("user", "answer"):
        exp = Experiment("v1", "v0", replace(policy, unit=unit))
        for i in range(40):
            exp.add("v1", -1.0, user=f"c{i}", answer=f"a{i}")
            exp.add("v0", 1.0 if i % 4 else -1.0, user=f"s{i}", answer=f"b{i}")
        assert exp.decide(now=exp.started_at) == "rollback", unit


@pytest.mark.parametrize(
    ("shape", "delta", "seed", "outcome"),
    [
        ("heavy", 0.4, 1, "not_worse"),
        ("thumbs", -0.6, 2, "worse"),
        ("mix", 0.1, 1, "undecided"),
        ("mix", 0.1, 10, "not_worse"),
        ("heavy", -0.3, 1, "worse"),
        ("thumbs", 0.6, 5, "not_worse"),
    ],
)
def test_the_simulated_user_level_test_decides_as_the_servers_experiment(
    shape, delta, seed, outcome
):
    """One simulated event stream, replayed through `Experiment` at the same clock: the
    same decision at the same event, and the same ramp. So `bench canary`'s figures are
    the server's test's, not a re-statement that could drift from it."""
    policy = CanaryPolicy(
        share=0.2,
        max_share=0.5,
        ramp_every_s=40.0,
        min_feedback=5,
        user_answers=2,
        user_settle_s=25.0,
        max_feedback=400,
        window_s=1e9,
    )
    trace: list[tuple[int, int, int, float]] = []
    sim = simulate_cs(Scenario(shape, delta), 2, 400, policy, rate=1.0, seed=seed, trace=trace)
    exp = Experiment("v1", "v0", policy, started_at=0.0)
    decided_step = None
    for step, user, arm, reward in trace:
        now = float(step)  # rate 1: one event a second
        for a in exp.arms.values():  # the simulation settles before the step's event
            a.settle(now)
        exp._pair()
        exp.add(("v1", "v0")[arm], reward, user=f"u{user}", answer=f"a{step}", now=now)
        if exp.decide(now=now):
            decided_step = step
            break
    assert {1: "not_worse", -1: "worse", 0: "undecided"}[int(sim["decision"][0])] == outcome
    assert exp.outcome == outcome, exp.reason
    assert decided_step + 1 == sim["seconds"][0]  # decided on the same event
    assert exp.share == sim["share"][0]


def test_at_a_small_deployment_a_clearly_better_version_reaches_users():
    """200 users sending 0.75 events a second (what `bench learn` runs), ±1 thumbs, a
    version better by 0.5 (about one learning step on a shared taste): promoted within
    the shipped 2-hour window in most runs (measured: 94 % of 500; 74 % when the first
    canary users took every waiting serving observation)."""
    good = Scenario("thumbs", 0.5)
    sim = simulate_cs(good, 200, 200, CanaryPolicy(), rate=0.75, seed=3)
    assert (sim["decision"] == 1).mean() >= 0.85


def test_heavy_users_fool_the_answer_level_test_but_not_the_user_level_one():
    """Zipf activity and a taste per user, the canary worse by 0.1: counting answers as
    independent promotes it far above α; the server's user-level test does not."""
    policy = CanaryPolicy(max_feedback=2000, window_s=1e9)
    bad = Scenario("heavy", -0.1)
    cs = summarise(bad, simulate_cs(bad, 300, 1000, policy, rate=0.5, seed=4), policy.margin, 0.5)
    msprt = simulate(bad, 300, 1000, policy, rate=0.5, seed=4)["msprt_answer"]
    assert cs["promote_rate"] <= policy.alpha
    assert summarise(bad, msprt, policy.margin, 0.5)["promote_rate"] > 1.5 * policy.alpha


def test_bench_canary_end_to_end_on_small_numbers(capsys):
    argv = ["bench", "canary", "--json", "--runs", "60", "--max-feedback", "300"]
    argv += ["--shapes", "thumbs,mix,heavy", "--deltas=-0.5,0.5", "--rate", "2"]
    assert main(argv) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["runs_per_scenario"] == 60
    assert [(s["shape"], s["delta"]) for s in figures["scenarios"]] == [
        (shape, d) for shape in ("thumbs", "mix", "heavy") for d in (-0.5, 0.5)
    ]
    by = {(s["shape"], s["delta"]): s for s in figures["scenarios"]}
    for test in ("cs_user", "msprt_answer", "msprt_user", "z_peek"):
        bad, good = by[("thumbs", -0.5)][test], by[("thumbs", 0.5)][test]
        assert bad["worse_than_margin"] and not good["worse_than_margin"]
        assert bad["promote_rate"] <= 0.1 < 0.6 <= good["promote_rate"], test
        low, high = good["promote_ci95"]
        assert low <= good["promote_rate"] <= high
        assert good["median_canary_events_to_decision"] > 0
    assert set(figures["worst_false_promotion"]) == {
        "cs_user",
        "msprt_answer",
        "msprt_user",
        "z_peek",
    }
    assert figures["policy"]["unit"] == "user"
    assert main(["bench", "canary", "--shapes", "nope"]) == 2
