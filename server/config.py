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
    device: str = option("auto", "torch device: auto, cpu, cuda, cuda:1 …")
    dtype: str = option(
        "auto",
        DTYPE_HELP,
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    max_batch: int = option(16, "requests decoded together in one batch at most")
    max_queue: int = option(256, "requests waiting for a batch at most; beyond, RESOURCE_EXHAUSTED")
    max_queue_wait_s: float = option(
        30.0, "longest a request may wait for a batch slot; beyond, DEADLINE_EXCEEDED"
    )
    max_new_tokens_cap: int = option(512, "largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = option(128, "max_new_tokens when a request sets no sampling")
    default_temperature: float = option(0.7, "temperature when a request sets no sampling")
    poll_registry_s: float = option(0.25, "how often the registry is checked for a new version")
    workers: int = option(32, "gRPC handler threads (concurrent RPCs in flight)")
