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
from kaizen.errors import InvalidArgument, ResourceExhausted
from kaizen.events import Sampling
from kaizen.registry import BASE_VERSION
from kaizen.v1 import chat_pb2_grpc
from server.engine import Engine, Failed, Finished, Request, Token, WaitQueue
from server.weights import read_adapter
from tests.conftest import ask, policy_logprobs, publish_random_adapter, wait_until
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
    # all left: every KV slot is free again, nothing is held between requests
    cache = engine._batch.cache
    assert engine._batch.rows == [] and cache.free_slots == 8 and set(cache.lengths) == {0}


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


# -- the slot KV cache: answers do not depend on who else is in the batch ----------------
#
# The tiny random model's greedy answer repeats one token whatever the context, so greedy
# equality alone would miss a row reading another's keys; sampled rows' logged
# log-probabilities, recomputed by a plain forward over prompt + answer, would not.


def greedy(tokens: int, prompt: list[int], **kwargs) -> Request:
    sampling = Sampling(max_new_tokens=tokens, temperature=0.0, seed=1, ignore_eos=True)
    return Request(prompt_ids=prompt, sampling=sampling, **kwargs)


def generate_alone(model, prompt: list[int], tokens: int) -> list[int]:
    """HF `generate`, greedy, batch 1: the reference a greedy batched answer must equal."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            pad_token_id=2,
        )
    return out[0, len(prompt) :].tolist()


def assert_exact(model, request: Request, tokens: list[Token]) -> None:
    """A greedy answer is `generate`'s alone; a sampled one (temperature 1, top_p 1) has
    the log-probabilities a forward over prompt + answer gives, to float noise."""
    ids = [t.token_id for t in tokens]
    if request.sampling.temperature == 0:
        assert ids == generate_alone(model, request.prompt_ids, len(ids))
    else:
        want = policy_logprobs(model, request.prompt_ids, ids)
        assert [t.logprob for t in tokens] == pytest.approx(want, abs=1e-4)


PROMPTS = [[1] + [300 + 7 * i + j for j in range(2 + 9 * i)] + [2] for i in range(7)]
LENGTHS = [5, 31, 12, 40, 3, 25, 18]  # rows leave at different steps


def mixed(i: int, prompt: list[int], tokens: int, **kwargs) -> Request:
    """Every other request greedy, the rest sampled at temperature 1."""
    if i % 2 == 0:
        return greedy(tokens, prompt, **kwargs)
    return job(tokens, seed=100 + i, prompt=prompt, **kwargs)


def test_answers_are_exact_while_rows_of_different_lengths_join_and_leave(make_engine, tiny_model):
    engine = make_engine(max_batch=3)  # 7 requests: later ones take freed slots mid-batch
    jobs = [
        engine.submit(mixed(i, p, n)) for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS, strict=True))
    ]
    results = [drain(j) for j in jobs]
    reference = modeling.load_model(tiny_model, CPU, torch.float32)
    for j, n, (tokens, finished) in zip(jobs, LENGTHS, results, strict=True):
        assert len(tokens) == n and finished.finish_reason == "length"
        assert_exact(reference, j, tokens)
    assert engine._batch.cache.free_slots == 3


def test_rows_with_and_without_an_adapter_share_the_batch_and_are_exact(
    make_engine, tiny_model, registry
):
    engine = make_engine(max_batch=4)
    name = modeling.model_info(tiny_model).name
    canary = publish_random_adapter(registry, tiny_model, seed=3)
    engine.stage(read_adapter(registry, canary, name), role="canary")  # serving stays v0
    wait_until(lambda: engine.canary is not None)
    mixed_before = REGISTRY.get_sample_value("kaizen_mixed_version_steps_total") or 0.0
    jobs = [
        mixed(i, p, n, version=canary if i % 3 != 1 else None)
        for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS, strict=True))
    ]
    for j in jobs[:2]:
        engine.submit(j)
    jobs[0].events.put(jobs[0].events.get(timeout=60))  # the batch is decoding
    for j in jobs[2:]:
        engine.submit(j)
    results = [drain(j) for j in jobs]
    assert REGISTRY.get_sample_value("kaizen_mixed_version_steps_total") > mixed_before
    models = {v: model_for(v, tiny_model, registry) for v in (BASE_VERSION, canary)}
    for j, (tokens, finished) in zip(jobs, results, strict=True):
        assert finished.version == (j.version or BASE_VERSION)
        assert_exact(models[finished.version], j, tokens)
    # the adapter changes the answers: the check would see a row decoded with the wrong one
    sampled = jobs[3]  # on the canary
    answer = [t.token_id for t in results[3][0]]
    other = policy_logprobs(models[BASE_VERSION], sampled.prompt_ids, answer)
    assert [t.logprob for t in results[3][0]] != pytest.approx(other, abs=1e-4)


def test_a_slot_freed_by_a_cancelled_request_gives_the_next_one_an_exact_answer(
    make_engine, tiny_model
):
    engine = make_engine(max_batch=2)
    neighbour = engine.submit(job(200, seed=1, prompt=[1] + list(range(600, 700)) + [2]))
    gone = engine.submit(job(200, seed=2, prompt=[1] + list(range(400, 460)) + [2]))
    for _ in range(20):  # its slot now holds 80 tokens of keys and values
        gone.events.get(timeout=60)
    gone.cancel()
    _, finished = drain(gone)
    assert finished.finish_reason == "cancelled"
    # the freed slot is the only one: the next request takes it, with stale keys and
    # values beyond its own length, inside the window its longer neighbour makes it read
    short = engine.submit(job(30, seed=3, prompt=PROMPTS[1]))
    tokens, _ = drain(short)
    assert engine._batch.seats[1] is None  # it sat in the cancelled request's slot...
    neighbour.cancel()
    drain(neighbour)
    reference = modeling.load_model(tiny_model, CPU, torch.float32)
    assert_exact(reference, short, tokens)  # ...and read none of its leftovers
    again = engine.submit(greedy(30, PROMPTS[1]))
    assert_exact(reference, again, drain(again)[0])


def test_a_seed_gives_the_same_answer_alone_and_in_a_changing_batch(make_engine):
    engine = make_engine(max_batch=4)
    alone_tokens, _ = drain(engine.submit(job(40, seed=77, prompt=PROMPTS[2])))
    others = [
        engine.submit(job(n, seed=i, prompt=p))
        for i, (p, n) in enumerate(zip(PROMPTS[3:6], (7, 50, 19), strict=True))
    ]
    others[0].events.put(others[0].events.get(timeout=60))  # the others are decoding
    again = engine.submit(job(40, seed=77, prompt=PROMPTS[2]))
    late = engine.submit(job(9, seed=5, prompt=PROMPTS[6]))  # joins while `again` runs
    tokens, _ = drain(again)
    for r in [*others, late]:
        drain(r)
    assert [t.token_id for t in tokens] == [t.token_id for t in alone_tokens]
    assert [t.logprob for t in tokens] == pytest.approx([t.logprob for t in alone_tokens], abs=1e-4)


def test_eager_attention_takes_the_same_slot_cache(tiny_model):
    tokenizer = modeling.load_tokenizer(tiny_model)
    model = modeling.load_model(tiny_model, CPU, torch.float32)
    model.set_attn_implementation("eager")  # the engine hands it a float mask
    engine = Engine(model, modeling.stop_token_ids(tokenizer), tokenizer.pad_token_id, CPU)
    engine.start()
    try:
        jobs = [
            engine.submit(mixed(i, p, n))
            for i, (p, n) in enumerate(zip(PROMPTS[:4], LENGTHS[:4], strict=True))
        ]
        results = [drain(j)[0] for j in jobs]
    finally:
        engine.stop()
    reference = modeling.load_model(tiny_model, CPU, torch.float32)
    for j, tokens in zip(jobs, results, strict=True):
        assert_exact(reference, j, tokens)


def test_a_request_longer_than_a_kv_slot_fails_and_the_others_are_served(make_engine):
    engine = make_engine(max_batch=2, max_len=64)
    fits = 64 - len(PROMPTS[1])  # prompt and answer exactly fill a slot
    too_long = engine.submit(greedy(fits + 1, PROMPTS[1]))
    event = too_long.events.get(timeout=60)
    assert isinstance(event, Failed) and isinstance(event.error, InvalidArgument)
    assert "max_new_tokens" in str(event.error) and "64" in str(event.error)
    tokens, finished = drain(engine.submit(greedy(fits, PROMPTS[1])))
    assert len(tokens) == fits and finished.finish_reason == "length"


class Tap(queue.Queue):
    """A request's event queue that also logs, across requests, who got what and when."""

    def __init__(self, who: str, log: list[tuple[str, str]]) -> None:
        super().__init__()
        self.who, self.log = who, log

    def put(self, item, *args, **kwargs) -> None:
        self.log.append((self.who, type(item).__name__))
        super().put(item, *args, **kwargs)


