"""Log lines as text (the default) or JSON, and the access line each request leaves.

`kaizen --log-format json` (or KAIZEN_LOG_FORMAT=json) writes one JSON object a line:
`ts`, `level`, `logger`, `msg`, and the structured fields a call passed with `extra=`
(request_id, response_id, version, method, status, duration_ms …). The text format is
the one kaizen always had; the same fields follow the message as `key=value`.

What is never logged: credentials (an `extra=` field named like one is redacted) and raw
user ids (`user_field` gives a SHA-256 prefix, the same in every process, so that one
user's requests can be followed without the logs naming them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
ENV = "KAIZEN_LOG_FORMAT"  # the default of --log-format
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
REQUEST_ID_HEADER = "x-request-id"
# A client's request id is taken as given only within these bounds; else one is made.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
# `extra=` fields that would carry a credential: their value never reaches a line
SECRET_FIELDS = frozenset(
    {"authorization", "api_key", "key", "token", "jwt", "secret", "password", "credential"}
)
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's copy of the message with terminal colours
}

access = logging.getLogger("kaizen.access")


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a call passed with `extra=`, credentials redacted."""
    return {
        name: "[redacted]" if name.lower() in SECRET_FIELDS else value
        for name, value in vars(record).items()
        if name not in _RECORD_FIELDS and not name.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (UTC, ISO 8601), level, logger, msg, the extra fields,
    and `exc` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def _text(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if not text or re.search(r'[\s"=]', text) else text


class TextFormatter(logging.Formatter):
    """kaizen's text lines, with the extra fields after the message as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        extra = fields(record)
        return line + "".join(f" {k}={_text(v)}" for k, v in extra.items()) if extra else line


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"--log-format: {fmt!r} is not one of {', '.join(FORMATS)}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(fmt: str = "text", level: int = logging.INFO) -> None:
    """Log to stderr in `fmt` (text or json) from `level` up; once, at start-up. In JSON,
    Python's warnings become log lines too, so that every line parses."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
    if fmt == "json":
        logging.captureWarnings(True)


def user_field(user_id: str) -> str:
    """How a user appears in a log line: `u-` and 16 hex digits of the id's SHA-256, or
    "" for none. A pseudonym, not anonymity: whoever can guess an id can hash it."""
    if not user_id:
        return ""
    return "u-" + hashlib.sha256(user_id.encode()).hexdigest()[:16]


def request_id(given: str | bytes | None) -> str:
    """The client's request id if it is well formed (1–128 of A-Z a-z 0-9 . _ : / + = @ -),
    else a new one: a malformed id is replaced, never echoed into a log line."""
    if isinstance(given, bytes):
        given = given.decode("ascii", errors="replace")
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def log_access(kind: str, **values: Any) -> None:
    """One access line (`kind`: rpc or http) with the fields that are set."""
    if access.isEnabledFor(logging.INFO):
        access.info(kind, extra={k: v for k, v in values.items() if v not in (None, "")})


Scope = MutableMapping[str, Any]
Asgi = Callable[[Scope, Callable, Callable], Awaitable[None]]


class RequestIds:
    """ASGI middleware: each HTTP request gets a request id (the client's `X-Request-Id`
    if well formed, else a new one), kept in `request.state.request_id` and sent back in
    the response's `X-Request-Id` header."""

    def __init__(self, app: Asgi) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER.encode()), None)
        rid = request_id(given)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def who(principal, user_id: str = "") -> dict[str, str]:
    """An access line's `caller` (key:<name>, user or insecure: never the credential) and
    `user` (hashed): a user token acts for its own user, a service key for `user_id`."""
    if principal is None:  # refused before the credential was read
        return {}
    if principal.kind == "user":
        return {"caller": "user", "user": user_field(principal.user)}
    return {"caller": principal.source, "user": user_field(user_id)}
