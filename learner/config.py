"""Learner configuration: one dataclass, parsed once by the CLI."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from kaizen.config import option
from kaizen.modeling import DEFAULT_MODEL_DIR, DTYPE_HELP

OBJECTIVES = ("reinforce", "kto", "dpo", "sft", "joint")
BASELINES = ("running", "per_prompt")
DTYPES = ("auto", "fp32", "bf16")


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
    max_user_share: float = option(
        0.25,
        "influence cap: one end user's examples in one version, as a share of "
        "--publish-every (at least one example; 1 = no cap)",
    )
    max_key_share: float = option(
        1.0,
        "influence cap: one API key's examples in one version, as a share of --publish-every "
        "(1 = no cap: one frontend key often carries every user)",
    )
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
        0.025,
        "guard: never publish a version whose mean per-token KL to the base on the probe "
        "set (general text it never trains on) is above",
    )
    anchor_coef: float = option(
        1.0, "weight of the KL to the base on general anchor text, added to every step's loss"
    )
    gate_holdout: float = option(
        0.1, "gate: share of answers (by response id) never trained on, replayed before publishing"
    )
    gate_window: int = option(128, "gate: the newest held-out rewarded events it replays")
    gate_min_events: int = option(32, "gate: below this many held-out events it does not judge")
    gate_margin: float = option(
        0.1,
        "gate: refuse when the lower bound of (candidate − last version) on the held-out "
        "slice is below minus this",
    )
    gate_confidence: float = option(0.9, "gate: one-sided confidence of the candidate's bound")
    gate_estimator: str = option("snips", "gate: ips or snips", ("ips", "snips"))
    gate_min_ess: float = option(
        16.0,
        "gate: abstains (refuses to publish) when the effective sample size of the held-out "
        "slice's importance weights, candidate's or last version's, is below this (see "
        "README, How kaizen decides)",
    )
    gate_abstain: str = option(
        "defer",
        "gate: what an abstention does: defer (publish it for the servers' canary to test "
        "live when they run one, per rollout/policy.json in the registry; refuse when they "
        "do not) or reject (always refuse)",
        ("defer", "reject"),
    )
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
    metrics_host: str = option(
        "127.0.0.1", "address /metrics listens on (the pod's own address for an in-cluster scrape)"
    )
    max_steps: int = option(0, "stop after this many gradient steps (0 = run until stopped)")
    seed: int = option(0, "random seed for the adapter's initialisation")
    rewards: Path | None = option(
        None, "reward configuration (TOML); default: the shipped kaizen/data/rewards.toml"
    )
    guard_evals: str = option(
        "default",
        "probes with rules every candidate must pass before it is published (TOML, see "
        "kaizen/guard.py): a file, default (the shipped kaizen/data/guard_evals.toml) or none",
    )

    def __post_init__(self) -> None:
        if not 0 <= self.gate_holdout < 1:
            raise ValueError(f"--gate-holdout: must be in [0, 1), got {self.gate_holdout}")
        if not 0 <= self.gate_min_ess <= self.gate_window:
            raise ValueError(
                f"--gate-min-ess: must be in [0, --gate-window {self.gate_window}] (the ESS is "
                f"at most the number of events), got {self.gate_min_ess}"
            )
        if not 0.5 < self.gate_confidence < 1:
            raise ValueError(f"--gate-confidence: must be in (0.5, 1), got {self.gate_confidence}")
        for name in ("max_user_share", "max_key_share"):
            if not 0 < getattr(self, name) <= 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag}: must be in (0, 1], got {getattr(self, name)}")

    def cap(self, share: float) -> int:
        """Examples one user (or key) may give one version under an influence cap."""
        return max(1, math.floor(share * self.publish_every))


@dataclass(frozen=True)
class ReplayEvaluateConfig:
    candidate: str = option(
        "",
        "the version(s) to evaluate: vN, a comma-separated list, or all (v0 and every "
        "version the learner did not reject); several are ranked by --rank-by",
    )
    against: str = option("", "the version to compare with; default: the serving one")
    model: Path = option(DEFAULT_MODEL_DIR, "base model checkpoint directory")
    buffer: str = option("sqlite:///kaizen-data/buffer.db", "replay buffer URL")
    registry: Path = option(Path("kaizen-data/registry"), "weight registry directory")
    limit: int = option(400, "the newest answers with rewarded feedback to replay (0 = all)")
    direct_method: str = option(
        "ridge",
        "doubly robust's reward model: ridge (on the base model's features) or none",
        ("ridge", "none"),
    )
    weights: str = option(
        "sequence",
        "importance weights: sequence (π/μ of the whole answer: unbiased, but collapses "
        "onto a few answers as versions drift apart) or token-mean (the geometric mean "
        "of the per-token ratios: biased, low-variance, for ranking)",
        ("sequence", "token-mean"),
    )
    rank_by: str = option(
        "snips", "the estimate several versions are ranked by", ("ips", "snips", "dr", "dm")
    )
    level: float = option(0.95, "confidence level of the bootstrap intervals")
    resamples: int = option(1000, "bootstrap resamples")
    device: str = option("auto", "torch device: auto, cpu, cuda …")
    dtype: str = option(
        "auto", DTYPE_HELP + " (the server's default, so its own answers weigh ≈ 1)", DTYPES
    )
    rewards: Path | None = option(None, "reward configuration (TOML); default: the shipped one")
    json: bool = option(False, "print the figures as one JSON object instead of a table")
    report: Path | None = option(None, "also draw the estimates and weights to this PNG")

    def __post_init__(self) -> None:
        if not self.candidate:
            raise ValueError("--candidate: required (e.g. --candidate v3)")
        if not 0 < self.level < 1:
            raise ValueError(f"--level: must be in (0, 1), got {self.level}")
        if self.limit < 0 or self.resamples < 1:
            raise ValueError("--limit must be 0 or more and --resamples at least 1")
        if self.rank_by in ("dr", "dm") and self.direct_method == "none":
            raise ValueError(f"--rank-by {self.rank_by}: needs --direct-method ridge")


@dataclass(frozen=True)
class ReplayExportConfig:
    out: Path = option(Path("kaizen-data/export.jsonl"), "file to write")
    format: str = option("jsonl", "jsonl or parquet (parquet needs pyarrow)", ("jsonl", "parquet"))
    buffer: str = option("sqlite:///kaizen-data/buffer.db", "replay buffer URL")
    rewards: Path | None = option(None, "reward configuration (TOML); default: the shipped one")
