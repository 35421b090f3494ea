"""The OpenAI-compatible HTTP door: `/v1/chat/completions`, `/v1/models`, `/v1/feedback`.

It sits beside gRPC on the same engine, buffer, limits and credentials, and adds no
serving logic of its own. Each request is authenticated by the gRPC AuthInterceptor's
own check, with the scope of the gRPC method it stands for; its JSON is converted once
into that method's protobuf request and handed to the same servicer method, with a
`_Call` in place of the gRPC context (the principal, and the callbacks that cancel an
answer whose client went away). So a completion is checked, rate-limited, routed to the
canary or not, and logged exactly as `Generate` is, and feedback reaches the buffer
exactly as `SubmitFeedback` does. kaizen's exceptions are mapped once, here, to an HTTP
status and OpenAI's error shape; their messages name the field as this request spells it.

uvicorn serves the app on its own event loop in a background thread; the servicers
block, so they run on at most --workers threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from kaizen.auth import Principal
from kaizen.errors import Cancelled, InvalidArgument, KaizenError, NotFound, ResourceExhausted
from kaizen.telemetry import logs
from kaizen.v1 import chat_pb2, feedback_pb2, model_pb2
from server import metrics
from server.auth import AuthInterceptor
from server.servicers import ChatService, FeedbackService, ModelService, new_response_id

log = logging.getLogger(__name__)

# gRPC's default limit on a received message: one HTTP request is bounded the same way
MAX_BODY_BYTES = 4 << 20
UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1

# The gRPC method each route stands for: its scope in server/auth.py's SCOPE_OF applies.
CHAT_METHOD = "/kaizen.v1.ChatService/Generate"  # chat (GenerateStream's is the same)
MODELS_METHOD = "/kaizen.v1.ModelService/GetModelInfo"  # any valid credential
FEEDBACK_METHOD = "/kaizen.v1.FeedbackService/SubmitFeedback"  # feedback

# gRPC status (KaizenError.status) -> HTTP status
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,  # nginx's "client closed request": nobody reads it
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 503,  # waited too long for a batch slot: the server is overloaded
}
ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}

# OpenAI parameters that concern OpenAI's platform (storage, billing tier, caching), not
# the answer, or only tools (which are refused): accepted with any value and ignored.
IGNORED = frozenset(
    {
        "store",
        "metadata",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
        "parallel_tool_calls",
    }
)
# Parameters accepted only at the value that changes nothing. Any other value, and any
# other parameter not null or empty (stop, tools, logit_bias…), asks for something kaizen
# does not do, so it is refused naming it rather than silently dropped.
NO_OP: dict[str, object] = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
    "top_logprobs": 0,
    "response_format": {"type": "text"},
}
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message
SIGNALS = ("thumb", "rating", "click", "dwell_ms", "copy", "regenerate", "comment", "correction")

T = TypeVar("T", bound=BaseModel)


class TooLarge(InvalidArgument):
    """A request body over MAX_BODY_BYTES (HTTP 413)."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request: the parameters kaizen honours; any other one is
    checked by `refuse_unsupported`."""

    model_config = ConfigDict(extra="allow")
    messages: list[dict[str, Any]]  # each checked by `_message`
    model: str | None = None  # ignored: routing picks the version; the answer's `model` names it
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the end user: GenerateRequest.user_id


class FeedbackRequest(BaseModel):
    """kaizen's Feedback message (proto/kaizen/v1/feedback.proto) as JSON: the ids, then
    exactly one signal."""

    model_config = ConfigDict(extra="forbid")
    event_id: str = ""  # idempotency key: the same id twice is stored once
    response_id: str = ""  # a completion's `id`
    user_id: str = ""  # the answer's user; empty = that user
    thumb: Literal["up", "down"] | None = None
    rating: int | None = None  # 1..5
    click: Literal[True] | None = None
    dwell_ms: int | None = None
    copy_: Literal[True] | None = Field(None, alias="copy")  # `copy` is BaseModel's
    regenerate: Literal[True] | None = None
    comment: str | None = None
    correction: str | None = None


# -- JSON in, protobuf out: every check names the field as the HTTP request spells it ----


def _wire(field: str, value: int, most: int) -> int:
    """`value` if it fits the protobuf field's unsigned type (the servicer then checks
    the real limit), else InvalidArgument."""
    if not 0 <= value <= most:
        raise InvalidArgument(field, f"{value} is outside 0..{most}")
    return value


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def refuse_unsupported(extra: Mapping[str, Any]) -> None:
    """Refuse a parameter kaizen cannot honour (see NO_OP, IGNORED)."""
    for name, value in extra.items():
        if name in IGNORED or value is None or value == [] or value == {}:
            continue
        if name in NO_OP:
            no_op = NO_OP[name]
            if value == no_op and isinstance(value, bool) == isinstance(no_op, bool):
                continue  # 0.0 for 0, but not true for 1
            raise InvalidArgument(
                name, f"{_short(value)} is not supported; only {_short(NO_OP[name])}"
            )
        raise InvalidArgument(name, "not a parameter kaizen supports")


def _message(i: int, message: dict[str, Any]) -> chat_pb2.Message:
    where = f"messages[{i}]"
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str):
        raise InvalidArgument(f"{where}.role", "required, a string")
    for key, value in message.items():
        if key not in ("role", "content") and value not in (None, [], {}):
            raise InvalidArgument(f"{where}.{key}", "not supported; a message is role and content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise InvalidArgument(
                    f"{where}.content[{j}]", 'only text parts ({"type": "text", "text": …})'
                )
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise InvalidArgument(f"{where}.content", "required, a string or a list of text parts")
    return chat_pb2.Message(role=ROLE_ALIASES.get(role, role), content=content)


def generate_request(
    body: ChatCompletionRequest, request_id: str
) -> tuple[chat_pb2.GenerateRequest, dict[str, str]]:
    """The GenerateRequest a chat completion stands for, and the names this request
    gives the GenerateRequest's fields (for error messages)."""
    refuse_unsupported(body.model_extra or {})
    if body.stream_options is not None and not body.stream:
        raise InvalidArgument("stream_options", "only with stream: true")
    tokens_field, max_tokens = "max_completion_tokens", body.max_completion_tokens
    if max_tokens is None:
        tokens_field, max_tokens = "max_tokens", body.max_tokens
    elif body.max_tokens is not None and body.max_tokens != max_tokens:
        raise InvalidArgument(
            "max_completion_tokens", f"{max_tokens} but max_tokens is {body.max_tokens}; send one"
        )
    request = chat_pb2.GenerateRequest(
        messages=[_message(i, m) for i, m in enumerate(body.messages)],
        user_id=body.user or "",
        request_id=request_id,
    )
    # a field left out stays unset: the server's default, as for a gRPC client
    if max_tokens is not None:
        request.sampling.max_new_tokens = _wire(tokens_field, max_tokens, UINT32_MAX)
    if body.temperature is not None:
        request.sampling.temperature = body.temperature
    if body.top_p is not None:
        request.sampling.top_p = body.top_p
    if body.seed is not None:
        request.sampling.seed = _wire("seed", body.seed, UINT64_MAX)
    fields = {
        "sampling.max_new_tokens": tokens_field,
        "sampling.temperature": "temperature",
        "sampling.top_p": "top_p",
        "user_id": "user",
        "request_id": "x-request-id",
    }
    return request, fields


