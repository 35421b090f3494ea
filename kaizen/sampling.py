"""The processed distribution a sampled token is drawn from: temperature, then nucleus.

The server samples each token from q = nucleus_p(softmax(logits / T)): the tempered
distribution restricted to the smallest prefix of its tokens, sorted by probability,
whose mass reaches top_p (the most likely token always kept), renormalised. It logs
log q(token). Whoever compares a policy with that log (the learner's importance ratio,
the replay gate) must score the same q, or the ratio is biased for top_p < 1: the
nucleus puts more mass on the tokens it keeps than the full softmax does.

One definition serves both sides (server/ and learner/ may import kaizen/):
`processed_logprobs` gives the whole distribution, for the sampler; `token_logprobs`
gives log q of given tokens only, for (B, T, V) training logits. Rows with
temperature ≤ 0 are greedy: they get the untruncated softmax at temperature 1 (the
sampler takes the argmax and logs 0). The nucleus is a selection made without gradient;
log q is differentiable w.r.t. the logits of the tokens it keeps.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 24  # rows × V per sort: bounds the sort's transient copies (~64 MB each)


def _per_row(x: torch.Tensor | float, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """`x` (a float, or a tensor whose shape is a prefix of `shape`) expanded to `shape`."""
    x = torch.as_tensor(x, dtype=torch.float32, device=device)
    while x.dim() < len(shape):
        x = x[..., None]
    return x.expand(shape)


@torch.no_grad()
def nucleus_keep(logp: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which tokens each row's nucleus keeps. (N, V) tempered log-probs, (N,) → (N, V) bool.

    The same operations, in the same order, as the sampler's cut: a descending sort
    (whose order decides among tied tokens at the boundary), the mass of the tokens
    sorted before each, kept while that mass is below top_p. Rows are sorted in chunks
    so the sort's copies stay small whatever N is."""
    keep = torch.empty(logp.shape, dtype=torch.bool, device=logp.device)
    step = max(1, CHUNK_ELEMENTS // max(1, logp.shape[-1]))
    for start in range(0, logp.shape[0], step):
        rows = slice(start, start + step)
        sorted_logp, order = logp[rows].sort(dim=-1, descending=True)
        probs = sorted_logp.exp_()
        mass_before = probs.cumsum(-1).sub_(probs)
        keep[rows] = torch.empty_like(keep[rows]).scatter_(
            -1, order, mass_before < top_p[rows, None]
        )
    return keep


def processed_logprobs(
    logits: torch.Tensor,  # (..., V)
    temperature: torch.Tensor | float,  # per row: a shape that prefixes logits.shape[:-1]
    top_p: torch.Tensor | float,  # per row, as temperature; ≥ 1 = no nucleus
) -> torch.Tensor:
    """log q over the vocabulary, −inf outside the nucleus. → (..., V)"""
    shape, V = logits.shape[:-1], logits.shape[-1]
    t = _per_row(temperature, shape, logits.device).reshape(-1)
    p = _per_row(top_p, shape, logits.device).reshape(-1)
    sampled = t > 0
    z = logits.float().reshape(-1, V) / torch.where(sampled, t, torch.ones_like(t))[:, None]
    logp = z.log_softmax(-1)  # (N, V)
    rows = (sampled & (p < 1)).nonzero()[:, 0]
    if len(rows):
        kept = logp[rows]
        kept = kept.masked_fill(~nucleus_keep(kept, p[rows]), float("-inf")).log_softmax(-1)
        logp = logp.index_put((rows,), kept)
    return logp.reshape(*shape, V)


def token_logprobs(
    logits: torch.Tensor,  # (..., V)
    tokens: torch.Tensor,  # (...) the token drawn from each row
    temperature: torch.Tensor | float,  # per row: a shape that prefixes logits.shape[:-1]
    top_p: torch.Tensor | float,  # per row, as temperature
) -> torch.Tensor:
    """log q(token) of each row, −inf where the token is outside the row's nucleus. → (...)

    Equal to `processed_logprobs(...).gather(-1, tokens)` without building the
    renormalised distribution: log q(y) = z_y − logsumexp over the kept tokens of z,
    z = logits / T. Only the rows with a nucleus are sorted; with gradient, it holds z
    and one masked copy of the nucleus rows."""
    shape, V = logits.shape[:-1], logits.shape[-1]
    t = _per_row(temperature, shape, logits.device).reshape(-1)
    p = _per_row(top_p, shape, logits.device).reshape(-1)
    y = tokens.reshape(-1, 1)
    sampled = t > 0
    z = logits.float().reshape(-1, V) / torch.where(sampled, t, torch.ones_like(t))[:, None]
    picked = z.gather(-1, y)[:, 0]  # (N,)
    normaliser = torch.logsumexp(z, -1)  # (N,)
    rows = (sampled & (p < 1)).nonzero()[:, 0]
    if len(rows):
        zr = z[rows]  # (n, V)
        keep = nucleus_keep(zr.detach().log_softmax(-1), p[rows])
        inside = keep.gather(-1, y[rows])[:, 0]
        normaliser = normaliser.index_put(
            (rows,), torch.logsumexp(zr.masked_fill(~keep, float("-inf")), -1)
        )
        out = torch.full_like(picked[rows], float("-inf"))
        picked = picked.index_put((rows,), torch.where(inside, picked[rows], out))
    return (picked - normaliser).reshape(shape)
