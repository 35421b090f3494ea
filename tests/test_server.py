"""The server over a real gRPC channel: answers, logging, feedback, errors, health, metrics."""

from __future__ import annotations

import sqlite3
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from kaizen.buffer import SQLiteBuffer
from kaizen.client import connect
from kaizen.v1 import chat_pb2, chat_pb2_grpc, feedback_pb2, model_pb2
from tests.conftest import ask


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def buffer_of(server) -> SQLiteBuffer:
    return server.buffer  # the server's own buffer object: reads go through its reader


def test_generate_answers_and_logs_the_generation(server, stubs):
    before = metric("kaizen_requests_total", method="Generate", code="OK")
    reply = stubs.chat.Generate(ask(max_new_tokens=6, seed=7))
    assert reply.response_id and reply.model_version == "v0"
    assert reply.finish_reason in ("stop", "length")
    assert 1 <= reply.completion_tokens <= 6 and reply.prompt_tokens > 0
    row = buffer_of(server).generation(reply.response_id)
    assert row is not None
    assert row.user_id == "u1" and row.model_version == "v0" and row.text == reply.text
    assert len(row.response_tokens) == reply.completion_tokens
    assert len(row.behaviour_logprobs) == len(row.response_tokens)
    assert all(lp <= 0.0 for lp in row.behaviour_logprobs)
    assert row.sampling.seed == 7 and row.sampling.temperature == pytest.approx(0.8)
    assert row.messages == [{"role": "user", "content": "What is the capital of France?"}]
    assert metric("kaizen_requests_total", method="Generate", code="OK") == before + 1


def test_same_seed_same_answer_streamed_or_not(stubs):
    whole = stubs.chat.Generate(ask(max_new_tokens=10, seed=42))
    chunks = list(stubs.chat.GenerateStream(ask(max_new_tokens=10, seed=42)))
    last = chunks[-1]
    assert last.done and last.response_id and last.response_id != whole.response_id
    assert "".join(c.text_delta for c in chunks) == whole.text
    assert last.completion_tokens == whole.completion_tokens
    assert last.model_version == whole.model_version == "v0"
    assert all(not c.done for c in chunks[:-1])


def test_unset_sampling_takes_the_server_defaults(stubs, server, serve_config):
    request = chat_pb2.GenerateRequest(messages=[chat_pb2.Message(role="user", content="hi")])
    reply = stubs.chat.Generate(request)
    assert 1 <= reply.completion_tokens <= 8  # serve_config.default_max_new_tokens
    # a message that sets only max_new_tokens: the temperature is the server's, not 0
    request.sampling.max_new_tokens = 3
    logged = server.buffer.generation(stubs.chat.Generate(request).response_id)
    assert logged.sampling.max_new_tokens == 3
    assert logged.sampling.temperature == serve_config.default_temperature == 0.7
    assert logged.sampling.top_p == 1.0 and logged.sampling.seed != 0  # a drawn seed
    request.sampling.temperature = 0.0  # set, and 0: greedy
    logged = server.buffer.generation(stubs.chat.Generate(request).response_id)
    assert logged.sampling.temperature == 0.0


