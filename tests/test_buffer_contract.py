"""The replay buffer's contract, against every backend: SQLite on disk and a real
redis-server. What the server and the learner rely on holds for both, or the test says
where they differ and why."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from kaizen.buffer import ReplayBuffer, open_buffer
from kaizen.buffer import redis as redis_buffer
from kaizen.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from kaizen.events import Feedback, FeedbackKind, Generation, Sampling
from kaizen.sim.demo import free_port
from tests.redis_server import DURABLE, redis_server_fixture, start_redis  # noqa: F401

THUMB, COPY, RATING, COMMENT = (
    FeedbackKind.THUMB,
    FeedbackKind.COPY,
    FeedbackKind.RATING,
    FeedbackKind.COMMENT,
)


@dataclass
class Store:
    """Where a backend keeps its data: open it (again) by URL, read its bytes on disk."""

    name: str
    url: str
    files: Callable[[], bytes]

    def open(self, **options) -> ReplayBuffer:
        return open_buffer(self.url, **options)


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path, monkeypatch) -> Store:
    if request.param == "sqlite":
        db = tmp_path / "buffer.db"
        return Store(
            "sqlite",
            f"sqlite:///{db}",
            lambda: b"".join(p.read_bytes() for p in tmp_path.glob("buffer.db*") if p.is_file()),
        )
    # pages of a few entries, so that these small tests read and delete across pages
    monkeypatch.setattr(redis_buffer, "SCAN", 3)
    monkeypatch.setattr(redis_buffer, "DELETE_BATCH", 2)
    server = request.getfixturevalue("redis_server")
    return Store("redis", server.url, server.files)


@pytest.fixture
def buffer(store):
    opened = store.open()
    yield opened
    opened.close()


def answer(rid: str, user: str = "ann", created_at: float | None = None) -> Generation:
    return Generation(
        response_id=rid,
        user_id=user,
        request_id=f"q-{rid}",
        model_version="v0",
        messages=[{"role": "user", "content": f"hi {rid} ✓"}],
        prompt_tokens=[1, 2, 3],
        response_tokens=[4, 5],
        behaviour_logprobs=[-0.5, -1.0 / 3.0],
        text="ok",
        finish_reason="stop",
        sampling=Sampling(max_new_tokens=2, temperature=0.9, top_p=0.95, seed=9),
        created_at=time.time() if created_at is None else created_at,
    )


def event(
    eid: str, rid: str, user: str = "ann", kind=THUMB, value: float = 1.0, text: str = ""
) -> Feedback:
    return Feedback(eid, rid, user, kind, value, text)


def active(buffer: ReplayBuffer) -> list[str]:
    return [s.feedback.event_id for s in buffer.read_samples(0, 1000)]


# -- appending and reading ---------------------------------------------------------------


def test_rows_round_trip_exactly_and_read_in_order_after_a_reopen(store):
    g1, g2 = answer("r1"), answer("r2", user="bob")
    first = store.open()
    first.append_generation(g1)
    first.append_generation(g2)
    sent = [
        Feedback("e1", "r1", "ann", THUMB, 1, received_at=123.25, source="key:frontend"),
        Feedback("e2", "r2", "bob", RATING, 4, source="user:bob"),
        Feedback("e3", "r2", "bob", COMMENT, 0, "too long — shorter please"),
    ]
    before = time.time()
    assert first.append_feedback(sent).new == (True, True, True)
    first.close()

    buffer = store.open()
    try:
        samples = buffer.read_samples(0, 10)
        assert [s.seq for s in samples] == [1, 2, 3]
        assert [s.feedback for s in samples] == sent
        assert [type(s.feedback.value) for s in samples] == [float] * 3
        assert samples[0].feedback.received_at == 123.25  # kept when the sender set it
        assert samples[1].feedback.received_at >= before  # else stamped on arrival
        assert [s.feedback.source for s in samples] == ["key:frontend", "user:bob", ""]
        assert [s.generation for s in samples] == [g1, g2, g2]  # every field, created_at too
        assert buffer.generation("r1") == g1 and buffer.generation("r2") == g2
        assert buffer.generation("r-none") is None
        assert [s.seq for s in buffer.read_samples(1, 10)] == [2, 3]
        assert [s.seq for s in buffer.read_samples(1, 1)] == [2]
        assert buffer.read_samples(3, 10) == [] and buffer.read_samples(0, 0) == []
        assert [s.seq for s in buffer.read_samples(0, -1)] == [1, 2, 3]  # as SQL's LIMIT -1
        assert buffer.last_seq() == 3
    finally:
        buffer.close()


def test_an_empty_buffer(buffer):
    assert buffer.read_samples(0, 10) == [] and buffer.read_answers(0, time.time(), 10) == []
    assert buffer.last_seq() == 0 and buffer.owners([]) == {} and buffer.owners(["r"]) == {}
    assert buffer.feedback_states() == {"active": 0, "superseded": 0, "withdrawn": 0}
    assert buffer.append_feedback([]).new == ()


def test_a_retry_is_a_duplicate_and_a_reused_event_id_is_refused(buffer):
    buffer.append_generation(answer("r1"))
    first = buffer.append_feedback([event("e1", "r1")])
    assert (first.new, first.accepted, first.duplicates) == ((True,), 1, 0)
    again = buffer.append_feedback([event("e1", "r1")])
    assert (again.new, again.accepted, again.duplicates, again.superseded) == ((False,), 0, 1, 0)
    with pytest.raises(AlreadyExists) as err:
        buffer.append_feedback([event("e1", "r1", value=-1.0)])
    assert str(err.value) == "event_id: 'e1' was already stored with another payload"
    assert err.value.status == "ALREADY_EXISTS"
    assert buffer.append_feedback([event("e2", "r1", kind=COPY)] * 2).new == (True, False)
    assert active(buffer) == ["e1", "e2"]
    assert sum(buffer.feedback_states().values()) == 2


def test_a_batch_is_stored_whole_or_not_at_all(buffer):
    buffer.append_generation(answer("r1"))
    buffer.append_feedback([event("e1", "r1")])
    with pytest.raises(NotFound) as err:
        buffer.append_feedback([event("e2", "r1", kind=COPY), event("e3", "r-missing")])
    assert str(err.value) == "response_id: unknown response_id 'r-missing' (event_id 'e3')"
    with pytest.raises(AlreadyExists):
        buffer.append_feedback([event("e4", "r1", kind=COPY), event("e1", "r1", value=-1.0)])
    with pytest.raises(AlreadyExists):  # a conflict inside the batch itself
        buffer.append_feedback([event("e5", "r1", kind=COPY), event("e5", "r1", kind=RATING)])
    assert active(buffer) == ["e1"]
    assert buffer.feedback_states() == {"active": 1, "superseded": 0, "withdrawn": 0}
    assert buffer.last_seq() == 1
    # none of the refused batches' events was kept: each is new when sent again alone
    assert buffer.append_feedback([event(e, "r1", kind=COPY) for e in ("e2", "e4", "e5")]).new == (
        True,
        True,
        True,
    )


def test_a_duplicate_answer_is_refused_and_the_first_kept(store, buffer):
    first = answer("r1")
    buffer.append_generation(first)
    # SQLite's UNIQUE constraint speaks for itself; Redis says it as kaizen's errors do.
    # Answers' ids are the server's own uuids, so neither is reached in service.
    refused = sqlite3.IntegrityError if store.name == "sqlite" else AlreadyExists
    with pytest.raises(refused, match="response_id"):
        buffer.append_generation(dataclasses.replace(first, text="other", user_id="bob"))
    assert buffer.generation("r1") == first and buffer.owners(["r1"]) == {"r1": "ann"}
    assert [seq for seq, _, _ in buffer.read_answers(0, time.time() + 1, 10)] == [1]


def test_seqs_increase_and_are_never_reused_after_a_delete(buffer):
    now = time.time()
    buffer.append_generation(answer("r1", created_at=now))
    buffer.append_generation(answer("r2", user="bob", created_at=now - 10))
    buffer.append_feedback([event("e1", "r1"), event("e2", "r1", user="cy")])
    buffer.append_feedback([event("e3", "r2", user="bob")])
    assert buffer.last_seq() == 3
    buffer.forget_user("bob")  # deletes r2 (generation seq 2) and e3 (the newest event)
    assert buffer.last_seq() == 2  # the newest event still stored
    buffer.append_generation(answer("r3", created_at=now))
    assert buffer.append_feedback([event("e4", "r3")]).new == (True,)
    assert [s.seq for s in buffer.read_samples(0, 10)] == [1, 2, 4]  # 3 is not given again
    assert [seq for seq, _, _ in buffer.read_answers(0, now + 1, 10)] == [1, 3]
    assert buffer.last_seq() == 4


# -- one effective signal per (user, answer, kind) ----------------------------------------


def test_up_then_down_then_resent_leaves_one_signal_the_latest(buffer):
    buffer.append_generation(answer("r1"))
    assert buffer.append_feedback([event("t1", "r1", value=1.0)]).superseded == 0
    assert buffer.append_feedback([event("t2", "r1", value=-1.0)]).superseded == 1
    again = buffer.append_feedback([event("t3", "r1", value=-1.0)])  # re-sent, new id
    assert (again.accepted, again.superseded) == (1, 1)
    retry = buffer.append_feedback([event("t3", "r1", value=-1.0)])
    assert (retry.duplicates, retry.superseded) == (1, 0)
    retry = buffer.append_feedback([event("t1", "r1", value=1.0)])  # a late retry of t1
    assert (retry.duplicates, retry.superseded) == (1, 0)  # stays superseded
    samples = buffer.read_samples(0, 100)
    assert [(s.feedback.event_id, s.feedback.value) for s in samples] == [("t3", -1.0)]
    assert buffer.feedback_states() == {"active": 1, "superseded": 2, "withdrawn": 0}


def test_kinds_and_users_are_separate_signals_and_a_batch_supersedes_within(buffer):
    buffer.append_generation(answer("r1"))
    buffer.append_generation(answer("r2"))
    result = buffer.append_feedback(
        [
            event("a", "r1"),
            event("b", "r1", kind=COPY),
            event("c", "r1", user="bob"),  # a frontend's key may send for another user
            event("d", "r2"),
            event("e", "r1", value=-1.0),  # replaces "a", in the same batch
        ]
    )
    assert (result.new, result.superseded) == ((True,) * 5, 1)
    assert active(buffer) == ["b", "c", "d", "e"]
    assert buffer.feedback_states() == {"active": 4, "superseded": 1, "withdrawn": 0}


def test_withdraw_takes_a_users_signal_back(buffer):
    buffer.append_generation(answer("r1"))
    buffer.append_feedback([event("up", "r1"), event("down", "r1", value=-1.0)])
    buffer.append_feedback([event("cp", "r1", kind=COPY), event("bob", "r1", user="bob")])
    assert buffer.withdraw("r1", "cy") == 0  # nothing of hers
    assert buffer.withdraw("r-none", "ann") == 0  # the servicer answers NOT_FOUND first
    assert buffer.withdraw("r1", "ann", "rating") == 0
    assert buffer.withdraw("r1", "ann", "thumb") == 1  # "down"; "up" was superseded already
    assert buffer.withdraw("r1", "ann", "thumb") == 0  # idempotent
    assert active(buffer) == ["cp", "bob"]
    assert buffer.withdraw("r1", "ann") == 1  # every kind: the copy
    assert active(buffer) == ["bob"]
    assert buffer.feedback_states() == {"active": 1, "superseded": 1, "withdrawn": 2}
    again = buffer.append_feedback([event("up2", "r1")])  # a new thumb after withdrawing
    assert (again.new, again.superseded) == ((True,), 0)  # withdrawn is not superseded
    assert active(buffer) == ["bob", "up2"]


def test_read_samples_pages_over_inactive_events_and_counts_only_active_ones(buffer):
    buffer.append_generation(answer("r1"))
    buffer.append_generation(answer("r2"))
    # seq 1..8: seven thumbs in turn on r1 (the last one counts), then one on r2
    buffer.append_feedback([event(f"t{i}", "r1", value=(-1) ** i) for i in range(7)])
    buffer.append_feedback([event("x", "r2", kind=COPY)])
    buffer.append_feedback([event("w", "r2", kind=RATING, value=5)])
    buffer.withdraw("r2", "ann", "rating")  # seq 9, withdrawn
    buffer.append_feedback([event("y", "r2", user="bob")])  # seq 10
    assert [(s.seq, s.feedback.event_id) for s in buffer.read_samples(0, 2)] == [
        (7, "t6"),
        (8, "x"),
    ]
    assert [s.seq for s in buffer.read_samples(0, 10)] == [7, 8, 10]
    assert [s.seq for s in buffer.read_samples(8, 1)] == [10]
    seen, cursor = [], 0  # the learner's way: a page at a time, after the last seq read
    while page := buffer.read_samples(cursor, 1):
        seen += [s.seq for s in page]
        cursor = page[-1].seq
    assert seen == [7, 8, 10]
    assert [s.generation.response_id for s in buffer.read_samples(0, 10)] == ["r1", "r2", "r2"]


def _consume_all(buffer: ReplayBuffer, cursor: int, page: int = 1) -> list[int]:
    """The learner's way through `consume`: a page at a time, after the last seq read."""
    seen = []
    while rows := buffer.consume(cursor, page):
        seen += [s.seq for s in rows]
        cursor = rows[-1].seq
    return seen


