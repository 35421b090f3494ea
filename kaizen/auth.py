"""Credentials both the CLI and the server use: service API keys and signed user tokens.

Two kinds of credential arrive as `authorization: Bearer …`:

- an API key (`kz_<id>_<secret>`) names a service such as a chatbot frontend. The keys
  file keeps only a salted SHA-256 of each secret: the secret is 256 random bits, so a
  stolen file cannot be brute-forced back into keys, and a fast hash keeps each check
  at a microsecond. A slow KDF (scrypt, argon2) is for guessable passwords; here it
  would only add its cost to every request. `kaizen auth key create|list|revoke` edit
  the file; a server re-reads it when it changes, so a revocation needs no restart.
- a user token is a JWT (HS256, PyJWT) a frontend signs for its end user: `sub` is the
  user, `scope` the space-separated scopes, `exp` mandatory.

The secrets never come from argv; the CLI reads them from files or the environment.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kaizen.errors import Unauthenticated

SCOPES = ("chat", "feedback", "admin")
KEY_PREFIX = "kz_"
MIN_JWT_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key at least as long as the hash
JWT_ALGORITHM = "HS256"
JWT_LEEWAY_S = 30  # clocks of the frontend and the server may differ this much


class AuthFailure(Unauthenticated):
    """A credential that is missing, malformed, expired, revoked or unknown; `reason` is
    the label it is counted under (never the credential itself)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"authorization: {message}")
        self.reason = reason


@dataclass(frozen=True)
class Principal:
    """Who sent a request, decided once at the edge."""

    kind: str  # "key" (a service), "user" (a signed user token) or "insecure" (auth off)
    name: str  # the key's name, or the user id
    scopes: frozenset[str]
    user: str = ""  # the end user a token vouches for; "" for a service or auth off

    @property
    def speaks_for_anyone(self) -> bool:
        """A service (the frontend) or an open server may set any user id; a user only
        their own."""
        return self.kind != "user"

    @property
    def source(self) -> str:
        """What the buffer records as the sender of an event."""
        return f"{self.kind}:{self.name}" if self.name else self.kind


INSECURE = Principal("insecure", "", frozenset(SCOPES))


def parse_scopes(text: str) -> frozenset[str]:
    """`chat,feedback` (or space-separated, as in a JWT) → a set of known scopes."""
    scopes = frozenset(s for s in text.replace(",", " ").split() if s)
    unknown = sorted(scopes - set(SCOPES))
    if unknown:
        raise ValueError(f"--scopes: unknown {', '.join(unknown)}; known: {', '.join(SCOPES)}")
    if not scopes:
        raise ValueError(f"--scopes: at least one of {', '.join(SCOPES)}")
    return scopes


def _hash(salt: bytes, secret: str) -> str:
    return hashlib.sha256(salt + secret.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    scopes: tuple[str, ...]
    salt: str  # hex
    sha256: str  # of salt + secret, hex
    created_at: float
    revoked_at: float | None = None


@dataclass
class KeyFile:
    """The keys file: JSON, written whole to a temporary file and renamed, mode 0600."""

    path: Path
    keys: list[KeyRecord] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path, must_exist: bool = True) -> KeyFile:
        path = Path(path)
        if not path.exists():
            if must_exist:
                raise FileNotFoundError(f"--keys: {path} does not exist")
            return cls(path)
        try:
            data = json.loads(path.read_text())
            keys = [KeyRecord(**{**k, "scopes": tuple(k["scopes"])}) for k in data.get("keys", [])]
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise ValueError(f"--keys: {path} is not a kaizen keys file ({exc})") from None
        return cls(path, keys)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [k.__dict__ | {"scopes": list(k.scopes)} for k in self.keys]}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def create(self, name: str, scopes: frozenset[str]) -> str:
        """Add a key; return the only copy of its secret form."""
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError("--name: 1 to 64 letters, digits, '-' or '_'")
        if any(k.name == name and k.revoked_at is None for k in self.keys):
            raise ValueError(f"--name: a key named {name!r} exists; revoke it first")
        key_id = secrets.token_hex(6)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        salt = secrets.token_bytes(16)
        order = tuple(s for s in SCOPES if s in scopes)
        self.keys.append(
            KeyRecord(key_id, name, order, salt.hex(), _hash(salt, secret), time.time())
        )
        return f"{KEY_PREFIX}{key_id}_{secret}"

    def revoke(self, name_or_id: str) -> list[KeyRecord]:
        hits = [k for k in self.keys if name_or_id in (k.name, k.id) and k.revoked_at is None]
        if not hits:
            raise ValueError(f"no active key named or with id {name_or_id!r} in {self.path}")
        now = time.time()
        self.keys = [
            KeyRecord(**{**k.__dict__, "revoked_at": now}) if k in hits else k for k in self.keys
        ]
        return hits

    def verify(self, token: str) -> Principal:
        key_id, _, secret = token[len(KEY_PREFIX) :].partition("_")
        for k in self.keys:
            if k.id == key_id:
                if not hmac.compare_digest(_hash(bytes.fromhex(k.salt), secret), k.sha256):
                    break
                if k.revoked_at is not None:
                    raise AuthFailure("revoked", f"API key {k.name!r} was revoked")
                return Principal("key", k.name, frozenset(k.scopes))
        raise AuthFailure("unknown_key", "unknown API key")


