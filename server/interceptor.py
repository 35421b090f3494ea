"""One interceptor maps exceptions to gRPC status codes, counts every RPC's outcome and
writes its access line (kaizen.access: method, status, duration, request id, the answer's
ids, the hashed user); `AccessPrincipal`, after authentication, says who called."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import grpc

from kaizen.errors import KaizenError
from kaizen.telemetry import logs
from server import metrics

log = logging.getLogger(__name__)


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, KaizenError):
        return grpc.StatusCode[exc.status], str(exc)
    log.error("unhandled error in an RPC", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


@dataclass
class AccessRecord:
    """What an RPC's access line says besides method, status and duration, filled in as
    the call learns it."""

    request_id: str
    caller: str = ""  # key:<name>, user or insecure: never the credential
    user: str = ""  # logs.user_field of the acting user: never the raw id
    response_id: str = ""
    version: str = ""

    def note(self, message) -> None:
        """Take the answer's ids (or the version acted on) from a message that has them."""
        names = getattr(getattr(message, "DESCRIPTOR", None), "fields_by_name", {})
        if "response_id" in names and message.response_id:
            self.response_id = message.response_id
        for name in ("model_version", "version"):
            if name in names and getattr(message, name):
                self.version = getattr(message, name)


class _Logged:
    """The RPC's context with its access record on it, for AccessPrincipal."""

    def __init__(self, context: grpc.ServicerContext, record: AccessRecord) -> None:
        self._context = context
        self.access = record

    def __getattr__(self, name: str):
        return getattr(self._context, name)


def _begin(request, context: grpc.ServicerContext, metadata) -> AccessRecord:
    """The call's access record. Its request id: the client's `x-request-id` metadata, else
    the request's own `request_id` field, if well formed; else a new one. It goes back to
    the client in the trailing metadata, and into an empty `request_id` field, so that the
    answer is logged in the buffer under the id the log line carries."""
    given = next((v for k, v in metadata or () if k == logs.REQUEST_ID_HEADER), None)
    has_field = "request_id" in getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", {})
    record = AccessRecord(logs.request_id(given or (request.request_id if has_field else None)))
    if has_field and not request.request_id:
        request.request_id = record.request_id
    context.set_trailing_metadata(((logs.REQUEST_ID_HEADER, record.request_id),))
    record.note(request)
    return record


class ErrorInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        metadata = handler_call_details.invocation_metadata

        def count(code: grpc.StatusCode, started: float, record: AccessRecord) -> None:
            metrics.REQUESTS.labels(method, code.name).inc()
            duration_ms = round((time.perf_counter() - started) * 1000, 1)
            logs.log_access(
                "rpc", method=method, status=code.name, duration_ms=duration_ms, **asdict(record)
            )

        def finish(context, started: float, exc: BaseException | None, record) -> None:
            # a call whose client went away mid-answer is CANCELLED, whatever it returned
            code = grpc.StatusCode.OK if context.is_active() else grpc.StatusCode.CANCELLED
            if exc is not None:
                already = context.code()
                if already is not None and already != grpc.StatusCode.OK:  # handler aborted
                    count(already, started, record)
                    raise exc
                code, message = _status_of(exc)
                count(code, started, record)
                context.abort(code, message)  # raises
            count(code, started, record)
            metrics.REQUEST_SECONDS.labels(method).observe(time.perf_counter() - started)

        def unary(behaviour):
            def wrapper(request, context):
                started = time.perf_counter()
                record = _begin(request, context, metadata)
                try:
                    response = behaviour(request, _Logged(context, record))
                except Exception as exc:  # noqa: BLE001 - mapped to a status, never swallowed
                    finish(context, started, exc, record)
                record.note(response)
                finish(context, started, None, record)
                return response

            return wrapper

        def streaming(behaviour):
            def wrapper(request, context):
                started = time.perf_counter()
                record = _begin(request, context, metadata)
                try:
                    messages = behaviour(request, _Logged(context, record))
                    for message in messages:
                        record.note(message)
                        yield message
                except GeneratorExit:  # the client cancelled the stream: gRPC closed us
                    messages.close()  # as `yield from` would: the servicer sees it first
                    count(grpc.StatusCode.CANCELLED, started, record)
                    raise
                except Exception as exc:  # noqa: BLE001
                    finish(context, started, exc, record)
                finish(context, started, None, record)

            return wrapper

        return rewrap(handler, unary, streaming)


class AccessPrincipal(grpc.ServerInterceptor):
    """After authentication: puts the caller and the acting user (hashed) on the access
    record. A user token acts for its own user; a service key for the request's user_id."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        def note(request, context) -> None:
            record = getattr(context, "access", None)
            principal = getattr(context, "principal", None)
            if record is None or principal is None:
                return
            for name, value in logs.who(principal, getattr(request, "user_id", "")).items():
                setattr(record, name, value)

        def unary(behaviour):
            def wrapper(request, context):
                note(request, context)
                return behaviour(request, context)

            return wrapper

        def streaming(behaviour):
            def wrapper(request, context):
                note(request, context)
                yield from behaviour(request, context)

            return wrapper

        return rewrap(handler, unary, streaming)


def rewrap(handler, unary, streaming):
    """`handler` with its behaviour wrapped: `unary` for the RPCs that return one message,
    `streaming` for those that return a stream."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            streaming(handler.unary_stream),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary(handler.stream_unary),
            handler.request_deserializer,
            handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        streaming(handler.stream_stream),
        handler.request_deserializer,
        handler.response_serializer,
    )
