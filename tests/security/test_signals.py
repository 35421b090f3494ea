"""One effective signal per (user, answer, kind); a withdrawn signal never trains."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from kaizen.v1 import feedback_pb2
from tests.conftest import ask


def thumb(event_id: str, rid: str, up: bool) -> feedback_pb2.Feedback:
    t = feedback_pb2.THUMB_UP if up else feedback_pb2.THUMB_DOWN
    return feedback_pb2.Feedback(event_id=event_id, response_id=rid, thumb=t)


def test_up_then_down_then_resent_leaves_one_signal_the_latest(server, stubs):
    rid = stubs.chat.Generate(ask(user_id="ann")).response_id
    assert stubs.feedback.SubmitFeedback(thumb("t1", rid, up=True)).superseded == 0
    assert stubs.feedback.SubmitFeedback(thumb("t2", rid, up=False)).superseded == 1
    again = stubs.feedback.SubmitFeedback(thumb("t3", rid, up=False))  # re-sent, new id
    assert (again.accepted, again.superseded) == (1, 1)
    assert stubs.feedback.SubmitFeedback(thumb("t3", rid, up=False)).duplicates == 1
    samples = server.buffer.read_samples(0, 100)
    assert [(s.feedback.event_id, s.feedback.value) for s in samples] == [("t3", -1.0)]
    assert server.buffer.feedback_states() == {"active": 1, "superseded": 2, "withdrawn": 0}


def test_kinds_are_separate_signals(server, stubs):
    rid = stubs.chat.Generate(ask(user_id="ann")).response_id
    stubs.feedback.SubmitFeedback(thumb("a", rid, up=True))
    stubs.feedback.SubmitFeedback(feedback_pb2.Feedback(event_id="b", response_id=rid, copy={}))
    kinds = sorted(str(s.feedback.kind) for s in server.buffer.read_samples(0, 10))
    assert kinds == ["copy", "thumb"]


def test_a_withdrawn_thumb_is_not_in_the_learners_next_batch(server, stubs, server_learner):
    kept = stubs.chat.Generate(ask(user_id="ann", seed=1)).response_id
    taken = stubs.chat.Generate(ask(user_id="ann", seed=2)).response_id
    stubs.feedback.SubmitFeedback(thumb("k", kept, up=True))
    stubs.feedback.SubmitFeedback(thumb("w", taken, up=False))
    ack = stubs.feedback.WithdrawFeedback(
        feedback_pb2.WithdrawRequest(response_id=taken, kind="thumb")
    )
    assert ack.withdrawn == 1
    assert (
        stubs.feedback.WithdrawFeedback(feedback_pb2.WithdrawRequest(response_id=taken)).withdrawn
        == 0
    )  # idempotent: nothing left to take back
    server_learner.fill()
    assert [ex.reward for ex in server_learner.pending] == [1.0]  # "w" is gone
    with pytest.raises(grpc.RpcError) as err:
        stubs.feedback.WithdrawFeedback(
            feedback_pb2.WithdrawRequest(response_id=kept, kind="smile")
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("kind:")
    with pytest.raises(grpc.RpcError) as err:
        stubs.feedback.WithdrawFeedback(feedback_pb2.WithdrawRequest(response_id="r-none"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_user_cannot_withdraw_another_users_signal(server, stubs):
    rid = stubs.chat.Generate(ask(user_id="ann")).response_id
    stubs.feedback.SubmitFeedback(thumb("x", rid, up=True))
    with pytest.raises(grpc.RpcError) as err:
        stubs.feedback.WithdrawFeedback(
            feedback_pb2.WithdrawRequest(response_id=rid, user_id="bob")
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert server.buffer.feedback_states()["active"] == 1
    assert dataclasses.is_dataclass(server.buffer.read_samples(0, 1)[0])
