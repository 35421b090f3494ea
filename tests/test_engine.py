"""The decode loop: continuous batching, cancellation, queue deadlines, mixed versions."""

from __future__ import annotations

import dataclasses
import queue
import threading

import grpc
import pytest
import torch
from prometheus_client import REGISTRY

from kaizen import modeling
from kaizen.client import connect
from kaizen.errors import ResourceExhausted
from kaizen.events import Sampling
from kaizen.v1 import chat_pb2_grpc
from server.engine import Engine, Failed, Finished, Request, Token, WaitQueue
from server.weights import read_adapter
from tests.conftest import ask, publish_random_adapter, wait_until
from tests.test_swap import model_for, teacher_forced_logprobs

CPU = torch.device("cpu")


@pytest.fixture
def make_engine(tiny_model):
    engines = []

    def make(**kwargs) -> Engine:
        tokenizer = modeling.load_tokenizer(tiny_model)
        model = modeling.load_model(tiny_model, CPU, torch.float32)  # fresh: peft wraps it
        engine = Engine(
            model, modeling.stop_token_ids(tokenizer), tokenizer.pad_token_id, CPU, **kwargs
        )
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def job(tokens: int, seed: int, prompt: list[int] | None = None, **kwargs) -> Request:
    sampling = Sampling(max_new_tokens=tokens, temperature=1.0, seed=seed, ignore_eos=True)
    return Request(prompt_ids=prompt or [1, 520, 2114, 30, 2], sampling=sampling, **kwargs)


def drain(request: Request, timeout_s: float = 60.0) -> tuple[list[Token], Finished]:
    tokens = []
    while True:
        event = request.events.get(timeout=timeout_s)
        if isinstance(event, Token):
            tokens.append(event)
        elif isinstance(event, Finished):
            return tokens, event
        else:
            raise AssertionError(f"request failed: {event}")


def test_a_request_joins_the_running_batch_instead_of_waiting_for_it(make_engine):
    engine = make_engine(max_batch=4)
    long = engine.submit(job(400, seed=1))
    long.events.get(timeout=30)  # it is decoding
    short = engine.submit(job(4, seed=2))
    tokens, finished = drain(short)
    assert len(tokens) == 4 and finished.finish_reason == "length"
    # the long request is still being decoded: the short one did not wait for its end
    produced_by_long = 1 + long.events.qsize()
    assert produced_by_long < 400
    rest, finished = drain(long)
    assert 1 + len(rest) == 400 and finished.finish_reason == "length"


def test_a_cancelled_row_is_freed_within_one_step_and_its_slot_reused(make_engine):
    engine = make_engine(max_batch=1)
    first = engine.submit(job(400, seed=1))
    first.events.get(timeout=30)
    second = engine.submit(job(3, seed=2))  # waits: the only slot is taken
    first.cancel()
    emitted_before_cancel = 1 + first.events.qsize()
    rest, finished = drain(first)
    assert finished.finish_reason == "cancelled"
    assert 1 + len(rest) <= emitted_before_cancel + 1  # at most the step under way
    tokens, finished = drain(second)
    assert len(tokens) == 3 and finished.finish_reason == "length"


def test_a_request_cancelled_while_waiting_is_never_decoded(make_engine):
    engine = make_engine(max_batch=1)
    first = engine.submit(job(200, seed=1))
    gone = engine.submit(job(50, seed=2))
    gone.cancel()
    drain(first)
    after = engine.submit(job(2, seed=3))
    drain(after)
    assert gone.events.empty()  # no token was spent on it


def test_finished_rows_leave_the_batch_and_the_cache_shrinks(make_engine):
    engine = make_engine(max_batch=8)
    prompts = [[1] + [300 + i] * (5 + 20 * i) + [2] for i in range(4)]
    jobs = [engine.submit(job(6 + 30 * i, seed=i + 1, prompt=p)) for i, p in enumerate(prompts)]
    for j in jobs:
        drain(j)
    # all left: nothing is held between requests
    assert engine._batch.rows == [] and engine._batch.cache is None


