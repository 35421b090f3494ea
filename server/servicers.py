"""Thin gRPC servicers: convert at the edge, hand work to the engine and the buffer."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import queue
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kaizen.auth import Principal
from kaizen.buffer import ReplayBuffer
from kaizen.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from kaizen.events import Feedback, FeedbackKind, Generation
from kaizen.modeling import chat_prompt_ids
from kaizen.registry import BASE_VERSION, PROMOTED, ROLLED_BACK, Registry, version_number
from kaizen.telemetry import tracing
from kaizen.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)
from server import metrics
from server.auth import acting_user, refuse
from server.convert import (
    Limits,
    check_context,
    check_id,
    check_request_ids,
    feedback_from_pb,
    messages_from_pb,
    sampling_from_pb,
)
from server.engine import Engine, Failed, Finished, Request, Serving, Token, resolve_seed
from server.limits import Limiter
from server.rollout import Rollout

log = logging.getLogger(__name__)

MAX_STREAM_EVENTS = 10_000


@dataclass
class _Answer:
    tokens: list[int]
    logprobs: list[float]
    version: str = ""
    finish_reason: str = ""


def new_response_id() -> str:
    return f"r-{uuid.uuid4().hex}"


def _traced(span: tracing.Span, g: Generation) -> None:
    """The answer's figures on its `kaizen.generate` span: never its text or user."""
    span.set(
        version=g.model_version,
        prompt_tokens=len(g.prompt_tokens),
        completion_tokens=len(g.response_tokens),
        finish_reason=g.finish_reason,
    )