def test_consume_gives_the_learner_what_read_samples_gives(buffer):
    buffer.append_generation(answer("r1"))
    buffer.append_generation(answer("r2"))
    buffer.append_feedback([event(f"t{i}", "r1", value=(-1) ** i) for i in range(7)])  # 1..7
    buffer.append_feedback([event("x", "r2", kind=COPY)])  # 8
    buffer.append_feedback([event("w", "r2", kind=RATING, value=5)])  # 9
    buffer.withdraw("r2", "ann", "rating")
    buffer.append_feedback([event("y", "r2", user="bob")])  # 10
    assert _consume_all(buffer, 0) == [s.seq for s in buffer.read_samples(0, 100)] == [7, 8, 10]
    assert buffer.consume(10, 5) == []
    buffer.append_feedback([event("z", "r1", user="bob", kind=COPY)])  # 11: read when it comes
    [late] = buffer.consume(10, 5)
    assert (late.seq, late.feedback.event_id, late.generation.response_id) == (11, "z", "r1")
    buffer.commit(11)  # nothing to see on SQLite; acknowledged on Redis (below)


def test_a_lease_has_one_holder_until_it_expires_or_is_released(store):
    """Server replicas elect the one that decides the canary with it: two buffers (two
    processes) never both hold it; the holder renews it; once it stops renewing, or lets
    go, the other takes it."""
    a, b = store.open(), store.open()
    try:
        assert a.lease("rollout", "a", ttl_s=0.5)
        assert not b.lease("rollout", "b", ttl_s=0.5)  # taken
        assert a.lease("rollout", "a", ttl_s=0.5)  # renewed by its holder
        assert b.lease("other", "b", ttl_s=0.5)  # another name is another lease
        time.sleep(0.7)  # a stops renewing (it died)
        assert b.lease("rollout", "b", ttl_s=30)
        assert not a.lease("rollout", "a", ttl_s=30)  # back too late: b holds it now
        a.release("rollout", "a")  # letting go of what it does not hold changes nothing
        assert not a.lease("rollout", "a", ttl_s=30)
        b.release("rollout", "b")
        assert a.lease("rollout", "a", ttl_s=30)
    finally:
        a.close()
        b.close()


