"""The objectives, as pure tensor code over one forward pass of the policy and the reference.

Every training example is an answer to a prompt (prompt + response tokens, right-padded
to T; `mask` is 1 on response tokens). One forward pass gives, per answer b:

    logp_b   = Σ_t log π_θ(y_t | y_<t)                  policy, temperature 1
    ref_b    = Σ_t log π_ref(y_t | y_<t)                frozen base model
    kl_b     = mean_t KL(π_θ(·|y_<t) ‖ π_ref(·|y_<t))   exact, over the vocabulary
    s_b      = exp(mean_t [log q_θ(y_t) − log μ(y_t)])  importance ratio against the
               logged behaviour μ, length-normalised; 1 where nobody sampled the answer
               (a user's correction) or it was greedy. The data was sampled by older
               versions: s corrects for that.
    w_b      = clip(s_b, 1 − ε, 1 + ε), detached        its clipped weight

q_θ is the policy's *processed* distribution, the one the server samples from and logs
log μ under (`kaizen.sampling`): softmax(logits / T), cut to the nucleus of mass top_p
and renormalised, with the answer's own T and top_p. Scoring the full tempered softmax
instead gives every kept token less mass than the nucleus did, so for top_p < 1 the
ratio would be biased low for every answer, however on-policy.

A response token outside the policy's own nucleus has q_θ = 0: the current policy
cannot produce that answer, and its true importance weight is 0. Its s_b is set to
e^−20 (the floor of the log ratio), so its weight is the lower clip 1 − ε, as for any
answer the policy has moved far from, and reinforce's clipped surrogate gives it no
gradient. We keep the example at 1 − ε rather than drop it (weight 0): q jumps to 0
when a token leaves the nucleus, which tiny changes of the weights can cause, and the
clip already bounds every other answer's weight to [1 − ε, 1 + ε]; dropping would let
this one jump all the way to 0. For sft, kto and dpo the weight is a staleness
correction, not an estimate, and an answer a user liked (or wrote) is still evidence of
what users want after the policy's nucleus has moved. No −inf reaches the loss: the
token's log q is replaced before the mean and the ratio set to the floor.

and every loss adds β · mean_b kl_b, the KL to the reference:

    reinforce  −mean_b min(s_b·A_b, clip(s_b, 1−ε, 1+ε)·A_b),  A_b = r_b − baseline
               (the PPO clipped surrogate: a policy gradient with a baseline)
    kto        mean_b w_b · (1 − σ(β_k·(ρ_b − z)))   desirable (r > 0, and corrections)
               mean_b w_b · (1 − σ(β_k·(z − ρ_b)))   undesirable (r < 0)
               ρ_b = logp_b − ref_b, z = max(0, mean ρ) detached (KTO's reference point)
    dpo        −mean_p w_c·w_r · log σ(β_d·[(logp_c − ref_c) − (logp_r − ref_r)])
    sft        mean_b w_b · (−logp_b / n_b)           corrections and highly rated answers
    joint      L_M + λ·L_F: L_M is sft's loss on the targets, L_F the squared error of a
               feedback head that predicts each answer's reward from the policy's last
               hidden state (mean over the answer's tokens); both train the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kaizen.sampling import token_logprobs
from learner.config import OBJECTIVES  # noqa: F401 - the names, next to their losses

MAX_LOG_RATIO = 20.0  # |mean_t log(q/μ)| is capped here: s_b stays in [e^−20, e^20]


def response_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t] | ids[<t]) for t ≥ 1; position 0 gets 0. (B, T, V), (B, T) → (B, T)"""
    logp = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
    picked = logp.gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    return F.pad(picked, (1, 0))  # (B, T)


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(π_θ ‖ π_ref) of the next-token distributions that predict each token. → (B, T)"""
    logp = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
    ref_logp = ref_logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
    kl = (logp.exp() * (logp - ref_logp)).sum(-1)  # (B, T-1)
    return F.pad(kl, (1, 0))  # (B, T)


def processed_response_logprobs(
    logits: torch.Tensor,  # (B, T, V)
    ids: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T) 1 on the tokens to score
    temperature: torch.Tensor,  # (B,) > 0 on the rows to score
    top_p: torch.Tensor,  # (B,)
) -> torch.Tensor:
    """log q(ids[t] | ids[<t]) under each row's processed distribution (its temperature,
    then its nucleus), on the masked tokens of rows with temperature > 0; 0 elsewhere,
    −inf on a token outside the row's nucleus. → (B, T)

    Only those tokens' logits are taken out of the (B, T, V) tensor: prompts, padding
    and unsampled rows cost nothing."""
    B, T = ids.shape
    scored = mask[:, 1:].bool() & (temperature > 0)[:, None]  # (B, T-1) predicts ids[:, 1:]
    logq = token_logprobs(
        logits[:, :-1][scored],  # (N, V)
        ids[:, 1:][scored],
        temperature[:, None].expand(B, T - 1)[scored],
        top_p[:, None].expand(B, T - 1)[scored],
    )
    out = torch.zeros((B, T - 1), dtype=logq.dtype, device=logq.device)
    return F.pad(out.masked_scatter(scored, logq), (1, 0))  # (B, T)


@dataclass(frozen=True)
class Forward:
    """What one forward pass tells about B answers; every field is per answer, (B,)."""

    logp: torch.Tensor  # Σ_t log π_θ(y_t), differentiable
    ref_logp: torch.Tensor  # Σ_t log π_ref(y_t)
    tokens: torch.Tensor  # n_b, response tokens
    kl: torch.Tensor  # mean_t KL to the reference, differentiable
    ratio: torch.Tensor  # s_b, differentiable
    hidden: torch.Tensor | None = None  # (B, H) mean last hidden state over the response


def forward_terms(
    logits: torch.Tensor,  # (B, T, V) policy
    ref_logits: torch.Tensor,  # (B, T, V) reference, no grad
    ids: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T) 1 on response tokens
    behaviour: torch.Tensor,  # (B, T) logged log μ on response tokens, 0 elsewhere
    temperature: torch.Tensor,  # (B,) sampling temperature; 0 = no ratio (greedy, corrections)
    top_p: torch.Tensor | None = None,  # (B,) nucleus mass it was sampled with; None = 1
    hidden: torch.Tensor | None = None,  # (B, T, H) policy's last hidden states
) -> Forward:
    mask = mask.float()
    n = mask.sum(-1).clamp(min=1)
    logp_tok = response_logprobs(logits, ids) * mask
    ref_tok = response_logprobs(ref_logits, ids) * mask
    kl = (token_kl(logits, ref_logits) * mask).sum(-1) / n
    sampled = temperature > 0
    if top_p is None:
        top_p = torch.ones_like(temperature)
    logq = processed_response_logprobs(logits, ids, mask, temperature, top_p)  # (B, T)
    outside = torch.isinf(logq)  # a token the policy's nucleus no longer keeps: q = 0
    logq = torch.where(outside, torch.zeros_like(logq), logq)
    log_ratio = ((logq - behaviour) * mask).sum(-1) / n
    floor = torch.full_like(log_ratio, -MAX_LOG_RATIO)
    log_ratio = torch.where(outside.any(-1), floor, log_ratio).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.where(sampled, log_ratio.exp(), torch.ones_like(log_ratio))
    pooled = None
    if hidden is not None:
        pooled = (hidden.float() * mask[..., None]).sum(1) / n[:, None]
    return Forward(logp_tok.sum(-1), ref_tok.sum(-1), n, kl, ratio, pooled)


def clipped_weight(ratio: torch.Tensor, eps: float) -> torch.Tensor:
    return ratio.detach().clamp(1 - eps, 1 + eps)


def reinforce_loss(f: Forward, advantages: torch.Tensor, eps: float) -> torch.Tensor:
    a = advantages.detach()
    surrogate = torch.minimum(f.ratio * a, f.ratio.clamp(1 - eps, 1 + eps) * a)
    return -surrogate.mean()


def kto_loss(f: Forward, desirable: torch.Tensor, eps: float, beta: float) -> torch.Tensor:
    rho = f.logp - f.ref_logp
    z = rho.detach().mean().clamp(min=0)
    value = torch.where(
        desirable, 1 - torch.sigmoid(beta * (rho - z)), 1 - torch.sigmoid(beta * (z - rho))
    )
    return (clipped_weight(f.ratio, eps) * value).mean()


def dpo_loss(chosen: Forward, rejected: Forward, eps: float, beta: float) -> torch.Tensor:
    margin = (chosen.logp - chosen.ref_logp) - (rejected.logp - rejected.ref_logp)
    weight = clipped_weight(chosen.ratio, eps) * clipped_weight(rejected.ratio, eps)
    return -(weight * F.logsigmoid(beta * margin)).mean()


def sft_loss(f: Forward, eps: float) -> torch.Tensor:
    return (clipped_weight(f.ratio, eps) * (-f.logp / f.tokens)).mean()


def feedback_loss(predicted: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """L_F: the feedback head's squared error on the rewards users gave."""
    return F.mse_loss(predicted.float(), rewards.float())


class FeedbackHead(torch.nn.Module):
    """Predicts the reward users give an answer from the policy's pooled hidden state."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(pooled.float()))[..., 0]
