"""What every replay buffer backend is and shares: the records it returns, the protocol the
server and the learner use, the reasons an event is refused (one set of messages for all
backends)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kaizen.errors import AlreadyExists, FailedPrecondition, NotFound
from kaizen.events import Feedback, Generation

ACTIVE, SUPERSEDED, WITHDRAWN = "active", "superseded", "withdrawn"


@dataclass(frozen=True)
class Sample:
    """A feedback event joined to the answer it is about."""

    seq: int  # the feedback's position in the buffer; the learner's cursor
    feedback: Feedback
    generation: Generation


@dataclass(frozen=True)
class StoreResult:
    new: tuple[bool, ...]  # per event, in order: True if stored now, False if a duplicate
    superseded: int = 0  # earlier events of the same (user, answer, kind) replaced

    @property
    def accepted(self) -> int:
        return sum(self.new)

    @property
    def duplicates(self) -> int:
        return len(self.new) - sum(self.new)


class ReplayBuffer(Protocol):
    """What the server writes to and the learner reads from."""

    def append_generation(self, generation: Generation) -> None: ...

    def append_feedback(self, events: Sequence[Feedback]) -> StoreResult: ...

    def read_samples(self, after_seq: int, limit: int) -> list[Sample]: ...

    # the learner's reads: what `consume` returned is acknowledged by `commit` once a
    # published version's cursor covers it (a consumer group on Redis; SQLite needs
    # nothing beyond the cursor)
    def consume(self, after_seq: int, limit: int) -> list[Sample]: ...

    def commit(self, cursor: int) -> None: ...

    def read_answers(
        self, after_seq: int, created_before: float, limit: int
    ) -> list[tuple[int, Generation, bool]]: ...

    def last_seq(self) -> int: ...

    def generation(self, response_id: str) -> Generation | None: ...

    def owners(self, response_ids: Sequence[str]) -> dict[str, str]: ...

    def withdraw(self, response_id: str, user_id: str, kind: str = "") -> int: ...

    def forget_user(self, user_id: str) -> Forgotten: ...

    def delete_before(self, created_before: float) -> tuple[int, int]: ...

    def feedback_states(self) -> dict[str, int]: ...

    # a lease: at most one holder of `name` at a time, for `ttl_s` after it last took or
    # renewed it (server replicas elect the one that decides the canary with it)
    def lease(self, name: str, holder: str, ttl_s: float) -> bool: ...

    def release(self, name: str, holder: str) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Forgotten:
    answers: int  # answers deleted
    feedback: int  # feedback events deleted
    already: bool  # the user had been forgotten before


@functools.lru_cache(maxsize=1 << 16)  # asked once per event's sender on every write
def user_sha256(user_id: str) -> str:
    return hashlib.sha256(user_id.encode()).hexdigest()


def conflicting_event(ev: Feedback) -> AlreadyExists:
    return AlreadyExists(f"event_id: {ev.event_id!r} was already stored with another payload")


def forgotten_sender(ev: Feedback) -> FailedPrecondition:
    return FailedPrecondition(
        "user_id", f"this user was forgotten; event {ev.event_id!r} is not stored"
    )


def unknown_answer(ev: Feedback) -> NotFound:
    return NotFound(
        f"response_id: unknown response_id {ev.response_id!r} (event_id {ev.event_id!r})"
    )