def test_redis_learner_group_acknowledges_only_what_a_version_covers(store):
    """Events stay pending with the learner until a published cursor covers them; a
    learner killed before it acknowledged leaves them to the next one, which is handed
    every event after its cursor once and takes over the dead consumer's entries."""
    if store.name != "redis":
        pytest.skip("the consumer group is Redis'; SQLite's learner has only its cursor")
    import redis

    first = store.open()
    for i in range(1, 7):
        first.append_generation(answer(f"r{i}"))
    first.append_feedback([event(f"e{i}", f"r{i}") for i in range(1, 7)])  # seqs 1..6
    raw = redis.Redis.from_url(store.url, decode_responses=True)
    key = "kaizen:feedback"

    assert [s.seq for s in first.consume(0, 4)] == [1, 2, 3, 4]
    assert raw.xpending(key, "learner")["pending"] == 4
    first.commit(2)  # a version with cursor 2 was published
    assert [p["message_id"] for p in raw.xpending_range(key, "learner", "-", "+", 10)] == [
        "0-3",
        "0-4",
    ]
    # the learner dies (no commit of 3, 4); the next one resumes from the cursor 2
    second = store.open()
    assert _consume_all(second, 2, page=2) == [3, 4, 5, 6]  # each once, none lost
    consumers = raw.xinfo_consumers(key, "learner")
    assert len(consumers) == 1 and consumers[0]["pending"] == 4  # the dead one is gone
    pending = raw.xpending_range(key, "learner", "-", "+", 10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [
        (f"0-{i}", consumers[0]["name"]) for i in range(3, 7)
    ]
    second.commit(6)
    assert raw.xpending(key, "learner")["pending"] == 0
    [group] = raw.xinfo_groups(key)
    assert (group["last-delivered-id"], group["lag"]) == ("0-6", 0)
    first.close(), second.close(), raw.close()


def test_read_answers_pages_by_seq_and_filters_by_age(buffer):
    now = time.time()
    g1 = answer("r1", created_at=now - 100)
    g2 = answer("r2", created_at=now + 100)  # too recent: skipped, does not end the read
    g3 = answer("r3", user="bob", created_at=now - 50)
    g4 = answer("r4", created_at=now - 10)
    g5 = answer("r5", created_at=now)  # at the cutoff: not before it
    for g in (g1, g2, g3, g4, g5):
        buffer.append_generation(g)
    buffer.append_feedback([event("e1", "r1"), event("e4", "r4", kind=COPY)])
    buffer.withdraw("r4", "ann")  # withdrawn feedback is still feedback
    rows = buffer.read_answers(0, now, 10)
    assert rows == [(1, g1, True), (3, g3, False), (4, g4, True)]
    assert buffer.read_answers(0, now, 2) == [(1, g1, True), (3, g3, False)]
    assert buffer.read_answers(1, now, 1) == [(3, g3, False)]
    assert buffer.read_answers(4, now, 10) == []
    assert [seq for seq, _, _ in buffer.read_answers(0, now + 200, 10)] == [1, 2, 3, 4, 5]


def test_owners_names_the_user_of_each_stored_answer(buffer):
    buffer.append_generation(answer("r1"))
    buffer.append_generation(answer("r2", user="bob"))
    assert buffer.owners(["r1", "r-none", "r1", "r2"]) == {"r1": "ann", "r2": "bob"}
    many = [f"x{i}" for i in range(1200)] + ["r2"]  # more ids than one query or script takes
    assert buffer.owners(many) == {"r2": "bob"}


def test_concurrent_writers_all_land_once(buffer):
    buffer.append_generation(answer("r1"))
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda i: buffer.append_feedback([event(f"e{i % 50}", "r1")]), range(100))
        )
    assert sum(r.accepted for r in results) == 50 and sum(r.duplicates for r in results) == 50
    assert sum(r.superseded for r in results) == 49  # each new thumb replaced the active one
    assert buffer.feedback_states() == {"active": 1, "superseded": 49, "withdrawn": 0}
    assert len(buffer.read_samples(0, 1000)) == 1