def test_a_long_prompt_is_prefilled_in_pieces_while_the_others_decode(make_engine, tiny_model):
    """A 122-token prompt in pieces of 8: the decoding row gets a token at every step of
    its prefill instead of waiting for one long forward, and both answers stay exact."""
    engine = make_engine(max_batch=3, prefill_chunk=8)
    log: list[tuple[str, str]] = []
    running = engine.submit(job(80, seed=1, prompt=PROMPTS[1], events=Tap("running", log)))
    running.events.put(running.events.get(timeout=60))  # it is decoding
    prompt = [1] + [300 + (7 * j) % 4000 for j in range(120)] + [2]
    mark = len(log)
    long = engine.submit(job(6, seed=2, prompt=prompt, events=Tap("long", log)))
    long_tokens, _ = drain(long)
    running_tokens, _ = drain(running)
    first = log.index(("long", "Token"))
    during = log[mark:first].count(("running", "Token"))
    assert during >= len(prompt) // 8 - 1  # one per piece (a whole-prompt forward: 1)
    reference = modeling.load_model(tiny_model, CPU, torch.float32)
    assert_exact(reference, long, long_tokens)
    assert_exact(reference, running, running_tokens)


def test_the_shared_prefix_is_computed_once_per_version_and_answers_stay_exact(
    make_engine, tiny_model, registry
):
    prefix = [1, 700, 701, 702, 703, 704, 705, 2]
    engine = make_engine(max_batch=3, prefix_ids=prefix, prefill_chunk=6)  # prompts in pieces
    name = modeling.model_info(tiny_model).name
    canary = publish_random_adapter(registry, tiny_model, seed=3)
    engine.stage(read_adapter(registry, canary, name), role="canary")
    wait_until(lambda: engine.canary is not None)
    reused = REGISTRY.get_sample_value("kaizen_prefix_reused_total") or 0.0
    computed = REGISTRY.get_sample_value("kaizen_prefill_tokens_total") or 0.0
    jobs = (
        [  # a prompt without the prefix, or only the prefix, computes its own
            mixed(i, prefix + p[1:], n, version=canary if i % 2 else None)
            for i, (p, n) in enumerate(zip(PROMPTS[:6], LENGTHS[:6], strict=True))
        ]
        + [mixed(1, PROMPTS[6], 12), mixed(0, prefix, 7, version=canary)]
    )
    for j in jobs:
        engine.submit(j)
    results = [drain(j)[0] for j in jobs]
    assert set(engine._prefixes) == {BASE_VERSION, canary}
    assert REGISTRY.get_sample_value("kaizen_prefix_reused_total") - reused == 6
    # the prefix went through the model once per version, the rest of each prompt once
    rest = sum(len(j.prompt_ids) - len(prefix) for j in jobs[:6]) + len(PROMPTS[6]) + len(prefix)
    assert REGISTRY.get_sample_value("kaizen_prefill_tokens_total") - computed == (
        2 * len(prefix) + rest
    )
    models = {v: model_for(v, tiny_model, registry) for v in (BASE_VERSION, canary)}
    for j, tokens in zip(jobs, results, strict=True):
        assert_exact(models[j.version or BASE_VERSION], j, tokens)
    assert engine.drop_canary(canary)
    wait_until(lambda: canary not in engine._prefixes, what="the dropped canary's prefix freed")
    assert BASE_VERSION in engine._prefixes


