"""`FeedbackService.StreamFeedbackBatches` over a real channel: stored as StreamFeedback
stores the same events, all or nothing, errors naming `batch[i].events[j]`, the stream's
bounds counted over every batch, its scope; and `Client.feedback_batch`."""

from __future__ import annotations

import dataclasses
import random
import sqlite3

import grpc
import pytest
from prometheus_client import REGISTRY

import kaizen.client
from kaizen.client import Client, RetryPolicy
from kaizen.v1 import feedback_pb2, feedback_pb2_grpc
from server.auth import SCOPE_OF
from tests.conftest import ask

Event = feedback_pb2.Feedback
Batch = feedback_pb2.FeedbackBatch


def stored(config) -> list[tuple]:
    """Every feedback row in the order stored, as the user would see it reported."""
    sql = """SELECT event_id, response_id, user_id, kind, value, text, source, state
             FROM feedback ORDER BY seq"""
    with sqlite3.connect(config.buffer.removeprefix("sqlite:///")) as db:
        return db.execute(sql).fetchall()


def split(events: list[Event], rng: random.Random) -> list[Batch]:
    """The events in order, in batches of random sizes, an empty batch among them."""
    batches, i = [], 0
    while i < len(events):
        n = rng.randrange(0, 6)
        batches.append(Batch(events=events[i : i + n]))
        i += n
    return batches


def ack(reply) -> tuple[int, int, int]:
    return reply.accepted, reply.duplicates, reply.superseded


def test_batches_store_what_the_same_events_streamed_one_by_one_store(server, stubs, serve_config):
    """Retries, a signal changed (superseding), the same event twice in one call, a
    comment: per call the same ack, and the same rows, as one event per message."""
    answers = {
        side: [stubs.chat.Generate(ask(user_id="u1")).response_id for _ in range(3)]
        for side in ("s", "b")
    }
    rng = random.Random(7)
    signals = [
        {"thumb": feedback_pb2.THUMB_UP},
        {"thumb": feedback_pb2.THUMB_DOWN},
        {"rating": 4},
        {"rating": 2},
        {"click": {}},
        {"dwell_ms": 5400},
        {"comment": "too long"},
    ]
    pool = [(f"e{i}", rng.randrange(3), rng.choice(signals)) for i in range(25)]
    calls = [[rng.choice(pool) for _ in range(rng.randrange(1, 12))] for _ in range(12)]

    def events(side: str, call: list) -> list[Event]:
        return [
            Event(event_id=f"{side}-{e}", response_id=answers[side][a], user_id="u1", **signal)
            for e, a, signal in call
        ]

    for call in calls:
        streamed = stubs.feedback.StreamFeedback(iter(events("s", call)))
        batched = stubs.feedback.StreamFeedbackBatches(iter(split(events("b", call), rng)))
        assert ack(batched) == ack(streamed)
    rows = stored(serve_config)
    as_streamed = {a: b for a, b in zip(answers["s"], answers["b"], strict=True)}
    streamed_rows = [
        (f"b-{r[0][2:]}", as_streamed[r[1]], *r[2:]) for r in rows if r[0].startswith("s-")
    ]
    assert [r for r in rows if r[0].startswith("b-")] == streamed_rows
    states = {r[-1] for r in streamed_rows}
    assert states == {"active", "superseded"}  # both cases were exercised
    assert len(streamed_rows) == len({e for call in calls for e, _, _ in call})


def test_an_empty_call_and_empty_batches_store_nothing(stubs, serve_config):
    assert ack(stubs.feedback.StreamFeedbackBatches(iter([]))) == (0, 0, 0)
    assert ack(stubs.feedback.StreamFeedbackBatches(iter([Batch(), Batch()]))) == (0, 0, 0)
    assert stored(serve_config) == []


