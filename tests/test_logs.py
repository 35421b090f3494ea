"""Logs an operator can search: text or JSON lines, one access line per request with its
request id, answer ids and hashed user, and never a credential or a raw user id."""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import logging
import os
import re
import subprocess
import sys

import grpc
import pytest

from kaizen.auth import issue_token, local_key
from kaizen.client import connect
from kaizen.sim.demo import free_port
from kaizen.telemetry import logs
from kaizen.v1 import chat_pb2_grpc, model_pb2, model_pb2_grpc
from tests.conftest import ask, wait_until

JWT_SECRET = b"a-test-secret-of-at-least-thirty-two-bytes!"
USER = "alice@example.com"  # a raw user id that must never reach a log line
HI = [{"role": "user", "content": "What is the capital of France?"}]


def record(msg: str = "hello %s", args=("world",), exc: bool = False, **extra):
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("kaizen.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    rec.__dict__.update(extra)
    return rec


def test_a_json_line_has_the_fields_and_never_a_credential():
    line = logs.JsonFormatter().format(
        record(exc=True, request_id="q-1", duration_ms=1.5, token="eyJ.secret", api_key="kz_x")
    )
    assert "\n" not in line  # one object a line, traceback included
    out = json.loads(line)
    assert out["level"] == "WARNING" and out["logger"] == "kaizen.test"
    assert out["msg"] == "hello world" and re.fullmatch(r"\d{4}-.*T.*\.\d{3}\+00:00", out["ts"])
    assert out["request_id"] == "q-1" and out["duration_ms"] == 1.5
    assert out["token"] == out["api_key"] == "[redacted]"
    assert "ValueError: boom" in out["exc"]
    assert "eyJ.secret" not in line and "kz_x" not in line


def test_a_text_line_is_as_before_with_the_fields_after_the_message():
    formatter = logs.TextFormatter()
    plain = formatter.format(record())
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(stamp + " kaizen.test WARNING hello world", plain)
    line = formatter.format(record(status="OK", note="two words", secret="s3"))
    assert line.endswith('hello world status=OK note="two words" secret=[redacted]')


@pytest.mark.parametrize(
    "given, kept",
    [
        ("req-1", True),
        ("0af7651916cd43dd8448eb211c80319c", True),
        ("Root=1-67891233-abcdef012345678912345678", True),
        ("x" * 128, True),
        ("x" * 129, False),  # bounded: a client cannot fill the log
        ("a b", False),
        ('a"\nlevel=ERROR', False),  # no forged fields or lines
        ("", False),
        (None, False),
    ],
)
def test_a_client_request_id_is_kept_only_when_well_formed(given, kept):
    rid = logs.request_id(given)
    assert (rid == given) is kept
    assert re.fullmatch(r"[A-Za-z0-9._:/+=@-]{1,128}", rid)
    if not kept:
        assert rid != logs.request_id(given)  # a new one each time


def test_the_user_field_is_a_stable_hash_never_the_id():
    assert logs.user_field(USER) == logs.user_field(USER) != logs.user_field("bob")
    assert USER not in logs.user_field(USER) and logs.user_field("") == ""


def access_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "kaizen.access"]


