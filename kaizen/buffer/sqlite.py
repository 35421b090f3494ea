"""The replay buffer: where the server logs answers and feedback, and the learner reads them.

Embedded default: SQLite in WAL mode. One writer thread takes whatever writes are
queued, commits them in one transaction (a savepoint each, so one caller's bad event
never rolls back another's) and only then resolves the callers' futures: an event is
acknowledged once it is durable, and under load many events share one fsync.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path

from kaizen.buffer.base import (
    ACTIVE,
    SUPERSEDED,
    WITHDRAWN,
    Forgotten,
    Sample,
    StoreResult,
    conflicting_event,
    forgotten_sender,
    unknown_answer,
    user_sha256,
)
from kaizen.errors import (
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from kaizen.events import Feedback, FeedbackKind, Generation

log = logging.getLogger(__name__)


SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    response_id TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    messages TEXT NOT NULL,            -- JSON list of {role, content}
    prompt_tokens TEXT NOT NULL,       -- JSON list of token ids
    response_tokens TEXT NOT NULL,     -- JSON list of token ids
    behaviour_logprobs TEXT NOT NULL,  -- JSON list, one per response token
    text TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    sampling TEXT NOT NULL,            -- JSON {max_new_tokens, temperature, top_p, seed}
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    response_id TEXT NOT NULL REFERENCES generations(response_id),
    user_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    value REAL NOT NULL,
    text TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    received_at REAL NOT NULL,
    source TEXT NOT NULL DEFAULT '',  -- who sent it: key:NAME, user:ID or insecure
    state TEXT NOT NULL DEFAULT 'active'  -- active | superseded | withdrawn
);
CREATE INDEX IF NOT EXISTS generations_user ON generations(user_id);
CREATE INDEX IF NOT EXISTS generations_created ON generations(created_at);
-- users forgotten on request: their rows are deleted and their old events refused. The
-- id is kept only as a SHA-256, enough to recognise it, not to list who asked.
CREATE TABLE IF NOT EXISTS forgotten (
    user_sha256 TEXT PRIMARY KEY,
    forgotten_at REAL NOT NULL
);
-- leases between processes on this node (the rollout authority): held until `expires`
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires REAL NOT NULL
);
"""


class _Job:
    __slots__ = ("work", "future")

    def __init__(self, work: Callable[[sqlite3.Connection], object]) -> None:
        self.work = work
        self.future: Future[object] = Future()


_STOP = object()


