"""Per-user and per-key limits at the door: over a limit is RESOURCE_EXHAUSTED naming
it, nothing is stored, other users are unaffected, a reconnect does not reset it."""

from __future__ import annotations

import dataclasses
import math
import sqlite3
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from kaizen.auth import INSECURE, KeyFile, Principal
from kaizen.client import connect
from kaizen.errors import ResourceExhausted
from kaizen.v1 import chat_pb2_grpc, feedback_pb2, feedback_pb2_grpc
from server.limits import Limiter, RateLimits
from tests.conftest import ask
from tests.redis_server import redis_server_fixture  # noqa: F401


def rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def feedback_rows(config) -> int:
    with sqlite3.connect(config.buffer.removeprefix("sqlite:///")) as db:
        return db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]


def limited(limit: str) -> float:
    return REGISTRY.get_sample_value("kaizen_rate_limited_total", {"limit": limit}) or 0.0


@pytest.fixture
def limited_server(serve_config):
    from server.app import start

    started = []

    def make(**changes):
        running = start(dataclasses.replace(serve_config, **changes))
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop(grace_s=1)


def test_one_user_over_the_feedback_limit_is_refused_and_others_are_not(
    limited_server, serve_config, api_key
):
    limit = 50
    running = limited_server(user_feedback_per_min=float(limit))
    address = f"127.0.0.1:{running.port}"
    with connect(address, api_key) as channel:  # the frontend's key: it names the users
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        fb = feedback_pb2_grpc.FeedbackServiceStub(channel)
        mine = chat.Generate(ask(user_id="flooder")).response_id
        theirs = chat.Generate(ask(user_id="bystander")).response_id
        counted = limited("user_feedback_per_min")
        rss_before = rss_kb()
        codes = []
        started = time.monotonic()
        for i in range(10 * limit):
            try:
                fb.SubmitFeedback(
                    feedback_pb2.Feedback(event_id=f"f{i}", response_id=mine, dwell_ms=i)
                )
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert exc.details().startswith("user_feedback_per_min:"), exc.details()
        refilled = math.ceil(limit / 60 * (time.monotonic() - started))  # a loaded machine
        rss_after = rss_kb()
        accepted = codes.count("OK")
        print(f"accepted {accepted} of {len(codes)}; RSS {rss_before} -> {rss_after} kB")
        # the first minute's allowance, plus what refilled while the loop ran
        assert limit <= accepted <= limit + refilled, (accepted, refilled)
        assert codes[:limit] == ["OK"] * limit
        assert codes.count("RESOURCE_EXHAUSTED") == len(codes) - accepted
        assert limited("user_feedback_per_min") >= counted + 10 * limit - accepted
        assert feedback_rows(serve_config) == accepted  # nothing refused was stored
        ack = fb.SubmitFeedback(
            feedback_pb2.Feedback(event_id="b1", response_id=theirs, thumb=feedback_pb2.THUMB_UP)
        )
        assert ack.accepted == 1  # another user is unaffected
    with connect(address, api_key) as channel:  # a new connection: the same bucket
        with pytest.raises(grpc.RpcError) as err:
            feedback_pb2_grpc.FeedbackServiceStub(channel).SubmitFeedback(
                feedback_pb2.Feedback(event_id="again", response_id=mine, copy={})
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # 450 refused calls leave the server's memory where it was (the limiter keeps one
    # bucket per user; a refused call allocates nothing that stays)
    assert rss_after - rss_before < 16 * 1024, (rss_before, rss_after)


def test_a_key_limit_caps_a_frontend_across_its_users(limited_server, credentials):
    keys, _ = credentials
    file = KeyFile.load(keys)
    frontend = file.create("frontend", frozenset({"chat"}))
    file.save()
    running = limited_server(key_requests_per_min=5.0)
    with connect(f"127.0.0.1:{running.port}", frontend) as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        for i in range(5):
            chat.Generate(ask(user_id=f"user-{i}", max_new_tokens=2))
        with pytest.raises(grpc.RpcError) as err:
            chat.Generate(ask(user_id="user-new", max_new_tokens=2))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details().startswith("key_requests_per_min:")
    assert "'frontend'" in err.value.details()


def test_long_corrections_and_heavy_streams_are_refused_naming_the_limit(
    limited_server, serve_config, api_key
):
    running = limited_server(max_feedback_text_chars=100, max_feedback_stream_bytes=1000)
    with connect(f"127.0.0.1:{running.port}", api_key) as channel:
        rid = chat_pb2_grpc.ChatServiceStub(channel).Generate(ask()).response_id
        fb = feedback_pb2_grpc.FeedbackServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            fb.SubmitFeedback(
                feedback_pb2.Feedback(event_id="c", response_id=rid, correction="x" * 101)
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("correction: 101 characters; the limit is 100")
        events = [
            feedback_pb2.Feedback(event_id=f"s{i}", response_id=rid, comment="y" * 90)
            for i in range(20)  # 20 × 90 bytes > 1000
        ]
        with pytest.raises(grpc.RpcError) as err:
            fb.StreamFeedback(iter(events))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details().startswith("max_feedback_stream_bytes:")
        assert "feedback[11]" in err.value.details()
    assert feedback_rows(serve_config) == 0


def test_buckets_refill_at_the_limits_pace_and_take_all_or_nothing():
    now = [0.0]
    limiter = Limiter(RateLimits(2, 100, 60, 100), clock=lambda: now[0])
    user = Principal("user", "ann", frozenset({"chat"}), user="ann")
    limiter.request(user, "ann")
    limiter.request(user, "ann")
    with pytest.raises(ResourceExhausted, match="retry in 30.0 s"):
        limiter.request(user, "ann")
    now[0] += 30  # 2 a minute: one more after 30 s
    limiter.request(user, "ann")
    with pytest.raises(ResourceExhausted):
        limiter.request(user, "ann")
    key = Principal("key", "fe", frozenset({"feedback"}))
    with pytest.raises(ResourceExhausted, match="user_feedback_per_min"):
        limiter.feedback(key, {"bob": 10, "cat": 61})  # cat over: bob not charged either
    limiter.feedback(key, {"bob": 60})  # bob's whole minute is still there
    limiter.feedback(INSECURE, {"": 1000})  # an open server and no user: no bucket


def test_replicas_on_redis_share_one_bucket_per_user_and_never_fsync_it(redis_server):
    """Two servers' limiters on one Redis buffer (two replicas behind a load balancer):
    the user's minute is spent once across both, all or nothing; the buckets never reach
    the append-only file."""
    from kaizen.buffer import open_buffer

    buffers = [open_buffer(redis_server.url) for _ in range(2)]
    try:
        a, b = (Limiter(RateLimits(3, 100, 60, 100), shared=buf) for buf in buffers)
        user = Principal("user", "ann-secret-id", frozenset({"chat"}), user="ann-secret-id")
        a.request(user, "ann-secret-id")
        b.request(user, "ann-secret-id")
        a.request(user, "ann-secret-id")
        with pytest.raises(ResourceExhausted, match="user_requests_per_min: user 'ann-secret-id'"):
            b.request(user, "ann-secret-id")  # 3 a minute in all, not 3 per replica
        b.request(Principal("user", "bob", frozenset({"chat"}), user="bob"), "bob")
        key = Principal("key", "fe", frozenset({"feedback"}))
        with pytest.raises(ResourceExhausted, match="user_feedback_per_min"):
            a.feedback(key, {"cat": 10, "dan": 61})  # dan over: cat not charged either
        b.feedback(key, {"cat": 60})  # cat's whole minute is still there, on the other one
        assert buffers[0].client.keys("kaizen:rate:*")  # they are in Redis, hashed…
        on_disk = redis_server.files()  # …and not in its append-only file
        assert b"rate:" not in on_disk and b"ann-secret-id" not in on_disk
    finally:
        for buf in buffers:
            buf.close()