# -- forgetting and retention --------------------------------------------------------------


def test_forget_deletes_the_users_rows_and_bytes_and_refuses_their_events(store, buffer):
    marker = f"MARKER{uuid.uuid4().hex}"
    a1, a2, b1 = answer("a1"), answer("a2"), answer("b1", user="bob")
    for g in (a1, a2, b1):
        buffer.append_generation(g)
    buffer.append_feedback(
        [
            event("ann-1", "a1", kind=COMMENT, text=f"{marker} one"),
            event("ann-2", "a2", kind=COMMENT, text=f"{marker} two"),
            event("bob-on-a1", "a1", user="bob"),  # on ann's answer: goes with it
            event("ann-on-b1", "b1", kind=COPY),  # ann's own event: goes with her
            event("bob-1", "b1", user="bob"),
        ]
    )
    assert marker.encode() in store.files()

    done = buffer.forget_user("ann")
    assert (done.answers, done.feedback, done.already) == (2, 4, False)
    assert marker.encode() not in store.files()  # gone from the disk, not only the index
    assert buffer.generation("a1") is None and buffer.generation("b1") == b1
    assert buffer.owners(["a1", "a2", "b1"]) == {"b1": "bob"}
    assert active(buffer) == ["bob-1"]
    assert buffer.feedback_states() == {"active": 1, "superseded": 0, "withdrawn": 0}
    assert [g.response_id for _, g, _ in buffer.read_answers(0, time.time() + 1, 10)] == ["b1"]

    # her old events, re-sent, and new ones on bob's answer: refused, before "unknown answer"
    for ev in (event("ann-1", "a1", kind=COMMENT, text="x"), event("ann-9", "b1")):
        with pytest.raises(FailedPrecondition) as err:
            buffer.append_feedback([event("bob-2", "b1", user="bob", kind=COPY), ev])
        assert err.value.field == "user_id" and err.value.status == "FAILED_PRECONDITION"
        expected = f"user_id: this user was forgotten; event {ev.event_id!r} is not stored"
        assert str(err.value) == expected
    assert active(buffer) == ["bob-1"]  # bob's event in the refused batches was not stored

    again = buffer.forget_user("ann")
    assert (again.answers, again.feedback, again.already) == (0, 0, True)
    with pytest.raises(InvalidArgument) as err:
        buffer.forget_user("")
    assert err.value.field == "user_id"
    # a forgotten user may chat again; her answers are logged, her feedback is not
    buffer.append_generation(answer("a3"))
    with pytest.raises(FailedPrecondition):
        buffer.append_feedback([event("ann-10", "a3")])