def test_every_rpc_leaves_one_access_line_with_its_ids(server, stubs, caplog, tiny_model):
    caplog.set_level(logging.INFO, logger="kaizen.access")
    reply, call = stubs.chat.Generate.with_call(
        ask(user_id=USER), metadata=((logs.REQUEST_ID_HEADER, "req-42"),)
    )
    assert (logs.REQUEST_ID_HEADER, "req-42") in call.trailing_metadata()
    stream = stubs.chat.GenerateStream(ask(user_id="bob"))
    *_, last = list(stream)
    (rid,) = [v for k, v in stream.trailing_metadata() if k == logs.REQUEST_ID_HEADER]
    with pytest.raises(grpc.RpcError) as refused:
        stubs.chat.Generate(ask(max_new_tokens=10_000))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as anonymous:
        with pytest.raises(grpc.RpcError):
            model_pb2_grpc.ModelServiceStub(anonymous).GetModelInfo(model_pb2.GetModelInfoRequest())

    wait_until(lambda: len(access_lines(caplog)) >= 4, what="four access lines")
    generate, streamed, bad, anonymous_line = access_lines(caplog)
    assert (generate.method, generate.status, generate.request_id) == ("Generate", "OK", "req-42")
    assert generate.response_id == reply.response_id and generate.version == "v0"
    assert generate.user == logs.user_field(USER) and generate.caller == "key:local"
    assert generate.duration_ms > 0
    assert (streamed.method, streamed.status, streamed.request_id) == ("GenerateStream", "OK", rid)
    assert streamed.response_id == last.response_id and streamed.user == logs.user_field("bob")
    # the answers are logged in the buffer under the request id the line carries
    assert server.buffer.generation(reply.response_id).request_id == "req-42"
    assert server.buffer.generation(last.response_id).request_id == rid
    assert (bad.method, bad.status) == ("Generate", "INVALID_ARGUMENT")
    assert not getattr(bad, "response_id", "")
    assert (anonymous_line.status, getattr(anonymous_line, "caller", "")) == ("UNAUTHENTICATED", "")


def http_post(port: int, path: str, body: object, headers: dict[str, str]):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "POST",
            path,
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **headers},
        )
        response = conn.getresponse()
        return response.status, response.getheader("x-request-id"), json.loads(response.read())
    finally:
        conn.close()


def test_http_requests_carry_x_request_id_in_and_out(serve_config, api_key, caplog):
    from server.app import start

    caplog.set_level(logging.INFO, logger="kaizen.access")
    running = start(dataclasses.replace(serve_config, http_port=0))
    auth = {"Authorization": f"Bearer {api_key}"}
    body = {"messages": HI, "max_tokens": 4, "user": USER}
    try:
        port = running.http.port
        status, rid, reply = http_post(
            port, "/v1/chat/completions", body, {**auth, "X-Request-Id": "web-7"}
        )
        assert status == 200 and rid == "web-7"
        status, made, _ = http_post(port, "/v1/chat/completions", body, {**auth})
        assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", made)
        status, replaced, error = http_post(
            port, "/v1/chat/completions", body | {"n": 2}, {**auth, "X-Request-Id": "x" * 500}
        )
        assert status == 400 and replaced != "x" * 500 and len(replaced) == 32
        wait_until(lambda: len(access_lines(caplog)) >= 3, what="three access lines")
        assert running.buffer.generation(reply["id"]).request_id == "web-7"
    finally:
        running.stop(grace_s=1)
    ok, generated, bad = access_lines(caplog)
    assert (ok.method, ok.status, ok.request_id) == ("HttpChatCompletions", "OK", "web-7")
    assert ok.response_id == reply["id"] and ok.version == "v0"
    assert ok.user == logs.user_field(USER) and ok.caller == "key:local"
    assert generated.request_id == made
    assert (bad.status, bad.request_id) == ("INVALID_ARGUMENT", replaced)


def kaizen_serve(model, tmp_path, keys, env: dict[str, str], *flags: str):
    """`kaizen [flags] serve` as a process on free ports: (process, gRPC port, HTTP port)."""
    port, http_port = free_port(), free_port()
    (tmp_path / "jwt.secret").write_bytes(JWT_SECRET)
    args = [
        *flags,
        "serve",
        *("--model", str(model)),
        *("--buffer", f"sqlite:///{tmp_path}/buffer.db"),
        *("--registry", str(tmp_path / "registry")),
        *("--auth-keys", str(keys)),
        *("--jwt-secret-file", str(tmp_path / "jwt.secret")),
        *("--port", str(port), "--http-port", str(http_port)),
        *("--metrics-port", str(free_port()), "--default-max-new-tokens", "4"),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kaizen.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "serve.log").open("w"),
        env={**os.environ, **env},
    )
    return proc, port, http_port


