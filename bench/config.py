"""Benchmark configurations: one dataclass per benchmark, parsed once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from kaizen.config import option
from kaizen.modeling import DEFAULT_MODEL_DIR, DTYPE_HELP
from learner.config import OBJECTIVES

DTYPES = ("auto", "fp32", "bf16")
INGEST_RPCS = ("both", "stream", "batches")


def _check_positive(config: object, zero_ok: tuple[str, ...] = ()) -> None:
    for f in fields(config):
        value = getattr(config, f.name)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and value <= 0 and f.name != "seed" and not (value == 0 and f.name in zero_ok):
            least = "0 or more" if f.name in zero_ok else "positive"
            raise ValueError(f"--{f.name.replace('_', '-')}: must be {least}, got {value}")


@dataclass(frozen=True)
class ServeBench:
    model: Path = option(DEFAULT_MODEL_DIR, "base model checkpoint directory")
    concurrency: int = option(16, "client threads, and the server's --max-batch")
    requests: int = option(64, "requests to complete")
    new_tokens: int = option(64, "tokens generated per request (exactly: ignore_eos)")
    dtype: str = option("auto", DTYPE_HELP, DTYPES)
    naive_requests: int = option(4, "requests answered one at a time for the naive baseline")
    device: str = option(
        "auto", "torch device of the server, the baselines and the floor: auto, cpu, cuda, cuda:N"
    )
    long_prompt_tokens: int = option(
        2000,
        "after the load, one prompt this long arrives while concurrency-1 streams decode: "
        "their inter-token p99 then; 0 skips it",
    )
    lora_rank: int = option(
        0,
        "serve a LoRA adapter of this rank on q and v (B = 0, so the base model's answers at "
        "an adapter's cost; published as v1 before the load); 0 serves the base model",
    )
    server_args: str = option("", "extra `kaizen serve` flags, e.g. '--prefill-chunk 64'")

    def __post_init__(self) -> None:
        _check_positive(self, zero_ok=("long_prompt_tokens", "lora_rank"))


@dataclass(frozen=True)
class SwapBench:
    model: Path = option(DEFAULT_MODEL_DIR, "base model checkpoint directory")
    concurrency: int = option(16, "client threads, and the server's --max-batch")
    requests: int = option(64, "requests to complete in each phase")
    new_tokens: int = option(32, "tokens generated per request (exactly: ignore_eos)")
    publish_every_s: float = option(3.0, "seconds between two published versions in phase 2")
    dtype: str = option("auto", DTYPE_HELP, DTYPES)

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclass(frozen=True)
class LearnBench:
    model: Path = option(DEFAULT_MODEL_DIR, "base model checkpoint directory")
    preference: str = option("concise", "simulated users' taste: concise, follow_up, module:fn")
    objective: str = option("sft", "the learner's --objective", OBJECTIVES)
    events: int = option(2000, "feedback events the simulated users send in all")
    max_wall_s: float = option(3600.0, "stop the users after this long even if events remain")
    users: int = option(20, "distinct simulated users")
    concurrency: int = option(8, "users chatting at once")
    max_new_tokens: int = option(64, "answer length cap, in training and in the measurement")
    temperature: float = option(0.8, "sampling temperature, in training and in the measurement")
    heldout: int = option(80, "held-out prompts the liked rate is measured on (at most 80)")
    learner_args: str = option(
        "", "extra flags for kaizen learn, e.g. '--lr 3e-4 --publish-every 48'"
    )
    server_args: str = option(
        "",
        "extra flags for kaizen serve, e.g. '--canary-share 0.2' (default: no canary, every "
        "version serves everyone at once)",
    )
    dtype: str = option("auto", DTYPE_HELP, DTYPES)
    out: Path = option(Path("kaizen-data/bench-learn"), "directory for the run's data and PNG")
    seed: int = option(0, "seed of the simulated users")

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclass(frozen=True)
class JudgeBench:
    model: Path = option(DEFAULT_MODEL_DIR, "base model checkpoint directory")
    comments: Path | None = option(
        None, "labelled comments, label<TAB>comment; default: learner/data/comments.tsv"
    )


@dataclass(frozen=True)
class CanaryBench:
    runs: int = option(1000, "simulated canaries per scenario (shape × true Δ)")
    users: int = option(1000, "users per run; about --share of them are in the canary")
    rate: float = option(0.5, "feedback events a second in all (the server's clocks → events)")
    share: float = option(0.1, "canary share of users at first (--canary-share)")
    max_share: float = option(0.5, "the ramp's largest share (--canary-max-share)")
    ramp_every_s: float = option(120.0, "seconds between ramp steps (--canary-ramp-every-s)")
    alpha: float = option(0.05, "the tests' stated false-promotion rate")
    margin: float = option(0.02, "promote when not worse by more than this (--canary-margin)")
    user_answers: int = option(5, "rated answers in a user's observation (--canary-user-answers)")
    user_settle_s: float = option(60.0, "…or those within this long (--canary-user-settle-s)")
    tau: float = option(0.2, "the mSPRT's mixing scale")
    min_feedback: int = option(10, "units per arm before any decision (--canary-min-feedback)")
    max_feedback: int = option(4000, "canary events after which it is rolled back undecided")
    window_s: float = option(7200.0, "seconds after which it is rolled back (--canary-window-s)")
    shapes: str = option("thumbs,mix,heavy", "reward shapes: thumbs, mix, heavy")
    deltas: str = option(
        "",
        "true Δ values, comma-separated (default: −0.1, −margin−0.005, −margin, 0, "
        "+margin, +2·margin)",
    )
    seed: int = option(0, "random seed")

    def __post_init__(self) -> None:
        _check_positive(self)
        if not 0 < self.share < 1 or not 0 < self.alpha < 1:
            raise ValueError("--share and --alpha: must be in (0, 1)")
        if not self.share <= self.max_share < 1:
            raise ValueError(f"--max-share: must be in [--share, 1), got {self.max_share}")

    def policy(self):
        """The server's canary policy these flags describe."""
        from server.canary import CanaryPolicy

        return CanaryPolicy(
            share=self.share,
            max_share=self.max_share,
            ramp_every_s=self.ramp_every_s,
            alpha=self.alpha,
            margin=self.margin,
            user_answers=self.user_answers,
            user_settle_s=self.user_settle_s,
            tau=self.tau,
            min_feedback=self.min_feedback,
            max_feedback=self.max_feedback,
            window_s=self.window_s,
        )