def test_a_reopened_buffer_still_refuses_a_forgotten_user(store):
    first = store.open()
    first.append_generation(answer("r1", user="bob"))
    first.forget_user("ann")
    first.close()
    buffer = store.open(must_exist=True)
    try:
        with pytest.raises(FailedPrecondition):
            buffer.append_feedback([event("e1", "r1")])
        assert buffer.append_feedback([event("e2", "r1", user="bob")]).new == (True,)
    finally:
        buffer.close()


def test_delete_before_removes_old_answers_and_all_their_feedback(buffer):
    now = time.time()
    cutoff = now - 86400
    old = [answer(f"old{i}", created_at=now - 3 * 86400 + i) for i in range(5)]
    edge = answer("edge", created_at=cutoff)  # created exactly at the cutoff: kept
    new = answer("new")
    for g in (*old, edge, new):
        buffer.append_generation(g)
    buffer.append_feedback([event("o1", "old0"), event("o2", "old0", value=-1.0)])
    buffer.append_feedback([event("o3", "old4", kind=COPY), event("n1", "new")])
    buffer.withdraw("old4", "ann")
    buffer.append_feedback([event("g1", "edge")])

    assert buffer.delete_before(cutoff) == (5, 3)
    assert [buffer.generation(g.response_id) for g in (*old, edge, new)] == [None] * 5 + [edge, new]
    assert active(buffer) == ["n1", "g1"]
    assert buffer.feedback_states() == {"active": 2, "superseded": 0, "withdrawn": 0}
    assert buffer.owners([g.response_id for g in old]) == {}
    assert buffer.delete_before(cutoff) == (0, 0)
    # an answer id deleted by retention can be logged again: nothing of it is left
    assert buffer.append_generation(old[0]) is None
    assert buffer.append_feedback([event("o1", "old0")]).new == (True,)