class Authenticator:
    """Turns an `authorization` header into a Principal. Re-reads the keys file when it
    changes (looked at no more than every `reload_s`), so revocations apply at once."""

    def __init__(
        self, keys_path: Path | None, jwt_secret: bytes | None, reload_s: float = 0.5
    ) -> None:
        if keys_path is None and not jwt_secret:
            raise ValueError("no credentials configured")
        if jwt_secret is not None and len(jwt_secret) < MIN_JWT_SECRET_BYTES:
            raise ValueError(
                f"the JWT secret is {len(jwt_secret)} bytes; at least {MIN_JWT_SECRET_BYTES} "
                "(e.g. `head -c 32 /dev/urandom | base64 > jwt.secret`)"
            )
        self.keys_path = keys_path
        self.jwt_secret = jwt_secret
        self.reload_s = reload_s
        self._lock = threading.Lock()
        self._keys = KeyFile.load(keys_path) if keys_path is not None else None
        self._stamp = self._stat() if keys_path is not None else None
        self._checked = 0.0

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.keys_path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _current_keys(self, look: bool = False) -> KeyFile | None:
        """The keys, re-read if the file changed; the file is looked at when `look` or
        when `reload_s` has passed since the last look."""
        if self.keys_path is None:
            return None
        now = time.monotonic()
        with self._lock:
            if look or now - self._checked >= self.reload_s:
                self._checked = now
                stamp = self._stat()
                if stamp != self._stamp:
                    try:
                        self._keys = KeyFile.load(self.keys_path, must_exist=False)
                        self._stamp = stamp
                    except ValueError:
                        pass  # a half-written file by hand: keep the last good one
            return self._keys

    def authenticate(self, header: str) -> Principal:
        if not header:
            raise AuthFailure(
                "missing", "no credential; send 'authorization: Bearer <key or token>'"
            )
        scheme, _, credential = header.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthFailure("malformed", "expected 'Bearer <key or token>'")
        if credential.startswith(KEY_PREFIX):
            keys = self._current_keys()
            if keys is None:
                raise AuthFailure("unknown_key", "this server accepts no API keys (--auth-keys)")
            try:
                return keys.verify(credential)
            except AuthFailure as exc:
                if exc.reason != "unknown_key":
                    raise
                # a key created a moment ago: look at the file now (one stat) rather than
                # refuse it until the next periodic look
                return self._current_keys(look=True).verify(credential)
        if credential.count(".") == 2:
            return self._verify_jwt(credential)
        raise AuthFailure("malformed", "neither an API key (kz_…) nor a JWT")

    def _verify_jwt(self, token: str) -> Principal:
        import jwt

        if not self.jwt_secret:
            raise AuthFailure("bad_token", "this server accepts no user tokens (--jwt-secret-file)")
        try:
            claims = jwt.decode(
                token,
                self.jwt_secret,
                algorithms=[JWT_ALGORITHM],
                options={"require": ["exp", "sub"]},
                leeway=JWT_LEEWAY_S,
            )
        except jwt.ExpiredSignatureError:
            raise AuthFailure("expired", "the user token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthFailure("bad_token", f"invalid user token ({type(exc).__name__})") from None
        sub, scope = claims.get("sub"), claims.get("scope", "")
        if not isinstance(sub, str) or not sub or len(sub) > 256:
            raise AuthFailure("bad_token", "the user token's sub must be a user id of 1-256 chars")
        if isinstance(scope, list):
            scope = " ".join(str(s) for s in scope)
        granted = frozenset(s for s in str(scope).split() if s in SCOPES)
        return Principal("user", sub, granted, user=sub)


def issue_token(secret: bytes, user: str, scopes: frozenset[str], ttl_s: float) -> str:
    """A user token as a frontend would sign it (for tests and `kaizen auth token`)."""
    import jwt

    if len(secret) < MIN_JWT_SECRET_BYTES:
        raise ValueError(f"--secret-file: at least {MIN_JWT_SECRET_BYTES} bytes")
    if not user:
        raise ValueError("--user: required")
    if ttl_s <= 0:
        raise ValueError("--ttl: must be positive")
    now = int(time.time())
    order = " ".join(s for s in SCOPES if s in scopes)
    claims = {"sub": user, "scope": order, "iat": now, "exp": now + int(ttl_s)}
    return jwt.encode(claims, secret, algorithm=JWT_ALGORITHM)


def parse_ttl(text: str) -> float:
    """`90s`, `15m`, `1h`, `7d` or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ValueError(f"--ttl: {text!r} is not a duration like 90s, 15m, 1h or 7d") from None


def read_secret(
    path: Path | None, env: str, flag: str, environ: Mapping[str, str] = os.environ
) -> bytes | None:
    """A secret from the file `flag` names (surrounding whitespace dropped), else from the
    environment variable `env`, else None. Never from argv."""
    if path is not None:
        try:
            data = Path(path).read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"{flag}: cannot read {path}: {exc.strerror}") from None
        if not data:
            raise ValueError(f"{flag}: {path} is empty")
        return data
    value = environ.get(env, "").strip()
    return value.encode() if value else None


# -- the command line: `kaizen auth key create|list|revoke`, `kaizen auth token` ----------


def _edit_keys(path: Path, change) -> object:
    """Apply `change(KeyFile)` under an exclusive lock and save: two edits never race."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        keys = KeyFile.load(path, must_exist=False)
        result = change(keys)
        keys.save()
        return result


def _key_create(args) -> int:
    scopes = parse_scopes(args.scopes)
    print(_edit_keys(args.keys, lambda keys: keys.create(args.name, scopes)))
    return 0


def _key_list(args) -> int:
    keys = KeyFile.load(args.keys)
    print(f"{'id':<12}  {'name':<20}  {'scopes':<20}  {'created (UTC)':<19}  state")
    for k in keys.keys:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(k.created_at))
        state = "active"
        if k.revoked_at is not None:
            state = "revoked " + time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(k.revoked_at))
        print(f"{k.id:<12}  {k.name:<20}  {','.join(k.scopes):<20}  {created:<19}  {state}")
    return 0


