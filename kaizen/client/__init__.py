"""Connecting to `kaizen serve` as a client: a channel that carries a credential, and
`Client`, the library a frontend imports to chat, stream and send feedback with retries.

Every kaizen RPC needs `authorization: Bearer <API key or user token>`. Over TLS the
credential travels as gRPC call credentials; over plaintext (loopback, tests, a sidecar)
an interceptor adds the same metadata, since gRPC refuses call credentials on an
insecure channel.
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
from google.protobuf.empty_pb2 import Empty

from kaizen.auth import read_secret
from kaizen.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)

CREDENTIAL_ENV = "KAIZEN_API_KEY"  # what the CLI's clients read when no --key-file is given


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, credential: str) -> None:
        self.header = ("authorization", f"Bearer {credential}")

    def _details(self, details):
        metadata = [*(details.metadata or ()), self.header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def connect(
    target: str,
    credential: str | None = None,
    *,
    root_ca: bytes | None = None,
    client_cert: bytes | None = None,
    client_key: bytes | None = None,
) -> grpc.Channel:
    """A channel to `target`: TLS when `root_ca` is given (with a client certificate for
    mutual TLS), plaintext otherwise; every call carries `credential` when given."""
    if root_ca is None:
        channel = grpc.insecure_channel(target)
        return grpc.intercept_channel(channel, _Bearer(credential)) if credential else channel
    tls = grpc.ssl_channel_credentials(root_ca, client_key, client_cert)
    if credential:
        tls = grpc.composite_channel_credentials(
            tls, grpc.access_token_call_credentials(credential)
        )
    return grpc.secure_channel(target, tls)


def read_credential(key_file: Path | None, environ: Mapping[str, str]) -> str | None:
    """The credential from --key-file, else from $KAIZEN_API_KEY, else None."""
    secret = read_secret(key_file, CREDENTIAL_ENV, "--key-file", environ)
    return secret.decode() if secret is not None else None


def add_connection_options(parser, credential: str) -> None:
    """--target, --key-file and --ca, as every command that talks to a server takes them;
    `credential` says what the key file holds (e.g. "the API key (scope admin)")."""
    parser.add_argument("--target", default="127.0.0.1:50051", help="the server's gRPC address")
    parser.add_argument(
        "--key-file",
        type=Path,
        default=None,
        help=f"file with {credential} (default: ${CREDENTIAL_ENV})",
    )
    parser.add_argument("--ca", default=None, help="PEM CA bundle: talk TLS to the server")


def connection_options(args, environ: Mapping[str, str]) -> tuple[str | None, bytes | None]:
    """(credential, root CA) from those options; ValueError or OSError when unreadable."""
    credential = read_credential(args.key_file, environ)
    return credential, Path(args.ca).read_bytes() if args.ca else None


# -- the client library frontends import -------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """When and how `Client` tries a call again. Only UNAVAILABLE is retried (the server
    is starting, draining or unreachable): any other status is the server's answer."""

    attempts: int = 5  # tries in all, the first included; 1 never retries
    initial_backoff_s: float = 0.1  # bound of the first wait; each wait is drawn in [0, bound]
    max_backoff_s: float = 5.0  # the bound doubles (x multiplier) after each try, up to this
    multiplier: float = 2.0
    deadline_s: float | None = 300.0  # per call: every try and wait together; None = no limit

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts: {self.attempts}; at least 1 (the first try)")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("initial_backoff_s, max_backoff_s: must be >= 0")
        if self.multiplier < 1:
            raise ValueError(f"multiplier: {self.multiplier}; at least 1")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ValueError(f"deadline_s: {self.deadline_s}; must be > 0 or None")

    def bound_s(self, attempt: int) -> float:
        """The longest wait after failed try number `attempt` (1-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))


@dataclass(frozen=True)
class Answer:
    """One answer, from `Client.chat` or last from `Client.stream`."""

    text: str
    response_id: str  # quote it in feedback
    model_version: str  # the weights that produced every token
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Ack:
    """A stored feedback event: `duplicates` 1 when `event_id` had been stored before."""

    event_id: str
    accepted: int
    duplicates: int
    superseded: int  # the user's earlier events of the same kind on the answer, now replaced


@dataclass(frozen=True)
class BatchAck:
    """The events of one `feedback_batch` call, stored together (or, on an error, none)."""

    event_ids: tuple[str, ...]  # in the order given; send them again and they are duplicates
    accepted: int
    duplicates: int
    superseded: int


Messages = str | Sequence[Mapping[str, str]]  # a prompt, or [{"role": …, "content": …}, …]
SIGNALS = ("thumb", "rating", "comment", "correction", "dwell_ms", "click", "copy", "regenerate")
BATCH_MESSAGE_BYTES = 1 << 20  # FeedbackBatch messages stay far below gRPC's 4 MiB cap


def _request(
    messages: Messages,
    user_id: str,
    max_new_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    request_id: str,
) -> chat_pb2.GenerateRequest:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    sampling = chat_pb2.SamplingParams()
    # unset fields stay unset: the server's defaults apply to them
    for name, value in (
        ("max_new_tokens", max_new_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("seed", seed),
    ):
        if value is not None:
            setattr(sampling, name, value)
    return chat_pb2.GenerateRequest(
        messages=[chat_pb2.Message(role=m["role"], content=m["content"]) for m in messages],
        sampling=sampling,
        user_id=user_id,
        request_id=request_id,
    )


def _feedback(
    response_id: str, user_id: str, event_id: str, signals: dict[str, object]
) -> feedback_pb2.Feedback:
    # "is", not "in (None, False)": rating=0 is a signal (one the server refuses), not none
    given = {name: v for name, v in signals.items() if v is not None and v is not False}
    if len(given) != 1:
        raise ValueError(
            f"set exactly one of {', '.join(signals)}; got {', '.join(given) or 'none'}"
        )
    ((name, value),) = given.items()
    fb = feedback_pb2.Feedback(event_id=event_id, response_id=response_id, user_id=user_id)
    if name == "thumb":
        if value not in ("up", "down"):
            raise ValueError(f"thumb: {value!r}; 'up' or 'down'")
        fb.thumb = feedback_pb2.THUMB_UP if value == "up" else feedback_pb2.THUMB_DOWN
    elif value is True:  # click, copy, regenerate: the event says it all
        getattr(fb, name).CopyFrom(Empty())
    else:
        setattr(fb, name, value)
    return fb


def _event(i: int, event: Mapping[str, object]) -> feedback_pb2.Feedback:
    """events[i] of `feedback_batch`: `feedback`'s arguments as a mapping."""
    unknown = sorted(set(event) - {"response_id", "user_id", "event_id", *SIGNALS})
    try:
        if unknown:
            raise ValueError(f"unknown {', '.join(unknown)}")
        if not event.get("response_id"):
            raise ValueError("response_id is required")
        event_id = event.get("event_id") or str(uuid.uuid4())
        signals = {name: event.get(name) for name in SIGNALS}
        return _feedback(event["response_id"], event.get("user_id", ""), event_id, signals)
    except ValueError as exc:
        raise ValueError(f"events[{i}]: {exc}") from None