def test_the_serving_version_alone_runs_folded_and_every_path_stays_exact(
    make_engine, tiny_model, registry
):
    """Alone, the serving version's LoRA is folded into the weights; with a canary in the
    batch it is unfolded; the base model's rows run with the adapters off; a new serving
    version is folded afresh. Every answer matches its own version's model."""
    from server.lora import BARE, MERGED, UNMERGED

    engine = make_engine(max_batch=3)
    name = modeling.model_info(tiny_model).name
    v1, v2 = (publish_random_adapter(registry, tiny_model, seed=s) for s in (5, 6))
    models = {v: model_for(v, tiny_model, registry) for v in (BASE_VERSION, v1, v2)}

    def answers(jobs: list[Request], state: str) -> None:
        for j in jobs:
            engine.submit(j)
        results = [drain(j) for j in jobs]
        assert engine._fold.state == state
        for j, (tokens, finished) in zip(jobs, results, strict=True):
            assert_exact(models[finished.version], j, tokens)

    engine.stage(read_adapter(registry, v1, name))
    wait_until(lambda: engine.version == v1)
    answers(
        [mixed(i, p, n) for i, (p, n) in enumerate(zip(PROMPTS[:3], LENGTHS[:3], strict=True))],
        MERGED,
    )
    assert engine._fold.slot == engine._slot_of(v1)
    engine.stage(read_adapter(registry, v2, name), role="canary")
    wait_until(lambda: engine.canary is not None)
    pinned = [mixed(i, p, 20, version=v2 if i % 2 else None) for i, p in enumerate(PROMPTS[:4])]
    answers(pinned, UNMERGED)
    assert engine.promote_canary(v2)
    answers([mixed(i, p, 15) for i, p in enumerate(PROMPTS[2:5])], MERGED)
    assert engine._fold.slot == engine._slot_of(v2)
    engine.restore(None)  # an operator's rollback to the base model
    wait_until(lambda: engine.version == BASE_VERSION)
    answers([mixed(i, p, 15) for i, p in enumerate(PROMPTS[:2])], BARE)


