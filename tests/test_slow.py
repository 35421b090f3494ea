"""The real SmolLM2-135M-Instruct (prepared by `make model`): served, answered, learned from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kaizen.client import connect
from kaizen.modeling import DEFAULT_MODEL_DIR
from kaizen.v1 import chat_pb2_grpc
from tests.conftest import ask

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / DEFAULT_MODEL_DIR


@pytest.fixture
def real_model() -> Path:
    if not (REAL / "config.json").is_file():
        pytest.fail(f"{REAL} is not prepared: run `make model`")
    return REAL


def test_the_real_model_answers_a_simple_question(serve_config, real_model, api_key):
    from server.app import start

    running = start(dataclasses.replace(serve_config, model=real_model))
    try:
        with connect(f"127.0.0.1:{running.port}", api_key) as ch:
            reply = chat_pb2_grpc.ChatServiceStub(ch).Generate(
                ask("What is the capital of France?", max_new_tokens=16, temperature=0.0)
            )
    finally:
        running.stop(grace_s=1)
    assert "Paris" in reply.text and reply.finish_reason == "stop"