@pytest.mark.parametrize(
    "request_, field",
    [
        (chat_pb2.GenerateRequest(), "messages"),
        (ask(max_new_tokens=0), "sampling.max_new_tokens"),
        (ask(max_new_tokens=65), "sampling.max_new_tokens"),  # cap is 64 in serve_config
        (ask(temperature=3.0), "sampling.temperature"),
        (ask(content="word " * 3000), "messages"),  # longer than the tiny model's 2048 context
        (
            chat_pb2.GenerateRequest(messages=[chat_pb2.Message(role="robot", content="x")]),
            "messages[0].role",
        ),
    ],
)
def test_bad_generate_requests_are_invalid_argument_naming_the_field(stubs, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        stubs.chat.Generate(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":")


def test_context_limit_message_names_the_limit(stubs):
    with pytest.raises(grpc.RpcError) as err:
        stubs.chat.Generate(ask(content="word " * 3000))
    assert "2048" in err.value.details()


def thumb(event_id: str, response_id: str, up: bool = True) -> feedback_pb2.Feedback:
    return feedback_pb2.Feedback(
        event_id=event_id,
        response_id=response_id,
        user_id="u1",
        thumb=feedback_pb2.THUMB_UP if up else feedback_pb2.THUMB_DOWN,
    )


def test_feedback_is_stored_once_per_event_id(server, stubs):
    reply = stubs.chat.Generate(ask())
    before = metric("kaizen_feedback_events_total", kind="thumb", result="accepted")
    first = stubs.feedback.SubmitFeedback(thumb("e1", reply.response_id))
    again = stubs.feedback.SubmitFeedback(thumb("e1", reply.response_id))
    assert (first.accepted, first.duplicates) == (1, 0)
    assert (again.accepted, again.duplicates) == (0, 1)
    samples = buffer_of(server).read_samples(0, 10)
    assert [s.feedback.event_id for s in samples] == ["e1"]
    assert samples[0].feedback.value == 1.0 and samples[0].generation.text == reply.text
    assert metric("kaizen_feedback_events_total", kind="thumb", result="accepted") == before + 1


def test_reused_event_id_with_another_payload_is_already_exists(stubs):
    reply = stubs.chat.Generate(ask())
    stubs.feedback.SubmitFeedback(thumb("e1", reply.response_id, up=True))
    with pytest.raises(grpc.RpcError) as err:
        stubs.feedback.SubmitFeedback(thumb("e1", reply.response_id, up=False))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "event_id" in err.value.details()


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda rid: feedback_pb2.Feedback(event_id="x", response_id=rid, rating=6), "rating"),
        (lambda rid: feedback_pb2.Feedback(event_id="x", response_id=rid, rating=0), "rating"),
        (lambda rid: feedback_pb2.Feedback(event_id="x", response_id=rid), "signal"),
        (lambda rid: feedback_pb2.Feedback(event_id="", response_id=rid, rating=3), "event_id"),
        (
            lambda rid: feedback_pb2.Feedback(
                event_id="x", response_id=rid, thumb=feedback_pb2.THUMB_UNSPECIFIED
            ),
            "thumb",
        ),
        (lambda rid: feedback_pb2.Feedback(event_id="x", response_id=rid, comment="  "), "comment"),
    ],
)
def test_bad_feedback_is_invalid_argument_naming_the_field(stubs, make, field):
    reply = stubs.chat.Generate(ask())
    with pytest.raises(grpc.RpcError) as err:
        stubs.feedback.SubmitFeedback(make(reply.response_id))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":")


