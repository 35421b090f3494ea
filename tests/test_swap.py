"""Hot swap: a published version is served at a batch boundary; no answer mixes versions."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from prometheus_client import REGISTRY

from bench.verify import teacher_forced_logprobs
from kaizen import modeling
from kaizen.registry import BASE_VERSION
from kaizen.v1 import model_pb2
from tests.conftest import ask, publish_random_adapter


def wait_for_version(stubs, version: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = stubs.model.GetModelInfo(model_pb2.GetModelInfoRequest())
        if info.versions[0].version == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server never served {version}")


def model_for(version: str, tiny_model, registry):
    from peft import PeftModel

    base = modeling.load_model(tiny_model, torch.device("cpu"), torch.float32)
    if version == BASE_VERSION:
        return base
    return PeftModel.from_pretrained(base, registry.path(version)).eval()


def test_new_versions_are_served_and_no_answer_mixes_versions(server, stubs, registry, tiny_model):
    before = REGISTRY.get_sample_value("kaizen_weight_swaps_total", {"result": "ok"}) or 0.0
    published = [BASE_VERSION]

    def one(i: int):
        return stubs.chat.Generate(
            ask(f"question {i}", max_new_tokens=24, temperature=1.0, seed=i + 1)
        )

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(12)]
        for seed in (1, 2):  # publish while those requests are being answered
            published.append(publish_random_adapter(registry, tiny_model, seed))
            time.sleep(0.1)
        futures += [pool.submit(one, 100 + i) for i in range(12)]
        replies = [f.result(timeout=60) for f in futures]

    wait_for_version(stubs, published[-1])
    later = stubs.chat.Generate(ask("after the swaps", max_new_tokens=8, temperature=1.0, seed=5))
    assert later.model_version == published[-1] == "v2"
    assert {r.model_version for r in replies} <= set(published)
    swaps = REGISTRY.get_sample_value("kaizen_weight_swaps_total", {"result": "ok"})
    assert swaps - before >= 1

    # Every token of an answer must come from the version it is tagged with: recompute
    # the logged behaviour log-probabilities under that version alone.
    models = {v: model_for(v, tiny_model, registry) for v in published}
    for reply in [*replies, later]:
        generation = server.buffer.generation(reply.response_id)
        expected = teacher_forced_logprobs(models[reply.model_version], generation)
        assert generation.behaviour_logprobs == pytest.approx(expected, abs=2e-3), (
            reply.model_version
        )
    # ...and the check can tell versions apart: the base model disagrees with v2's answer.
    generation = server.buffer.generation(later.response_id)
    assert teacher_forced_logprobs(models[BASE_VERSION], generation) != pytest.approx(
        generation.behaviour_logprobs, abs=2e-3
    )


def test_a_corrupt_version_is_never_served(server, stubs, registry, tiny_model):
    before = REGISTRY.get_sample_value("kaizen_weight_swaps_total", {"result": "corrupt"}) or 0.0
    good = publish_random_adapter(registry, tiny_model, seed=1)
    wait_for_version(stubs, good)
    # A version whose adapter bytes do not match its manifest (a torn copy, a bad disk).
    with registry.publish("kaizen-tiny-random") as staging:
        (staging / "adapter_model.safetensors").write_bytes(
            (registry.path(good) / "adapter_model.safetensors").read_bytes()
        )
        (staging / "adapter_config.json").write_bytes(
            (registry.path(good) / "adapter_config.json").read_bytes()
        )
    bad = registry.latest()
    blob = registry.path(bad) / "adapter_model.safetensors"
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    deadline = time.monotonic() + 10
    while (
        REGISTRY.get_sample_value("kaizen_weight_swaps_total", {"result": "corrupt"}) or 0.0
    ) == before:
        assert time.monotonic() < deadline, "the corrupt version was never examined"
        time.sleep(0.05)
    assert stubs.chat.Generate(ask()).model_version == good


def test_a_version_for_another_base_model_is_refused(server, stubs, registry, tiny_model):
    publish_random_adapter(registry, tiny_model, seed=1)
    wait_for_version(stubs, "v1")
    with registry.publish("some-other-model") as staging:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            (staging / name).write_bytes((registry.path("v1") / name).read_bytes())
    time.sleep(0.5)
    assert stubs.chat.Generate(ask()).model_version == "v1"


def test_a_restarted_server_serves_the_newest_version_from_the_start(serve_config, tiny_model):
    from kaizen.registry import Registry
    from server.app import start

    publish_random_adapter(Registry(serve_config.registry), tiny_model, seed=3)
    running = start(serve_config)
    try:
        assert running.engine.version == "v1"
    finally:
        running.stop(grace_s=1)
