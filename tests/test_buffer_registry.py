"""The replay buffer (SQLite) and the weight registry, against the real thing on disk."""

from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kaizen.buffer import SQLiteBuffer, open_buffer
from kaizen.buffer.sqlite import supersede_sql
from kaizen.errors import AlreadyExists, CorruptVersion, NotFound, ResourceExhausted
from kaizen.events import Feedback, FeedbackKind, Generation, Sampling
from kaizen.registry import Registry


def generation(rid: str) -> Generation:
    return Generation(
        response_id=rid,
        user_id="u",
        request_id="q",
        model_version="v0",
        messages=[{"role": "user", "content": "hi"}],
        prompt_tokens=[1, 2, 3],
        response_tokens=[4, 5],
        behaviour_logprobs=[-0.5, -1.5],
        text="ok",
        finish_reason="stop",
        sampling=Sampling(max_new_tokens=2, seed=9),
        created_at=time.time(),
    )


def thumb(eid: str, rid: str, value: float = 1.0) -> Feedback:
    return Feedback(eid, rid, "u", FeedbackKind.THUMB, value)


def test_events_survive_a_reopen_and_join_in_order(tmp_path):
    url = f"sqlite:///{tmp_path}/b.db"
    buffer = open_buffer(url)
    buffer.append_generation(generation("r1"))
    buffer.append_generation(generation("r2"))
    buffer.append_feedback([thumb("e1", "r1"), thumb("e2", "r2", -1.0)])
    buffer.close()
    reopened = open_buffer(url)
    samples = reopened.read_samples(0, 10)
    assert [(s.seq, s.feedback.event_id, s.feedback.value) for s in samples] == [
        (1, "e1", 1.0),
        (2, "e2", -1.0),
    ]
    g = samples[0].generation
    assert (g.response_tokens, g.behaviour_logprobs, g.sampling.seed) == ([4, 5], [-0.5, -1.5], 9)
    assert [s.feedback.event_id for s in reopened.read_samples(1, 10)] == ["e2"]
    assert reopened.last_seq() == 2
    reopened.close()


def test_a_buffer_from_an_older_kaizen_opens_without_its_redundant_index(tmp_path):
    """Older buffers carry feedback_response(response_id), which feedback_signal (whose
    first column is response_id) makes redundant: reopening drops it, so each stored
    event updates one B-tree fewer, and lookups by answer still use an index."""
    path = tmp_path / "b.db"
    buffer = SQLiteBuffer(path)
    buffer.append_generation(generation("r1"))
    buffer.append_feedback([thumb("e1", "r1")])
    buffer.close()
    with sqlite3.connect(path) as conn:  # as an older kaizen left it
        conn.execute("CREATE INDEX feedback_response ON feedback(response_id)")
    reopened = SQLiteBuffer(path)
    reopened.close()
    with sqlite3.connect(path) as conn:
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        plan = " ".join(
            str(r[-1])
            for r in conn.execute(
                "EXPLAIN QUERY PLAN SELECT seq FROM feedback WHERE response_id = ?", ("r1",)
            )
        )
    assert "feedback_response" not in indexes and "feedback_signal" in indexes
    assert "USING INDEX feedback_signal" in plan or "USING COVERING INDEX" in plan, plan
    reopened = SQLiteBuffer(path)
    assert reopened.withdraw("r1", "u", "thumb") == 1
    assert reopened.append_feedback([thumb("e1", "r1")]).new == (False,)  # still a duplicate
    reopened.close()


def test_superseding_a_signal_reads_only_its_active_event(tmp_path):
    """A newer thumb (rating, ...) supersedes the stored active one through the partial
    index feedback_active, so it costs the same however often the user changed their mind
    before; through feedback_signal it read every superseded row of the signal (ingest
    slowed down as the buffer grew). A buffer from an older kaizen gains the index."""
    path = tmp_path / "b.db"
    buffer = SQLiteBuffer(path)
    buffer.append_generation(generation("r1"))
    for i in range(5):  # the user flips their thumb five times: one active event
        buffer.append_feedback([thumb(f"e{i}", "r1", 1.0 if i % 2 else -1.0)])
    assert [s.feedback.event_id for s in buffer.read_samples(0, 10)] == ["e4"]
    buffer.close()
    with sqlite3.connect(path) as conn:  # as a kaizen before the index left it
        conn.execute("DROP INDEX feedback_active")
    reopened = SQLiteBuffer(path)
    reopened.append_feedback([thumb("e5", "r1", 1.0)])
    assert [s.feedback.event_id for s in reopened.read_samples(0, 10)] == ["e5"]
    reopened.close()
    with sqlite3.connect(path) as conn:
        plan = " ".join(
            str(r[-1])
            for r in conn.execute(
                "EXPLAIN QUERY PLAN " + supersede_sql(2), ["r1", "u", "thumb"] * 2
            )
        )
    assert "USING INDEX feedback_active" in plan, plan


