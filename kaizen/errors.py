"""Exceptions shared by the server and the learner; the server maps each to a gRPC status."""

from __future__ import annotations


class KaizenError(Exception):
    """Base class; a subclass names the gRPC status it stands for."""

    status = "INTERNAL"


class InvalidArgument(KaizenError):
    """Bad input. The message names the field and the limit."""

    status = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class AlreadyExists(KaizenError):
    """An idempotency key reused with another payload."""

    status = "ALREADY_EXISTS"


class ResourceExhausted(KaizenError):
    """A bounded queue is full; the caller should retry later."""

    status = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(KaizenError):
    """A request waited in the queue longer than the server allows."""

    status = "DEADLINE_EXCEEDED"


class Cancelled(KaizenError):
    """The client went away (or its deadline passed) before the answer was finished."""

    status = "CANCELLED"


class Unavailable(KaizenError):
    """The component is shutting down or not ready."""

    status = "UNAVAILABLE"


class CorruptVersion(KaizenError):
    """A published version whose files do not match their manifest."""


class FailedPrecondition(InvalidArgument):
    """A valid request the current state does not allow (e.g. promoting the serving version)."""

    status = "FAILED_PRECONDITION"


class NotFound(KaizenError):
    """A reference to something that does not exist (an unknown response_id)."""

    status = "NOT_FOUND"


class Unauthenticated(KaizenError):
    """No credential, or one that is malformed, expired, revoked or unknown."""

    status = "UNAUTHENTICATED"


class PermissionDenied(KaizenError):
    """A valid credential that may not do this: a missing scope, another user's answer."""

    status = "PERMISSION_DENIED"