def test_must_exist_refuses_a_buffer_never_created(store):
    with pytest.raises(ValueError, match="--buffer"):
        store.open(must_exist=True)
    store.open().close()  # creates it
    store.open(must_exist=True).close()


def test_a_closed_buffer_refuses_writes(store):
    buffer = store.open()
    buffer.append_generation(answer("r1"))
    buffer.close()
    with pytest.raises(Unavailable, match="closed"):
        buffer.append_feedback([event("e1", "r1")])
    with pytest.raises(Unavailable, match="closed"):
        buffer.append_generation(answer("r2"))
    buffer.close()  # twice is fine


# -- Redis only: durability, credentials, failures ----------------------------------------


def test_redis_without_append_only_durability_is_refused(tmp_path):
    server = start_redis(tmp_path / "redis", ("--appendonly", "no", "--save", ""))
    try:
        with pytest.raises(ValueError, match="appendonly no") as err:
            open_buffer(server.url)
        assert "appendfsync always" in str(err.value)  # says what to set
        with server.client() as client:
            assert client.dbsize() == 0  # refused before writing anything
    finally:
        server.stop()


def test_redis_everysec_is_refused_unless_the_url_accepts_it(redis_server):
    with redis_server.client() as client:
        client.config_set("appendfsync", "everysec")
        with pytest.raises(ValueError, match="appendfsync everysec") as err:
            open_buffer(redis_server.url)
        assert "?durability=everysec" in str(err.value)
        open_buffer(redis_server.url + "?durability=everysec").close()
        with pytest.raises(ValueError, match="durability='sometimes'"):
            open_buffer(redis_server.url + "?durability=sometimes")
        client.config_set("appendfsync", "no")
        with pytest.raises(ValueError, match="appendfsync no"):
            open_buffer(redis_server.url + "?durability=everysec")
        client.config_set("appendfsync", "always")
        client.config_set("maxmemory-policy", "allkeys-lru")
        with pytest.raises(ValueError, match="maxmemory-policy allkeys-lru"):
            open_buffer(redis_server.url)
        client.config_set("maxmemory-policy", "volatile-lru")  # the buffer sets no TTLs
        open_buffer(redis_server.url).close()


