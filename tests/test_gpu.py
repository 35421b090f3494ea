"""On a CUDA device: the server decodes and the learner steps there (bf16 serving, fp32 LoRA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kaizen.events import Feedback, FeedbackKind
from learner.config import LearnerConfig
from learner.loop import Learner
from tests.conftest import ask
from tests.test_learner import make_generation

pytestmark = pytest.mark.gpu


def test_server_generates_on_cuda(serve_config, api_key):
    from kaizen.client import connect
    from kaizen.v1 import chat_pb2_grpc
    from server.app import start

    running = start(dataclasses.replace(serve_config, device="cuda", dtype="auto"))
    try:
        assert running.engine.device.type == "cuda"
        assert next(running.engine.model.parameters()).dtype == torch.bfloat16
        with connect(f"127.0.0.1:{running.port}", api_key) as ch:
            reply = chat_pb2_grpc.ChatServiceStub(ch).Generate(ask(max_new_tokens=8, seed=3))
        assert reply.completion_tokens >= 1 and reply.model_version == "v0"
    finally:
        running.stop(grace_s=1)


def test_learner_steps_on_cuda(tiny_model, tmp_path):
    config = LearnerConfig(
        model=tiny_model,
        buffer=f"sqlite:///{tmp_path}/b.db",
        registry=tmp_path / "registry",
        batch_size=2,
        metrics_port=-1,
        device="cuda",
        lr=1e-2,
    )
    learner = Learner(config)
    assert learner.device.type == "cuda"
    g = make_generation(learner.tokenizer, "r1", "Paris.")
    learner.buffer.append_generation(g)
    learner.buffer.append_feedback([Feedback("e1", "r1", "u", FeedbackKind.THUMB, 1)])
    learner.fill()
    assert learner.train_pending().ok
    assert learner.publish() == "v1"
