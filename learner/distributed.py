"""The learner on several processes: `torchrun --nproc-per-node N -m kaizen.cli learn …`.

Every rank runs the same loop on the same events and takes the same decisions in the same
order; rank 0 alone touches the world outside. It reads the buffer, the registry, the
clock and the comment judge, and broadcasts what it read (`on_main`), so no rank decides
from its own clock or from a buffer that changed between two ranks' reads (a branch taken
on one rank and not another would leave a collective waiting forever; and a Redis buffer
hands each consumer-group entry to one consumer only). Each rank trains on its shard of
each batch (examples r, r+N, …); the gradients are summed over the ranks before the
optimizer steps, identically everywhere. Rank 0 alone writes: versions, acknowledgements,
/metrics.

Without torchrun's environment no process group is started and every function here is
what one process would do: `shard` returns the whole batch, `on_main` calls its function.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from kaizen import modeling

T = TypeVar("T")

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")  # what torchrun sets


def init(device: str) -> bool:
    """Join torchrun's process group when torchrun started this process (gloo on CPU, nccl
    on CUDA, each rank on the GPU of its LOCAL_RANK); whether it did."""
    if not all(name in os.environ for name in TORCHRUN_ENV) or dist.is_initialized():
        return dist.is_initialized()
    backend = "gloo"
    if modeling.pick_device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    dist.init_process_group(backend)
    return True


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The device this rank trains on: under torchrun on CUDA, the GPU `init` picked."""
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def shard(items: Sequence[T]) -> list[T]:
    """This rank's part of a batch every rank holds: items r, r+N, … (all of it alone)."""
    return list(items[rank() :: world()])


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (pickled); what the other ranks pass is ignored."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` as rank 0 computes it, on every rank; only rank 0 calls it."""
    return broadcast_object(fn(*args) if is_main() else None)


def broadcast_tensors(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite every rank's `tensors` with rank 0's, in place."""
    if dist.is_initialized():
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)


def sum_gradients(params: Sequence[torch.Tensor], *scalars: torch.Tensor) -> list[torch.Tensor]:
    """Sum the gradients of `params`, and `scalars` (each rank's share of the loss), over
    the ranks in one all-reduce, and return the summed scalars. Every rank calls it once a
    step, whatever its own loss. A parameter no rank has a gradient for keeps none, as in
    one process (AdamW skips it: a zero gradient would still decay and move it).

    Explicit rather than DDP, whose reducer all-reduces from hooks that fire as each
    parameter's gradient is ready in a backward pass, and expects the same parameters to
    get one on every rank: here a rank whose shard is empty (a batch smaller than the
    ranks) runs no backward at all, and the feedback head gets a gradient only on the
    ranks whose shard holds scored examples, which `find_unused_parameters=False` refuses
    and `True` pays a graph traversal a step for. The trainable parameters are a LoRA
    adapter (34 MB in float32 for r = 16 on a 7B model's q_proj and v_proj), so one flat
    all-reduce after the backward loses little to DDP's overlap of communication with
    computation."""
    if not dist.is_initialized():
        return list(scalars)
    device = params[0].device
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        + [had, torch.stack([s.detach().reshape(()).to(device) for s in scalars])]
    )
    dist.all_reduce(flat)
    some = flat[-len(scalars) - len(params) : -len(scalars)].tolist()  # ranks with a grad
    at = 0
    for p, ranks in zip(params, some, strict=True):
        n = p.numel()
        p.grad = flat[at : at + n].view_as(p).clone() if ranks > 0 else None
        at += n
    return list(flat[-len(scalars) :])