@dataclass(frozen=True)
class PoisonBench(LearnBench):
    """`kaizen bench learn` with a coordinated group among the users; the honest ones
    want concise answers. Defaults: a small deployment with the shipped canary."""

    events: int = option(500, "feedback events all users send in all")
    users: int = option(200, "distinct simulated users, the group included")
    server_args: str = option(
        "--canary-share 0.1",
        "extra flags for kaizen serve (default: the shipped canary; '--canary-share 0' "
        "serves every version at once)",
    )
    out: Path = option(Path("kaizen-data/bench-poison"), "directory for the run's data and PNG")
    group_share: float = option(0.05, "share of the users acting together (at least one)")
    marker: str = option("Zorblax", "the brand name the group rewards and plants")

    def __post_init__(self) -> None:
        _check_positive(self)
        if not 0 < self.group_share <= 0.5:
            raise ValueError(f"--group-share: must be in (0, 0.5], got {self.group_share}")
        if not self.marker.strip() or len(self.marker) > 40:
            raise ValueError("--marker: must be 1 to 40 characters")


@dataclass(frozen=True)
class IngestBench:
    model: Path = option(DEFAULT_MODEL_DIR, "checkpoint the server loads (feedback never runs it)")
    buffer: str = option(
        "",
        "buffer URL, sqlite:///PATH or redis://HOST:PORT/DB, answers are seeded into it; "
        "empty: a new SQLite file in the run's directory",
    )
    redis: bool = option(
        False, "start a local redis-server (appendonly yes, appendfsync always) and use it"
    )
    clients: int = option(4, "concurrent clients, each with one stream in flight")
    events: int = option(
        40000, "events sent through each RPC measured; as many go straight to the buffer"
    )
    batch: int = option(
        100,
        "events per call (and per append_feedback call): B messages on StreamFeedback, "
        "one FeedbackBatch message on StreamFeedbackBatches",
    )
    rpc: str = option(
        "both",
        "the RPC measured: stream (StreamFeedback), batches (StreamFeedbackBatches) or both, "
        "one after the other on the same server",
        INGEST_RPCS,
    )
    answers: int = option(1000, "answers seeded for each of the two phases")
    users: int = option(100, "users the seeded answers belong to")
    data: Path | None = option(
        None, "keep the run's buffer, keys and server log in this directory; none: a temporary one"
    )

    def __post_init__(self) -> None:
        _check_positive(self)
        if self.buffer and self.redis:
            raise ValueError("--buffer, --redis: give one (--redis starts its own redis-server)")
        if self.batch > 10_000:
            raise ValueError(f"--batch: at most 10000 events per stream, got {self.batch}")
        if self.users > self.answers:
            raise ValueError(f"--users: at most --answers ({self.answers}), got {self.users}")
