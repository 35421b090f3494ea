"""The replay buffer: where the server logs answers and feedback, and the learner reads them.

`open_buffer(url)` picks the backend: SQLite (`kaizen.buffer.sqlite`, the embedded
default) or Redis Streams (`kaizen.buffer.redis`, for servers and a learner on several
machines). Both implement `ReplayBuffer` (`kaizen.buffer.base`) and pass one contract
suite (tests/test_buffer_contract.py).
"""

from pathlib import Path

from kaizen.buffer.base import (
    ACTIVE,
    SUPERSEDED,
    WITHDRAWN,
    Forgotten,
    ReplayBuffer,
    Sample,
    StoreResult,
    user_sha256,
)
from kaizen.buffer.sqlite import SQLiteBuffer


def open_buffer(url: str, must_exist: bool = False, **options: int) -> ReplayBuffer:
    """Open a buffer by URL: `sqlite:///relative/path.db` or `sqlite:////absolute/path.db`,
    or Redis Streams at `redis://HOST:PORT/DB` (`rediss://` for TLS; see kaizen.buffer.redis).
    A new one is created unless `must_exist` (readers of logs that should be there)."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if must_exist and not path.is_file():
            raise ValueError(f"--buffer: {path} does not exist")
        return SQLiteBuffer(path, **options)
    if url.startswith(("redis://", "rediss://")):
        from kaizen.buffer.redis import open_redis

        return open_redis(url, must_exist, **options)
    raise ValueError(
        f"--buffer: unsupported URL {url!r}; expected sqlite:///PATH or redis://HOST:PORT/DB"
    )


__all__ = [
    "ACTIVE",
    "SUPERSEDED",
    "WITHDRAWN",
    "Forgotten",
    "ReplayBuffer",
    "SQLiteBuffer",
    "Sample",
    "StoreResult",
    "open_buffer",
    "user_sha256",
]
