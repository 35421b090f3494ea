"""The OpenAI-compatible HTTP door, through the official `openai` client: the same engine,
credentials, limits and buffer as gRPC (issue 20)."""

from __future__ import annotations

import dataclasses
import http.client
import json
import sqlite3

import grpc
import openai
import pytest
from prometheus_client import REGISTRY

from kaizen.auth import issue_token
from kaizen.client import connect
from kaizen.v1 import chat_pb2_grpc
from tests.conftest import ask, wait_until

JWT_SECRET = b"a-test-secret-of-at-least-thirty-two-bytes!"
HI = [{"role": "user", "content": "What is the capital of France?"}]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def rows(buffer_url: str) -> tuple[int, int]:
    """(answers, feedback events) in the buffer file."""
    with sqlite3.connect(buffer_url.removeprefix("sqlite:///")) as db:
        g = db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
        f = db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
    return g, f


@pytest.fixture
def http_config(serve_config):
    return dataclasses.replace(serve_config, http_port=0)  # 0: the door picks a free port


@pytest.fixture
def door(http_config):
    """A server with gRPC and the HTTP door, taking API keys and user tokens."""
    from server.app import start

    running = start(http_config, jwt_secret=JWT_SECRET)
    yield running
    running.stop(grace_s=1)


def client(running, credential: str) -> openai.OpenAI:
    base_url = f"http://127.0.0.1:{running.http.port}/v1"
    return openai.OpenAI(base_url=base_url, api_key=credential, max_retries=0)