def test_rows_of_two_versions_share_a_batch_and_each_keeps_its_own(
    make_engine, tiny_model, registry
):
    engine = make_engine(max_batch=8)
    name = modeling.model_info(tiny_model).name
    serving = publish_random_adapter(registry, tiny_model, seed=1)
    canary = publish_random_adapter(registry, tiny_model, seed=2)
    engine.stage(read_adapter(registry, serving, name))
    engine.stage(read_adapter(registry, canary, name), role="canary")
    wait_until(lambda: engine.canary is not None and engine.version == serving)
    mixed_before = REGISTRY.get_sample_value("kaizen_mixed_version_steps_total") or 0.0

    jobs = [
        engine.submit(job(24, seed=10 + i, version=canary if i % 2 else None)) for i in range(6)
    ]
    results = [drain(j) for j in jobs]

    assert REGISTRY.get_sample_value("kaizen_mixed_version_steps_total") > mixed_before
    assert [f.version for _, f in results] == [serving, canary] * 3
    models = {v: model_for(v, tiny_model, registry) for v in (serving, canary)}
    for j, (tokens, finished) in zip(jobs, results, strict=True):
        logged = dataclasses.make_dataclass("G", ["prompt_tokens", "response_tokens", "sampling"])(
            j.prompt_ids, [t.token_id for t in tokens], j.sampling
        )
        other_version = canary if finished.version == serving else serving
        mine = teacher_forced_logprobs(models[finished.version], logged)
        other = teacher_forced_logprobs(models[other_version], logged)
        got = [t.logprob for t in tokens]
        assert got == pytest.approx(mine, abs=2e-3)
        assert got != pytest.approx(other, abs=2e-3)  # the check tells versions apart


def test_adapter_slots_are_reused_not_accumulated(make_engine, tiny_model, registry):
    engine = make_engine(max_batch=4)
    name = modeling.model_info(tiny_model).name
    for seed in range(1, 6):
        version = publish_random_adapter(registry, tiny_model, seed=seed)
        engine.stage(read_adapter(registry, version, name))
        wait_until(lambda: engine.version == version)  # noqa: B023 - called at once
        drain(engine.submit(job(3, seed=seed)))
    assert engine.version == "v5"
    # the first install made a slot and a spare; every later version was copied into one
    assert len(engine.peft.peft_config) == 2


def test_a_request_waiting_past_the_queue_limit_is_deadline_exceeded(
    serve_config, monkeypatch, api_key
):
    from server.app import start

    running = start(dataclasses.replace(serve_config, max_queue_wait_s=0.2))
    engine = running.engine
    parked, go_on = threading.Event(), threading.Event()
    install = engine.install_staged

    def park() -> None:  # the decode loop stops here, before it takes any request
        parked.set()
        go_on.wait()
        install()

    monkeypatch.setattr(engine, "install_staged", park)
    try:
        with connect(f"127.0.0.1:{running.port}", api_key) as ch:
            stub = chat_pb2_grpc.ChatServiceStub(ch)
            assert parked.wait(10)
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(ask(max_new_tokens=4, seed=2))
            go_on.set()
            assert stub.Generate(ask(max_new_tokens=4, seed=3)).completion_tokens > 0
    finally:
        go_on.set()
        running.stop(grace_s=1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--max-queue-wait-s" in err.value.details()


def test_ignore_eos_generates_exactly_max_new_tokens(stubs):
    request = ask(max_new_tokens=40, temperature=1.5, seed=3)
    request.sampling.ignore_eos = True
    reply = stubs.chat.Generate(request)
    assert reply.completion_tokens == 40 and reply.finish_reason == "length"


def test_stop_fails_every_row_and_waiting_request(make_engine):
    engine = make_engine(max_batch=1)
    running = engine.submit(job(400, seed=1))
    waiting = engine.submit(job(400, seed=2))
    running.events.get(timeout=30)
    engine.stop()
    for request in (running, waiting):
        events = []
        while True:
            try:
                events.append(request.events.get_nowait())
            except queue.Empty:
                break
        assert isinstance(events[-1], Failed) and "shut down" in str(events[-1].error)


def test_cancelled_requests_do_not_take_a_place_in_the_queue():
    waiting = WaitQueue(maxsize=2)
    first, second = job(4, seed=1), job(4, seed=2)
    waiting.put(first)
    waiting.put(second)
    with pytest.raises(ResourceExhausted, match="--max-queue"):
        waiting.put(job(4, seed=3))
    first.cancel()
    third = job(4, seed=4)
    waiting.put(third)  # the cancelled one made room
    assert waiting.take(5, wait_s=0) == [second, third]
