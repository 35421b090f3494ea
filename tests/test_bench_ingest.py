"""`kaizen bench ingest` end to end on the tiny model: both RPCs on SQLite, the batched
one alone on a real redis-server; and the batched insert it made SQLite use, against one
event at a time."""

from __future__ import annotations

import json
import random
import sqlite3

import pytest

from bench import ingest
from bench.config import IngestBench
from kaizen.buffer import open_buffer
from kaizen.cli import main
from kaizen.errors import NotFound
from kaizen.events import Feedback, FeedbackKind, Generation, Sampling
from tests.redis_server import redis_server_fixture  # noqa: F401

KEYS = ("events_per_s", "ratio", "p50_ack_ms", "p99_ack_ms", "server_cpu_us_per_event")
KEYS += ("grpc_floor_events_per_s", "ratio_vs_grpc_floor")
# CPU time is read in clock ticks (10 ms): the floor may use less than one on 300 events
TICKS = ("grpc_floor_server_cpu_us_per_event",)
PREFIXES = {"stream": ("",), "batches": ("batched_",), "both": ("", "batched_")}
SMALL = ("--events", "300", "--clients", "2", "--batch", "50", "--answers", "40", "--users", "8")


def bench(capsys, *argv: str) -> dict:
    assert main(["bench", "ingest", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # the one JSON object, nothing else on stdout


def check_figures(figures: dict, backend: str, rpc: str = "both") -> None:
    """Each RPC's figures under its prefix (StreamFeedback's unprefixed), no others."""
    assert figures["backend_limit_events_per_s"] > 0
    for prefix in ("", "batched_"):
        measured = prefix in PREFIXES[rpc]
        for key in KEYS:
            assert (figures[prefix + key] > 0) if measured else (prefix + key not in figures)
        for key in TICKS:
            assert (figures[prefix + key] >= 0) if measured else (prefix + key not in figures)
        if measured:
            assert figures[prefix + "p50_ack_ms"] <= figures[prefix + "p99_ack_ms"]
            assert figures[prefix + "ratio"] == pytest.approx(
                figures[prefix + "events_per_s"] / figures["backend_limit_events_per_s"],
                abs=2e-3,
            )
            # the same messages to a server that parses and drops them, in the same run
            assert figures[prefix + "ratio_vs_grpc_floor"] == pytest.approx(
                figures[prefix + "events_per_s"] / figures[prefix + "grpc_floor_events_per_s"],
                abs=2e-3,
            )
    if rpc == "both":
        assert figures["batched_vs_stream"] == pytest.approx(
            figures["batched_events_per_s"] / figures["events_per_s"], abs=0.01
        )
    assert (figures["backend"], figures["clients"], figures["events"]) == (backend, 2, 300)
    # every event sent over gRPC acknowledged, stored, and not stored again when resent
    sent = 300 * len(PREFIXES[rpc])
    assert figures["events_accepted"] == figures["events_stored"] == sent
    assert figures["events_lost"] == 0
    assert figures["answers_seeded"] == 40 * (1 + len(PREFIXES[rpc]))
    assert figures["server_exit_code"] == 0


def test_bench_ingest_on_sqlite_stores_each_event_exactly_once(tiny_model, capsys, tmp_path):
    figures = bench(capsys, "--model", str(tiny_model), *SMALL, "--data", str(tmp_path))
    check_figures(figures, "sqlite")
    assert figures["durability"] == "SQLite WAL, synchronous=FULL"
    db = sqlite3.connect(tmp_path / "buffer.db")

    def ids(phase: str) -> list[int]:
        sql = "SELECT event_id FROM feedback WHERE event_id LIKE ?"
        return sorted(int(r[0].rsplit("-", 1)[1]) for r in db.execute(sql, (f"%-{phase}-%",)))

    assert ids("rpc") == ids("bat") == ids("raw") == list(range(300))
    # one call per client and RPC before the clock starts
    assert ids("warm") == ids("bwarm") == list(range(100))
    assert db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 1100


def test_bench_ingest_on_redis(tiny_model, capsys, redis_server):
    argv = ("--model", str(tiny_model), *SMALL, "--buffer", redis_server.url, "--rpc", "batches")
    figures = bench(capsys, *argv)
    check_figures(figures, "redis", "batches")
    assert figures["durability"] == "Redis appendfsync always"


def test_flags_the_run_cannot_use_are_refused_with_the_flag_named(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="--redis: redis-server is not installed"):
        with ingest.redis_server(tmp_path):
            pass
    with pytest.raises(ValueError, match="--buffer, --redis"):
        IngestBench(buffer="redis://127.0.0.1:6379/0", redis=True)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("someone's")
    with pytest.raises(ValueError, match="--data: .* is not empty"):
        ingest.run(IngestBench(data=tmp_path / "kept"))
    assert (tmp_path / "kept" / "notes.txt").read_text() == "someone's"


def answer(rid: str, user: str) -> Generation:
    return Generation(
        response_id=rid,
        user_id=user,
        request_id=rid,
        model_version="v0",
        messages=[{"role": "user", "content": "hi"}],
        prompt_tokens=[1],
        response_tokens=[2],
        behaviour_logprobs=[-0.5],
        text="hello",
        finish_reason="stop",
        sampling=Sampling(),
        created_at=1.0,
    )


def test_a_batch_stores_what_the_same_events_sent_one_at_a_time_store(tmp_path):
    """Retries, repeated signals and the same event twice within one batch: the batched
    SQL (one query per check, rows inserted in their final state) against one event per
    call."""
    rng = random.Random(0)
    kinds = [FeedbackKind.THUMB, FeedbackKind.RATING, FeedbackKind.CLICK]
    pool = [
        Feedback(f"e{i}", f"r{rng.randrange(4)}", "ann", rng.choice(kinds), float(i % 2))
        for i in range(60)
    ]
    batches = [[rng.choice(pool) for _ in range(rng.randrange(1, 12))] for _ in range(30)]
    batched, single = (open_buffer(f"sqlite:///{tmp_path}/{n}.db") for n in ("a", "b"))
    for buffer in (batched, single):
        for r in range(4):
            buffer.append_generation(answer(f"r{r}", "ann"))
    for batch in batches:
        together = batched.append_feedback(batch)
        apart = [single.append_feedback([ev]) for ev in batch]
        assert together.new == tuple(n for r in apart for n in r.new)
        assert together.superseded == sum(r.superseded for r in apart)
    assert batched.feedback_states() == single.feedback_states()
    assert batched.feedback_states()["superseded"] > 0  # the case was exercised

    def active(buffer) -> list[tuple[str, str]]:
        return [(s.feedback.event_id, s.feedback.kind) for s in buffer.read_samples(0, 1000)]

    assert active(batched) == active(single)
    # all or nothing, the first bad event in order named
    bad = Feedback("x", "nope", "ann", kinds[0], 1.0)
    with pytest.raises(NotFound, match="'nope'"):
        batched.append_feedback([Feedback("new", "r0", "ann", kinds[0], 1.0), pool[0], bad])
    assert batched.feedback_states() == single.feedback_states()
