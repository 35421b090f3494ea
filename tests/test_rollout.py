"""Safe rollout in a running server: canary routing, the test's decisions, admin RPCs."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import grpc
import pytest

from kaizen.auth import KeyFile
from kaizen.client import connect
from kaizen.registry import PROMOTED, ROLLED_BACK, Registry
from kaizen.v1 import chat_pb2_grpc, feedback_pb2, feedback_pb2_grpc, model_pb2, model_pb2_grpc
from tests.conftest import ask, publish_random_adapter, wait_until

USERS = [f"user-{i}" for i in range(40)]


@pytest.fixture
def rollout_server(serve_config, api_key):
    """Start a server with rollout settings; stopped at the end of the test."""
    from server.app import start

    started = []

    def make(**changes):
        running = start(replace(serve_config, **changes))
        started.append(running)
        channel = connect(f"127.0.0.1:{running.port}", api_key)
        grpc.channel_ready_future(channel).result(timeout=10)
        running.chat = chat_pb2_grpc.ChatServiceStub(channel)
        running.feedback = feedback_pb2_grpc.FeedbackServiceStub(channel)
        running.model = model_pb2_grpc.ModelServiceStub(channel)
        running.channel = channel
        return running

    yield make
    for running in started:
        running.channel.close()
        running.stop(grace_s=1)


def versions(running) -> dict[str, model_pb2.VersionInfo]:
    listed = running.model.ListVersions(model_pb2.ListVersionsRequest()).versions
    return {v.version: v for v in listed}


def chat_everyone(running) -> dict[str, object]:
    return {u: running.chat.Generate(ask(user_id=u, seed=i + 1)) for i, u in enumerate(USERS)}


def thumbs(running, answers, up) -> None:
    """A thumb from each user on their answer: up where `up(answer)` says so."""
    for u, a in answers.items():
        running.feedback.SubmitFeedback(
            feedback_pb2.Feedback(
                event_id=f"e-{a.response_id}",
                response_id=a.response_id,
                user_id=u,
                thumb=feedback_pb2.THUMB_UP if up(a) else feedback_pb2.THUMB_DOWN,
            )
        )


def test_a_canary_serves_its_sticky_share_and_good_feedback_promotes_it(rollout_server, tiny_model):
    # each user's first rated answer is their observation; a lenient margin: promote what
    # 20 users a side cannot show to be worse by a whole reward point
    running = rollout_server(
        canary_share=0.5,
        canary_max_share=0.5,
        canary_min_feedback=8,
        canary_margin=1.0,
        canary_user_answers=1,
    )
    registry = Registry(running.watcher.registry.root)
    v1 = publish_random_adapter(registry, tiny_model, seed=1)
    wait_until(lambda: running.engine.canary is not None, what="the canary install")
    assert versions(running)[v1].state == "canary"

    answers = chat_everyone(running)
    for u, a in answers.items():  # the same users, in the same batches, on their version
        assert a.model_version == (v1 if running.rollout.buckets.in_canary(u, 0.5) else "v0"), u
    again = running.chat.Generate(ask(user_id=USERS[0], seed=99))
    assert again.model_version == answers[USERS[0]].model_version

    thumbs(running, answers, up=lambda a: True)  # as good as the serving version
    wait_until(lambda: registry.rollout(v1) is not None, what="the decision")
    assert running.engine.version == v1 and running.engine.canary is None
    assert registry.rollout(v1)["state"] == PROMOTED
    listed = versions(running)
    assert listed[v1].state == "serving" and listed["v0"].state == "retired"
    evidence = json.loads(listed[v1].evidence_json)["canary"]
    assert evidence["decision"] == "promote" and evidence["arms"][v1]["n"] >= 8
    assert running.chat.Generate(ask(user_id=USERS[1])).model_version == v1


def test_bad_feedback_rolls_the_canary_back_and_it_is_never_served_again(
    rollout_server, tiny_model
):
    running = rollout_server(
        canary_share=0.5, canary_max_share=0.5, canary_min_feedback=8, canary_user_answers=1
    )
    registry = Registry(running.watcher.registry.root)
    v1 = publish_random_adapter(registry, tiny_model, seed=1)
    wait_until(lambda: running.engine.canary is not None, what="the canary install")
    for _ in range(2):
        answers = chat_everyone(running)
        thumbs(running, answers, up=lambda a: a.model_version != v1)
    wait_until(lambda: registry.rollout(v1) is not None, what="the rollback")
    assert registry.rollout(v1)["state"] == ROLLED_BACK
    assert running.engine.version == "v0" and running.engine.canary is None
    listed = versions(running)
    assert listed[v1].state == "rolled_back" and "worse than v0" in listed[v1].reason
    assert all(a.model_version == "v0" for a in chat_everyone(running).values())

    v2 = publish_random_adapter(registry, tiny_model, seed=2)  # the next one gets its turn
    wait_until(lambda: running.engine.canary is not None, what="the next canary")
    served = {a.model_version for a in chat_everyone(running).values()}
    assert served == {"v0", v2}


def test_an_undecided_canary_gives_way_to_a_newer_version_after_supersede_after_s(
    rollout_server, tiny_model
):
    running = rollout_server(canary_share=0.5, canary_supersede_after_s=900.0)
    registry = Registry(running.watcher.registry.root)
    policy = registry.policy()  # what the learner's gate reads: a live test will run
    assert policy["canary_share"] == 0.5 and policy["by"] == running.rollout.holder
    v1 = publish_random_adapter(registry, tiny_model, seed=1)
    wait_until(lambda: running.engine.canary is not None, what="the canary install")
    v2 = publish_random_adapter(registry, tiny_model, seed=2)
    rollout = running.rollout
    started = rollout.experiment.started_at
    assert not rollout.yield_to(v2, now=started + 899)  # too young: v2 waits its turn
    assert rollout.experiment.canary == v1 and registry.rollout(v1) is None
    assert not rollout.yield_to(v1, now=started + 901)  # only a newer version replaces it
    assert rollout.yield_to(v2, now=started + 901)
    record = registry.rollout(v1)
    assert record["state"] == ROLLED_BACK and record["by"] == "test"
    assert record["reason"].startswith(f"superseded by {v2}: undecided after 901 s")
    assert record["evidence"]["outcome"] == "undecided"  # the learner goes on from it
    wait_until(lambda: rollout.experiment is not None, what="the next canary")
    assert rollout.experiment.canary == v2
    served = {a.model_version for a in chat_everyone(running).values()}
    assert served == {"v0", v2}


def test_a_restarted_server_goes_on_with_its_canary_and_the_feedback_it_had(
    rollout_server, tiny_model
):
    config = dict(canary_share=0.5, canary_max_share=0.5, canary_user_answers=1)
    running = rollout_server(**config)
    registry = Registry(running.watcher.registry.root)
    v1 = publish_random_adapter(registry, tiny_model, seed=1)
    wait_until(lambda: running.engine.canary is not None, what="the canary install")
    answers = chat_everyone(running)
    thumbs(running, answers, up=lambda a: True)
    arms = running.rollout.experiment.arms
    wait_until(lambda: sum(a.events for a in arms.values()) == len(USERS), what="the evidence")
    before = {v: arm.events for v, arm in arms.items()}
    started_at = running.rollout.experiment.started_at
    running.channel.close()
    running.stop(grace_s=1)

    again = rollout_server(**config)  # the same registry and buffer
    assert again.engine.canary is not None and again.engine.canary.version == v1
    assert versions(again)[v1].state == "canary" and registry.rollout(v1) is None
    e = again.rollout.experiment
    assert e.canary == v1 and e.started_at == started_at  # the same test, not a new one
    assert {v: arm.events for v, arm in e.arms.items()} == before  # read again from the buffer
    for u, a in answers.items():  # and the same users on it
        assert again.chat.Generate(ask(user_id=u, seed=7)).model_version == a.model_version


def test_a_version_the_learner_rejected_is_listed_with_its_reason_and_never_served(
    rollout_server, tiny_model
):
    running = rollout_server()  # no canary: anything servable would be served at once
    registry = Registry(running.watcher.registry.root)
    reason = "replay gate: snips lower bound -0.400 is below v0's +0.100"
    v1 = publish_random_adapter(registry, tiny_model, seed=1, metadata={"rejected": reason})
    v2 = publish_random_adapter(registry, tiny_model, seed=2)
    wait_until(lambda: running.engine.version == v2, what="serving v2")
    listed = versions(running)
    assert (listed[v1].state, listed[v1].reason) == ("rejected", reason)
    with pytest.raises(grpc.RpcError) as refused:
        running.model.Promote(model_pb2.PromoteRequest(version=v1))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_version_passed_over_stays_skipped_after_the_newer_canary_is_rolled_back(
    rollout_server, tiny_model
):
    """ListVersions says what the watcher will do: v2, published while v1 was the canary
    and passed over for v3, is never offered once v3 has been tried, so it is "skipped",
    not "pending" for ever (bench learn waited on such versions to start)."""
    running = rollout_server(canary_share=0.5, canary_max_share=0.5)
    registry = Registry(running.watcher.registry.root)
    v1 = publish_random_adapter(registry, tiny_model, seed=1)
    wait_until(lambda: running.engine.canary is not None, what="v1's canary")
    v2 = publish_random_adapter(registry, tiny_model, seed=2)
    v3 = publish_random_adapter(registry, tiny_model, seed=3)
    assert versions(running)[v2].state == "pending"
    running.model.Rollback(model_pb2.RollbackRequest(version=v1, reason="ending it"))
    wait_until(
        lambda: running.engine.canary is not None and running.engine.canary.version == v3,
        what="v3's canary",
    )
    running.model.Rollback(model_pb2.RollbackRequest(version=v3, reason="ending it too"))
    time.sleep(0.5)  # ten registry polls: v2 would have been offered by now
    assert running.engine.canary is None and running.engine.version == "v0"
    listed = versions(running)
    assert [listed[v].state for v in (v1, v2, v3)] == ["rolled_back", "skipped", "rolled_back"]


def test_admin_rpcs_need_the_admin_scope_and_roll_back_to_the_last_promoted_version(
    rollout_server, tiny_model, credentials
):
    running = rollout_server()
    keys, _ = credentials
    chat_only = KeyFile.load(keys)
    frontend = chat_only.create("frontend", frozenset({"chat", "feedback"}))
    chat_only.save()
    registry = Registry(running.watcher.registry.root)
    v1 = publish_random_adapter(registry, tiny_model, seed=1)
    wait_until(lambda: running.engine.version == v1, what="serving v1")
    v2 = publish_random_adapter(registry, tiny_model, seed=2)
    wait_until(lambda: running.engine.version == v2, what="serving v2")
    rollback = model_pb2.RollbackRequest(version=v2, reason="users complain")
    for credential, code in (
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("kz_000000000000_wrong", grpc.StatusCode.UNAUTHENTICATED),
        (frontend, grpc.StatusCode.PERMISSION_DENIED),  # no admin scope
    ):
        with connect(f"127.0.0.1:{running.port}", credential) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                model_pb2_grpc.ModelServiceStub(channel).Rollback(rollback)
        assert refused.value.code() == code
        assert "authorization" in refused.value.details()
    assert registry.rollout(v2)["state"] == PROMOTED  # a refused call changed nothing
    assert running.engine.version == v2
    token = ()  # the fixture's channel carries a key with every scope

    info = running.model.Rollback(rollback, metadata=token)
    assert (info.state, info.reason) == ("rolled_back", "users complain")
    assert running.engine.version == v1  # the last promoted before v2; Rollback waits
    assert running.chat.Generate(ask()).model_version == v1

    running.model.Promote(model_pb2.PromoteRequest(version=v2), metadata=token)  # override
    assert running.engine.version == v2  # Promote answers once it serves
    # an operator's promotion of an older version sticks: the watcher does not bring v2 back
    running.model.Promote(model_pb2.PromoteRequest(version=v1), metadata=token)
    time.sleep(0.5)
    assert running.engine.version == v1 and registry.serving() == v1
    for request, field in (
        (model_pb2.PromoteRequest(version="v9"), "version"),
        (model_pb2.PromoteRequest(version="latest"), "version"),
        (model_pb2.PromoteRequest(), "version"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            running.model.Promote(request, metadata=token)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith(field)


def park_the_decode_loop(engine, monkeypatch):
    """Stop the decode loop before it installs anything; returns (parked, go_on) events."""
    import threading

    parked, go_on = threading.Event(), threading.Event()
    install = engine.install_staged

    def slow() -> None:
        parked.set()
        go_on.wait()
        install()

    monkeypatch.setattr(engine, "install_staged", slow)
    assert parked.wait(10)
    return go_on


def test_a_promotion_that_times_out_is_withdrawn_and_never_served_later(
    rollout_server, tiny_model, monkeypatch
):
    running = rollout_server(
        canary_share=0.5, canary_max_share=0.5, canary_min_feedback=10_000
    )  # no test decision
    v1 = publish_random_adapter(Registry(running.watcher.registry.root), tiny_model, seed=1)
    engine = running.engine
    wait_until(lambda: engine.canary is not None, what="the canary install")
    go_on = park_the_decode_loop(engine, monkeypatch)
    assert engine.promote_canary(v1, timeout_s=0.2) is False  # a slow swap: timed out
    go_on.set()
    assert running.chat.Generate(ask(user_id=USERS[0])).model_version in ("v0", v1)
    time.sleep(0.2)
    assert engine.version == "v0" and engine.canary.version == v1  # withdrawn, not applied late


def test_an_operator_promotion_that_times_out_changes_nothing_and_records_nothing(
    rollout_server, tiny_model, monkeypatch
):
    import functools

    running = rollout_server()
    registry = Registry(running.watcher.registry.root)
    v1 = publish_random_adapter(registry, tiny_model, seed=1)
    wait_until(lambda: running.engine.version == v1, what="serving v1")
    v2 = publish_random_adapter(registry, tiny_model, seed=2)
    wait_until(lambda: running.engine.version == v2, what="serving v2")
    engine = running.engine
    go_on = park_the_decode_loop(engine, monkeypatch)
    monkeypatch.setattr(
        engine, "wait_serving", functools.partial(type(engine).wait_serving, engine, timeout_s=0.2)
    )
    with pytest.raises(grpc.RpcError) as err:
        running.model.Promote(model_pb2.PromoteRequest(version=v1, reason="try"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "nothing changed" in err.value.details()
    go_on.set()
    time.sleep(0.3)
    assert engine.version == v2 and registry.serving() == v2  # not applied later either
    assert registry.rollout(v1)["reason"] != "try"