def test_the_model_is_loaded_in_the_dtype_asked_for_not_the_checkpoints(tiny_model):
    """The tiny checkpoint is stored in float32; serving in bf16 must get bf16 everywhere
    (a float32 model served under bf16 was the GPU test's failure)."""
    for dtype in (torch.bfloat16, torch.float32):
        model = modeling.load_model(tiny_model, CPU, dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}


def test_a_failed_prefix_forward_fails_every_request_seated_with_it(make_engine):
    """None of the requests admitted in that step is left waiting on a stream that no
    one will write (their callers would wait out the request timeout)."""
    prefix = [1, 700, 701, 702, 2]
    engine = make_engine(max_batch=3, prefix_ids=prefix)
    engine._prefix_of = lambda row: (_ for _ in ()).throw(RuntimeError("out of memory"))
    engine.stop()  # queued while no loop runs, so that one step takes all three
    engine._running.set()
    jobs = [engine.submit(job(4, seed=i, prompt=prefix + [300 + i, 2])) for i in range(3)]
    engine.start()
    for j in jobs:
        event = j.events.get(timeout=30)
        assert isinstance(event, Failed) and "out of memory" in str(event.error)
    tokens, _ = drain(engine.submit(job(4, seed=9, prompt=[1, 400, 2])))  # the loop goes on
    assert len(tokens) == 4
