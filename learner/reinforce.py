"""REINFORCE with a baseline and a KL penalty to the reference model, as pure tensor code.

Batch layout: B answers, each the tokens of prompt + response, right-padded to T;
`mask` is 1 on response tokens (the positions whose log-probability is trained) and 0
on the prompt and the padding.

    L = −1/B Σ_b (r_b − b̄) · Σ_t mask_bt · log π_θ(y_bt | y_<t)          (policy gradient)
        + β · 1/B Σ_b mean_t KL(π_θ(·|y_<t) ‖ π_ref(·|y_<t))              (stay close to ref)

The advantage (r − b̄) is a constant: the gradient flows only through log π_θ. The KL
is computed exactly over the vocabulary at each response position rather than estimated
from the sampled token, which removes that estimator's variance at the cost of one
softmax over V per position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Terms:
    loss: torch.Tensor  # scalar, differentiable
    pg: torch.Tensor  # policy-gradient part, scalar
    kl: torch.Tensor  # mean per-token KL, scalar


def response_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t] | ids[<t]) for t ≥ 1; position 0 gets 0. (B, T, V), (B, T) → (B, T)"""
    logp = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
    picked = logp.gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    return torch.nn.functional.pad(picked, (1, 0))  # (B, T)


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(π_θ ‖ π_ref) of the next-token distributions that predict each token. → (B, T)"""
    logp = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
    ref_logp = ref_logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
    kl = (logp.exp() * (logp - ref_logp)).sum(-1)  # (B, T-1)
    return torch.nn.functional.pad(kl, (1, 0))  # (B, T)


def reinforce_loss(
    logits: torch.Tensor,  # (B, T, V) policy
    ref_logits: torch.Tensor,  # (B, T, V) reference, no grad
    ids: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T) 1 on response tokens
    advantages: torch.Tensor,  # (B,) reward − baseline
    kl_coef: float,
) -> Terms:
    mask = mask.float()
    logp = response_logprobs(logits, ids) * mask  # (B, T)
    seq_logp = logp.sum(-1)  # (B,)
    pg = -(advantages.detach() * seq_logp).mean()
    kl_per_seq = (token_kl(logits, ref_logits) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    kl = kl_per_seq.mean()
    return Terms(loss=pg + kl_coef * kl, pg=pg.detach(), kl=kl.detach())