def test_feedback_on_an_unknown_answer_is_not_found_and_stores_nothing(server, stubs):
    with pytest.raises(grpc.RpcError) as err:
        stubs.feedback.SubmitFeedback(
            feedback_pb2.Feedback(event_id="x", response_id="r-nope", rating=4)
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details().startswith("response_id:")
    assert SQLiteBuffer(server.buffer.path).last_seq() == 0


def test_stream_feedback_counts_and_is_all_or_nothing(server, stubs):
    reply = stubs.chat.Generate(ask())
    rid = reply.response_id
    events = [
        thumb("a", rid),
        feedback_pb2.Feedback(event_id="b", response_id=rid, rating=5),
        feedback_pb2.Feedback(event_id="c", response_id=rid, dwell_ms=12_000),
        feedback_pb2.Feedback(event_id="d", response_id=rid, correction="Paris."),
        thumb("a", rid),  # a retry inside the same stream
    ]
    ack = stubs.feedback.StreamFeedback(iter(events))
    assert (ack.accepted, ack.duplicates) == (4, 1)
    with pytest.raises(grpc.RpcError) as err:  # one bad event: none of this stream is stored
        stubs.feedback.StreamFeedback(
            iter(
                [
                    feedback_pb2.Feedback(event_id="e", response_id=rid, copy={}),
                    feedback_pb2.Feedback(event_id="f", response_id="r-unknown", click={}),
                ]
            )
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    kinds = [
        (s.feedback.event_id, str(s.feedback.kind)) for s in buffer_of(server).read_samples(0, 10)
    ]
    assert kinds == [("a", "thumb"), ("b", "rating"), ("c", "dwell"), ("d", "correction")]


def test_stream_feedback_error_names_the_event(stubs):
    reply = stubs.chat.Generate(ask())
    with pytest.raises(grpc.RpcError) as err:
        stubs.feedback.StreamFeedback(
            iter(
                [
                    thumb("a", reply.response_id),
                    feedback_pb2.Feedback(event_id="b", response_id=reply.response_id, rating=9),
                ]
            )
        )
    assert err.value.details().startswith("feedback[1].rating:")


def test_model_info_health_and_reflection(server, channel, stubs):
    info = stubs.model.GetModelInfo(model_pb2.GetModelInfoRequest())
    assert info.base_model == "kaizen-tiny-random"
    assert [v.version for v in info.versions] == ["v0"] and info.versions[0].state == "serving"
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kaizen.v1.ChatService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(
        reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    )
    names = {s.name for s in answer.list_services_response.service}
    assert {
        "kaizen.v1.ChatService",
        "kaizen.v1.FeedbackService",
        "kaizen.v1.ModelService",
        "grpc.health.v1.Health",
    } <= names


def test_metrics_endpoint_serves_prometheus_text(server, stubs):
    stubs.chat.Generate(ask())
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    for name in (
        "kaizen_requests_total",
        "kaizen_generated_tokens_total",
        "kaizen_serving_version",
        "kaizen_request_duration_seconds_bucket",
    ):
        assert name in body


def test_a_full_queue_is_resource_exhausted_at_once(serve_config, api_key):
    """One request decoding, one waiting: every other concurrent request is refused."""
    import dataclasses

    from server.app import start

    running = start(dataclasses.replace(serve_config, max_queue=1, max_batch=1))
    try:
        with connect(f"127.0.0.1:{running.port}", api_key) as ch:
            stub = chat_pb2_grpc.ChatServiceStub(ch)
            calls = [
                stub.Generate.future(ask(max_new_tokens=64, temperature=1.0, seed=i + 1))
                for i in range(16)
            ]
            codes, details = [], []
            for call in calls:
                try:
                    call.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    codes.append(err.code())
                    details.append(err.details())
    finally:
        running.stop(grace_s=1)
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("--max-queue" in d for d in details)


def long_request() -> chat_pb2.GenerateRequest:
    request = ask(max_new_tokens=64, temperature=1.0, seed=5)
    request.sampling.ignore_eos = True  # it runs all 64 steps: time to go away mid-answer
    return request


def requests_counted(method: str, code: str) -> float:
    labels = {"method": method, "code": code}
    return REGISTRY.get_sample_value("kaizen_requests_total", labels) or 0.0


def test_a_cancelled_stream_is_counted_cancelled_and_not_logged(server, stubs):
    from tests.conftest import wait_until

    before = requests_counted("GenerateStream", "CANCELLED")
    ok_before = requests_counted("GenerateStream", "OK")
    call = stubs.chat.GenerateStream(long_request())
    next(call)  # the answer is under way
    call.cancel()
    wait_until(
        lambda: requests_counted("GenerateStream", "CANCELLED") == before + 1,
        what="the cancelled stream counted as CANCELLED",
    )
    assert requests_counted("GenerateStream", "OK") == ok_before
    with sqlite3.connect(server.buffer.path) as db:
        assert db.execute("SELECT COUNT(*) FROM generations").fetchone()[0] == 0


def test_a_generate_past_its_deadline_is_not_logged(server, stubs):
    from tests.conftest import wait_until

    before = requests_counted("Generate", "CANCELLED")
    with pytest.raises(grpc.RpcError) as err:
        stubs.chat.Generate(long_request(), timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(
        lambda: requests_counted("Generate", "CANCELLED") == before + 1,
        what="the abandoned Generate counted as CANCELLED",
    )
    with sqlite3.connect(server.buffer.path) as db:
        assert db.execute("SELECT COUNT(*) FROM generations").fetchone()[0] == 0


def test_kaizen_version(capsys):
    from importlib.metadata import version

    from kaizen.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"kaizen {version('kaizen')}"


def test_the_latencies_users_feel_are_exported(server, stubs):
    def count(name: str, labels: dict | None = None) -> float:
        return REGISTRY.get_sample_value(name, labels or {}) or 0.0

    serving = {"arm": "serving"}
    before = {
        "ttft": count("kaizen_time_to_first_token_seconds_count", serving),
        "itl": count("kaizen_inter_token_latency_seconds_count", serving),
        "wait": count("kaizen_queue_wait_seconds_count"),
        "step": count("kaizen_decode_step_seconds_count"),
        "length": count("kaizen_request_finished_total", {"reason": "length"}),
        "generated": count("kaizen_request_generation_tokens_sum"),
    }
    request = ask(max_new_tokens=5, seed=9)
    request.sampling.ignore_eos = True
    reply = stubs.chat.Generate(request)
    assert reply.completion_tokens == 5 and reply.finish_reason == "length"
    assert count("kaizen_time_to_first_token_seconds_count", serving) == before["ttft"] + 1
    assert count("kaizen_inter_token_latency_seconds_count", serving) == before["itl"] + 4
    assert count("kaizen_queue_wait_seconds_count") == before["wait"] + 1
    assert count("kaizen_decode_step_seconds_count") >= before["step"] + 5
    assert count("kaizen_request_finished_total", {"reason": "length"}) == before["length"] + 1
    assert count("kaizen_request_generation_tokens_sum") == before["generated"] + 5
    assert count("kaizen_build_info", {"version": "0.1.0"}) == 1
    assert count("kaizen_requests_running") in (0, 1)


def health_status(channel, service: str = "") -> int:
    return (
        health_pb2_grpc.HealthStub(channel)
        .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        .status
    )


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_turns_not_serving_when_the_decode_loop_dies_or_sticks(
    serve_config, api_key, monkeypatch
):
    import dataclasses
    import threading

    from server.app import start
    from tests.conftest import wait_until

    running = start(dataclasses.replace(serve_config, stuck_after_s=0.5))
    watch, engine = running.health, running.engine
    try:
        with connect(f"127.0.0.1:{running.port}", api_key) as channel:
            assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            stuck, release = threading.Event(), threading.Event()
            iterate = engine._iterate

            def hang() -> None:  # one iteration that never ends, until released
                stuck.set()
                release.wait()
                iterate()

            monkeypatch.setattr(engine, "_iterate", hang)
            assert stuck.wait(10)
            wait_until(lambda: not watch.check(), timeout_s=10, what="NOT_SERVING when stuck")
            for service in ("", "kaizen.v1.ChatService"):
                status = health_status(channel, service)
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            monkeypatch.setattr(engine, "_iterate", iterate)
            release.set()
            wait_until(lambda: watch.check(), timeout_s=10, what="SERVING again")
            assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING

            def die() -> None:
                raise SystemExit  # not an Exception: the decode loop's thread ends

            monkeypatch.setattr(engine, "_iterate", die)
            wait_until(lambda: not watch.check(), timeout_s=10, what="NOT_SERVING when dead")
            assert health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert REGISTRY.get_sample_value("kaizen_decode_loop_up") == 0
    finally:
        running.stop(grace_s=1)


def test_stopping_drains_answers_in_flight_and_refuses_new_calls(serve_config, api_key):
    import threading

    from server.app import start

    running = start(serve_config)
    with connect(f"127.0.0.1:{running.port}", api_key) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        in_flight = stub.Generate.future(long_request())
        time.sleep(0.2)  # it is decoding
        stopper = threading.Thread(target=running.stop, kwargs={"grace_s": 60})
        stopper.start()
        time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(ask(max_new_tokens=2), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        reply = in_flight.result(timeout=60)  # finished, not cut off
        assert reply.completion_tokens == 64
        stopper.join(60)