@pytest.mark.parametrize(
    "bad, code, details",
    [
        (
            Event(event_id="bad", response_id="{rid}", rating=9),
            grpc.StatusCode.INVALID_ARGUMENT,
            "batch[1].events[2].rating: 9 is outside 1..5",
        ),
        (
            Event(event_id="", response_id="{rid}", rating=3),
            grpc.StatusCode.INVALID_ARGUMENT,
            "batch[1].events[2].event_id:",
        ),
        (
            Event(event_id="bad", response_id="r-unknown", click={}),
            grpc.StatusCode.NOT_FOUND,
            "batch[1].events[2].response_id: no answer 'r-unknown'",
        ),
    ],
)
def test_one_bad_event_in_batch_two_refuses_the_whole_call_naming_it(
    stubs, serve_config, bad, code, details
):
    rid = stubs.chat.Generate(ask()).response_id
    bad.response_id = bad.response_id.format(rid=rid)
    good = [Event(event_id=f"g{i}", response_id=rid, dwell_ms=100 * i) for i in range(6)]
    batches = [Batch(events=good[:3]), Batch(events=[*good[3:5], bad, good[5]])]
    with pytest.raises(grpc.RpcError) as err:
        stubs.feedback.StreamFeedbackBatches(iter(batches))
    assert err.value.code() == code
    assert err.value.details().startswith(details)
    assert stored(serve_config) == []  # batch 1 was fine, and is not stored either


def test_an_event_in_another_users_name_refuses_the_call_naming_it(stubs, serve_config):
    """Ownership is checked per event, as in StreamFeedback: the user an event names
    must be its answer's."""
    rid = stubs.chat.Generate(ask(user_id="u1")).response_id
    batches = [
        Batch(events=[Event(event_id="a", response_id=rid, thumb=feedback_pb2.THUMB_UP)]),
        Batch(events=[Event(event_id="b", response_id=rid, user_id="u2", copy={})]),
    ]
    with pytest.raises(grpc.RpcError) as err:
        stubs.feedback.StreamFeedbackBatches(iter(batches))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details().startswith("batch[1].events[0].response_id:")
    assert stored(serve_config) == []


