"""Forgetting a user deletes their rows (the bytes, not a flag), refuses their old events
and keeps them out of export and training."""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path

import grpc
import pytest

from kaizen.cli import main
from kaizen.v1 import feedback_pb2, model_pb2
from tests.conftest import ask

ROOT = Path(__file__).resolve().parents[2]


def file_bytes(db: Path) -> bytes:
    """The database file and its WAL and journal, as they lie on disk."""
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*") if p.is_file())


def talk(stubs, user: str, marker: str, n: int = 3) -> list[feedback_pb2.Feedback]:
    sent = []
    for i in range(n):
        rid = stubs.chat.Generate(ask(f"{marker} question {i}", user_id=user)).response_id
        ev = feedback_pb2.Feedback(
            event_id=f"{user}-{i}", response_id=rid, correction=f"{marker} answer {i}"
        )
        stubs.feedback.SubmitFeedback(ev)
        sent.append(ev)
    return sent


def test_forget_deletes_the_bytes_refuses_old_events_and_is_idempotent(
    server, stubs, serve_config, tmp_path, capsys
):
    marker = f"MARKER{uuid.uuid4().hex}"
    sent = talk(stubs, "uma", marker)
    talk(stubs, "vic", "ordinary")
    db = Path(serve_config.buffer.removeprefix("sqlite:///"))
    assert marker.encode() in file_bytes(db)

    assert main(["buffer", "forget", "--buffer", serve_config.buffer, "--user", "uma"]) == 0
    out = capsys.readouterr().out
    assert "3 answers" in out and "3 feedback events" in out
    assert marker.encode() not in file_bytes(db)  # nowhere in the file, the WAL included
    with sqlite3.connect(db) as conn:
        assert (
            conn.execute("SELECT COUNT(*) FROM generations WHERE user_id='uma'").fetchone()[0] == 0
        )
        assert (
            conn.execute("SELECT COUNT(*) FROM generations WHERE user_id='vic'").fetchone()[0] == 3
        )

    for ev in sent:  # the old events, re-sent: refused, nothing stored
        with pytest.raises(grpc.RpcError) as err:
            stubs.feedback.SubmitFeedback(ev)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    again = stubs.model.ForgetUser(model_pb2.ForgetUserRequest(user_id="uma"))
    assert (again.answers_deleted, again.feedback_deleted, again.already_forgotten) == (
        0,
        0,
        True,
    )
    export = tmp_path / "export.jsonl"
    assert main(["replay", "export", "--buffer", serve_config.buffer, "--out", str(export)]) == 0
    rows = [json.loads(line) for line in export.read_text().splitlines()]
    assert rows and all(r["user_id"] == "vic" for r in rows)


def test_forget_user_rpc_needs_admin_and_names_the_field(server, stubs):
    with pytest.raises(grpc.RpcError) as err:
        stubs.model.ForgetUser(model_pb2.ForgetUserRequest(user_id=""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("user_id:")


def test_retention_deletes_answers_older_than_the_window_and_their_feedback(tmp_path):
    import dataclasses
    import time

    from kaizen.buffer import SQLiteBuffer
    from kaizen.events import Feedback, FeedbackKind
    from server.retention import Retention
    from tests.test_buffer_registry import generation

    buffer = SQLiteBuffer(tmp_path / "b.db")
    try:
        old = dataclasses.replace(generation("old"), created_at=time.time() - 3 * 86400)
        buffer.append_generation(old)
        buffer.append_generation(generation("new"))
        buffer.append_feedback(
            [
                Feedback("e1", "old", "u", FeedbackKind.COPY),
                Feedback("e2", "new", "u", FeedbackKind.COPY),
            ]
        )
        assert Retention(buffer, days=2).sweep() == (1, 1)
        assert buffer.generation("old") is None and buffer.generation("new") is not None
        assert [s.feedback.event_id for s in buffer.read_samples(0, 10)] == ["e2"]
        assert Retention(buffer, days=2).sweep() == (0, 0)
    finally:
        buffer.close()
    with pytest.raises(ValueError, match="--retention-days"):
        Retention(buffer, days=0)


def test_a_user_forgotten_while_the_learner_holds_their_answers_never_enters_a_step(
    stubs, server_learner
):
    for user in ("uma", "vic"):
        rid = stubs.chat.Generate(ask(user_id=user)).response_id
        stubs.feedback.SubmitFeedback(
            feedback_pb2.Feedback(
                event_id=f"t-{user}", response_id=rid, thumb=feedback_pb2.THUMB_UP
            )
        )
    learner = server_learner
    learner.fill()
    assert len(learner.pending) == 2  # both read before anyone asked to be forgotten
    stubs.model.ForgetUser(model_pb2.ForgetUserRequest(user_id="uma"))
    kept = learner.drop_deleted(learner.pending)
    assert [ex.answer.source for ex in kept] == [
        s.generation.response_id for s in learner.buffer.read_samples(0, 10)
    ]  # vic's only
    assert len(kept) == 1