def test_redis_password_from_env_or_a_file_and_never_in_a_message(tmp_path, monkeypatch):
    secret = f"pw-{uuid.uuid4().hex}"
    server = start_redis(tmp_path / "redis", (*DURABLE, "--requirepass", secret))
    try:
        monkeypatch.delenv(redis_buffer.PASSWORD_ENV, raising=False)
        with pytest.raises(ValueError, match="--buffer: cannot use Redis") as err:
            open_buffer(server.url)
        monkeypatch.setenv(redis_buffer.PASSWORD_ENV, "wrong-" + secret)
        with pytest.raises(ValueError) as wrong:
            open_buffer(server.url)
        assert secret not in str(err.value) + str(wrong.value)
        url_with_password = server.url.replace("redis://", f"redis://:{secret}@")
        buffer = open_buffer(url_with_password)  # the URL's password wins over the variable
        assert secret not in buffer.where
        buffer.append_generation(answer("r1"))
        buffer.close()
        monkeypatch.setenv(redis_buffer.PASSWORD_ENV, secret)
        buffer = open_buffer(server.url, must_exist=True)
        assert buffer.generation("r1") is not None
        buffer.close()
        monkeypatch.delenv(redis_buffer.PASSWORD_ENV)
        secret_file = tmp_path / "redis-password"
        secret_file.write_text(secret + "\n")  # as a mounted Secret usually ends
        monkeypatch.setenv(redis_buffer.PASSWORD_FILE_ENV, str(secret_file))
        buffer = open_buffer(server.url, must_exist=True)
        assert buffer.generation("r1") is not None
        buffer.close()
        monkeypatch.setenv(redis_buffer.PASSWORD_FILE_ENV, str(tmp_path / "absent"))
        with pytest.raises(ValueError, match="KAIZEN_REDIS_PASSWORD_FILE: cannot read"):
            open_buffer(server.url)
    finally:
        server.stop()