def test_the_events_bound_counts_over_all_batches(stubs, serve_config):
    rid = stubs.chat.Generate(ask()).response_id

    def batch(start: int, n: int) -> Batch:
        return Batch(
            events=[Event(event_id=f"e{i}", response_id=rid, click={}) for i in range(start, n)]
        )

    # 10,001 events in three batches, none of them over the bound on its own
    with pytest.raises(grpc.RpcError) as err:
        stubs.feedback.StreamFeedbackBatches(
            iter([batch(0, 4000), batch(4000, 8000), batch(8000, 10_001)])
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "batch: more than 10000 events in one stream; split it"
    assert stored(serve_config) == []
    reply = stubs.feedback.StreamFeedbackBatches(iter([batch(0, 5000), batch(5000, 10_000)]))
    # exactly the bound is taken; each click on the answer replaces the one before
    assert ack(reply) == (10_000, 0, 9_999)


def test_the_text_bound_counts_over_all_batches(serve_config, api_key):
    from server.app import start

    running = start(dataclasses.replace(serve_config, max_feedback_stream_bytes=1000))
    limited = {"limit": "max_feedback_stream_bytes"}
    before = REGISTRY.get_sample_value("kaizen_rate_limited_total", limited) or 0.0
    try:
        with kaizen.client.connect(f"127.0.0.1:{running.port}", api_key) as channel:
            rid = Client.from_channel(channel).chat("hi", "u1").response_id
            fb = feedback_pb2_grpc.FeedbackServiceStub(channel)
            comments = [
                Event(event_id=f"c{i}", response_id=rid, comment="y" * 90) for i in range(15)
            ]
            # 5 × 90 bytes a batch, each under 1000; the call passes 1000 at its 12th event
            batches = [Batch(events=comments[i : i + 5]) for i in range(0, 15, 5)]
            with pytest.raises(grpc.RpcError) as err:
                fb.StreamFeedbackBatches(iter(batches))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.value.details().startswith("max_feedback_stream_bytes:")
            assert "passed 1000 bytes at batch[2].events[1] " in err.value.details()
            assert stored(serve_config) == []
            # 900 bytes are taken (each comment replaces the one before on the answer)
            assert ack(fb.StreamFeedbackBatches(iter(batches[:2]))) == (10, 0, 9)
    finally:
        running.stop(grace_s=1)
    assert REGISTRY.get_sample_value("kaizen_rate_limited_total", limited) == before + 1


def test_every_kaizen_method_has_its_scope_listed():
    """A method missing from the table would need scope admin: a frontend's feedback key
    would be refused on it."""
    methods = {
        f"/{service.full_name}/{method.name}"
        for service in feedback_pb2.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert "/kaizen.v1.FeedbackService/StreamFeedbackBatches" in methods
    assert {m: SCOPE_OF.get(m) for m in methods} == {m: "feedback" for m in methods}


# -- Client.feedback_batch -------------------------------------------------------------


class LostReply(grpc.StreamUnaryClientInterceptor):
    """The first call is done by the server, then its reply is lost (UNAVAILABLE)."""

    def __init__(self) -> None:
        self.calls = 0

    def intercept_stream_unary(self, continuation, details, request_iterator):
        self.calls += 1
        outcome = continuation(details, request_iterator)
        if self.calls == 1:
            outcome.result()

            class Unavailable(grpc.RpcError):
                def code(self):
                    return grpc.StatusCode.UNAVAILABLE

                def details(self):
                    return "injected: the reply was lost"

            raise Unavailable()
        return outcome


def test_client_feedback_batch_is_stored_once_when_retried(server, api_key, serve_config):
    lost = LostReply()
    with kaizen.client.connect(f"127.0.0.1:{server.port}", api_key) as channel:
        retrying = RetryPolicy(attempts=3, initial_backoff_s=0.0)
        kz = Client.from_channel(grpc.intercept_channel(channel, lost), retrying)
        rid = kz.chat("hi", "u1").response_id
        reply = kz.feedback_batch(
            [
                {"response_id": rid, "user_id": "u1", "thumb": "up"},
                {"response_id": rid, "rating": 5, "event_id": "mine"},
                {"response_id": rid, "click": True},
            ]
        )
    assert lost.calls == 2  # the first try stored the events; the retry found duplicates
    assert (reply.accepted, reply.duplicates, reply.superseded) == (0, 3, 0)
    assert len(reply.event_ids) == 3 and reply.event_ids[1] == "mine"
    rows = stored(serve_config)
    assert [(r[0], r[3]) for r in rows] == list(
        zip(reply.event_ids, ["thumb", "rating", "click"], strict=True)
    )


def test_client_feedback_batch_splits_large_calls_into_messages(
    server, api_key, serve_config, monkeypatch
):
    with Client(f"127.0.0.1:{server.port}", api_key) as kz:
        rid = kz.chat("hi", "u1").response_id
        events = [{"response_id": rid, "comment": f"note {i} " + "z" * 60} for i in range(6)]
        each = kaizen.client._event(0, events[0]).ByteSize() + 8
        monkeypatch.setattr(kaizen.client, "BATCH_MESSAGE_BYTES", 2 * each)
        assert kz.feedback_batch(events).accepted == 6
        events[4] = {"response_id": rid, "rating": 7}
        with pytest.raises(grpc.RpcError) as err:
            kz.feedback_batch(events)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # two events a message: the fifth is the third message's first
    assert err.value.details().startswith("batch[2].events[0].rating:")
    assert len(stored(serve_config)) == 6


def test_client_feedback_batch_refuses_a_malformed_event_naming_it():
    with pytest.raises(ValueError, match=r"events\[1\]: set exactly one of"):
        kaizen.client._event(1, {"response_id": "r", "thumb": "up", "rating": 3})
    with pytest.raises(ValueError, match=r"events\[0\]: unknown score"):
        kaizen.client._event(0, {"response_id": "r", "score": 3})
    with pytest.raises(ValueError, match=r"events\[2\]: response_id is required"):
        kaizen.client._event(2, {"thumb": "up"})