def _key_revoke(args) -> int:
    if not Path(args.keys).exists():
        raise FileNotFoundError(f"--keys: {args.keys} does not exist")
    hits = _edit_keys(args.keys, lambda keys: keys.revoke(args.key))
    for k in hits:
        print(f"revoked {k.name} ({k.id}); servers reading {args.keys} refuse it from now on")
    return 0


def _token(args) -> int:
    secret = read_secret(args.secret_file, "KAIZEN_JWT_SECRET", "--secret-file")
    if secret is None:
        raise ValueError("--secret-file: required (or the environment variable KAIZEN_JWT_SECRET)")
    print(issue_token(secret, args.user, parse_scopes(args.scopes), parse_ttl(args.ttl)))
    return 0


def _guarded(work):
    """Bad input is one line on stderr and exit code 2, not a traceback."""

    def run(args) -> int:
        import sys

        try:
            return work(args)
        except ValueError as exc:
            print(f"kaizen auth: {exc}", file=sys.stderr)
            return 2

    return run


def add_parser(commands) -> None:
    auth = commands.add_parser(
        "auth",
        help="create, list and revoke API keys; sign user tokens",
        description="Credentials for `kaizen serve`: API keys for services (stored hashed "
        "in a keys file the server re-reads when it changes) and HS256 user tokens.",
    )
    sub = auth.add_subparsers(dest="auth_command", required=True, metavar="COMMAND")
    key = sub.add_parser("key", help="API keys for services (a chatbot frontend)")
    key_sub = key.add_subparsers(dest="key_command", required=True, metavar="ACTION")

    create = key_sub.add_parser(
        "create",
        help="add a key; print it once on stdout (only its hash is stored)",
        description="Add an API key to the keys file and print the key, once, on stdout; "
        "the file keeps only a salted SHA-256 of it.",
    )
    create.add_argument("--keys", type=Path, required=True, help="the keys file (made if new)")
    create.add_argument("--name", required=True, help="who uses it, e.g. frontend")
    create.add_argument("--scopes", required=True, help=f"comma-separated: {', '.join(SCOPES)}")
    create.set_defaults(func=_guarded(_key_create))

    listing = key_sub.add_parser("list", help="the keys in a file, without their secrets")
    listing.add_argument("--keys", type=Path, required=True, help="the keys file")
    listing.set_defaults(func=_guarded(_key_list))

    revoke = key_sub.add_parser(
        "revoke", help="revoke a key by name or id; running servers refuse it at once"
    )
    revoke.add_argument("--keys", type=Path, required=True, help="the keys file")
    revoke.add_argument("key", help="the key's name or id (see `kaizen auth key list`)")
    revoke.set_defaults(func=_guarded(_key_revoke))

    token = sub.add_parser(
        "token",
        help="sign a user token (JWT) as a frontend would, for testing",
        description="Print an HS256 user token on stdout: sub = --user, scope = --scopes, "
        "exp = now + --ttl.",
    )
    token.add_argument(
        "--secret-file",
        type=Path,
        default=None,
        help="the HS256 secret (default: the environment variable KAIZEN_JWT_SECRET)",
    )
    token.add_argument("--user", required=True, help="the user id (sub)")
    token.add_argument("--scopes", default="chat,feedback", help="default: chat,feedback")
    token.add_argument("--ttl", default="1h", help="lifetime: 90s, 15m, 1h, 7d (default: 1h)")
    token.set_defaults(func=_guarded(_token))


def local_key(directory: Path, name: str = "local") -> tuple[Path, str]:
    """A keys file in `directory` holding one key with every scope, for a run on this
    machine (the demo, the benchmarks, the tests): (the file, the key)."""
    path = Path(directory) / "keys.json"
    key = _edit_keys(path, lambda keys: keys.create(name, frozenset(SCOPES)))
    return path, str(key)
