"""Server configuration: one dataclass, parsed once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kaizen.config import option
from kaizen.modeling import DEFAULT_MODEL_DIR, DTYPE_HELP


@dataclass(frozen=True)
class ServeConfig:
    model: Path = option(DEFAULT_MODEL_DIR, "base model checkpoint directory")
    buffer: str = option("sqlite:///kaizen-data/buffer.db", "replay buffer URL")
    registry: Path = option(Path("kaizen-data/registry"), "weight registry directory")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for all interfaces)")
    port: int = option(50051, "gRPC port; 0 picks a free one")
    metrics_port: int = option(9400, "Prometheus /metrics HTTP port; 0 picks a free one")
    metrics_host: str = option(
        "127.0.0.1",
        "address /metrics listens on; keep it off the public network (e.g. the pod's own "
        "address for a Prometheus in the cluster)",
    )
    http_port: int = option(
        -1,
        "OpenAI-compatible HTTP port (/v1/chat/completions, /v1/models, /v1/feedback), beside "
        "gRPC with the same credentials; 0 picks a free one, -1 none",
    )
    http_host: str = option(
        "127.0.0.1", "address the HTTP port listens on (0.0.0.0 for all interfaces)"
    )
    auth_keys: Path | None = option(
        None, "API keys file (`kaizen auth key create --keys FILE`); re-read when it changes"
    )
    jwt_secret_file: Path | None = option(
        None,
        "file with the HS256 secret user tokens are signed with (or the environment "
        "variable KAIZEN_JWT_SECRET)",
    )
    insecure_no_auth: bool = option(
        False, "serve without authentication: anyone who reaches the port may do anything"
    )
    tls_cert: Path | None = option(None, "PEM certificate chain: serve gRPC over TLS")
    tls_key: Path | None = option(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = option(
        None, "PEM CA bundle: require client certificates signed by it (mutual TLS)"
    )
    device: str = option("auto", "torch device: auto, cpu, cuda, cuda:1 …")
    dtype: str = option(
        "auto",
        DTYPE_HELP,
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    max_batch: int = option(16, "requests decoded together in one batch at most")
    prefill_chunk: int = option(
        128,
        "prompt tokens one prefill forward computes at most (rows x padded width): a longer "
        "prompt is prefilled over several steps while the running answers go on",
    )
    max_queue: int = option(256, "requests waiting for a batch at most; beyond, RESOURCE_EXHAUSTED")
    max_queue_wait_s: float = option(
        30.0, "longest a request may wait for a batch slot; beyond, DEADLINE_EXCEEDED"
    )
    max_new_tokens_cap: int = option(512, "largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = option(128, "max_new_tokens when a request sets no sampling")
    default_temperature: float = option(0.7, "temperature when a request sets no sampling")
    poll_registry_s: float = option(0.25, "how often the registry is checked for a new version")
    workers: int = option(32, "gRPC handler threads (concurrent RPCs in flight)")
    canary_share: float = option(
        0.1, "share of users (by user id hash) a new version serves first; 0 = no canary"
    )
    canary_max_share: float = option(
        0.5, "the ramp doubles the canary's share up to this (≤ --canary-share: no ramp)"
    )
    canary_ramp_every_s: float = option(
        120.0, "seconds between two ramp steps, taken while the canary does not look worse"
    )
    canary_alpha: float = option(
        0.05,
        "the canary test's false-promotion rate (a worse version promoted); also its "
        "false-rollback rate (one not worse rolled back)",
    )
    canary_margin: float = option(
        0.02, "promote a canary not worse than the serving version by more than this reward"
    )
    canary_unit: str = option(
        "user",
        "the canary test's observation: a user's mean reward (betting confidence sequence), "
        "or an answer's or each event's (mSPRT, assumes them independent)",
        ("user", "answer", "event"),
    )
    canary_user_answers: int = option(
        5, "a user's observation is the mean reward of their first this many rated answers…"
    )
    canary_user_settle_s: float = option(
        60.0, "…or of those rated within this many seconds of their first"
    )
    canary_min_feedback: int = option(
        10,
        "users (or answers, or events: --canary-unit) per arm with rewarded feedback "
        "before a decision",
    )
    canary_max_feedback: int = option(
        4000, "canary feedback events after which an undecided canary is rolled back"
    )
    canary_window_s: float = option(
        7200.0, "seconds after which an undecided canary is rolled back"
    )
    canary_supersede_after_s: float = option(
        600.0,
        "an undecided canary this old gives way to a newer published version (rolled back "
        "undecided; the newer one is canaried); 0 = never",
    )
    rollout_lease_s: float = option(
        15.0,
        "replicas sharing a buffer elect one rollout authority (it decides canaries) with a "
        "lease this long, renewed every third of it; when it dies, another replica takes "
        "over after at most this long",
    )
    rewards: Path | None = option(
        None, "reward configuration (TOML) for the canary test; default: the shipped one"
    )
    guard_evals: str = option(
        "default",
        "probes with rules a canary must pass before the test may promote it (TOML, see "
        "kaizen/guard.py): a file, default (the shipped kaizen/data/guard_evals.toml) or none",
    )
    user_requests_per_min: float = option(60.0, "chat requests a minute per end user")
    key_requests_per_min: float = option(6000.0, "chat requests a minute per API key")
    user_feedback_per_min: float = option(120.0, "feedback events a minute per end user")
    key_feedback_per_min: float = option(12000.0, "feedback events a minute per API key")
    max_feedback_text_chars: int = option(
        2000, "longest comment or correction, in characters (about one long answer)"
    )
    drain_timeout_s: float = option(
        120.0,
        "on SIGTERM, how long answers in flight may take to finish (a 512-token answer "
        "under load takes about a minute here)",
    )
    stuck_after_s: float = option(
        60.0, "health turns NOT_SERVING when the decode loop has not moved for this long"
    )
    retention_days: float = option(
        0.0, "delete answers older than this many days, and their feedback (0 = keep all)"
    )
    max_feedback_stream_bytes: int = option(
        1 << 20, "bytes of comment and correction text one StreamFeedback call may carry"
    )

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca: needs --tls-cert and --tls-key (mutual TLS)")
        if not 0 <= self.canary_share < 1:
            raise ValueError(f"--canary-share: must be in [0, 1), got {self.canary_share}")
        if not 0 < self.canary_alpha < 1:
            raise ValueError(f"--canary-alpha: must be in (0, 1), got {self.canary_alpha}")
        if not 0 <= self.canary_max_share < 1:
            raise ValueError(f"--canary-max-share: must be in [0, 1), got {self.canary_max_share}")
        if self.canary_supersede_after_s < 0:
            raise ValueError(
                f"--canary-supersede-after-s: must be ≥ 0, got {self.canary_supersede_after_s}"
            )
        if self.rollout_lease_s < 3 * self.poll_registry_s:
            raise ValueError(
                f"--rollout-lease-s: must be at least 3 × --poll-registry-s "
                f"({3 * self.poll_registry_s:g} s), got {self.rollout_lease_s:g}: it is renewed "
                "at every third of it, at the registry polls"
            )
        if self.canary_ramp_every_s <= 0 or self.canary_user_settle_s <= 0:
            raise ValueError("--canary-ramp-every-s, --canary-user-settle-s: must be positive")
        if self.canary_user_answers < 1:
            raise ValueError(
                f"--canary-user-answers: must be at least 1, got {self.canary_user_answers}"
            )
        if self.canary_margin < 0:
            raise ValueError(f"--canary-margin: must be 0 or more, got {self.canary_margin}")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(
                f"--http-port: -1 (none), 0 (any free one) or a port, got {self.http_port}"
            )
        if self.http_port >= 0 and not self.http_host:
            raise ValueError("--http-host: an address to listen on, e.g. 127.0.0.1")
        self.rate_limits()  # each limit positive
        if self.retention_days < 0:
            raise ValueError(f"--retention-days: 0 or more, got {self.retention_days}")
        if self.max_feedback_text_chars < 1 or self.max_feedback_stream_bytes < 1:
            raise ValueError("--max-feedback-text-chars, --max-feedback-stream-bytes: positive")
        if self.canary_min_feedback < 2:
            raise ValueError(
                f"--canary-min-feedback: must be at least 2, got {self.canary_min_feedback}"
            )
        if self.prefill_chunk < 1:
            raise ValueError(f"--prefill-chunk: must be at least 1, got {self.prefill_chunk}")

    def rate_limits(self):
        from server.limits import RateLimits

        return RateLimits(
            user_requests_per_min=self.user_requests_per_min,
            key_requests_per_min=self.key_requests_per_min,
            user_feedback_per_min=self.user_feedback_per_min,
            key_feedback_per_min=self.key_feedback_per_min,
        )

    def canary_policy(self):
        from server.canary import CanaryPolicy

        return CanaryPolicy(
            share=self.canary_share,
            max_share=max(self.canary_share, self.canary_max_share),
            ramp_every_s=self.canary_ramp_every_s,
            alpha=self.canary_alpha,
            margin=self.canary_margin,
            unit=self.canary_unit,
            user_answers=self.canary_user_answers,
            user_settle_s=self.canary_user_settle_s,
            min_feedback=self.canary_min_feedback,
            max_feedback=self.canary_max_feedback,
            window_s=self.canary_window_s,
            supersede_after_s=self.canary_supersede_after_s,
        )
