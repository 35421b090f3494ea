"""OpenTelemetry traces: an answer's spans share one trace in every process, a version's
another; the learner's step links to its answers; nothing personal is in a span; off by
default, and then kaizen never imports OpenTelemetry."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from kaizen import cli
from kaizen.telemetry import tracing
from kaizen.telemetry.logs import user_field
from kaizen.v1 import feedback_pb2, model_pb2
from tests.conftest import ask, wait_until

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Which river flows through Zanzibar-Quokka town?"
USER = "alice-7f3c9"


@pytest.fixture
def spans():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing.configure(exporter)
    yield exporter
    tracing.configure("none")


def derived(key: str) -> int:
    """The trace id the README promises: the first 16 bytes of SHA-256 of the key."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:16], "big")


def named(exporter, name: str, **attributes) -> list:
    return [
        s
        for s in exporter.get_finished_spans()
        if s.name == name
        and all(s.attributes.get(f"kaizen.{k}") == v for k, v in attributes.items())
    ]


def test_an_answer_and_a_version_are_each_one_trace_across_server_and_learner(
    spans, server, stubs, serve_config, tiny_model, api_key
):
    from learner.config import LearnerConfig
    from learner.loop import Learner

    reply = stubs.chat.Generate(ask(content=PROMPT, user_id=USER))
    chunks = list(stubs.chat.GenerateStream(ask(content=PROMPT, user_id=USER, seed=1)))
    streamed = chunks[-1].response_id
    stubs.feedback.SubmitFeedback(
        feedback_pb2.Feedback(
            event_id="e1", response_id=reply.response_id, user_id=USER, thumb=feedback_pb2.THUMB_UP
        )
    )
    learner = Learner(
        LearnerConfig(
            model=tiny_model,
            buffer=serve_config.buffer,
            registry=serve_config.registry,
            objective="reinforce",
            publish_every=1,
            batch_size=1,
            metrics_port=-1,
            gate_holdout=0.0,
            max_user_share=1.0,
        )
    )
    try:
        learner.fill()
        learner.train_pending()
        assert learner.publish() == "v1"
    finally:
        learner.buffer.close()
    info = model_pb2.GetModelInfoRequest()
    serving = lambda: stubs.model.GetModelInfo(info).versions[0].version == "v1"  # noqa: E731
    wait_until(serving, what="the swap to v1")
    stubs.model.Rollback(model_pb2.RollbackRequest(version="v1", reason="tracing test"))

    answer = derived("kaizen:answer:" + reply.response_id)
    (generate,) = named(spans, "kaizen.generate", response_id=reply.response_id)
    assert generate.context.trace_id == answer
    assert generate.attributes["kaizen.completion_tokens"] == reply.completion_tokens
    assert generate.attributes["kaizen.version"] == "v0"
    (feedback,) = named(spans, "kaizen.feedback", event_id="e1")
    assert feedback.context.trace_id == answer
    assert feedback.attributes["kaizen.result"] == "accepted"
    (stream,) = named(spans, "kaizen.generate", response_id=streamed, stream=True)
    assert stream.context.trace_id == derived("kaizen:answer:" + streamed)

    (step,) = named(spans, "kaizen.learner.step", result="ok")
    assert [link.context.trace_id for link in step.links] == [answer]
    assert step.attributes["kaizen.links"] == 1

    version = derived("kaizen:version:v1")
    (publish,) = named(spans, "kaizen.publish", version="v1")
    (swap,) = named(spans, "kaizen.swap", version="v1")
    (rollback,) = named(spans, "kaizen.rollout", version="v1")
    assert publish.context.trace_id == swap.context.trace_id == version
    assert rollback.context.trace_id == version
    assert publish.attributes["kaizen.cursor"] > 0 and "kaizen.rejected" not in publish.attributes
    assert swap.attributes["kaizen.result"] == "staged_serving"
    assert rollback.attributes["kaizen.decision"] == "rollback"

    values = [str(v) for s in spans.get_finished_spans() for v in [s.name, *s.attributes.values()]]
    secrets = [USER, user_field(USER), "Zanzibar", api_key]  # no user at all, even hashed
    if len(reply.text) >= 12:  # a shorter random answer could be a substring by chance
        secrets.append(reply.text)
    for secret in secrets:
        assert not [v for v in values if secret in v], secret


def test_with_tracing_off_opentelemetry_is_never_imported():
    script = """
import sys
from kaizen.telemetry import tracing
import kaizen.cli, server.servicers, learner.loop

def never():
    raise AssertionError("links iterated while tracing is off")
    yield

with tracing.span("kaizen.generate", tracing.answer("r-1"), links=never(), a=1) as span:
    span.set(b=2)
tracing.record("kaizen.swap", tracing.version("v1"), version="v1")
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
import server.app  # the HTTP door: FastAPI imports the OpenTelemetry API itself
kaizen.cli.build_parser()
print(sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk")))
tracing.configure("console")
print("opentelemetry.sdk.trace" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["[]", "[]", "True"]  # on, the SDK is imported: the checks above can fail


def test_the_flag_wins_over_the_environment(tiny_model, monkeypatch, capsys):
    monkeypatch.setenv(tracing.ENV, "console")
    try:
        assert (
            cli.main(["--trace-exporter", "none", "model", "prepare", "--out", str(tiny_model)])
            == 0
        )
        assert not tracing.enabled()
        assert cli.main(["model", "prepare", "--out", str(tiny_model)]) == 0
        assert tracing.enabled()
    finally:
        tracing.configure("none")
    monkeypatch.setenv(tracing.ENV, "jaeger")
    with pytest.raises(SystemExit):
        cli.main(["model", "prepare", "--out", str(tiny_model)])
    assert (
        "KAIZEN_TRACE_EXPORTER: 'jaeger' is not one of none, console, otlp"
        in capsys.readouterr().err
    )


def otlp_installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.exporter.otlp") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(otlp_installed(), reason="opentelemetry-exporter-otlp is installed")
def test_otlp_without_its_exporter_package_is_refused_naming_it(tiny_model, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--trace-exporter", "otlp", "model", "prepare", "--out", str(tiny_model)])
    assert "opentelemetry-exporter-otlp" in capsys.readouterr().err
    assert not tracing.enabled()