def _messages(events: list[feedback_pb2.Feedback]) -> list[feedback_pb2.FeedbackBatch]:
    """The events in order, in as few FeedbackBatch messages of BATCH_MESSAGE_BYTES as fit."""
    batches, size = [feedback_pb2.FeedbackBatch()], 0
    for fb in events:
        n = fb.ByteSize() + 8  # the field's tag and length
        if batches[-1].events and size + n > BATCH_MESSAGE_BYTES:
            batches.append(feedback_pb2.FeedbackBatch())
            size = 0
        batches[-1].events.append(fb)
        size += n
    return batches


def _answer(reply: chat_pb2.GenerateResponse | chat_pb2.GenerateChunk, text: str) -> Answer:
    return Answer(
        text=text,
        response_id=reply.response_id,
        model_version=reply.model_version,
        finish_reason=reply.finish_reason,
        prompt_tokens=reply.prompt_tokens,
        completion_tokens=reply.completion_tokens,
    )


class Client:
    """Chat and feedback with `kaizen serve`, retrying what is safe to retry.

        with Client("127.0.0.1:50051", key) as kz:
            answer = kz.chat("What is the capital of France?", user_id="u1")
            kz.feedback(answer.response_id, "u1", thumb="up")

    A call that fails with UNAVAILABLE is tried again after an exponential backoff with
    full jitter, within `retry.attempts` and `retry.deadline_s`: `chat`, `feedback` and
    `feedback_batch` (event ids make a retry a duplicate, not a second event), `withdraw`
    and `serving` always, `stream` only before its first piece arrives (after that, a
    retry would send the caller a second, different answer). Every other error is raised
    at once as the `grpc.RpcError` the server sent: `.code()` and `.details()` unchanged.
    """

    def __init__(
        self,
        target: str,
        credential: str | None = None,
        *,
        root_ca: bytes | None = None,
        client_cert: bytes | None = None,
        client_key: bytes | None = None,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        """Connect to `target` (see `connect`: TLS when `root_ca` is given)."""
        channel = connect(
            target, credential, root_ca=root_ca, client_cert=client_cert, client_key=client_key
        )
        self._use(channel, retry, owns_channel=True)

    @classmethod
    def from_channel(cls, channel: grpc.Channel, retry: RetryPolicy = RetryPolicy()) -> Client:
        """A client on a channel the caller made (and closes)."""
        client = cls.__new__(cls)
        client._use(channel, retry, owns_channel=False)
        return client

    def _use(self, channel: grpc.Channel, retry: RetryPolicy, owns_channel: bool) -> None:
        self.channel = channel
        self.retry = retry
        self._owns_channel = owns_channel
        self._chat = chat_pb2_grpc.ChatServiceStub(channel)
        self._feedback = feedback_pb2_grpc.FeedbackServiceStub(channel)
        self._model = model_pb2_grpc.ModelServiceStub(channel)
        self._random = random.Random()

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- the calls --

    def chat(
        self,
        messages: Messages,
        user_id: str = "",
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> Answer:
        """The answer to `messages` (a prompt, or the conversation so far), whole. An
        unset sampling option takes the server's default; `timeout_s` replaces
        `retry.deadline_s` for this call."""
        request = _request(messages, user_id, max_new_tokens, temperature, top_p, seed, request_id)
        reply = self._unary(self._chat.Generate, request, timeout_s)
        return _answer(reply, reply.text)

    def stream(
        self,
        messages: Messages,
        user_id: str = "",
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> Iterator[str | Answer]:
        """The answer as it is generated: text pieces (str), then the `Answer`, whose text
        is the pieces joined. Close it early (`.close()`, or drop it) and the server stops
        generating."""
        request = _request(messages, user_id, max_new_tokens, temperature, top_p, seed, request_id)
        deadline = self._deadline(timeout_s)
        for attempt in itertools.count(1):
            call = self._chat.GenerateStream(request, timeout=_left_s(deadline))
            pieces: list[str] = []
            started = False
            try:
                for chunk in call:
                    started = True
                    if chunk.done:
                        yield _answer(chunk, "".join(pieces))
                        return
                    pieces.append(chunk.text_delta)
                    yield chunk.text_delta
            except grpc.RpcError as exc:
                if started or not self._may_retry(exc, attempt, deadline):
                    raise
                continue
            finally:
                call.cancel()  # a no-op once done; frees the server's row if the reader left
            raise RuntimeError("GenerateStream ended without its final chunk")

    def feedback(
        self,
        response_id: str,
        user_id: str = "",
        *,
        thumb: Literal["up", "down"] | None = None,
        rating: int | None = None,
        comment: str | None = None,
        correction: str | None = None,
        dwell_ms: int | None = None,
        click: bool = False,
        copy: bool = False,
        regenerate: bool = False,
        event_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Ack:
        """Store one feedback event (exactly one signal) on the answer `response_id`.
        Without `event_id` a fresh uuid is used; pass your own to make your retries of this
        call duplicates too. `user_id` empty means the answer's user."""
        signals = {
            "thumb": thumb,
            "rating": rating,
            "comment": comment,
            "correction": correction,
            "dwell_ms": dwell_ms,
            "click": click,
            "copy": copy,
            "regenerate": regenerate,
        }
        event_id = event_id or str(uuid.uuid4())
        request = _feedback(response_id, user_id, event_id, signals)
        ack = self._unary(self._feedback.SubmitFeedback, request, timeout_s)
        return Ack(event_id, ack.accepted, ack.duplicates, ack.superseded)

    def feedback_batch(
        self, events: Sequence[Mapping[str, object]], *, timeout_s: float | None = None
    ) -> BatchAck:
        """Store many events on one call, all or nothing (StreamFeedbackBatches: far less
        server CPU per event than one call each). Each event is a mapping of `feedback`'s
        arguments, {"response_id": rid, "user_id": "u1", "thumb": "up"}; at most 10,000
        events. Retried like `feedback`: the event ids are fixed before the first try."""
        request = _messages([_event(i, ev) for i, ev in enumerate(events)])
        event_ids = tuple(fb.event_id for batch in request for fb in batch.events)

        def call(batches: list[feedback_pb2.FeedbackBatch], timeout: float | None):
            return self._feedback.StreamFeedbackBatches(iter(batches), timeout=timeout)

        ack = self._unary(call, request, timeout_s)
        return BatchAck(event_ids, ack.accepted, ack.duplicates, ack.superseded)

    def withdraw(
        self, response_id: str, user_id: str = "", kind: str = "", timeout_s: float | None = None
    ) -> int:
        """Take back the user's signal of `kind` ("thumb", "rating", …; empty: every kind)
        on an answer. Returns the events taken back (0 when there was none)."""
        request = feedback_pb2.WithdrawRequest(response_id=response_id, user_id=user_id, kind=kind)
        return self._unary(self._feedback.WithdrawFeedback, request, timeout_s).withdrawn

    def serving(self, timeout_s: float | None = None) -> dict[str, str]:
        """The versions being served, by state: {"serving": "v3"}, with "canary" during a
        canary. Any valid credential may ask: a cheap check of the target and the key."""
        info = self._unary(self._model.GetModelInfo, model_pb2.GetModelInfoRequest(), timeout_s)
        return {v.state: v.version for v in info.versions}

    # -- retries --

    def _deadline(self, timeout_s: float | None) -> float | None:
        limit_s = self.retry.deadline_s if timeout_s is None else timeout_s
        return None if limit_s is None else time.monotonic() + limit_s

    def _unary(self, method, request, timeout_s: float | None):
        deadline = self._deadline(timeout_s)
        for attempt in itertools.count(1):
            try:
                return method(request, timeout=_left_s(deadline))
            except grpc.RpcError as exc:
                if not self._may_retry(exc, attempt, deadline):
                    raise

    def _may_retry(self, exc: grpc.RpcError, attempt: int, deadline: float | None) -> bool:
        """Whether to try again after failed try `attempt`; if so, wait first."""
        if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retry.attempts:
            return False
        wait_s = self._random.uniform(0, self.retry.bound_s(attempt))  # full jitter
        if deadline is not None and time.monotonic() + wait_s >= deadline:
            return False  # the next try could not finish in time: report this failure now
        time.sleep(wait_s)
        return True


def _left_s(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)
