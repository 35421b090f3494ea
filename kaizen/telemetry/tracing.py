"""Optional OpenTelemetry traces: off by default, and then kaizen imports nothing of
OpenTelemetry (FastAPI, the HTTP door's framework, imports its API on its own).

`kaizen --trace-exporter console|otlp` (or KAIZEN_TRACE_EXPORTER) turns them on; the
`otel` extra installs the SDK, and `otlp` also needs `opentelemetry-exporter-otlp`.

One answer, one trace, without storing anything new: an answer's spans (the server's
`kaizen.generate`, each `kaizen.feedback` on it, in any process or replica) share the
trace id derived from its response id, and a version's spans (the learner's
`kaizen.publish`, each server's `kaizen.swap` and `kaizen.rollout`) the one derived from
the version. Each such span's parent is a virtual remote span with an id derived from
the same key: it is never exported, so viewers show the spans side by side in one trace
(some note the missing parent). A version's key is its name: a registry started afresh, or
another deployment exporting to the same collector, reuses the trace of its v1.
The learner's `kaizen.learner.step` links to the traces of the answers it trained on.

Attributes carry ids, versions, counts and reasons: never a user id, a prompt, an
answer, token ids or a credential.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

EXPORTERS = ("none", "console", "otlp")
ENV = "KAIZEN_TRACE_EXPORTER"  # the default of --trace-exporter
MAX_LINKS = 32  # a step links to at most this many answers' traces; the rest are counted
PREFIX = "kaizen."  # every attribute's namespace

_tracer = None  # an opentelemetry Tracer while tracing is on
_provider = None


def answer(response_id: str) -> str:
    """The trace key of an answer: its generation and every feedback event on it."""
    return "kaizen:answer:" + response_id


def version(name: str) -> str:
    """The trace key of a version: its publish, and every server's swap and rollout."""
    return "kaizen:version:" + name


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def trace_id(key: str) -> int:
    """The 128-bit trace id of `key`: the first 16 bytes of its SHA-256, the same in every
    process (all zeros is invalid in OpenTelemetry; one in 2**128, made 1)."""
    return int.from_bytes(_digest(key)[:16], "big") or 1


def parent_span_id(key: str) -> int:
    """The 64-bit id of the virtual span every span of `key`'s trace hangs from."""
    return int.from_bytes(_digest(key)[16:24], "big") or 1


def enabled() -> bool:
    return _tracer is not None


def _exporter(name: str):
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n")
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ValueError(
            "--trace-exporter otlp needs the opentelemetry-exporter-otlp package "
            "(pip install opentelemetry-exporter-otlp); it is not installed"
        ) from None
    return OTLPSpanExporter()  # endpoint etc. from the standard OTEL_EXPORTER_OTLP_* env


def configure(exporter: Any = "none", service: str = "kaizen") -> None:
    """Trace to `exporter`: "none" (off), "console" (a JSON line a span on stdout),
    "otlp" (gRPC to $OTEL_EXPORTER_OTLP_ENDPOINT), or a SpanExporter object, exported span
    by span (tests: the in-memory exporter). Once, at start-up; a later call replaces the
    earlier one."""
    global _tracer, _provider
    if isinstance(exporter, str) and exporter not in EXPORTERS:
        raise ValueError(f"--trace-exporter: {exporter!r} is not one of {', '.join(EXPORTERS)}")
    if _provider is not None:
        _tracer, old, _provider = None, _provider, None
        old.shutdown()
    if exporter == "none":
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        raise ValueError(
            "--trace-exporter needs the opentelemetry-sdk package "
            "(pip install 'kaizen[otel]'); it is not installed"
        ) from None
    if isinstance(exporter, str):  # off the caller's thread: a slow collector never blocks
        processor = BatchSpanProcessor(_exporter(exporter))
    else:
        processor = SimpleSpanProcessor(exporter)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(processor)
    _provider, _tracer = provider, provider.get_tracer("kaizen")


def _context(key: str):
    from opentelemetry import trace

    return trace.SpanContext(
        trace_id=trace_id(key),
        span_id=parent_span_id(key),
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )


def _attributes(values: dict[str, Any]) -> dict[str, Any]:
    return {PREFIX + k: v for k, v in values.items() if v is not None}


class Span:
    """What `span` yields: `set(**attributes)` adds attributes (None values are left out)."""

    def __init__(self, otel_span=None) -> None:
        self._span = otel_span

    def set(self, **attributes: Any) -> None:
        if self._span is not None:
            self._span.set_attributes(_attributes(attributes))


_OFF = Span()


def _start(tracer, name: str, trace_key: str | None, links: Iterable[str], start_ns, attrs):
    from opentelemetry import trace

    parent = None
    if trace_key is not None:
        parent = trace.set_span_in_context(trace.NonRecordingSpan(_context(trace_key)))
    linked, total = [], 0
    for key in links:
        total += 1
        if len(linked) < MAX_LINKS:
            linked.append(trace.Link(_context(key)))
    if total:
        attrs = {**attrs, "links": total}
    return tracer.start_span(
        name, context=parent, links=linked, attributes=_attributes(attrs), start_time=start_ns
    )


@contextmanager
def span(
    name: str, trace_key: str | None = None, links: Iterable[str] = (), **attributes: Any
) -> Iterator[Span]:
    """A span named `name` around the block, in `trace_key`'s trace (a new trace if None),
    linked to the traces of `links` (keys; the first MAX_LINKS, all counted in
    `kaizen.links`; not iterated while tracing is off). Never the current span: a
    generator may end it on another thread. An exception marks it an error with the
    exception's type only (messages may quote input). A no-op while tracing is off."""
    tracer = _tracer
    if tracer is None:
        yield _OFF
        return
    otel_span = _start(tracer, name, trace_key, links, None, attributes)
    try:
        yield Span(otel_span)
    except BaseException as exc:
        from opentelemetry.trace import Status, StatusCode

        otel_span.set_attribute(PREFIX + "error", type(exc).__name__)
        otel_span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        otel_span.end()


def record(
    name: str, trace_key: str | None, start_ns: int | None = None, **attributes: Any
) -> None:
    """A span that began at `start_ns` (time.time_ns(); default now) and ends now: for work
    whose trace is known only at its end (a version's number), or a decision."""
    tracer = _tracer
    if tracer is not None:
        _start(tracer, name, trace_key, (), start_ns, attributes).end()