def feedback_message(body: FeedbackRequest) -> feedback_pb2.Feedback:
    given = body.model_dump(by_alias=True, exclude_none=True)
    signals = [name for name in SIGNALS if name in given]
    if len(signals) > 1:
        raise InvalidArgument(
            "signal", f"set one of {', '.join(SIGNALS)}; got {', '.join(signals)}"
        )
    fb = feedback_pb2.Feedback(
        event_id=body.event_id, response_id=body.response_id, user_id=body.user_id
    )
    for name in signals:  # none: the servicer says which to set
        value = given[name]
        if name == "thumb":
            fb.thumb = feedback_pb2.THUMB_UP if value == "up" else feedback_pb2.THUMB_DOWN
        elif name in ("click", "copy", "regenerate"):
            getattr(fb, name).SetInParent()
        elif name in ("rating", "dwell_ms"):
            setattr(fb, name, _wire(name, value, UINT32_MAX))
        else:
            setattr(fb, name, value)
    return fb


async def read_body(request: Request, model: type[T]) -> T:
    """The request's JSON body as `model`, read no further than MAX_BODY_BYTES."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise TooLarge("body", f"{declared} bytes; the limit is {MAX_BODY_BYTES}")
    body = bytearray()
    try:
        async for part in request.stream():
            body += part
            if len(body) > MAX_BODY_BYTES:
                raise TooLarge("body", f"over the limit of {MAX_BODY_BYTES} bytes")
    except ClientDisconnect:
        raise Cancelled("the client went away while sending its request") from None
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        raise InvalidArgument(path.lstrip(".") or "body", error["msg"]) from None


# -- protobuf in, OpenAI's JSON out ---------------------------------------------------------


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(reply: chat_pb2.GenerateResponse, created: int) -> dict[str, Any]:
    return {
        "id": reply.response_id,
        "object": "chat.completion",
        "created": created,
        "model": reply.model_version,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "finish_reason": reply.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": _usage(reply.prompt_tokens, reply.completion_tokens),
    }


def chunk(
    response_id: str,
    created: int,
    version: str,
    delta: dict[str, str] | None,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One chat.completion.chunk: a delta, or with `delta` None the usage chunk (no
    choices) that stream_options.include_usage asks for."""
    out: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": version,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def error_body(exc: BaseException, fields: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI's error object) for an exception. A kaizen message starts with
    the field it is about; a gRPC field name is replaced by this request's (`fields`)."""
    if isinstance(exc, KaizenError):
        status, message = exc.status, str(exc)
    else:
        log.error("unhandled error in an HTTP request", exc_info=exc)
        status, message = "INTERNAL", f"internal error ({type(exc).__name__}); see the server log"
    field, sep, rest = message.partition(": ")
    if sep and field in fields:
        message = f"{fields[field]}: {rest}"
    param = fields.get(exc.field, exc.field) if isinstance(exc, InvalidArgument) else None
    code = 413 if isinstance(exc, TooLarge) else HTTP_STATUS.get(status, 500)
    error = {
        "message": message,
        "type": ERROR_TYPE.get(code, "server_error"),
        "param": param,
        "code": status.lower(),
    }
    return code, {"error": error}