def test_rediss_speaks_tls_and_checks_the_servers_certificate(tmp_path):
    make_pki = pytest.importorskip("tests.security.test_tls").make_pki
    pki = {k: str(v) for k, v in make_pki(tmp_path).items()}
    tls_port = free_port()
    tls = ("--tls-port", str(tls_port), "--tls-auth-clients", "no")
    tls += ("--tls-cert-file", pki["server_cert"], "--tls-key-file", pki["server_key"])
    server = start_redis(tmp_path / "redis", (*DURABLE, *tls, "--tls-ca-cert-file", pki["ca"]))
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0"
        buffer = open_buffer(f"{url}?ssl_ca_certs={pki['ca']}")
        buffer.append_generation(answer("r1"))
        assert buffer.generation("r1") == buffer.read_answers(0, time.time() + 1, 1)[0][1]
        buffer.close()
        with pytest.raises(ValueError, match="certificate verify failed"):
            open_buffer(url)  # a server this machine's CAs do not vouch for
    finally:
        server.stop()


def test_redis_gone_is_unavailable_and_back_is_served(redis_server):
    with pytest.raises(ValueError, match="--buffer: cannot use Redis"):
        open_buffer(f"redis://127.0.0.1:{free_port()}/0")
    buffer = open_buffer(redis_server.url)
    try:
        buffer.append_generation(answer("r1"))
        buffer.append_feedback([event("e1", "r1")])
        redis_server.stop()
        with pytest.raises(Unavailable, match="Redis at redis://127.0.0.1"):
            buffer.append_feedback([event("e2", "r1", kind=COPY)])
        with pytest.raises(Unavailable):
            buffer.read_samples(0, 10)
        redis_server.start()  # same port, same append-only file
        assert active(buffer) == ["e1"]
        assert buffer.append_feedback([event("e2", "r1", kind=COPY)]).new == (True,)
    finally:
        buffer.close()


def test_a_full_redis_refuses_writes_whole(redis_server):
    buffer = open_buffer(redis_server.url)
    try:
        buffer.append_generation(answer("r1"))
        buffer.append_feedback([event("e0", "r1", kind=COPY)])  # the script is loaded
        with redis_server.client() as client:
            client.config_set("maxmemory", 1)  # every write is over the limit
            with pytest.raises(ResourceExhausted, match="out of memory"):
                buffer.append_feedback([event("e1", "r1"), event("e2", "r1", kind=RATING)])
            client.config_set("maxmemory", 0)
        assert active(buffer) == ["e0"]
        assert buffer.append_feedback([event("e1", "r1")]).new == (True,)
    finally:
        buffer.close()


# -- Redis killed while writing -----------------------------------------------------------


@pytest.mark.slow
def test_every_acknowledged_event_survives_sigkill_of_redis_exactly_once(redis_server):
    """SIGKILL redis-server three times while a thread appends; after each restart every
    acknowledged event is sent again and must be a duplicate, stored once."""
    buffer = open_buffer(redis_server.url)
    buffer.append_generation(answer("r1"))
    acknowledged: list[Feedback] = []
    tried: set[str] = set()
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            ev = event(f"e{i}", "r1", user=f"u{i}")  # a user each: every event stays active
            tried.add(ev.event_id)
            try:
                buffer.append_feedback([ev])
            except Unavailable:
                time.sleep(0.01)
                continue  # the same event again, until it is acknowledged
            acknowledged.append(ev)
            i += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(3):
            wait_for(grown(acknowledged, 50))
            redis_server.kill()
            redis_server.start()
            wait_for(grown(acknowledged, 1))  # writing again
            result = buffer.append_feedback(list(acknowledged))
            assert not any(result.new)  # every acknowledged event was there after the kill
    finally:
        stop.set()
        writer.join()
    result = buffer.append_feedback(acknowledged)
    assert not any(result.new)  # all stored already
    stored = active(buffer)
    assert len(stored) == len(set(stored)) == sum(buffer.feedback_states().values())
    assert {ev.event_id for ev in acknowledged} <= set(stored) <= tried
    buffer.close()


def grown(items: list, by: int) -> Callable[[], bool]:
    start = len(items)
    return lambda: len(items) >= start + by


def wait_for(condition: Callable[[], bool], limit_s: float = 60.0) -> None:
    """Poll until `condition` holds; fail (not hang) if it never does."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
