"""Off-policy estimators: what a candidate policy would have earned on logged traffic.

Each logged answer i was drawn by the behaviour policy μ (the version that served it),
got a reward r_i, and has an importance weight w_i = π(a_i | x_i) / μ(a_i | x_i) under
the candidate π. With a direct method (a reward model) r̂, dm_logged_i = r̂(x_i, a_i)
and dm_policy_i = E_{a∼π(·|x_i)} r̂(x_i, a) (estimated from an answer the candidate
samples itself):

- IPS: mean(w · r). Unbiased when μ > 0 wherever π > 0; its variance grows with the
  spread of the weights.
- SNIPS: Σ w·r / Σ w. Divides by the weights' own sum instead of n: a little bias, much
  less variance, and it stays within the rewards' range.
- DR (doubly robust): mean(dm_policy + w · (r − dm_logged)). The reward model's guess,
  corrected by importance-weighted residuals: unbiased if either the weights or the
  reward model are right, and low-variance when the reward model is good.
- DM (direct method): mean(dm_policy), the reward model's guess alone. No weights, so
  no variance from them, but every error of the reward model is a bias.

The effective sample size (Σw)² / Σw² says how many logged answers the estimate is
really worth: it is n when π = μ and collapses towards 1 as π moves away from μ.
Confidence intervals are percentile bootstrap over the logged answers.

Pure numpy, no model: `learner.replay` computes the weights and rewards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ESTIMATORS = ("ips", "snips", "dr", "dm")


@dataclass(frozen=True)
class Estimate:
    name: str
    value: float
    low: float  # bootstrap percentile interval at `level`
    high: float
    level: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def weights(
    target_logp: np.ndarray,
    behaviour_logp: np.ndarray,
    tokens: np.ndarray | None = None,
    max_log: float = 50.0,
):
    """w = π / μ from sequence log-probabilities, the log ratio capped at ±max_log so that
    one absurd answer cannot overflow the sums.

    With `tokens` (each answer's length), the length-normalised ratio
    exp((log π − log μ) / tokens) instead: the geometric mean of the per-token ratios, as
    in GSPO's sequence ratio. It no longer makes IPS unbiased, but it does not collapse
    onto a few answers over long sequences: a low-variance score of which answers π
    favours, for ranking versions rather than for estimating their value."""
    log_w = np.asarray(target_logp, dtype=np.float64) - np.asarray(behaviour_logp)
    if tokens is not None:
        log_w = log_w / np.maximum(np.asarray(tokens, dtype=np.float64), 1)
    return np.exp(np.clip(log_w, -max_log, max_log))


def ips(w: np.ndarray, r: np.ndarray) -> float:
    return float(np.mean(w * r))


def snips(w: np.ndarray, r: np.ndarray) -> float:
    total = float(np.sum(w))
    return float(np.sum(w * r) / total) if total > 0 else float("nan")


def dr(w: np.ndarray, r: np.ndarray, dm_logged: np.ndarray, dm_policy: np.ndarray) -> float:
    return float(np.mean(dm_policy + w * (r - dm_logged)))


def effective_sample_size(w: np.ndarray) -> float:
    w = np.asarray(w, dtype=np.float64)
    square = float(np.sum(w * w))
    return float(np.sum(w)) ** 2 / square if square > 0 else 0.0


def _point(name: str, w, r, dm_logged, dm_policy) -> float:
    if name == "ips":
        return ips(w, r)
    if name == "snips":
        return snips(w, r)
    if name == "dr":
        return dr(w, r, dm_logged, dm_policy)
    if name == "dm":
        return float(np.mean(dm_policy))
    raise ValueError(f"estimator: {name!r} is not one of {', '.join(ESTIMATORS)}")


def estimate_all(
    w: np.ndarray,
    r: np.ndarray,
    dm_logged: np.ndarray | None = None,
    dm_policy: np.ndarray | None = None,
    level: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Estimate]:
    """IPS, SNIPS and (when a direct method is given) DR and DM, with bootstrap intervals.

    One set of bootstrap resamples serves every estimator, so their intervals are
    comparable; with fewer than 2 logged answers the interval is the point itself.
    """
    w = np.asarray(w, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    if w.shape != r.shape or w.ndim != 1:
        raise ValueError(
            f"weights and rewards: need two equal 1-d arrays, got {w.shape}, {r.shape}"
        )
    if not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    names = ["ips", "snips"]
    if dm_logged is not None and dm_policy is not None:
        dm_logged = np.asarray(dm_logged, dtype=np.float64)
        dm_policy = np.asarray(dm_policy, dtype=np.float64)
        names += ["dr", "dm"]
    n = len(w)
    if n == 0:
        nan = float("nan")
        return {k: Estimate(k, nan, nan, nan, level) for k in names}
    points = {k: _point(k, w, r, dm_logged, dm_policy) for k in names}
    if n < 2:
        return {k: Estimate(k, v, v, v, level) for k, v in points.items()}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    wb, rb = w[idx], r[idx]
    draws = {
        "ips": np.mean(wb * rb, axis=1),
        "snips": np.sum(wb * rb, axis=1) / np.maximum(np.sum(wb, axis=1), 1e-300),
    }
    if "dr" in names:
        draws["dr"] = np.mean(dm_policy[idx] + wb * (rb - dm_logged[idx]), axis=1)
        draws["dm"] = np.mean(dm_policy[idx], axis=1)
    tail = (1 - level) / 2 * 100
    out = {}
    for k in names:
        low, high = np.percentile(draws[k], [tail, 100 - tail])
        out[k] = Estimate(k, points[k], float(low), float(high), level)
    return out


def paired_difference(
    w_candidate: np.ndarray,
    w_base: np.ndarray,
    r: np.ndarray,
    name: str = "snips",
    confidence: float = 0.9,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """(estimate of V(candidate) − V(base), its one-sided lower bound at `confidence`).

    Both policies are replayed on the same logged answers, so their estimates move
    together; the bootstrap resamples the answers once for both, and the interval of the
    difference is much narrower than either estimate's own."""
    w_c, w_b, r = (np.asarray(x, dtype=np.float64) for x in (w_candidate, w_base, r))
    diff = _point(name, w_c, r, None, None) - _point(name, w_b, r, None, None)
    if len(r) < 2:
        return diff, diff
    idx = np.random.default_rng(seed).integers(0, len(r), size=(resamples, len(r)))
    rb = r[idx]
    if name == "ips":
        draws = np.mean((w_c[idx] - w_b[idx]) * rb, axis=1)
    else:
        draws = np.sum(w_c[idx] * rb, axis=1) / np.maximum(np.sum(w_c[idx], axis=1), 1e-300)
        draws -= np.sum(w_b[idx] * rb, axis=1) / np.maximum(np.sum(w_b[idx], axis=1), 1e-300)
    return diff, float(np.percentile(draws, (1 - confidence) * 100))
