"""One interceptor maps exceptions to gRPC status codes and counts every RPC's outcome."""

from __future__ import annotations

import logging
import time

import grpc

from kaizen.errors import KaizenError
from server import metrics

log = logging.getLogger(__name__)


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, KaizenError):
        return grpc.StatusCode[exc.status], str(exc)
    log.error("unhandled error in an RPC", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


class ErrorInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def finish(context, started: float, exc: BaseException | None) -> None:
            # a call whose client went away mid-answer is CANCELLED, whatever it returned
            code = grpc.StatusCode.OK if context.is_active() else grpc.StatusCode.CANCELLED
            if exc is not None:
                already = context.code()
                if already is not None and already != grpc.StatusCode.OK:  # handler aborted
                    metrics.REQUESTS.labels(method, already.name).inc()
                    raise exc
                code, message = _status_of(exc)
                metrics.REQUESTS.labels(method, code.name).inc()
                context.abort(code, message)  # raises
            metrics.REQUESTS.labels(method, code.name).inc()
            metrics.REQUEST_SECONDS.labels(method).observe(time.perf_counter() - started)

        def unary(behaviour):
            def wrapper(request, context):
                started = time.perf_counter()
                try:
                    response = behaviour(request, context)
                except Exception as exc:  # noqa: BLE001 - mapped to a status, never swallowed
                    finish(context, started, exc)
                finish(context, started, None)
                return response

            return wrapper

        def streaming(behaviour):
            def wrapper(request, context):
                started = time.perf_counter()
                try:
                    yield from behaviour(request, context)
                except GeneratorExit:  # the client cancelled the stream: gRPC closed us
                    metrics.REQUESTS.labels(method, grpc.StatusCode.CANCELLED.name).inc()
                    raise
                except Exception as exc:  # noqa: BLE001
                    finish(context, started, exc)
                finish(context, started, None)

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
