"""Learner configuration: one dataclass, parsed once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kaizen.config import option
from kaizen.modeling import DEFAULT_MODEL_DIR

OBJECTIVES = ("reinforce", "kto", "dpo", "sft", "joint")
BASELINES = ("running", "per_prompt")


@dataclass(frozen=True)
class LearnerConfig:
    model: Path = option(DEFAULT_MODEL_DIR, "base model checkpoint directory (frozen reference)")
    buffer: str = option("sqlite:///kaizen-data/buffer.db", "replay buffer URL")
    registry: Path = option(Path("kaizen-data/registry"), "weight registry directory")
    objective: str = option(
        "sft", "what to optimise: reinforce, kto, dpo, sft or joint (see README)", OBJECTIVES
    )
    publish_every: int = option(24, "publish a new version after this many training examples")
    batch_size: int = option(8, "training examples per gradient step (a pair counts once)")
    lr: float = option(3e-4, "AdamW learning rate for the LoRA adapter (and feedback head)")
    kl_coef: float = option(0.1, "β: weight of the per-token KL to the frozen base model")
    baseline: str = option(
        "running", "reinforce's baseline: running (mean of all) or per_prompt", BASELINES
    )
    baseline_momentum: float = option(0.9, "running-mean baseline: b ← m·b + (1−m)·reward")
    clip_eps: float = option(
        0.2, "ε: importance ratios against the logged behaviour are clipped to [1−ε, 1+ε]"
    )
    kto_beta: float = option(0.1, "KTO's β (sharpness of the implied reward)")
    dpo_beta: float = option(0.1, "DPO's β (sharpness of the implied reward)")
    feedback_coef: float = option(1.0, "λ in joint's L = L_M + λ·L_F (feedback head loss)")
    sft_min_reward: float = option(
        0.5, "an answer whose reward is at least this is also a supervised target"
    )
    max_probe_kl: float = option(
        0.07, "guard: never publish a version whose mean KL to the base on the probe set is above"
    )
    probe_prompts: int = option(8, "held-out prompts in the KL probe set (plus general text)")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha (scale = alpha / r)")
    lora_targets: str = option("q_proj,v_proj", "comma-separated module names that get LoRA")
    device: str = option("auto", "torch device: auto, cpu, cuda …")
    batch_wait_s: float = option(
        2.0, "train on a partial batch once its first sample waited this long"
    )
    poll_s: float = option(0.5, "how often an idle learner looks for new feedback")
    metrics_port: int = option(9401, "Prometheus /metrics HTTP port; 0 picks one, -1 none")
    max_steps: int = option(0, "stop after this many gradient steps (0 = run until stopped)")
    seed: int = option(0, "random seed for the adapter's initialisation")
    rewards: Path | None = option(
        None, "reward configuration (TOML); default: the shipped learner/rewards.toml"
    )