def _error_response(code: int, body: dict[str, Any]) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
    return JSONResponse(body, status_code=code, headers=headers)


async def _http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (an unknown path, a wrong method) in OpenAI's shape."""
    error = {
        "message": f"{request.method} {request.url.path}: {exc.detail}",
        "type": ERROR_TYPE.get(exc.status_code, "invalid_request_error"),
        "param": None,
        "code": "not_found" if exc.status_code == 404 else "invalid_request",
    }
    return JSONResponse({"error": error}, status_code=exc.status_code, headers=exc.headers)


# -- the door -------------------------------------------------------------------------------


class _Call:
    """What a servicer reads of its gRPC context, for one HTTP request: the caller's
    principal, and callbacks run when the request ends or its client goes away (the
    servicer's `job.cancel`). `fields`: the GenerateRequest's field names as this
    request spells them, for error messages."""

    def __init__(self) -> None:
        self.principal: Principal | None = None
        self.fields: dict[str, str] = {}
        self.status = "CANCELLED"  # a stream's outcome, set when it ends otherwise
        self.access: dict[str, str] = {}  # the access line's user_id, response_id, version
        self._callbacks: list[Callable[[], None]] = []
        self._ended = False
        self._lock = threading.Lock()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if not self._ended:
                self._callbacks.append(callback)
                return True
        callback()  # the client is already gone: cancel at once
        return True

    def end(self) -> None:
        with self._lock:
            callbacks, self._callbacks, self._ended = self._callbacks, [], True
        for callback in callbacks:
            callback()


class _EventStream(StreamingResponse):
    """Server-sent events. A client that goes away ends its call at once, so its row is
    dropped at the end of the decode step under way, as for a cancelled gRPC stream."""

    media_type = "text/event-stream"

    def __init__(
        self, events: AsyncIterator[bytes], call: _Call, ended: Callable[[str], None]
    ) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache"})
        self.call = call
        self.ended = ended  # called once with the stream's outcome (a gRPC status name)

    async def listen_for_disconnect(self, receive) -> None:
        await super().listen_for_disconnect(receive)
        self.call.end()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # also when the client left before the first event was sent
            await self.body_iterator.aclose()
            self.call.end()
            self.ended(self.call.status)