class TextStream:
    """Turns a growing list of tokens into text deltas, holding back split UTF-8 characters."""

    def __init__(self, tokenizer, stop_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.tokens: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        if token_id in self.stop_ids:
            return ""
        self.tokens.append(token_id)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character not yet complete
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta


class ChatService(chat_pb2_grpc.ChatServiceServicer):
    def __init__(
        self,
        engine: Engine,
        tokenizer,
        stop_ids: set[int],
        buffer: ReplayBuffer,
        limits: Limits,
        rollout: Rollout,
        limiter: Limiter,
        request_timeout_s: float = 600.0,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.buffer = buffer
        self.limits = limits
        self.rollout = rollout
        self.limiter = limiter
        self.request_timeout_s = request_timeout_s

    def start(
        self, request: chat_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> tuple[str, list[dict[str, str]], Request]:
        """Check a chat request (as its principal may send it, within its limits) and queue
        it for the batch: (the acting user, the messages, the job)."""
        check_request_ids(request)
        user = acting_user(context.principal, request.user_id)
        messages = messages_from_pb(request)
        self.limiter.request(context.principal, user)
        sampling = resolve_seed(sampling_from_pb(request, self.limits))
        prompt_ids = chat_prompt_ids(self.tokenizer, messages)
        check_context(len(prompt_ids), sampling, self.limits)
        canary = self.rollout.route_to_canary(user)
        job = self.engine.submit(Request(prompt_ids=prompt_ids, sampling=sampling, canary=canary))
        context.add_callback(job.cancel)  # client gone or deadline passed: free the row
        metrics.PROMPT_TOKENS.inc(len(prompt_ids))
        return user, messages, job

    def _next_event(self, job: Request):
        while True:
            waiting = job.waiting
            timeout = self.request_timeout_s
            if waiting:  # not admitted yet: give up at the queue deadline
                timeout = job.enqueued_at + self.engine.max_queue_wait_s - time.monotonic()
            try:
                return job.events.get(timeout=max(timeout, 0.0))
            except queue.Empty:
                if not waiting:
                    job.cancel()
                    raise Unavailable(
                        "generation stalled; the decode loop did not answer"
                    ) from None
                if job.expire():
                    raise self.engine.queue_deadline_error() from None
                # admitted at that very moment: wait for its tokens

    def _events(self, job: Request, answer: _Answer) -> Iterator[int]:
        """Yield token ids as they come; fill `answer` with the version and finish reason;
        observe the latencies a user feels and how the request ended."""
        arm = "canary" if job.canary else "serving"
        last = job.enqueued_at
        try:
            yield from self._tokens(job, answer, arm, last)
        except (Cancelled, GeneratorExit):  # the client went away (a stream: gRPC closed it)
            metrics.FINISHED.labels("cancelled").inc()
            raise
        except DeadlineExceeded:
            metrics.FINISHED.labels("deadline").inc()
            raise
        except Exception:
            metrics.FINISHED.labels("error").inc()
            raise
        metrics.FINISHED.labels(answer.finish_reason).inc()
        metrics.REQUEST_PROMPT_TOKENS.observe(len(job.prompt_ids))
        metrics.REQUEST_GENERATION_TOKENS.observe(len(answer.tokens))

    def _tokens(self, job: Request, answer: _Answer, arm: str, last: float) -> Iterator[int]:
        while True:
            event = self._next_event(job)
            if isinstance(event, Token):
                now = time.monotonic()
                first = not answer.tokens
                (metrics.TIME_TO_FIRST_TOKEN if first else metrics.INTER_TOKEN_LATENCY).labels(
                    arm
                ).observe(now - last)
                last = now
                answer.tokens.append(event.token_id)
                answer.logprobs.append(event.logprob)
                yield event.token_id
            elif isinstance(event, Finished):
                if event.finish_reason == "cancelled":  # nobody will read it: not logged
                    raise Cancelled("the client cancelled or its deadline passed")
                answer.version, answer.finish_reason = event.version, event.finish_reason
                return
            elif isinstance(event, Failed):
                raise event.error

    def _record(
        self,
        request,
        user: str,
        messages,
        job: Request,
        answer: _Answer,
        text: str,
        response_id: str,
    ) -> Generation:
        generation = Generation(
            response_id=response_id,
            user_id=user,
            request_id=request.request_id,
            model_version=answer.version,
            messages=messages,
            prompt_tokens=job.prompt_ids,
            response_tokens=answer.tokens,
            behaviour_logprobs=answer.logprobs,
            text=text,
            finish_reason=answer.finish_reason,
            sampling=job.sampling,
            created_at=time.time(),
        )
        # Durable before the caller sees response_id, so feedback can always be joined.
        self.buffer.append_generation(generation)
        return generation

    def Generate(self, request, context):
        user, messages, job = self.start(request, context)
        rid = new_response_id()
        with tracing.span("kaizen.generate", tracing.answer(rid), response_id=rid) as span:
            answer = _Answer([], [])
            for _ in self._events(job, answer):
                pass
            text = self.tokenizer.decode(
                [t for t in answer.tokens if t not in self.stop_ids], skip_special_tokens=True
            )
            g = self._record(request, user, messages, job, answer, text, rid)
            _traced(span, g)
        return chat_pb2.GenerateResponse(
            response_id=g.response_id,
            text=g.text,
            model_version=g.model_version,
            finish_reason=g.finish_reason,
            prompt_tokens=len(g.prompt_tokens),
            completion_tokens=len(g.response_tokens),
        )

    def GenerateStream(self, request, context):
        started = self.start(request, context)
        yield from self.stream(request, started, new_response_id())

    def stream(
        self,
        request: chat_pb2.GenerateRequest,
        started: tuple[str, list[dict[str, str]], Request],
        response_id: str,
    ) -> Iterator[chat_pb2.GenerateChunk]:
        """The chunks of a `start`ed request: text deltas, then the last chunk with the
        answer's fields. The caller picks `response_id`, so it knows the id the answer
        will be logged under before the first token (the HTTP door's chunks carry it)."""
        user, messages, job = started
        key = tracing.answer(response_id)
        with tracing.span("kaizen.generate", key, response_id=response_id, stream=True) as span:
            answer = _Answer([], [])
            stream = TextStream(self.tokenizer, self.stop_ids)
            for token_id in self._events(job, answer):
                delta = stream.push(token_id)
                if delta:
                    yield chat_pb2.GenerateChunk(text_delta=delta)
            g = self._record(request, user, messages, job, answer, stream.text, response_id)
            _traced(span, g)
        yield chat_pb2.GenerateChunk(
            done=True,
            response_id=g.response_id,
            model_version=g.model_version,
            finish_reason=g.finish_reason,
            prompt_tokens=len(g.prompt_tokens),
            completion_tokens=len(g.response_tokens),
        )


class FeedbackService(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(
        self,
        buffer: ReplayBuffer,
        limits: Limits,
        limiter: Limiter,
        max_stream_bytes: int,
    ) -> None:
        self.buffer = buffer
        self.max_text_chars = limits.max_feedback_text_chars
        self.limiter = limiter
        self.max_stream_bytes = max_stream_bytes

    def _store(self, events: list[Feedback], principal: Principal) -> feedback_pb2.FeedbackAck:
        started = time.time_ns()
        self.limiter.feedback(principal, collections.Counter(ev.user_id for ev in events))
        result = self.buffer.append_feedback(events)
        results = zip(events, result.new, strict=True)
        outcomes = [(ev, "accepted" if new else "duplicate") for ev, new in results]
        # counted once durable; one increment per kind and result, not per event
        for (kind, outcome), n in collections.Counter((ev.kind, r) for ev, r in outcomes).items():
            metrics.FEEDBACK.labels(str(kind), outcome).inc(n)
        if tracing.enabled():  # off: no per-event span attributes to build
            for ev, outcome in outcomes:
                tracing.record(
                    "kaizen.feedback",
                    tracing.answer(ev.response_id),
                    started,
                    kind=str(ev.kind),
                    event_id=ev.event_id,
                    result=outcome,
                )
        return feedback_pb2.FeedbackAck(
            accepted=result.accepted, duplicates=result.duplicates, superseded=result.superseded
        )

    @staticmethod
    def _owner(
        owners: dict[str, str], response_id: str, user_id: str, principal: Principal, where=""
    ) -> str:
        """The user whose feedback on `response_id` this is (`owners`: the answers' users,
        from the buffer). Feedback belongs to the user the answer was generated for: a
        user token only on its own answers, a service key on any answer, but never in
        another user's name."""
        owner = owners.get(response_id)
        if owner is None:
            raise NotFound(f"{where}response_id: no answer {response_id!r} is logged")
        user = acting_user(principal, user_id, f"{where}user_id") or owner
        if user != owner:
            refuse("other_user")
            raise PermissionDenied(f"{where}response_id: the answer was generated for another user")
        return user

    def _owned(self, events: list[tuple[Feedback, str]], principal: Principal) -> list[Feedback]:
        """Each (event, where) in its owner's name, recording who sent it: the answers'
        users are looked up in one query for the whole call."""
        owners = self.buffer.owners([ev.response_id for ev, _ in events])
        owned = []
        for ev, where in events:  # parsed with the principal's source already
            user = self._owner(owners, ev.response_id, ev.user_id, principal, where)
            # a copy only where the owner differs (cProfile blamed replace() per event, but
            # `kaizen bench ingest` measured no change in server CPU per event: 72 µs both)
            owned.append(ev if user == ev.user_id else dataclasses.replace(ev, user_id=user))
        return owned

    def SubmitFeedback(self, request, context):
        principal = context.principal
        event = feedback_from_pb(request, self.max_text_chars, source=principal.source)
        return self._store(self._owned([(event, "")], principal), principal)

    def StreamFeedback(self, request_iterator, context):
        numbered = ((f"feedback[{i}].", fb) for i, fb in enumerate(request_iterator))
        return self._stream("feedback", numbered, context.principal)

    def StreamFeedbackBatches(self, request_iterator, context):
        numbered = (
            (f"batch[{i}].events[{j}].", fb)
            for i, batch in enumerate(request_iterator)
            for j, fb in enumerate(batch.events)
        )
        return self._stream("batch", numbered, context.principal)

    def _stream(
        self,
        field: str,
        numbered: Iterable[tuple[str, feedback_pb2.Feedback]],
        principal: Principal,
    ) -> feedback_pb2.FeedbackAck:
        """Store a streaming call's (where, event) pairs all or nothing; both RPCs share
        one bound on the call's events and text, however the client split them."""
        events, text_bytes = [], 0
        for i, (where, fb) in enumerate(numbered):
            if i >= MAX_STREAM_EVENTS:
                raise InvalidArgument(
                    field, f"more than {MAX_STREAM_EVENTS} events in one stream; split it"
                )
            event = feedback_from_pb(fb, self.max_text_chars, where, principal.source)
            text_bytes += len(event.text.encode())
            if text_bytes > self.max_stream_bytes:
                metrics.RATE_LIMITED.labels("max_feedback_stream_bytes").inc()
                raise ResourceExhausted(
                    f"max_feedback_stream_bytes: this stream's comments and corrections "
                    f"passed {self.max_stream_bytes} bytes at {where[:-1]} "
                    "(--max-feedback-stream-bytes); split it"
                )
            events.append((event, where))
        if not events:
            return feedback_pb2.FeedbackAck()
        return self._store(self._owned(events, principal), principal)

    def WithdrawFeedback(self, request, context):
        check_id("response_id", request.response_id, required=True)
        check_id("user_id", request.user_id, required=False)
        kinds = [k.value for k in FeedbackKind if k != FeedbackKind.NO_REACTION]
        if request.kind and request.kind not in kinds:
            raise InvalidArgument("kind", f"{request.kind!r} is not one of {', '.join(kinds)}")
        owners = self.buffer.owners([request.response_id])
        user = self._owner(owners, request.response_id, request.user_id, context.principal)
        self.limiter.feedback(context.principal, {user: 1})
        n = self.buffer.withdraw(request.response_id, user, request.kind)
        metrics.FEEDBACK.labels(request.kind or "all", "withdrawn").inc(n)
        key = tracing.answer(request.response_id)
        tracing.record(
            "kaizen.feedback", key, kind=request.kind or "all", result="withdrawn", withdrawn=n
        )
        return feedback_pb2.WithdrawAck(withdrawn=n)


def _timestamp(unix_s: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(unix_s * 1e9))
    return ts


def _served(record: Serving, state: str) -> model_pb2.ServedVersion:
    served = model_pb2.ServedVersion(
        version=record.version,
        state=state,
        serving_since=_timestamp(record.since),
        install_ms=record.install_ms,
    )
    if record.adapter is not None:
        served.published_at.CopyFrom(_timestamp(record.adapter.published_at))
        served.sha256 = record.adapter.manifest_sha256
    return served


class ModelService(model_pb2_grpc.ModelServiceServicer):
    def __init__(
        self,
        engine: Engine,
        rollout: Rollout,
        registry: Registry,
        rejected: dict[str, str],
        base_model: str,
        base_model_path: str,
        started_at: float,
        buffer: ReplayBuffer,
    ) -> None:
        self.engine = engine
        self.rollout = rollout
        self.registry = registry
        self.rejected = rejected  # the watcher's: versions that failed their checks
        self.base_model = base_model
        self.base_model_path = base_model_path
        self.started_at = started_at
        self.buffer = buffer

    def GetModelInfo(self, request, context):
        engine = self.engine
        versions = [_served(engine.serving, "serving")]
        canary = engine.canary
        if canary is not None:
            versions.append(_served(canary, "canary"))
        return model_pb2.ModelInfo(
            base_model=self.base_model,
            base_model_path=self.base_model_path,
            versions=versions,
            started_at=_timestamp(self.started_at),
            swaps=engine.swaps,
        )

    def ListVersions(self, request, context):
        return model_pb2.ListVersionsResponse(versions=self._versions())

    def _versions(self) -> list[model_pb2.VersionInfo]:
        serving = self.engine.version
        running = self.rollout.experiment
        live = self.registry.canary()
        out = [
            model_pb2.VersionInfo(
                version=BASE_VERSION,
                state="serving" if serving == BASE_VERSION else "retired",
                reason="the base model",
            )
        ]
        decisions = self.registry.decisions()  # every rollout record, read once
        floor = self.rollout.floor(decisions)  # at or below it, never offered: skipped
        for version in self.registry.versions():
            manifest = self.registry.manifest(version)
            record = decisions.get(version)
            state, reason = self._state(version, manifest.metadata, record, floor)
            evidence: dict[str, object] = {}
            if gate := manifest.metadata.get("gate"):
                evidence["gate"] = gate
            if running is not None and running.canary == version:
                evidence["canary"] = running.evidence()
            elif live is not None and live["version"] == version and live.get("evidence"):
                evidence["canary"] = live["evidence"]  # the authority is another replica
            elif record is not None and record.get("evidence"):
                evidence["canary"] = record["evidence"]
            out.append(
                model_pb2.VersionInfo(
                    version=version,
                    state=state,
                    parent=manifest.parent,
                    published_at=_timestamp(manifest.created_at),
                    reason=reason,
                    evidence_json=json.dumps(evidence, sort_keys=True) if evidence else "",
                )
            )
        return out

    def _state(
        self, version: str, metadata: dict, record: dict | None, floor: int
    ) -> tuple[str, str]:
        """A published version's state, and why, in order of precedence."""
        engine = self.engine
        canary = engine.canary
        running = self.rollout.experiment
        decided = record["state"] if record is not None else ""
        if rejected := metadata.get("rejected"):
            return "rejected", str(rejected)
        if version in self.rejected or version in engine.failed:
            return "rejected", self.rejected.get(version) or engine.failed[version]
        if version == engine.version:
            return "serving", str(record["reason"]) if record else ""
        if (canary is not None and canary.version == version) or (
            running is not None and running.canary == version
        ):
            return "canary", "under test"
        if decided == ROLLED_BACK:
            return "rolled_back", str(record["reason"])
        if decided == PROMOTED:
            return "retired", f"replaced; {record['reason']}"
        if version_number(version) > floor:
            return "pending", "waiting for its turn as canary"
        return "skipped", "a newer version went first"

    def _info(self, version: str) -> model_pb2.VersionInfo:
        for info in self._versions():
            if info.version == version:
                return info
        raise InvalidArgument("version", f"{version} is not published in the registry")

    def Promote(self, request, context):
        if not request.version:
            raise InvalidArgument("version", "required (e.g. v3)")
        self.rollout.promote(request.version, request.reason)
        return self._info(request.version)

    def Rollback(self, request, context):
        if not request.version:
            raise InvalidArgument("version", "required (e.g. v3)")
        self.rollout.rollback(request.version, request.reason)
        return self._info(request.version)

    def ForgetUser(self, request, context):
        check_id("user_id", request.user_id, required=True)
        done = self.buffer.forget_user(request.user_id)
        metrics.ROWS_DELETED.labels("forget").inc(done.answers + done.feedback)
        log.info(
            "forgot a user on request: %d answers, %d feedback events deleted%s",
            done.answers,
            done.feedback,
            " (already forgotten before)" if done.already else "",
        )
        return model_pb2.ForgetUserResponse(
            answers_deleted=done.answers,
            feedback_deleted=done.feedback,
            already_forgotten=done.already,
        )