@pytest.mark.parametrize(
    "env, flags, fmt",
    [
        ({logs.ENV: "json"}, (), "json"),
        ({logs.ENV: "json"}, ("--log-format", "text"), "text"),  # the flag wins
    ],
    ids=["json-from-env", "text-from-flag"],
)
def test_neither_key_nor_token_nor_user_id_is_logged(tiny_model, tmp_path, env, flags, fmt):
    keys, key = local_key(tmp_path / "auth")
    token = issue_token(JWT_SECRET, USER, frozenset({"chat", "feedback"}), ttl_s=600)
    proc, port, http_port = kaizen_serve(tiny_model, tmp_path, keys, env, *flags)
    log = tmp_path / "serve.log"
    try:
        with connect(f"127.0.0.1:{port}", key) as channel:
            grpc.channel_ready_future(channel).result(timeout=120)  # listens once loaded
            chat_pb2_grpc.ChatServiceStub(channel).Generate(ask(user_id=USER))
        with connect(f"127.0.0.1:{port}", token) as channel:
            chat_pb2_grpc.ChatServiceStub(channel).Generate(ask(user_id=""))
        with connect(f"127.0.0.1:{port}", key + "x") as channel:  # a wrong key is not logged
            with pytest.raises(grpc.RpcError):
                chat_pb2_grpc.ChatServiceStub(channel).Generate(ask(user_id=USER))
        for credential, user in ((key, USER), (token, "")):
            status, _, _ = http_post(
                http_port,
                "/v1/chat/completions",
                {"messages": HI, "user": user} if user else {"messages": HI},
                {"Authorization": f"Bearer {credential}"},
            )
            assert status == 200
        wait_until(lambda: log.read_text().count("HttpChatCompletions") >= 2, what="HTTP lines")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = log.read_text()
    secret = key.split("_", 2)[2]
    for leaked, what in ((secret, "the API key"), (token, "the user token"), (USER, "user id")):
        assert leaked not in text, f"{what} is in the log:\n{text}"
    assert token.split(".")[2] not in text  # not even the token's signature
    lines = [line for line in text.splitlines() if line.strip()]
    hashed = logs.user_field(USER)
    if fmt == "json":
        parsed = [json.loads(line) for line in lines]  # every line is one JSON object
        access = [p for p in parsed if p["logger"] == "kaizen.access"]
        assert [(p["method"], p["status"]) for p in access] == [
            ("Generate", "OK"),
            ("Generate", "OK"),
            ("Generate", "UNAUTHENTICATED"),
            ("HttpChatCompletions", "OK"),
            ("HttpChatCompletions", "OK"),
        ], access
        assert all(p.get("user") == hashed for i, p in enumerate(access) if i != 2)
        assert [p.get("caller") for p in access] == ["key:local", "user", None, "key:local", "user"]
        assert all(p["request_id"] and "duration_ms" in p for p in access)
    else:
        access = [line for line in lines if " kaizen.access INFO " in line]
        assert len(access) == 5 and all(f"user={hashed}" in line for line in access if "OK" in line)
        assert not any(line.startswith("{") for line in lines)


def test_a_bad_log_format_is_refused_naming_it():
    done = subprocess.run(
        [sys.executable, "-m", "kaizen.cli", "model", "prepare", "--tiny"],
        capture_output=True,
        text=True,
        env={**os.environ, logs.ENV: "xml"},
        timeout=120,
    )
    assert done.returncode == 2 and "KAIZEN_LOG_FORMAT: 'xml' is not one of text, json" in (
        done.stderr
    )


def test_a_warning_through_the_configured_handler_is_json(monkeypatch):
    """`configure` puts the chosen formatter on the root logger's handler."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    logs.configure("json")
    logging.getLogger("kaizen.x").warning("swap failed", extra={"version": "v3"})
    out = json.loads(stream.getvalue())
    assert (out["msg"], out["version"], out["level"]) == ("swap failed", "v3", "WARNING")