class HttpDoor:
    """The FastAPI app over the gRPC servicers, and the uvicorn thread that serves it."""

    def __init__(
        self,
        chat: ChatService,
        feedback: FeedbackService,
        model: ModelService,
        auth: AuthInterceptor,
        workers: int,
        max_in_flight: int,
    ) -> None:
        self.chat = chat
        self.feedback_service = feedback
        self.model_service = model
        self.auth = auth
        self.max_in_flight = max_in_flight  # requests being answered; beyond, 429
        self._in_flight = 0  # touched only on the event loop's thread
        self._threads = anyio.CapacityLimiter(workers)
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        self.app.post("/v1/chat/completions")(self.completions)
        self.app.get("/v1/models")(self.models)
        self.app.get("/v1/models/{version}")(self.model)
        self.app.post("/v1/feedback")(self.feedback)
        self.app.add_exception_handler(HTTPException, _http_exception)
        self.app.add_middleware(logs.RequestIds)  # X-Request-Id in and out

    # -- serving --------------------------------------------------------------------------

    def start(
        self,
        host: str,
        port: int,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_client_ca: Path | None = None,
    ) -> int:
        """Listen on host:port (0 picks a free one), over TLS when given the gRPC server's
        certificate (and mutual TLS with its client CA); return the port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"--http-port: cannot listen on {host}:{port}: {exc.strerror}") from None
        config = uvicorn.Config(
            self.app,
            log_config=None,  # the server's logging stays as kaizen set it up
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
            ssl_ca_certs=tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE,
        )
        config.load()  # a bad certificate fails here, not in the thread
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="kaizen-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise OSError(f"--http-port: the HTTP server did not start on {host}:{port}")
            time.sleep(0.01)
        self.port = sock.getsockname()[1]
        return self.port

    def stop(self, grace_s: float) -> None:
        """Stop accepting connections; let the requests in flight finish for up to
        `grace_s`, then cancel them."""
        if self._server is None or self._thread is None:
            return
        self._server.config.timeout_graceful_shutdown = grace_s
        self._server.should_exit = True
        self._thread.join(grace_s + 5)

    # -- one request ----------------------------------------------------------------------

    async def _answer(
        self,
        name: str,
        grpc_method: str,
        request: Request,
        work: Callable[[_Call, Callable[[str], None]], Awaitable[Response]],
    ) -> Response:
        """Authenticate as for `grpc_method`, run `work(call, ended)`, count the outcome in
        kaizen_requests_total{method=name} and map errors. An _EventStream calls `ended`
        itself when it ends."""
        started = time.perf_counter()

        def ended(status: str) -> None:
            self._in_flight -= 1
            metrics.REQUESTS.labels(name, status).inc()
            if status == "OK":
                metrics.REQUEST_SECONDS.labels(name).observe(time.perf_counter() - started)
            user_id = call.access.pop("user_id", "")
            logs.log_access(
                "http",
                method=name,
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                request_id=request.state.request_id,
                **logs.who(call.principal, user_id),
                **call.access,
            )

        call = _Call()
        self._in_flight += 1
        try:
            if self._in_flight > self.max_in_flight:
                raise ResourceExhausted(
                    f"server busy: {self.max_in_flight} HTTP requests already in flight "
                    "(--workers + --max-queue)"
                )
            header = request.headers.get("authorization", "")
            call.principal = self.auth.principal(grpc_method, [("authorization", header)])
            response = await work(call, ended)
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never swallowed
            call.end()
            ended(_status_name(exc))
            return _error_response(*error_body(exc, call.fields))
        except BaseException:  # cancelled: the server stopped past its grace period
            call.end()
            ended("CANCELLED")
            raise
        if not isinstance(response, _EventStream):
            call.end()
            ended("OK")
        return response

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A servicer call on one of --workers threads."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._threads)

    async def _until_disconnected(
        self, request: Request, call: _Call, fn: Callable[..., Any], *args: Any
    ) -> Any:
        """`fn(*args)` on a worker thread; if the client goes away meanwhile, end the call
        (the servicer's callbacks cancel its answer), as gRPC does for a unary call."""

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            call.end()

        watcher = asyncio.create_task(watch())
        try:
            return await self._blocking(fn, *args)
        finally:
            watcher.cancel()

    # -- the routes -----------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        async def work(call: _Call, ended: Callable[[str], None]) -> Response:
            body = await read_body(request, ChatCompletionRequest)
            pb, call.fields = generate_request(body, request.state.request_id)
            call.access["user_id"] = pb.user_id
            if body.stream:
                started = await self._blocking(self.chat.start, pb, call)
                usage = body.stream_options is not None and body.stream_options.include_usage
                return _EventStream(self._events(pb, started, call, usage), call, ended)
            reply = await self._until_disconnected(request, call, self.chat.Generate, pb, call)
            call.access.update(response_id=reply.response_id, version=reply.model_version)
            return JSONResponse(completion(reply, int(time.time())))

        return await self._answer("HttpChatCompletions", CHAT_METHOD, request, work)

    async def _events(
        self, pb: chat_pb2.GenerateRequest, started: tuple, call: _Call, include_usage: bool
    ) -> AsyncIterator[bytes]:
        """The stream of a started answer as chat.completion.chunk events. Its id, the
        answer's response_id, is known from the first chunk; the version that answered
        only at the end: chunks before the last have `model` "". An error after the
        first event is an event `{"error": …}`, as OpenAI sends it."""
        response_id, created = new_response_id(), int(time.time())
        call.access["response_id"] = response_id
        chunks = self.chat.stream(pb, started, response_id)
        usage = {"usage": None} if include_usage else {}
        try:
            yield _sse(
                chunk(response_id, created, "", {"role": "assistant", "content": ""}) | usage
            )
            while (part := await self._blocking(next, chunks, None)) is not None:
                if not part.done:
                    delta = {"content": part.text_delta}
                    yield _sse(chunk(response_id, created, "", delta) | usage)
                    continue
                call.access["version"] = part.model_version
                last = chunk(response_id, created, part.model_version, {}, part.finish_reason)
                yield _sse(last | usage)
                if include_usage:
                    total = _usage(part.prompt_tokens, part.completion_tokens)
                    yield _sse(chunk(response_id, created, part.model_version, None, usage=total))
            yield b"data: [DONE]\n\n"
            call.status = "OK"
        except Cancelled:
            pass  # the client is gone: nobody reads an error event
        except Exception as exc:  # noqa: BLE001 - sent to the client, never swallowed
            call.status = _status_name(exc)
            yield _sse(error_body(exc, call.fields)[1])
        finally:  # also when cancelled (the client's disconnect, the server's stop)
            chunks.close()

    async def models(self, request: Request) -> Response:
        async def work(call: _Call, _ended) -> Response:
            return JSONResponse({"object": "list", "data": await self._served(call)})

        return await self._answer("HttpModels", MODELS_METHOD, request, work)

    async def model(self, request: Request, version: str) -> Response:
        async def work(call: _Call, _ended) -> Response:
            served = await self._served(call)
            for entry in served:
                if entry["id"] == version:
                    return JSONResponse(entry)
            names = ", ".join(e["id"] for e in served)
            raise NotFound(f"model: {_short(version)} is not served here; serving {names}")

        return await self._answer("HttpModels", MODELS_METHOD, request, work)

    async def _served(self, call: _Call) -> list[dict[str, Any]]:
        """The versions served now (serving, then canary) as OpenAI model objects."""
        info = await self._blocking(
            self.model_service.GetModelInfo, model_pb2.GetModelInfoRequest(), call
        )
        return [
            {
                "id": v.version,
                "object": "model",
                "created": (
                    v.published_at if v.HasField("published_at") else info.started_at
                ).seconds,
                "owned_by": "kaizen",
                "state": v.state,
            }
            for v in info.versions
        ]

    async def feedback(self, request: Request) -> Response:
        async def work(call: _Call, _ended) -> Response:
            fb = feedback_message(await read_body(request, FeedbackRequest))
            call.access.update(user_id=fb.user_id, response_id=fb.response_id)
            ack = await self._blocking(self.feedback_service.SubmitFeedback, fb, call)
            return JSONResponse(
                {
                    "accepted": ack.accepted,
                    "duplicates": ack.duplicates,
                    "superseded": ack.superseded,
                }
            )

        return await self._answer("HttpFeedback", FEEDBACK_METHOD, request, work)


def _status_name(exc: BaseException) -> str:
    return exc.status if isinstance(exc, KaizenError) else "INTERNAL"
