"""The learner under torchrun: two CPU ranks (gloo) publish what one process publishes.

Both learners train the tiny model on the same prepared buffer. Under torchrun rank r
trains on examples r, r+2, … of each batch and the gradients are summed over the ranks;
every version published must hold the same adapter and feedback head as one process's,
within TOLERANCE. Not 0: each rank pads its shard to its own width and the gradient is
summed in another order (shard by shard, then the all-reduce), so float32 rounding
differs in the last bits; AdamW divides each gradient component by its own running
magnitude, which magnifies that rounding where a component nearly cancels. Measured here:
4.8e-8 at the default --lr 3e-4 (3.5e-6 at --lr 1e-2), while the weights move ~1e-3.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kaizen.buffer import SQLiteBuffer
from kaizen.events import Feedback, FeedbackKind
from kaizen.registry import Registry
from kaizen.sim.demo import free_port
from learner import distributed
from learner.config import LearnerConfig
from learner.loop import Learner
from tests.test_learner import make_generation

TOLERANCE = 1e-6  # max |Δ| of any adapter or feedback-head weight, float32, at lr 3e-4

# joint trains the feedback head on Scored examples (S) and sft on Target ones (T; a thumb
# up and a correction give both). fill() reads up to --batch-size 3 events at a time:
#   e0-e2 up, up, comment   [S0 T0 S1 T1 S2]  rank 0: S0 S1 S2 (no sft term), rank 1: T0 T1
#                                              (no feedback-head gradient)
#   e3-e5 correction, down, down   [S3 T3 S4 S5]
#   e6-e8 down, up, down           [S6 S7 T7 S8]
#   e9 down                        [S9]        rank 1: nothing, and it joins the all-reduce
EVENTS = [
    ("up", ""),
    ("up", ""),
    ("comment", "that was helpful, thanks"),
    ("correction", "Paris is the capital of France."),
    ("down", ""),
    ("down", ""),
    ("down", ""),
    ("up", ""),
    ("down", ""),
    ("down", ""),
]
CURSORS = [3, 6, 9, 10]  # one version a step
BATCHES = [5, 4, 4, 1]
STEPS = len(CURSORS)


def fill_buffer(path: Path, tokenizer) -> None:
    buffer = SQLiteBuffer(path)
    for i, (kind, text) in enumerate(EVENTS):
        buffer.append_generation(make_generation(tokenizer, f"r{i}", f"Answer number {i}."))
        event = {
            "up": Feedback(f"e{i}", f"r{i}", "u", FeedbackKind.THUMB, 1),
            "down": Feedback(f"e{i}", f"r{i}", "u", FeedbackKind.THUMB, -1),
            "correction": Feedback(f"e{i}", f"r{i}", "u", FeedbackKind.CORRECTION, text=text),
            "comment": Feedback(f"e{i}", f"r{i}", "u", FeedbackKind.COMMENT, text=text),
        }[kind]
        buffer.append_feedback([event])
    buffer.close()


def learn_flags(config: LearnerConfig) -> list[str]:
    return [
        "learn",
        "--model", str(config.model),
        "--buffer", config.buffer,
        "--registry", str(config.registry),
        "--objective", config.objective,
        "--batch-size", str(config.batch_size),
        "--publish-every", str(config.publish_every),
        "--max-steps", str(config.max_steps),
        "--lr", str(config.lr),
        "--max-probe-kl", str(config.max_probe_kl),
        "--gate-holdout", str(config.gate_holdout),
        "--max-user-share", str(config.max_user_share),
        "--batch-wait-s", str(config.batch_wait_s),
        "--poll-s", str(config.poll_s),
        "--metrics-port", str(config.metrics_port),
        "--guard-evals", config.guard_evals,
        "--device", config.device,
    ]  # fmt: skip


def run(command: list[str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    """`command` in its own process group, killed whole (torchrun and its ranks) if it
    outlives `timeout_s`: a rank stuck in a collective ignores SIGTERM."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            pytest.fail(f"{command[:6]} ran past {timeout_s} s:\n{out[-2000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def weights_of(registry: Registry, version: str) -> dict[str, torch.Tensor]:
    path = registry.path(version)
    return {
        **load_file(path / "adapter_model.safetensors"),
        **{f"head.{k}": v for k, v in torch.load(path / "feedback_head.pt").items()},
    }


@pytest.mark.parametrize(
    "max_probe_kl, accepted",
    [(10.0, True), (0.0, False)],  # every version accepted; every one refused by the KL guard
    ids=["accepted", "rejected"],
)
def test_two_ranks_publish_the_adapter_one_process_publishes(
    tiny_model, tmp_path, max_probe_kl, accepted
):
    """Two ranks under torchrun and one process, on the same 10 events: the same versions
    (rank 0 alone publishes, the cursor moves once), the same verdicts, and the same
    weights in each within TOLERANCE. With every version refused, each rank must go back
    to the published weights after each verdict, or the next candidate parts."""
    from kaizen import modeling

    fill_buffer(tmp_path / "events.db", modeling.load_tokenizer(tiny_model))
    configs = {}
    for name in ("one", "two"):
        shutil.copy(tmp_path / "events.db", tmp_path / f"{name}.db")
        configs[name] = LearnerConfig(
            model=tiny_model,
            buffer=f"sqlite:///{tmp_path}/{name}.db",
            registry=tmp_path / name,
            objective="joint",
            batch_size=3,
            publish_every=1,
            max_steps=STEPS,
            lr=3e-4,  # the default
            max_probe_kl=max_probe_kl,
            gate_holdout=0.0,
            max_user_share=1.0,
            batch_wait_s=0.0,
            poll_s=0.05,
            metrics_port=-1,
            guard_evals="none",
            device="cpu",
        )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    two = run([*torchrun, "-m", "kaizen.cli", *learn_flags(configs["two"])])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "(rank 0 of 2)" in two.stdout  # it ran under torchrun, not as one process
    one = Learner(configs["one"])  # one process: this one, on the same flags
    one.run(threading.Event())  # returns after --max-steps
    one.buffer.close()

    registries = {name: Registry(c.registry) for name, c in configs.items()}
    versions = registries["one"].versions()
    assert versions == [f"v{i}" for i in range(1, STEPS + 1)]  # one version a step
    assert registries["two"].versions() == versions  # rank 1 published nothing
    worst = 0.0
    for v in versions:
        meta = {name: r.manifest(v).metadata for name, r in registries.items()}
        for key in ("cursor", "steps", "samples", "window_examples", "window_rewards"):
            assert meta["two"][key] == meta["one"][key], (v, key)
        assert ("rejected" not in meta["two"]) == accepted
        assert meta["two"]["window_mean_reward"] == pytest.approx(meta["one"]["window_mean_reward"])
        assert meta["two"]["baseline"] == pytest.approx(meta["one"]["baseline"], abs=1e-9)
        mine, theirs = (weights_of(r, v) for r in (registries["two"], registries["one"]))
        assert mine.keys() == theirs.keys()
        worst = max(worst, *((mine[k] - theirs[k]).abs().max().item() for k in mine))
    print(f"max |two ranks - one process| over {len(versions)} versions: {worst:.2e}")
    assert worst <= TOLERANCE
    batches = [registries["two"].manifest(v).metadata for v in versions]
    assert [m["cursor"] for m in batches] == CURSORS  # the batches the layout above says
    assert [m["window_examples"] for m in batches] == BATCHES
    first = weights_of(registries["two"], versions[0])
    last = weights_of(registries["two"], versions[-1])
    moved = max((first[k] - last[k]).abs().max().item() for k in first)
    if accepted:  # it learned: the last version is not the first
        assert moved > 100 * TOLERANCE


def test_kto_is_refused_under_torchrun(tiny_model, tmp_path, monkeypatch):
    """KTO's reference point is a mean over the whole batch, which no rank holds: the
    learner refuses it at start, naming the flag, rather than train something else."""
    monkeypatch.setattr(distributed, "world", lambda: 2)
    config = LearnerConfig(
        model=tiny_model,
        buffer=f"sqlite:///{tmp_path}/b.db",
        registry=tmp_path / "r",
        objective="kto",
    )
    with pytest.raises(ValueError, match="--objective kto: .* under torchrun"):
        Learner(config)
