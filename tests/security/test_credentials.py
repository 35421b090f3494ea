"""Who may chat, who may teach, who may deploy: every RPC refuses a bad credential, and a
refused call writes nothing (issue 17)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from kaizen.auth import KeyFile, issue_token
from kaizen.buffer import SQLiteBuffer
from kaizen.client import connect
from kaizen.v1 import (
    chat_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)
from tests.conftest import ask

ROOT = Path(__file__).resolve().parents[2]
JWT_SECRET = b"a-test-secret-of-at-least-thirty-two-bytes!"


def rows(buffer_url: str) -> tuple[int, int]:
    """(answers, feedback events) in the buffer file."""
    import sqlite3

    path = buffer_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        g = db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
        f = db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
    return g, f


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("kaizen_auth_failures_total", {"reason": reason}) or 0.0


def every_rpc(channel: grpc.Channel, response_id: str) -> dict[str, object]:
    """One call of every kaizen RPC; each returns its status code."""
    chat = chat_pb2_grpc.ChatServiceStub(channel)
    fb = feedback_pb2_grpc.FeedbackServiceStub(channel)
    model = model_pb2_grpc.ModelServiceStub(channel)
    thumb = feedback_pb2.Feedback(
        event_id=str(uuid.uuid4()), response_id=response_id, thumb=feedback_pb2.THUMB_UP
    )
    calls = {
        "Generate": lambda: chat.Generate(ask()),
        "GenerateStream": lambda: list(chat.GenerateStream(ask())),
        "SubmitFeedback": lambda: fb.SubmitFeedback(thumb),
        "StreamFeedback": lambda: fb.StreamFeedback(iter([thumb])),
        "StreamFeedbackBatches": lambda: fb.StreamFeedbackBatches(
            iter([feedback_pb2.FeedbackBatch(events=[thumb])])
        ),
        "WithdrawFeedback": lambda: fb.WithdrawFeedback(
            feedback_pb2.WithdrawRequest(response_id=response_id, kind="copy")
        ),
        "GetModelInfo": lambda: model.GetModelInfo(model_pb2.GetModelInfoRequest()),
        "ListVersions": lambda: model.ListVersions(model_pb2.ListVersionsRequest()),
        "Promote": lambda: model.Promote(model_pb2.PromoteRequest(version="v0")),
        "Rollback": lambda: model.Rollback(model_pb2.RollbackRequest(version="v0")),
        "ForgetUser": lambda: model.ForgetUser(model_pb2.ForgetUserRequest(user_id="nobody")),
    }
    codes = {}
    for name, call in calls.items():
        try:
            call()
            codes[name] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            codes[name] = exc.code()
            codes[name + ".details"] = exc.details()
    return codes


@pytest.fixture
def secured(serve_config, credentials):
    """A server taking API keys and user tokens; a logged answer of user alice."""
    from server.app import start

    running = start(serve_config, jwt_secret=JWT_SECRET)
    keys, admin_key = credentials
    with connect(f"127.0.0.1:{running.port}", admin_key) as ch:
        answer = chat_pb2_grpc.ChatServiceStub(ch).Generate(ask(user_id="alice"))
    yield running, keys, answer.response_id
    running.stop(grace_s=1)


def key_with(keys: Path, name: str, scopes: set[str]) -> str:
    file = KeyFile.load(keys)
    key = file.create(name, frozenset(scopes))
    file.save()
    return key


def test_bad_credentials_are_refused_on_every_rpc_and_write_nothing(secured, serve_config):
    running, keys, rid = secured
    revoked = key_with(keys, "gone", {"chat", "feedback", "admin"})
    file = KeyFile.load(keys)
    file.revoke("gone")
    file.save()
    expired = issue_token(JWT_SECRET, "alice", frozenset({"chat", "feedback"}), 1)
    forged = issue_token(b"another-secret-of-at-least-thirty-two-bytes", "alice", {"chat"}, 600)
    cases = {
        "missing": None,
        "malformed": "Basic",  # not a bearer credential at all
        "unknown_key": "kz_0123456789ab_not-a-real-secret",
        "revoked": revoked,
        "bad_token": forged,
        "expired": expired,
    }
    time.sleep(0.6)  # the server looks at the keys file at most every 0.5 s
    before = rows(serve_config.buffer)
    address = f"127.0.0.1:{running.port}"
    for reason, credential in cases.items():
        if reason == "expired":
            continue  # PyJWT allows 30 s of clock leeway: tested on its own below
        counted = failures(reason)
        if credential == "Basic":
            channel = grpc.insecure_channel(address)
            metadata = (("authorization", "Basic dXNlcjpwYXNz"),)
            codes = {}
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(ask(), metadata=metadata)
            codes["Generate"] = err.value.code()
            channel.close()
        else:
            with connect(address, credential) as channel:
                codes = every_rpc(channel, rid)
        for method, code in codes.items():
            if not method.endswith(".details"):
                assert code == grpc.StatusCode.UNAUTHENTICATED, (reason, method, code)
        assert failures(reason) >= counted + 1, reason
    assert rows(serve_config.buffer) == before  # nothing written by any refused call


def test_an_expired_user_token_is_unauthenticated(secured, monkeypatch):
    import kaizen.auth

    running, _, rid = secured
    monkeypatch.setattr(kaizen.auth, "JWT_LEEWAY_S", 0)
    token = issue_token(JWT_SECRET, "alice", frozenset({"chat"}), 1)
    time.sleep(2.1)
    with connect(f"127.0.0.1:{running.port}", token) as channel:
        with pytest.raises(grpc.RpcError) as err:
            chat_pb2_grpc.ChatServiceStub(channel).Generate(ask(user_id="alice"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in err.value.details()


def test_a_missing_scope_is_permission_denied_and_writes_nothing(secured, serve_config):
    running, keys, rid = secured
    chat_only = key_with(keys, "chat-only", {"chat"})
    teach_only = issue_token(JWT_SECRET, "alice", frozenset({"feedback"}), 600)
    address = f"127.0.0.1:{running.port}"
    with connect(address, chat_only) as channel:
        codes = every_rpc(channel, rid)
    denied = {m for m, c in codes.items() if c == grpc.StatusCode.PERMISSION_DENIED}
    assert denied == {
        "SubmitFeedback",
        "StreamFeedback",
        "StreamFeedbackBatches",
        "WithdrawFeedback",
        "ListVersions",
        "Promote",
        "Rollback",
        "ForgetUser",
    }
    assert codes["Generate"] == codes["GenerateStream"] == grpc.StatusCode.OK
    assert "needs scope 'admin'" in codes["Promote.details"]
    before = rows(serve_config.buffer)
    with connect(address, teach_only) as channel:
        codes = every_rpc(channel, rid)
    assert codes["Generate"] == codes["GenerateStream"] == grpc.StatusCode.PERMISSION_DENIED
    assert codes["Promote"] == codes["ForgetUser"] == grpc.StatusCode.PERMISSION_DENIED
    assert codes["SubmitFeedback"] == codes["StreamFeedback"] == grpc.StatusCode.OK
    assert codes["StreamFeedbackBatches"] == codes["WithdrawFeedback"] == grpc.StatusCode.OK
    # no answer; one thumb (the three feedback calls sent the same event id)
    assert rows(serve_config.buffer) == (before[0], before[1] + 1)


def test_a_user_token_acts_only_for_its_own_user(secured, serve_config):
    running, _, alice_answer = secured
    address = f"127.0.0.1:{running.port}"
    bob = issue_token(JWT_SECRET, "bob", frozenset({"chat", "feedback"}), 600)
    before = rows(serve_config.buffer)
    with connect(address, bob) as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        fb = feedback_pb2_grpc.FeedbackServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            chat.Generate(ask(user_id="alice"))  # bob's token, alice's name
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details().startswith("user_id:")
        thumb = feedback_pb2.Feedback(
            event_id="bob-1", response_id=alice_answer, thumb=feedback_pb2.THUMB_DOWN
        )
        with pytest.raises(grpc.RpcError) as err:
            fb.SubmitFeedback(thumb)  # bob rating alice's answer
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert rows(serve_config.buffer) == before
        mine = chat.Generate(ask(user_id=""))  # empty: the token's own user
        ack = fb.SubmitFeedback(
            feedback_pb2.Feedback(
                event_id="bob-2", response_id=mine.response_id, thumb=feedback_pb2.THUMB_UP
            )
        )
        assert ack.accepted == 1
    buffer = SQLiteBuffer(Path(serve_config.buffer.removeprefix("sqlite:///")))
    try:
        (sample,) = [s for s in buffer.read_samples(0, 100) if s.feedback.event_id == "bob-2"]
    finally:
        buffer.close()
    assert sample.generation.user_id == "bob" and sample.feedback.user_id == "bob"


def test_a_service_key_speaks_for_any_user_and_is_recorded_as_the_sender(secured, serve_config):
    running, keys, alice_answer = secured
    frontend = key_with(keys, "frontend", {"chat", "feedback"})
    with connect(f"127.0.0.1:{running.port}", frontend) as channel:
        fb = feedback_pb2_grpc.FeedbackServiceStub(channel)
        fb.SubmitFeedback(
            feedback_pb2.Feedback(
                event_id="fe-1", response_id=alice_answer, thumb=feedback_pb2.THUMB_UP
            )
        )
        with pytest.raises(grpc.RpcError) as err:  # alice's answer in carol's name
            fb.SubmitFeedback(
                feedback_pb2.Feedback(
                    event_id="fe-2",
                    response_id=alice_answer,
                    user_id="carol",
                    thumb=feedback_pb2.THUMB_UP,
                )
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    import sqlite3

    with sqlite3.connect(serve_config.buffer.removeprefix("sqlite:///")) as db:
        stored = db.execute("SELECT event_id, user_id, source FROM feedback").fetchall()
    assert stored == [("fe-1", "alice", "key:frontend")]


def test_a_revoked_key_is_refused_by_a_running_server_without_restart(secured):
    running, keys, _ = secured
    key = key_with(keys, "soon-gone", {"chat"})
    with connect(f"127.0.0.1:{running.port}", key) as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        assert chat.Generate(ask()).response_id
        done = subprocess.run(
            [sys.executable, "-m", "kaizen.cli", "auth", "key", "revoke", "--keys", str(keys)]
            + ["soon-gone"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 10
        while True:
            try:
                chat.Generate(ask())
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "revoked" in exc.details()
                break
            assert time.monotonic() < deadline, "the revoked key still works after 10 s"
            time.sleep(0.1)


def kaizen_cli(*args: str, env: dict | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "kaizen.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def test_key_create_prints_only_the_key_and_stores_only_its_hash(tmp_path):
    keys = tmp_path / "keys.json"
    made = kaizen_cli("auth", "key", "create", "--keys", str(keys), "--name", "frontend")
    assert made.returncode == 2  # --scopes is required
    made = kaizen_cli(
        "auth", "key", "create", "--keys", str(keys), "--name", "fe", "--scopes", "chat,feedback"
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert made.stdout == key + "\n" and key.startswith("kz_")  # nothing else on stdout
    secret = key.split("_", 2)[2]
    assert secret not in keys.read_text() and key not in keys.read_text()
    assert oct(keys.stat().st_mode & 0o777) == "0o600"
    listed = kaizen_cli("auth", "key", "list", "--keys", str(keys))
    assert "fe" in listed.stdout and "chat,feedback" in listed.stdout
    assert secret not in listed.stdout
    bad = kaizen_cli(
        "auth", "key", "create", "--keys", str(keys), "--name", "x", "--scopes", "chat,root"
    )
    assert bad.returncode == 2 and "unknown root" in bad.stderr


def test_token_command_signs_a_verifiable_user_token(tmp_path):
    import jwt

    secret_file = tmp_path / "jwt.secret"
    secret_file.write_bytes(JWT_SECRET + b"\n")
    made = kaizen_cli(
        "auth", "token", "--secret-file", str(secret_file), "--user", "u7", "--ttl", "15m"
    )
    assert made.returncode == 0, made.stderr
    claims = jwt.decode(made.stdout.strip(), JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "u7" and claims["scope"] == "chat feedback"
    assert 890 <= claims["exp"] - claims["iat"] <= 900
    short = tmp_path / "short.secret"
    short.write_text("too short")
    refused = kaizen_cli("auth", "token", "--secret-file", str(short), "--user", "u7")
    assert refused.returncode == 2 and "32 bytes" in refused.stderr


def test_serve_refuses_to_start_without_credentials(tiny_model, tmp_path):
    done = kaizen_cli(
        "serve",
        *("--model", str(tiny_model), "--port", "0", "--metrics-port", "0"),
        *("--buffer", f"sqlite:///{tmp_path}/b.db", "--registry", str(tmp_path / "reg")),
        env={"KAIZEN_JWT_SECRET": ""},
    )
    assert done.returncode == 2
    assert "--auth-keys" in done.stderr and "--insecure-no-auth" in done.stderr


def test_insecure_no_auth_serves_anyone_and_says_so(serve_config, caplog):
    """The one test that runs open: the flag works, warns, and exports auth_enabled 0."""
    from server.app import start

    config = dataclasses.replace(serve_config, auth_keys=None, insecure_no_auth=True)
    caplog.set_level("WARNING", logger="server.app")
    running = start(config)
    try:
        with connect(f"127.0.0.1:{running.port}") as channel:  # no credential at all
            reply = chat_pb2_grpc.ChatServiceStub(channel).Generate(ask(user_id="anyone"))
        assert reply.response_id
        assert REGISTRY.get_sample_value("kaizen_auth_enabled") == 0
        assert "--insecure-no-auth" in caplog.text
    finally:
        running.stop(grace_s=1)
    with pytest.raises(ValueError, match="insecure-no-auth"):
        start(dataclasses.replace(serve_config, insecure_no_auth=True))  # and keys: refused