def test_a_retry_matches_events_stored_by_an_older_kaizen(tmp_path):
    """A client retrying after an upgrade must get `duplicate`, not a conflict: the payload
    digest stays the SHA-256 of json.dumps([response_id, user_id, kind, value, text]),
    whatever the text holds (quotes, escapes, non-ASCII, control characters) and for
    every value (integers, large and tiny floats, NaN)."""
    texts = ["plain", 'say "hi" \\ /', "é 漢字 😀 \u2028", "\x00\x1f\n\t", ""]
    values = [1, -1.0, 5400.0, 1e20, 1e-7, 2**53 + 1, 0.1, -0.0, float("nan"), float("inf")]
    for i, (text, value) in enumerate(itertools.product(texts, values)):
        ev = Feedback(f"e{i}", f"r-{text}", f"u-{text}", FeedbackKind.COMMENT, value, text)
        body = json.dumps([ev.response_id, ev.user_id, "comment", float(value), text])
        assert ev.payload_sha256() == hashlib.sha256(body.encode()).hexdigest(), (text, value)
    path = tmp_path / "b.db"
    buffer = SQLiteBuffer(path)
    buffer.append_generation(generation("r1"))
    ev = Feedback("old", "r1", "u", FeedbackKind.COMMENT, 0.0, 'too "long" — shorter')
    buffer.append_feedback([Feedback("e0", "r1", "u", FeedbackKind.THUMB, 1.0)])
    with sqlite3.connect(path) as conn:  # as a kaizen with json.dumps' digest stored it
        body = json.dumps(["r1", "u", "comment", 0.0, ev.text])
        conn.execute(
            "INSERT INTO feedback (event_id, response_id, user_id, kind, value, text,"
            " payload_sha256, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                "old",
                "r1",
                "u",
                "comment",
                0.0,
                ev.text,
                hashlib.sha256(body.encode()).hexdigest(),
                0,
            ),
        )
    assert buffer.append_feedback([ev]).new == (False,)
    buffer.close()


def test_duplicates_conflicts_and_unknown_answers(tmp_path):
    buffer = SQLiteBuffer(tmp_path / "b.db")
    buffer.append_generation(generation("r1"))
    assert buffer.append_feedback([thumb("e1", "r1")]).new == (True,)
    assert buffer.append_feedback([thumb("e1", "r1")]).new == (False,)
    with pytest.raises(AlreadyExists, match="event_id"):
        buffer.append_feedback([thumb("e1", "r1", -1.0)])
    with pytest.raises(NotFound, match="response_id"):
        buffer.append_feedback([thumb("e2", "r1"), thumb("e3", "r-missing")])
    assert [s.feedback.event_id for s in buffer.read_samples(0, 10)] == ["e1"]  # e2 rolled back
    buffer.close()


def test_concurrent_writers_all_land_once(tmp_path):
    buffer = SQLiteBuffer(tmp_path / "b.db")
    buffer.append_generation(generation("r1"))
    with ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(lambda i: buffer.append_feedback([thumb(f"e{i % 100}", "r1")]), range(200))
        )
    assert sum(r.accepted for r in results) == 100 and sum(r.duplicates for r in results) == 100
    states = buffer.feedback_states()  # all stored; one user's thumbs on one answer: one counts
    assert sum(states.values()) == 100 and states["active"] == 1
    assert len(buffer.read_samples(0, 1000)) == 1
    buffer.close()


def test_a_full_write_queue_refuses_at_once(tmp_path):
    buffer = SQLiteBuffer(tmp_path / "b.db", max_pending=2, max_batch=1, timeout_s=30)
    buffer.append_generation(generation("r1"))
    blocker = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    waiting = [
        threading.Thread(target=buffer.append_feedback, args=([thumb(f"e{i}", "r1")],))
        for i in range(3)
    ]
    for t in waiting:
        t.start()
    time.sleep(1.0)  # one job is in the writer's hands (max_batch=1), two wait in the queue
    with pytest.raises(ResourceExhausted, match="pending"):
        buffer.append_feedback([thumb("e-late", "r1")])
    blocker.execute("ROLLBACK")
    for t in waiting:
        t.join()
    assert sum(buffer.feedback_states().values()) == 3  # all three stored (one active)
    buffer.close()


def test_bad_buffer_url_names_the_flag():
    with pytest.raises(ValueError, match="--buffer"):
        open_buffer("postgres://somewhere")


def test_publish_is_atomic_and_verified(tmp_path):
    registry = Registry(tmp_path / "reg")
    assert registry.latest() == "v0"
    with registry.publish("base", {"note": 1}) as staging:
        (staging / "weights.bin").write_bytes(b"abc")
    assert registry.versions() == ["v1"]
    manifest = registry.verify("v1")
    assert manifest.parent == "v0" and manifest.metadata == {"note": 1}
    assert set(manifest.files) == {"weights.bin"}
    with pytest.raises(RuntimeError), registry.publish("base") as staging:
        (staging / "weights.bin").write_bytes(b"half")
        raise RuntimeError("the publisher died mid-write")
    assert registry.versions() == ["v1"]
    assert not any(p.name.startswith(".staging") for p in (tmp_path / "reg").iterdir())
    (registry.path("v1") / "weights.bin").write_bytes(b"abd")
    with pytest.raises(CorruptVersion, match="weights.bin"):
        registry.verify("v1")
