"""What every benchmark reports besides its figures (hardware, versions, commit), and how."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def environment(device: torch.device, dtype: torch.dtype, model_name: str) -> dict[str, object]:
    info: dict[str, object] = {
        "model": model_name,
        "device": str(device),
        "dtype": DTYPE_NAMES[dtype],
        "torch_version": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "commit": _commit(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _commit() -> str:
    """The checkout's commit, with "-dirty" when it has uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Anything a library prints while the benchmark runs must not land in the result."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def run_and_print(title: str, benchmark: Callable[[], dict[str, object]], as_json: bool) -> int:
    """Run `benchmark` with stdout kept clean, then print its figures: JSON or a table."""
    with stdout_to_stderr():
        figures = benchmark()
    if as_json:
        print(json.dumps(figures))
        return 0
    print(title)
    width = max(len(key) for key in figures)
    for key, value in figures.items():
        text = json.dumps(value) if isinstance(value, dict | list) else value
        print(f"  {key:<{width}}  {'n/a' if value is None else text}")
    return 0
