"""Keyed bucketing: which users a canary serves, which answers the learner holds out.

A bucket is HMAC-SHA256(secret, purpose ∥ 0 ∥ key) read as a number in [0, 1). With a
plain hash anyone could compute their own bucket and pick a user id that lands in the
canary (or an answer id the gate never trains on); with a secret key nobody outside
can. Each purpose derives its own bucket from the same secret, so the canary's users and
the learner's hold-out are independent of each other.

The secret is 32 random bytes in the registry (`bucket.key`, mode 0600), made by
whichever process starts first and read by all the others, so every server replica and
the learner agree on every bucket, across restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_FILE = "bucket.key"
SECRET_BYTES = 32
CANARY = "canary"
HOLDOUT = "holdout"


def load_or_create_secret(directory: Path) -> bytes:
    """The bucketing secret kept in `directory`, created (atomically, once) if missing."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SECRET_FILE
    if not path.exists():
        tmp = directory / f".{SECRET_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(SECRET_BYTES))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process made it first: theirs wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    secret = path.read_bytes()
    if len(secret) < SECRET_BYTES:
        raise ValueError(f"{path}: a bucketing secret of {len(secret)} bytes; expected 32")
    return secret


class Buckets:
    """Stable numbers in [0, 1) for (purpose, key), keyed by a secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < SECRET_BYTES:
            raise ValueError(f"a bucketing secret needs {SECRET_BYTES} bytes")
        self._secret = secret

    def __call__(self, purpose: str, key: str) -> float:
        message = purpose.encode() + b"\0" + key.encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def in_canary(self, user_id: str, share: float) -> bool:
        return self(CANARY, user_id) < share

    def held_out(self, response_id: str, share: float) -> bool:
        return self(HOLDOUT, response_id) < share