def post(running, path: str, body: object, credential: str | None) -> tuple[int, dict]:
    """POST JSON with the standard library: for the routes the openai client has none of."""
    conn = http.client.HTTPConnection("127.0.0.1", running.http.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if credential is not None:
        headers["Authorization"] = f"Bearer {credential}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        conn.request("POST", path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_completion_is_answered_and_logged_as_generate_would(door, api_key):
    before = metric("kaizen_requests_total", method="HttpChatCompletions", code="OK")
    reply = client(door, api_key).chat.completions.create(
        model="kaizen",
        messages=HI,
        max_tokens=6,
        temperature=0.8,
        seed=7,
        user="u1",
        extra_headers={"X-Request-Id": "req-1"},
    )
    assert reply.id.startswith("r-") and reply.model == "v0"
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    logged = door.buffer.generation(reply.id)  # the id is kaizen's response_id
    assert logged.user_id == "u1" and logged.request_id == "req-1"
    assert logged.text == choice.message.content and logged.model_version == "v0"
    assert logged.sampling.seed == 7 and logged.sampling.max_new_tokens == 6
    assert len(logged.response_tokens) == reply.usage.completion_tokens
    assert metric("kaizen_requests_total", method="HttpChatCompletions", code="OK") == before + 1
    # the same engine: the same seed over gRPC gives the same answer
    with connect(f"127.0.0.1:{door.port}", api_key) as channel:
        same = chat_pb2_grpc.ChatServiceStub(channel).Generate(
            ask(max_new_tokens=6, temperature=0.8, seed=7)
        )
    assert same.text == choice.message.content


def test_a_streamed_completion_concatenates_to_the_logged_answer(door, api_key):
    openai_client = client(door, api_key)
    whole = openai_client.chat.completions.create(
        model="kaizen", messages=HI, max_tokens=10, seed=3
    )
    chunks = list(
        openai_client.chat.completions.create(
            model="kaizen",
            messages=HI,
            max_tokens=10,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *answer, usage = chunks
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != whole.id
    assert answer[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in answer)
    assert text == whole.choices[0].message.content
    assert door.buffer.generation(chunks[0].id).text == text
    last = answer[-1]
    assert last.choices[0].finish_reason in ("stop", "length") and last.model == "v0"
    assert all(c.choices[0].finish_reason is None for c in answer[:-1])
    assert usage.choices == [] and usage.usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize(
    "params, field, says",
    [
        ({"temperature": -1}, "temperature", "-1.0 is outside 0..2"),
        ({"max_tokens": 65}, "max_tokens", "65 is outside 1..64"),  # the cap is 64
        ({"max_completion_tokens": 0}, "max_completion_tokens", "0 is outside 1..64"),
        ({"top_p": 1.5}, "top_p", "1.5 is outside 0..1"),
        ({"seed": -1}, "seed", "-1 is outside 0..18446744073709551615"),
        ({"n": 2}, "n", "2 is not supported; only 1"),
        ({"stop": ["\n"]}, "stop", "not a parameter kaizen supports"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "'robot'"),
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages", "2048"),
        ({"messages": []}, "messages", "at least one message"),
        ({"user": "u" * 129}, "user", "the limit is 128"),
    ],
)
def test_bad_parameters_are_bad_requests_naming_the_field(
    door, http_config, api_key, params, field, says
):
    before = rows(http_config.buffer)
    request = {"model": "kaizen", "messages": HI, **params}
    with pytest.raises(openai.BadRequestError) as err:
        client(door, api_key).chat.completions.create(**request)
    assert err.value.status_code == 400
    assert err.value.body["message"].startswith(f"{field}: ") and says in err.value.body["message"]
    assert err.value.param == field and err.value.code == "invalid_argument"
    assert rows(http_config.buffer) == before  # nothing generated, nothing logged


def test_a_wrong_or_missing_credential_is_401_and_a_missing_scope_403(door):
    with pytest.raises(openai.AuthenticationError) as err:
        client(door, "kz_0123456789ab_not-a-real-secret").chat.completions.create(
            model="kaizen", messages=HI
        )
    assert err.value.status_code == 401 and "unknown API key" in err.value.body["message"]
    status, body = post(door, "/v1/chat/completions", {"messages": HI}, credential=None)
    assert status == 401 and body["error"]["code"] == "unauthenticated"
    assert body["error"]["message"].startswith("authorization: no credential")
    feedback_only = issue_token(JWT_SECRET, "alice", frozenset({"feedback"}), 600)
    with pytest.raises(openai.PermissionDeniedError) as err:
        client(door, feedback_only).chat.completions.create(model="kaizen", messages=HI)
    assert "needs scope 'chat'" in err.value.body["message"]


def test_models_lists_the_served_version(door, api_key):
    models = client(door, api_key).models.list()
    assert [m.id for m in models.data] == ["v0"]
    assert client(door, api_key).models.retrieve("v0").id == "v0"
    with pytest.raises(openai.NotFoundError):
        client(door, api_key).models.retrieve("v9")


def test_feedback_over_http_reaches_the_buffer_once_per_event_id(door, api_key):
    reply = client(door, api_key).chat.completions.create(model="kaizen", messages=HI, user="u1")
    thumb = {"event_id": "h1", "response_id": reply.id, "thumb": "up"}
    before = metric("kaizen_feedback_events_total", kind="thumb", result="accepted")
    assert post(door, "/v1/feedback", thumb, api_key) == (
        200,
        {"accepted": 1, "duplicates": 0, "superseded": 0},
    )
    assert post(door, "/v1/feedback", thumb, api_key)[1]["duplicates"] == 1
    status, body = post(door, "/v1/feedback", {**thumb, "thumb": "down"}, api_key)
    assert status == 409 and body["error"]["code"] == "already_exists"
    correction = {"event_id": "h2", "response_id": reply.id, "correction": "Paris."}
    assert post(door, "/v1/feedback", correction, api_key)[1]["accepted"] == 1
    samples = {s.feedback.event_id: s for s in door.buffer.read_samples(0, 10)}
    assert samples["h1"].feedback.value == 1.0 and samples["h1"].feedback.user_id == "u1"
    assert samples["h1"].feedback.source == "key:local"
    assert samples["h2"].feedback.text == "Paris."
    assert metric("kaizen_feedback_events_total", kind="thumb", result="accepted") == before + 1


@pytest.mark.parametrize(
    "event, status, field",
    [
        ({"thumb": "up", "rating": 4}, 400, "signal"),
        ({}, 400, "signal"),
        ({"rating": 9}, 400, "rating"),
        ({"thumb": "sideways"}, 400, "thumb"),
        ({"correction": "x" * 2001}, 400, "correction"),  # --max-feedback-text-chars
        ({"thumb": "up", "response_id": "r-nobody"}, 404, "response_id"),
        ({"thumb": "up", "event_id": ""}, 400, "event_id"),
    ],
)
def test_bad_feedback_is_refused_naming_the_field(door, api_key, event, status, field):
    reply = client(door, api_key).chat.completions.create(model="kaizen", messages=HI)
    got, body = post(
        door, "/v1/feedback", {"event_id": "b1", "response_id": reply.id, **event}, api_key
    )
    assert got == status and body["error"]["message"].startswith(f"{field}: ")
    assert door.buffer.read_samples(0, 10) == []


def test_a_user_token_acts_only_for_its_own_user(door):
    alice = issue_token(JWT_SECRET, "alice", frozenset({"chat", "feedback"}), 600)
    bob = issue_token(JWT_SECRET, "bob", frozenset({"chat", "feedback"}), 600)
    answer = client(door, alice).chat.completions.create(model="kaizen", messages=HI)
    assert door.buffer.generation(answer.id).user_id == "alice"
    with pytest.raises(openai.PermissionDeniedError) as err:
        client(door, bob).chat.completions.create(model="kaizen", messages=HI, user="alice")
    assert err.value.body["message"].startswith("user: this user token is for another user")
    before = metric("kaizen_auth_failures_total", reason="other_user")
    thumb = {"event_id": "bob-1", "response_id": answer.id, "thumb": "down"}
    status, body = post(door, "/v1/feedback", thumb, bob)  # bob rating alice's answer
    assert status == 403 and body["error"]["code"] == "permission_denied"
    assert metric("kaizen_auth_failures_total", reason="other_user") == before + 1
    assert door.buffer.read_samples(0, 10) == []
    status, body = post(door, "/v1/feedback", {**thumb, "event_id": "alice-1"}, alice)
    assert status == 200 and body["accepted"] == 1


def test_the_door_bounds_its_input(door, api_key):
    status, body = post(door, "/v1/chat/completions", b"{not json", api_key)
    assert status == 400 and body["error"]["message"].startswith("body: Invalid JSON")
    status, body = post(door, "/v1/feedback", {"event_id": "e", "bogus": 1}, api_key)
    assert status == 400 and body["error"]["param"] == "bogus"
    # a body over 4 MiB is refused from its Content-Length, before it is read
    conn = http.client.HTTPConnection("127.0.0.1", door.http.port, timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", f"Bearer {api_key}")
    conn.putheader("Content-Length", str(5 << 20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["param"] == "body"
    conn.close()
    status, body = post(door, "/v1/nowhere", {}, api_key)
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def test_a_rate_limited_user_gets_429_over_http_as_over_grpc(http_config, api_key):
    from server.app import start

    running = start(dataclasses.replace(http_config, user_requests_per_min=2))
    try:
        openai_client = client(running, api_key)
        for _ in range(2):
            openai_client.chat.completions.create(model="kaizen", messages=HI, user="u9")
        with pytest.raises(openai.RateLimitError) as err:
            openai_client.chat.completions.create(model="kaizen", messages=HI, user="u9")
        assert err.value.body["message"].startswith("user_requests_per_min: user 'u9'")
        with pytest.raises(openai.RateLimitError):  # streams draw on the same bucket
            openai_client.chat.completions.create(
                model="kaizen", messages=HI, user="u9", stream=True
            )
        # the bucket is the user's, whichever door: gRPC refuses u9 too
        with connect(f"127.0.0.1:{running.port}", api_key) as channel:
            with pytest.raises(grpc.RpcError) as rpc_err:
                chat_pb2_grpc.ChatServiceStub(channel).Generate(ask(user_id="u9"))
        assert rpc_err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.stop(grace_s=1)


def test_insecure_no_auth_opens_the_door_as_it_opens_grpc(http_config):
    from server.app import start

    running = start(dataclasses.replace(http_config, auth_keys=None, insecure_no_auth=True))
    try:
        status, body = post(running, "/v1/chat/completions", {"messages": HI}, credential=None)
        assert status == 200 and body["model"] == "v0"
    finally:
        running.stop(grace_s=1)
    with pytest.raises(ConnectionRefusedError):  # stopped with the server
        post(running, "/v1/chat/completions", {"messages": HI}, credential=None)


def test_http_port_is_off_by_default_and_checked(serve_config):
    from server.config import ServeConfig

    assert ServeConfig().http_port == -1 and ServeConfig().http_host == "127.0.0.1"
    with pytest.raises(ValueError, match="--http-port"):
        dataclasses.replace(serve_config, http_port=70000)


def test_with_mutual_tls_the_door_serves_https_to_certified_clients_only(
    http_config, api_key, tmp_path
):
    import ssl

    from server.app import start
    from tests.security.test_tls import make_pki

    pki = make_pki(tmp_path)
    config = dataclasses.replace(
        http_config,
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_client_ca=pki["ca"],
    )
    running = start(config)

    def models(context: ssl.SSLContext | None) -> int:
        port = running.http.port
        if context is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        else:
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
        try:
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {api_key}"})
            return conn.getresponse().status
        finally:
            conn.close()

    try:
        anonymous = ssl.create_default_context(cafile=pki["ca"])
        certified = ssl.create_default_context(cafile=pki["ca"])
        certified.load_cert_chain(pki["client_cert"], pki["client_key"])
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            models(None)  # plaintext
        with pytest.raises((ssl.SSLError, ConnectionError)):
            models(anonymous)  # no client certificate
        assert models(certified) == 200
    finally:
        running.stop(grace_s=1)


def test_an_unexpected_error_is_500_in_openais_shape_without_a_traceback(
    door, api_key, monkeypatch
):
    from kaizen.v1 import chat_pb2

    def broken(*args):
        raise RuntimeError("a bug, /some/secret/path")

    def broken_stream(request, started, response_id):
        yield chat_pb2.GenerateChunk(text_delta="Par")
        raise RuntimeError("a bug, /some/secret/path")

    monkeypatch.setattr(door.http.chat, "Generate", broken)
    monkeypatch.setattr(door.http.chat, "stream", broken_stream)
    before = metric("kaizen_requests_total", method="HttpChatCompletions", code="INTERNAL")
    with pytest.raises(openai.InternalServerError) as err:
        client(door, api_key).chat.completions.create(model="kaizen", messages=HI)
    assert err.value.body == {
        "message": "internal error (RuntimeError); see the server log",
        "type": "server_error",
        "param": None,
        "code": "internal",
    }
    stream = client(door, api_key).chat.completions.create(model="kaizen", messages=HI, stream=True)
    with pytest.raises(openai.APIError, match="internal error"):  # an error event, after a 200
        for _ in stream:
            pass
    # the stream's count lands when its handler finishes, just after the client read the event
    wait_until(
        lambda: (
            metric("kaizen_requests_total", method="HttpChatCompletions", code="INTERNAL")
            == before + 2
        ),
        what="both internal errors counted",
    )
