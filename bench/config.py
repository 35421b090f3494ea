"""Benchmark configurations: one dataclass per benchmark, parsed once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from kaizen.config import option
from kaizen.modeling import DEFAULT_MODEL_DIR, DTYPE_HELP

DTYPES = ("auto", "fp32", "bf16")


def _check_positive(config: object) -> None:
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
            raise ValueError(f"--{f.name.replace('_', '-')}: must be positive, got {value}")


@dataclass(frozen=True)
class ServeBench:
    model: Path = option(DEFAULT_MODEL_DIR, "base model checkpoint directory")
    concurrency: int = option(16, "client threads, and the server's --max-batch")
    requests: int = option(64, "requests to complete")
    new_tokens: int = option(64, "tokens generated per request (exactly: ignore_eos)")
    dtype: str = option("auto", DTYPE_HELP, DTYPES)
    naive_requests: int = option(4, "requests answered one at a time for the naive baseline")

    def __post_init__(self) -> None:
        _check_positive(self)


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