class SQLiteBuffer:
    """SQLite in WAL mode with group commit; safe to share between threads and processes."""

    def __init__(
        self, path: Path, max_pending: int = 4096, max_batch: int = 512, timeout_s: int = 30
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_pending)
        self._read_lock = threading.Lock()
        self._reader = self._connect()
        self._reader.executescript(SCHEMA)
        _migrate(self._reader)
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before we acknowledge it, power loss included.
        conn.execute("PRAGMA synchronous=FULL")
        # deleted rows are overwritten with zeros, not left in free pages: forgetting a
        # user removes their bytes from the file
        conn.execute("PRAGMA secure_delete=ON")
        # up to 64 MiB of pages per connection (SQLite's default is 2 MiB): the event_id
        # and answer indexes take random keys, and each insert that misses the cache
        # reads its page back (with the index dropped in _migrate, `kaizen bench ingest`
        # stores 1.6-1.8x the events a second; README). Allocated as used.
        conn.execute("PRAGMA cache_size=-65536")
        return conn

    # -- writes ------------------------------------------------------------------------

    def append_generation(self, generation: Generation) -> None:
        row = generation.to_row()
        columns = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        sql = f"INSERT INTO generations ({columns}) VALUES ({marks})"
        self._submit(lambda conn: conn.execute(sql, row))

    def append_feedback(self, events: Sequence[Feedback]) -> StoreResult:
        """Store events atomically: all of them, or none when one is invalid or conflicting.
        The digests are computed here, in the caller's thread: the one writer runs SQL."""
        events = list(events)
        digests = [ev.payload_sha256() for ev in events]
        return self._submit(lambda conn: _insert_feedback(conn, events, digests))  # type: ignore[return-value]

    def _submit(self, work: Callable[[sqlite3.Connection], object]) -> object:
        if self._closed:
            raise Unavailable("replay buffer is closed")
        self._ensure_writer()
        job = _Job(work)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ResourceExhausted(
                f"replay buffer: {self._queue.maxsize} writes already pending; retry later"
            ) from None
        return job.future.result(timeout=self.timeout_s)

    def _ensure_writer(self) -> None:
        with self._writer_lock:
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name="kaizen-buffer-writer", daemon=True
                )
                self._writer.start()

    def _write_loop(self) -> None:
        conn = self._connect()
        while True:
            first = self._queue.get()
            if first is _STOP:
                break
            jobs = [first]
            while len(jobs) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._queue.put(_STOP)
                    break
                jobs.append(nxt)
            self._commit_group(conn, jobs)  # type: ignore[arg-type]
        conn.close()

    @staticmethod
    def _commit_group(conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        outcomes: list[tuple[bool, object]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in jobs:
                conn.execute("SAVEPOINT job")
                try:
                    outcomes.append((True, job.work(conn)))
                    conn.execute("RELEASE job")
                except Exception as exc:  # noqa: BLE001 - handed to the caller, not swallowed
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
        except Exception as exc:  # the commit itself failed: nobody's events are durable
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, (ok, value) in zip(jobs, outcomes, strict=True):
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)  # type: ignore[arg-type]

    # -- reads -------------------------------------------------------------------------

    def read_samples(self, after_seq: int, limit: int) -> list[Sample]:
        """Feedback events after a cursor, in order, each joined to its answer."""
        sql = """
            SELECT f.seq AS f_seq, f.event_id, f.response_id AS f_response_id,
                   f.user_id AS f_user_id, f.kind, f.value, f.text AS f_text, f.received_at,
                   f.source AS f_source, g.*
            FROM feedback f JOIN generations g ON g.response_id = f.response_id
            WHERE f.seq > ? AND f.state = 'active' ORDER BY f.seq LIMIT ?
        """
        with self._read_lock:
            rows = self._reader.execute(sql, (after_seq, limit)).fetchall()
        return [
            Sample(
                seq=r["f_seq"],
                feedback=Feedback(
                    event_id=r["event_id"],
                    response_id=r["f_response_id"],
                    user_id=r["f_user_id"],
                    kind=FeedbackKind(r["kind"]),
                    value=r["value"],
                    text=r["f_text"],
                    received_at=r["received_at"],
                    source=r["f_source"],
                ),
                generation=Generation.from_row(dict(r)),
            )
            for r in rows
        ]

    def consume(self, after_seq: int, limit: int) -> list[Sample]:
        """The learner's read; on SQLite the cursor saved with each version is all the
        bookkeeping there is."""
        return self.read_samples(after_seq, limit)

    def commit(self, cursor: int) -> None:
        """Nothing to acknowledge: the cursor saved with the version says it all."""

    def read_answers(
        self, after_seq: int, created_before: float, limit: int
    ) -> list[tuple[int, Generation, bool]]:
        """Answers after a cursor (generation seq) given before `created_before`, in order:
        (seq, answer, whether any feedback on it is stored yet)."""
        sql = """
            SELECT g.*, EXISTS (SELECT 1 FROM feedback f WHERE f.response_id = g.response_id)
                   AS has_feedback
            FROM generations g WHERE g.seq > ? AND g.created_at < ? ORDER BY g.seq LIMIT ?
        """
        with self._read_lock:
            rows = self._reader.execute(sql, (after_seq, created_before, limit)).fetchall()
        return [(r["seq"], Generation.from_row(dict(r)), bool(r["has_feedback"])) for r in rows]

    def last_seq(self) -> int:
        with self._read_lock:
            row = self._reader.execute("SELECT COALESCE(MAX(seq), 0) FROM feedback").fetchone()
        return int(row[0])

    def generation(self, response_id: str) -> Generation | None:
        with self._read_lock:
            row = self._reader.execute(
                "SELECT * FROM generations WHERE response_id = ?", (response_id,)
            ).fetchone()
        return None if row is None else Generation.from_row(dict(row))

    def owners(self, response_ids: Sequence[str]) -> dict[str, str]:
        """{response_id: user_id} of those answers still in the buffer (an answer forgotten,
        expired or never logged is absent): one indexed query per 500 ids, no row decoded."""
        ids = list(dict.fromkeys(response_ids))
        found: dict[str, str] = {}
        for i in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            chunk = ids[i : i + 500]
            marks = ", ".join("?" * len(chunk))
            sql = f"SELECT response_id, user_id FROM generations WHERE response_id IN ({marks})"
            with self._read_lock:
                found.update(self._reader.execute(sql, chunk).fetchall())
        return found

    def withdraw(self, response_id: str, user_id: str, kind: str = "") -> int:
        """Withdraw the user's active events on an answer (of `kind`, or all); how many."""
        sql = (
            f"UPDATE feedback SET state = '{WITHDRAWN}' WHERE response_id = ? AND user_id = ?"
            f" AND state = '{ACTIVE}'" + (" AND kind = ?" if kind else "")
        )
        args = (response_id, user_id, *((kind,) if kind else ()))
        return self._submit(lambda conn: conn.execute(sql, args).rowcount)  # type: ignore[return-value]

    def forget_user(self, user_id: str) -> Forgotten:
        """Delete the user's answers, the feedback on them and the user's own feedback,
        write a tombstone, and truncate the WAL so the bytes are gone from disk too."""
        if not user_id:
            raise InvalidArgument("user_id", "required")
        result = self._submit(lambda conn: _forget(conn, user_id))
        self._checkpoint()
        return result  # type: ignore[return-value]

    def delete_before(self, created_before: float) -> tuple[int, int]:
        """Delete answers created before a time and all feedback on them: (answers, events)."""

        def work(conn: sqlite3.Connection) -> tuple[int, int]:
            old = "SELECT response_id FROM generations WHERE created_at < ?"
            events = conn.execute(
                f"DELETE FROM feedback WHERE response_id IN ({old})", (created_before,)
            ).rowcount
            answers = conn.execute(
                "DELETE FROM generations WHERE created_at < ?", (created_before,)
            ).rowcount
            return answers, events

        result = self._submit(work)
        if result != (0, 0):
            self._checkpoint()
        return result  # type: ignore[return-value]

    def lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take `name` for `ttl_s` if it is free, expired or already `holder`'s; whether
        `holder` holds it now. The processes sharing a SQLite file share a machine, and so
        a clock."""

        def work(conn: sqlite3.Connection) -> bool:
            now = time.time()
            conn.execute(
                "INSERT INTO leases (name, holder, expires) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "expires = excluded.expires "
                "WHERE leases.holder = excluded.holder OR leases.expires < ?",
                (name, holder, now + ttl_s, now),
            )
            row = conn.execute("SELECT holder FROM leases WHERE name = ?", (name,)).fetchone()
            return row[0] == holder

        return bool(self._submit(work))

    def release(self, name: str, holder: str) -> None:
        sql = "DELETE FROM leases WHERE name = ? AND holder = ?"
        self._submit(lambda conn: conn.execute(sql, (name, holder)).rowcount)

    def feedback_states(self) -> dict[str, int]:
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT state, COUNT(*) FROM feedback GROUP BY state"
            ).fetchall()
        return {ACTIVE: 0, SUPERSEDED: 0, WITHDRAWN: 0, **{r[0]: r[1] for r in rows}}

    def _checkpoint(self, attempts: int = 50) -> None:
        """Copy the WAL into the database and truncate it, so deleted rows' old page
        images do not linger in the -wal file. Another process's open read can hold it
        up; then it retries for a few seconds and says so if it could not."""
        for _ in range(attempts):
            with self._read_lock:
                busy, _, _ = self._reader.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return
            time.sleep(0.1)
        log.warning("replay buffer: the WAL could not be truncated (a reader holds it)")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
        with self._read_lock:
            self._reader.close()


def _forget(conn: sqlite3.Connection, user_id: str) -> Forgotten:
    digest = user_sha256(user_id)
    already = conn.execute("SELECT 1 FROM forgotten WHERE user_sha256 = ?", (digest,)).fetchone()
    mine = "SELECT response_id FROM generations WHERE user_id = ?"
    feedback = conn.execute(
        f"DELETE FROM feedback WHERE user_id = ? OR response_id IN ({mine})", (user_id, user_id)
    ).rowcount
    answers = conn.execute("DELETE FROM generations WHERE user_id = ?", (user_id,)).rowcount
    conn.execute(
        "INSERT OR IGNORE INTO forgotten (user_sha256, forgotten_at) VALUES (?, ?)",
        (digest, time.time()),
    )
    return Forgotten(answers, feedback, already is not None)


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a buffer written by an older kaizen up to SCHEMA (columns added since)."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(feedback)")}
    if "source" not in columns:
        conn.execute("ALTER TABLE feedback ADD COLUMN source TEXT NOT NULL DEFAULT ''")
    if "state" not in columns:
        conn.execute(f"ALTER TABLE feedback ADD COLUMN state TEXT NOT NULL DEFAULT '{ACTIVE}'")
    conn.execute(
        "CREATE INDEX IF NOT EXISTS feedback_signal ON feedback(response_id, user_id, kind)"
    )
    # feedback_signal starts with response_id, so it serves every lookup by answer that
    # this index did; one B-tree fewer to update per stored event (`bench ingest`)
    conn.execute("DROP INDEX IF EXISTS feedback_response")
    # the active event of each signal, which a newer one supersedes: through feedback_signal
    # that UPDATE read every superseded row of the signal too, so each stored event cost
    # more the longer a user kept changing their mind (`bench ingest`: 4.5 -> 35 µs an
    # event over 100,000 events; through this index 2.2-2.4 µs throughout)
    conn.execute(
        "CREATE INDEX IF NOT EXISTS feedback_active ON feedback(response_id, user_id, kind)"
        f" WHERE state = '{ACTIVE}'"
    )


def supersede_sql(signals: int) -> str:
    """The UPDATE that supersedes the active events of `signals` (response_id, user_id,
    kind) triples, bound in that order; it finds them through the feedback_active index."""
    return (
        f"UPDATE feedback SET state = '{SUPERSEDED}' WHERE state = '{ACTIVE}' AND"
        " (response_id, user_id, kind) IN (SELECT * FROM (VALUES"
        f" {', '.join(['(?, ?, ?)'] * signals)}))"
    )


def _select_in(conn: sqlite3.Connection, sql: str, values: Sequence[str]) -> list[tuple]:
    """Rows of `sql`, whose `IN ({})` takes the distinct `values`, 500 bound at a time
    (SQLite's bound-parameter limit)."""
    distinct = list(dict.fromkeys(values))
    cursor = conn.cursor()
    cursor.row_factory = None  # plain tuples: a Row per checked id costs more than its lookup
    rows: list[tuple] = []
    for i in range(0, len(distinct), 500):
        chunk = distinct[i : i + 500]
        rows += cursor.execute(sql.format(", ".join("?" * len(chunk))), chunk).fetchall()
    return rows


def _insert_feedback(
    conn: sqlite3.Connection, events: list[Feedback], digests: list[str]
) -> StoreResult:
    """One query per check for the whole batch (stored ids, forgotten senders, known
    answers), one UPDATE for the active events the batch supersedes, then the rows in one
    INSERT, each already in its final state, instead of five statements per event."""
    sql = "SELECT event_id, payload_sha256 FROM feedback WHERE event_id IN ({})"
    stored = dict(_select_in(conn, sql, [ev.event_id for ev in events]))
    senders = {user: user_sha256(user) for user in {ev.user_id for ev in events}}
    sql = "SELECT user_sha256 FROM forgotten WHERE user_sha256 IN ({})"
    forgotten = {r[0] for r in _select_in(conn, sql, list(senders.values()))}
    sql = "SELECT response_id FROM generations WHERE response_id IN ({})"
    known = {r[0] for r in _select_in(conn, sql, [ev.response_id for ev in events])}
    new: list[bool] = []
    rows: list[list[object]] = []
    newest: dict[tuple[str, str, str], int] = {}  # signal -> its newest row in this batch
    now = time.time()
    for ev, digest in zip(events, digests, strict=True):
        old = stored.get(ev.event_id)
        if old is not None:
            if old != digest:
                raise conflicting_event(ev)
            new.append(False)
            continue
        if senders[ev.user_id] in forgotten:
            raise forgotten_sender(ev)
        if ev.response_id not in known:
            raise unknown_answer(ev)
        stored[ev.event_id] = digest  # the same id again later in this batch: a duplicate
        newest[(ev.response_id, ev.user_id, str(ev.kind))] = len(rows)
        row = [ev.event_id, ev.response_id, ev.user_id, str(ev.kind), ev.value, ev.text]
        rows.append([*row, digest, ev.received_at or now, ev.source, ACTIVE])
        new.append(True)
    # one effective signal per (user, answer, kind): each signal's newest event in the
    # batch replaces the stored active one and the batch's earlier ones
    latest = set(newest.values())
    for i, row in enumerate(rows):
        if i not in latest:
            row[-1] = SUPERSEDED
    replaced = 0
    signals = list(newest)
    for i in range(0, len(signals), 166):  # 3 bound parameters each
        chunk = signals[i : i + 166]
        replaced += conn.execute(
            supersede_sql(len(chunk)), [x for signal in chunk for x in signal]
        ).rowcount
    conn.executemany(
        "INSERT INTO feedback (event_id, response_id, user_id, kind, value, text,"
        " payload_sha256, received_at, source, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    return StoreResult(tuple(new), len(rows) - len(latest) + replaced)
