"""Off-policy estimators on simulated logs whose true value is known."""

from __future__ import annotations

import numpy as np
import pytest

from learner.estimators import (
    effective_sample_size,
    estimate_all,
    paired_difference,
    snips,
    weights,
)

K = 6  # answers per prompt


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


class World:
    """Prompts x, K possible answers each; q(x, a) is the mean reward of answer a to x.
    The logging policy μ and the target π are softmaxes of per-answer scores."""

    def __init__(self, shift: float = 1.0, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.prompts = 50
        self.q = rng.uniform(-0.8, 0.8, size=(self.prompts, K))
        scores = rng.normal(size=(self.prompts, K))
        self.mu = softmax(scores)
        self.pi = softmax(scores + shift * self.q * 3)  # leans towards better answers
        self.truth = float(np.mean(np.sum(self.pi * self.q, axis=1)))

    def log(self, n: int, rng):
        x = rng.integers(0, self.prompts, size=n)
        a = np.array([rng.choice(K, p=self.mu[i]) for i in x])
        r = self.q[x, a] + rng.uniform(-0.2, 0.2, size=n)  # in [-1, 1], mean q
        return x, a, r

    def weights(self, x, a):
        return weights(np.log(self.pi[x, a]), np.log(self.mu[x, a]))


def test_ips_and_snips_are_unbiased_and_their_intervals_cover_the_truth():
    world = World()
    rng = np.random.default_rng(1)
    runs, covered = [], {"ips": 0, "snips": 0}
    for seed in range(150):
        x, a, r = world.log(400, rng)
        estimates = estimate_all(world.weights(x, a), r, resamples=300, seed=seed)
        runs.append([estimates["ips"].value, estimates["snips"].value])
        for name in covered:
            covered[name] += estimates[name].low <= world.truth <= estimates[name].high
    runs = np.array(runs)
    se = runs.std(0) / np.sqrt(len(runs))
    # the average over independent logs lands on the true value, within 3 standard errors
    assert abs(runs[:, 0].mean() - world.truth) < 3 * se[0] + 1e-3
    assert abs(runs[:, 1].mean() - world.truth) < 3 * se[1] + 0.01  # SNIPS: O(1/n) bias
    # a 95 % interval covers the truth in about 95 % of the logs (binomial slack)
    for name, k in covered.items():
        assert 0.88 <= k / 150 <= 0.995, (name, k)


def test_doubly_robust_is_unbiased_with_a_wrong_reward_model_and_tighter_with_a_good_one():
    world = World()
    rng = np.random.default_rng(2)
    wrong, good, ips = [], [], []
    for seed in range(100):
        x, a, r = world.log(400, rng)
        w = world.weights(x, a)
        policy_value = np.sum(world.pi[x] * world.q[x], axis=1)  # E_π q(x, ·)
        good.append(estimate_all(w, r, world.q[x, a], policy_value, resamples=10, seed=seed))
        zeros = np.zeros_like(r) + 0.5  # a reward model that is just wrong
        wrong.append(estimate_all(w, r, zeros, zeros, resamples=10, seed=seed))
        ips.append(good[-1]["ips"].value)
    good_dr = np.array([e["dr"].value for e in good])
    wrong_dr = np.array([e["dr"].value for e in wrong])
    assert abs(wrong_dr.mean() - world.truth) < 3 * wrong_dr.std() / 10 + 1e-3
    assert abs(good_dr.mean() - world.truth) < 3 * good_dr.std() / 10 + 1e-3
    assert good_dr.std() < 0.5 * np.std(ips)


def test_effective_sample_size_collapses_as_the_candidate_moves_away():
    rng = np.random.default_rng(3)
    n = 500
    ess = []
    for shift in (0.0, 1.0, 3.0, 10.0):
        world = World(shift=shift)
        x, a, _ = world.log(n, rng)
        ess.append(effective_sample_size(world.weights(x, a)))
    assert ess[0] == pytest.approx(n)  # π = μ: every answer counts fully
    assert ess[0] > ess[1] > ess[2] > ess[3]
    assert ess[3] < 0.2 * n  # nearly deterministic π: a few answers carry the estimate


def test_token_mean_weights_do_not_collapse_over_long_answers_and_keep_the_order():
    rng = np.random.default_rng(5)
    n, length = 400, 64
    r = rng.choice([-1.0, 1.0], size=n)  # liked or disliked
    behaviour = rng.normal(-2.0, 0.5, size=(n, length))  # log μ of each token

    def candidate(lean: float) -> np.ndarray:
        """log π per token: `lean` higher on liked answers' tokens, lower on disliked."""
        noise = np.random.default_rng(6).normal(0, 0.3, size=(n, length))
        return behaviour + lean * r[:, None] + noise

    tokens = np.full(n, length)
    sequence = weights(candidate(0.1).sum(1), behaviour.sum(1))
    token = weights(candidate(0.1).sum(1), behaviour.sum(1), tokens)
    assert effective_sample_size(sequence) < 0.05 * n  # 64 small ratios multiply up
    assert effective_sample_size(token) > 0.8 * n
    scores = [
        snips(weights(candidate(lean).sum(1), behaviour.sum(1), tokens), r)
        for lean in (-0.1, 0.0, 0.1, 0.2)
    ]
    assert scores == sorted(scores) and scores[0] < 0 < scores[-1]


def test_a_paired_difference_is_tighter_than_either_estimate_and_sees_a_worse_policy():
    world = World()
    x, a, r = world.log(300, np.random.default_rng(4))
    w = world.weights(x, a)
    assert paired_difference(w, w, r) == (0.0, 0.0)  # the same policy: exactly no difference
    worse = World(shift=0.7)  # a little less keen on the better answers than π
    w_worse = worse.weights(x, a)
    diff, low = paired_difference(w_worse, w, r, "snips", confidence=0.9)
    assert low < diff < 0
    assert diff == pytest.approx(worse.truth - world.truth, abs=0.02)
    own = estimate_all(w_worse, r, level=0.8)["snips"]  # its own 90 % one-sided bound
    assert diff - low < 0.5 * (own.value - own.low)  # the paired bound is much narrower


def test_an_answer_the_candidate_cannot_produce_weighs_nothing_and_estimates_stay_finite():
    """A logged token outside the candidate's nucleus: log π = −inf. Its weight is 0 (to
    the cap e^−50), the others are untouched, and no estimate becomes NaN."""
    target = np.array([-np.inf, -3.0, -2.0, -2.5])
    behaviour = np.array([-2.0, -3.0, -2.0, -2.5])
    r = np.array([1.0, -1.0, 1.0, -1.0])
    for w in (weights(target, behaviour), weights(target, behaviour, np.full(4, 8))):
        assert w[0] < 1e-20 and w[1:] == pytest.approx(np.ones(3))
        assert effective_sample_size(w) == pytest.approx(3.0)
        estimates = estimate_all(w, r, resamples=50)
        assert all(np.isfinite([e.value, e.low, e.high]).all() for e in estimates.values())
        assert estimates["snips"].value == pytest.approx(np.mean(r[1:]))


def test_estimates_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="weights and rewards"):
        estimate_all(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="level"):
        estimate_all(np.ones(3), np.ones(3), level=1.5)
