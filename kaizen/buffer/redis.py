"""The replay buffer on Redis Streams: the scale-out backend, the same contract as SQLite.

`redis://HOST:PORT/DB` (`rediss://` for TLS). The password is the URL's when it has one
(`redis://:PASSWORD@HOST…`, which `ps` shows wherever the URL is an argument), else the
environment variable KAIZEN_REDIS_PASSWORD, else the first line of the file that
KAIZEN_REDIS_PASSWORD_FILE names (a mounted secret); a username, when the server has ACL users,
goes in the URL (`redis://USER@HOST…`).

Durability is checked, not assumed: on connect the buffer reads the server's settings and
refuses to start unless it runs with `appendonly yes` and `appendfsync always` (Redis
then fsyncs the append-only file before it replies, so an acknowledged event survives a
crash of Redis or of its machine, as SQLite's `synchronous=FULL` does). `everysec` is
accepted only when the URL says `?durability=everysec`: up to a second of acknowledged
events is lost on a power failure or a kernel crash. A `maxmemory-policy` that evicts any
key (`allkeys-*`) is refused too: it would drop events silently when memory runs out;
with `noeviction` a full Redis refuses the write instead (ResourceExhausted). WAITAOF per
write is the alternative for servers whose CONFIG is closed; it needs Redis 7.2.

Layout, every key under `kaizen:`:
- `gens` and `feedback`: streams, the ordered logs. An entry's id is `0-<seq>`, where
  `seq` comes from the counters `gen:seq` and `fb:seq` (INCR) in the same script as the
  XADD, so seqs are strictly increasing and never reused, deletions included; reading
  after a cursor is `XRANGE (0-<cursor> +`. The learner reads `feedback` through the
  consumer group `learner` (below).
- `gen:<seq>` and `fb:<seq>`: hashes, the rows. Entries hold no data of their own
  (`seq` only): a row must change state (superseded, withdrawn) and, when its user is
  forgotten, really go. XDEL only flags a stream entry as deleted and leaves its bytes in
  the listpack, and so in the append-only file's RDB base; DEL of a hash frees it, and
  the AOF rewrite that follows a forget writes the data set without it.
- indexes: `rid` (response_id → gen seq), `event` (event_id → fb seq), `signal`
  (digest of user, answer and kind → the one active event), `gen:time` (gen seqs by
  created_at), `gen:<seq>:fb` (events on an answer), `user:<sha256>:gens` and
  `user:<sha256>:fb` (a user's answers and events), `states` (events per state) and
  `forgotten` (tombstones: SHA-256 of the user id → when).
- `lease:<name>`: a string, the holder, with a TTL (server replicas elect their rollout
  authority with it; Redis' clock expires it, so the replicas' clocks do not matter).
- `rate:<what>:<kind>:<sha256>`: the replicas' shared rate-limit buckets (tokens, at),
  each expiring a minute after its last use (a bucket idle that long is full anyway).
  Written with replication off: never in the append-only file (no fsync per request),
  so a restarted Redis forgets them, as a restarted server forgets its own.

The learner consumes `feedback` through the consumer group `learner`: XREADGROUP hands it
entries, which stay pending until the learner has published a version whose cursor covers
them; then `commit` acknowledges them (XACK). The cursor saved inside the published
version stays the truth, since the registry and Redis cannot change in one transaction:
a learner that starts (or restarts after kill -9) sets the group back to its cursor
(XGROUP SETID), takes over whatever a dead learner left pending (XAUTOCLAIM, then
XGROUP DELCONSUMER) and is handed every event after the cursor again, once. So an event
is trained into one version exactly once, and none is lost, even when a learner dies
between its publish and its XACK. `XINFO GROUPS kaizen:feedback` shows the learner's lag
and pending count; `XPENDING` how often an event was delivered. One learner per buffer:
a second one would take over the first's entries.

Every check-and-write is one Lua script, so it is atomic: an answer and its indexes; a
batch of events (all of them or none: the script checks every event before it writes
any, since a Redis script is not rolled back when it fails half-way), each with its
idempotency check, its supersession and its counters; a withdrawal; a forget with its
tombstone. Retention deletes in scripts of at most 500 answers each. Reads are scripts
too (flagged no-writes), each a consistent snapshot of up to 512 stream entries; a read
longer than that pages forward by seq, and since a new event always takes a higher seq,
paging misses none. The scripts derive keys from the rows they read: one Redis (and its
replicas), not Redis Cluster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import OutOfMemoryError
from redis.retry import Retry

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
from kaizen.errors import AlreadyExists, InvalidArgument, ResourceExhausted, Unavailable
from kaizen.events import Feedback, FeedbackKind, Generation

log = logging.getLogger(__name__)

PASSWORD_ENV = "KAIZEN_REDIS_PASSWORD"
PASSWORD_FILE_ENV = "KAIZEN_REDIS_PASSWORD_FILE"  # a mounted secret: the file's first line
PREFIX = "kaizen:"
FORMAT = "1"  # the layout above; a buffer written in another is refused, not misread
DURABILITY = ("always", "everysec")  # appendfsync settings a buffer URL may accept
SCAN = 512  # stream entries a read script looks at per call, to keep each call short
GROUP = "learner"  # the consumer group the learner reads `feedback` through
DELETE_BATCH = 500  # answers one retention script deletes
T = TypeVar("T")

# -- the scripts ----------------------------------------------------------------------
# ARGV[1] is always the key prefix. `#!lua` (no flags) makes Redis refuse a write script
# up front when it is out of memory, rather than at its first write: no half-done batch.

_DROP = """
local function drop_event(P, fseq)
  local f = redis.call('HMGET', P..'fb:'..fseq, 'event_id', 'state', 'signal',
                       'user_sha256', 'gen')
  if not f[1] then return 0 end
  redis.call('HDEL', P..'event', f[1])
  redis.call('HINCRBY', P..'states', f[2], -1)
  if redis.call('HGET', P..'signal', f[3]) == fseq then redis.call('HDEL', P..'signal', f[3]) end
  redis.call('SREM', P..'user:'..f[4]..':fb', fseq)
  redis.call('SREM', P..'gen:'..f[5]..':fb', fseq)
  redis.call('XDEL', P..'feedback', '0-'..fseq)
  redis.call('DEL', P..'fb:'..fseq)
  return 1
end
local function drop_answer(P, gseq)
  local g = redis.call('HMGET', P..'gen:'..gseq, 'response_id', 'user_sha256')
  if not g[1] then return 0 end
  local events = 0
  for _, fseq in ipairs(redis.call('SMEMBERS', P..'gen:'..gseq..':fb')) do
    events = events + drop_event(P, fseq)
  end
  redis.call('HDEL', P..'rid', g[1])
  redis.call('ZREM', P..'gen:time', gseq)
  redis.call('SREM', P..'user:'..g[2]..':gens', gseq)
  redis.call('XDEL', P..'gens', '0-'..gseq)
  redis.call('DEL', P..'gen:'..gseq, P..'gen:'..gseq..':fb')
  return events
end
"""

# ARGV: P, response_id, user_sha256, created_at, then the row's field/value pairs.
# Returns the new seq, or 0 when the response_id is already stored.
APPEND_GENERATION = """#!lua
local P, rid, usha = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HEXISTS', P..'rid', rid) == 1 then return 0 end
local gseq = tostring(redis.call('INCR', P..'gen:seq'))
redis.call('HSET', P..'gen:'..gseq, 'user_sha256', usha, unpack(ARGV, 5))
redis.call('HSET', P..'rid', rid, gseq)
redis.call('ZADD', P..'gen:time', ARGV[4], gseq)
redis.call('SADD', P..'user:'..usha..':gens', gseq)
redis.call('XADD', P..'gens', '0-'..gseq, 'seq', gseq)
return tonumber(gseq)
"""

# ARGV: P, then per event: event_id, response_id, user_id, kind, value, text,
# payload_sha256, received_at, source, user_sha256, signal.
# Returns {'ok', superseded, new_1, …, new_n} or {'refused', why, index (0-based)}.
APPEND_FEEDBACK = """#!lua
local P, F = ARGV[1], 11  -- F: fields per event, as RedisBuffer.append_feedback sends them
local n = (#ARGV - 1) / F
local seen, plan = {}, {}
-- 1. check every event, in order, before writing any: all of them or none
for i = 0, n - 1 do
  local b = 2 + i * F
  local eid, rid, digest, usha = ARGV[b], ARGV[b + 1], ARGV[b + 6], ARGV[b + 9]
  local old = seen[eid]
  if not old then
    local fseq = redis.call('HGET', P..'event', eid)
    if fseq then old = redis.call('HGET', P..'fb:'..fseq, 'payload_sha256') end
  end
  if old then
    if old ~= digest then return {'refused', 'conflict', i} end
    plan[i + 1] = false  -- a retry: stored already
  else
    if redis.call('HEXISTS', P..'forgotten', usha) == 1 then return {'refused', 'forgotten', i} end
    local gseq = redis.call('HGET', P..'rid', rid)
    if not gseq then return {'refused', 'unknown', i} end
    plan[i + 1] = gseq
    seen[eid] = digest
  end
end
-- 2. write
local reply, superseded = {'ok', 0}, 0
for i = 0, n - 1 do
  local b = 2 + i * F
  local gseq = plan[i + 1]
  if gseq then
    local usha, signal = ARGV[b + 9], ARGV[b + 10]
    local fseq = tostring(redis.call('INCR', P..'fb:seq'))
    redis.call('HSET', P..'fb:'..fseq, 'event_id', ARGV[b], 'response_id', ARGV[b + 1],
               'user_id', ARGV[b + 2], 'kind', ARGV[b + 3], 'value', ARGV[b + 4],
               'text', ARGV[b + 5], 'payload_sha256', ARGV[b + 6], 'received_at', ARGV[b + 7],
               'source', ARGV[b + 8], 'user_sha256', usha, 'signal', signal, 'gen', gseq,
               'state', 'active')
    redis.call('HSET', P..'event', ARGV[b], fseq)
    redis.call('SADD', P..'gen:'..gseq..':fb', fseq)
    redis.call('SADD', P..'user:'..usha..':fb', fseq)
    redis.call('XADD', P..'feedback', '0-'..fseq, 'seq', fseq)
    -- one effective signal per (user, answer, kind): this event replaces the active one
    local prev = redis.call('HGET', P..'signal', signal)
    if prev then
      redis.call('HSET', P..'fb:'..prev, 'state', 'superseded')
      redis.call('HINCRBY', P..'states', 'active', -1)
      redis.call('HINCRBY', P..'states', 'superseded', 1)
      superseded = superseded + 1
    end
    redis.call('HSET', P..'signal', signal, fseq)
    redis.call('HINCRBY', P..'states', 'active', 1)
    reply[#reply + 1] = 1
  else
    reply[#reply + 1] = 0
  end
end
reply[2] = superseded
return reply
"""

# ARGV: P, response_id, user_id, kind ('' = every kind). Returns how many were withdrawn.
WITHDRAW = """#!lua
local P, rid, user, kind = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local gseq = redis.call('HGET', P..'rid', rid)
if not gseq then return 0 end
local n = 0
for _, fseq in ipairs(redis.call('SMEMBERS', P..'gen:'..gseq..':fb')) do
  local f = redis.call('HMGET', P..'fb:'..fseq, 'user_id', 'kind', 'state', 'signal')
  if f[1] == user and f[3] == 'active' and (kind == '' or f[2] == kind) then
    redis.call('HSET', P..'fb:'..fseq, 'state', 'withdrawn')
    redis.call('HINCRBY', P..'states', 'active', -1)
    redis.call('HINCRBY', P..'states', 'withdrawn', 1)
    if redis.call('HGET', P..'signal', f[4]) == fseq then redis.call('HDEL', P..'signal', f[4]) end
    n = n + 1
  end
end
return n
"""

# ARGV: P, user_sha256, now. Returns {answers, events, already forgotten (0|1)}.
FORGET = (
    "#!lua\n"
    + _DROP
    + """
local P, usha = ARGV[1], ARGV[2]
local already = redis.call('HEXISTS', P..'forgotten', usha)
local answers, events = 0, 0
for _, fseq in ipairs(redis.call('SMEMBERS', P..'user:'..usha..':fb')) do
  events = events + drop_event(P, fseq)
end
for _, gseq in ipairs(redis.call('SMEMBERS', P..'user:'..usha..':gens')) do
  answers = answers + 1
  events = events + drop_answer(P, gseq)
end
redis.call('HSETNX', P..'forgotten', usha, ARGV[3])
return {answers, events, already}
"""
)

# ARGV: P, created_before, batch. Returns {answers, events} deleted (answers < batch: done).
DELETE_BEFORE = (
    "#!lua\n"
    + _DROP
    + """
local P = ARGV[1]
local old = redis.call('ZRANGEBYSCORE', P..'gen:time', '-inf', '('..ARGV[2], 'LIMIT', 0, ARGV[3])
local events = 0
for _, gseq in ipairs(old) do events = events + drop_answer(P, gseq) end
return {#old, events}
"""
)

# An active feedback event joined to its answer, appended to `out` as {seq, event row,
# gen seq, answer row or {} when an earlier sample in this reply carries it}; an event
# not active (superseded, withdrawn, forgotten) adds nothing. Returns whether it added.
_JOIN = """
local function join(P, fseq, sent, out)
  if redis.call('HGET', P..'fb:'..fseq, 'state') ~= 'active' then return false end
  local gseq = redis.call('HGET', P..'fb:'..fseq, 'gen')
  local g = {}
  if not sent[gseq] then g = redis.call('HGETALL', P..'gen:'..gseq); sent[gseq] = true end
  out[#out + 1] = {fseq, redis.call('HGETALL', P..'fb:'..fseq), gseq, g}
  return true
end
"""

# The learner's read: ARGV: P, group, consumer, count. New entries for its consumer, each
# joined (as READ_SAMPLES); entries not active are delivered, and acknowledged later with
# the rest, but not returned. Returns {entries delivered, rows}.
CONSUME = (
    "#!lua\n"
    + _JOIN
    + """
local P, group, me, count = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local got = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', count,
                       'STREAMS', P..'feedback', '>')
if not got then return {0, {}} end
local out, sent = {}, {}
for _, e in ipairs(got[1][2]) do join(P, string.sub(e[1], 3), sent, out) end
return {#got[1][2], out}
"""
)

# ARGV: P, after, limit, scan. Returns {last seq looked at, 1 if the stream ended,
# {joined rows, …}}.
READ_SAMPLES = (
    "#!lua flags=no-writes\n"
    + _JOIN
    + """
local P, limit, scan = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])
local entries = redis.call('XRANGE', P..'feedback', '(0-'..ARGV[2], '+', 'COUNT', scan)
local out, sent, last = {}, {}, ARGV[2]
for _, e in ipairs(entries) do
  last = string.sub(e[1], 3)
  if join(P, last, sent, out) and #out == limit then break end
end
return {last, (#entries < scan) and 1 or 0, out}
"""
)

# ARGV: P, after, created_before, limit, scan. Returns {last seq looked at, 1 if the
# stream ended, {{seq, answer row, 1 if any feedback on it}, …}}.
READ_ANSWERS = """#!lua flags=no-writes
local P, before = ARGV[1], tonumber(ARGV[3])
local limit, scan = tonumber(ARGV[4]), tonumber(ARGV[5])
local entries = redis.call('XRANGE', P..'gens', '(0-'..ARGV[2], '+', 'COUNT', scan)
local out, last = {}, ARGV[2]
for _, e in ipairs(entries) do
  local gseq = string.sub(e[1], 3)
  last = gseq
  if tonumber(redis.call('HGET', P..'gen:'..gseq, 'created_at')) < before then
    local has = redis.call('SCARD', P..'gen:'..gseq..':fb') > 0 and 1 or 0
    out[#out + 1] = {gseq, redis.call('HGETALL', P..'gen:'..gseq), has}
    if #out == limit then break end
  end
end
return {last, (#entries < scan) and 1 or 0, out}
"""

# ARGV: P, response_id. Returns the answer's row ({} when absent).
GENERATION = """#!lua flags=no-writes
local gseq = redis.call('HGET', ARGV[1]..'rid', ARGV[2])
if not gseq then return {} end
return redis.call('HGETALL', ARGV[1]..'gen:'..gseq)
"""

# ARGV: P, response_ids…. Returns {response_id, user_id, …} of those stored.
OWNERS = """#!lua flags=no-writes
local P, out = ARGV[1], {}
for i = 2, #ARGV do
  local gseq = redis.call('HGET', P..'rid', ARGV[i])
  if gseq then
    out[#out + 1] = ARGV[i]
    out[#out + 1] = redis.call('HGET', P..'gen:'..gseq, 'user_id')
  end
end
return out
"""


# -- opening --------------------------------------------------------------------------


def open_redis(
    url: str,
    must_exist: bool = False,
    timeout_s: int = 30,
    environ: Mapping[str, str] = os.environ,
) -> RedisBuffer:
    """Connect to `redis://HOST:PORT/DB` (or `rediss://`), check that the server is durable
    enough (see the module docstring) and open the buffer there. Refusals are ValueErrors
    naming `--buffer`; none of them repeats the password."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    durability = dict(query).get("durability", "always")
    if durability not in DURABILITY:
        raise ValueError(
            f"--buffer: durability={durability!r}; expected one of {', '.join(DURABILITY)}"
        )
    plain = urlunsplit(parts._replace(query=urlencode([q for q in query if q[0] != "durability"])))
    extra: dict[str, str] = {}
    if parts.password is None and environ.get(PASSWORD_ENV):
        extra["password"] = environ[PASSWORD_ENV]
    elif parts.password is None and environ.get(PASSWORD_FILE_ENV):
        extra["password"] = _password_file(environ[PASSWORD_FILE_ENV])
    client = redis.Redis.from_url(
        plain,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # no silent resend: a write whose reply was lost is reported (Unavailable), and
        # the caller's retry is safe because events are idempotent by event_id
        retry=Retry(NoBackoff(), 0),
        **extra,
    )
    kw = client.get_connection_kwargs()
    where = f"{parts.scheme}://{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"
    try:
        check_durability(client, where, durability)
        stored = client.hget(PREFIX + "meta", "format")
        if stored is None and must_exist:
            raise ValueError(f"--buffer: no kaizen buffer at {where}")
        if stored is None:
            client.hsetnx(PREFIX + "meta", "format", FORMAT)
        elif stored != FORMAT:
            raise ValueError(
                f"--buffer: the buffer at {where} has layout {stored!r}; "
                f"this kaizen reads {FORMAT!r}"
            )
    except redis.RedisError as exc:
        client.close()
        raise ValueError(f"--buffer: cannot use Redis at {where}: {exc}") from exc
    except ValueError:
        client.close()
        raise
    return RedisBuffer(client, where, timeout_s)


def _password_file(path: str) -> str:
    """The first line of a secret file (a Kubernetes Secret mounted as a file, say)."""
    try:
        with open(path, encoding="utf-8") as f:
            password = f.readline(4097).rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"{PASSWORD_FILE_ENV}: cannot read {path}: {exc.strerror}") from exc
    if not password or len(password) > 4096:
        raise ValueError(f"{PASSWORD_FILE_ENV}: {path} must hold a password of 1 to 4096 chars")
    return password


def check_durability(client: redis.Redis, where: str, durability: str = "always") -> None:
    """Refuse (ValueError naming the setting) a Redis that could lose an acknowledged event."""
    try:
        config = client.config_get("appendonly")
        config |= client.config_get("appendfsync")
        config |= client.config_get("maxmemory-policy")
    except redis.ResponseError as exc:  # CONFIG closed by an ACL or renamed
        raise ValueError(
            f"--buffer: cannot check the durability of Redis at {where}: CONFIG GET refused "
            f"({exc}); allow it for this user (ACL +config|get)"
        ) from None
    if config.get("appendonly") != "yes":
        raise ValueError(
            f"--buffer: Redis at {where} runs with appendonly {config.get('appendonly')}: "
            "acknowledged events would be lost when it restarts. Run it with "
            "`appendonly yes` and `appendfsync always`"
        )
    fsync = config.get("appendfsync")
    if fsync != "always" and not (fsync == "everysec" == durability):
        also = (
            " or accept everysec with ?durability=everysec in the URL"
            if fsync == "everysec"
            else ""
        )
        raise ValueError(
            f"--buffer: Redis at {where} runs with appendfsync {fsync}: an acknowledged event "
            f"could be lost if its machine crashes. Set `appendfsync always`{also}"
        )
    policy = config.get("maxmemory-policy", "")
    if policy.startswith("allkeys"):
        raise ValueError(
            f"--buffer: Redis at {where} runs with maxmemory-policy {policy}: it would evict "
            "stored events when memory runs out. Use noeviction (a full Redis then refuses "
            "writes)"
        )


LEASE = """#!lua
local key = ARGV[1]..'lease:'..ARGV[2]
local holder = redis.call('GET', key)
if holder and holder ~= ARGV[3] then return 0 end
redis.call('SET', key, ARGV[3], 'PX', ARGV[4])
return 1
"""

RELEASE = """#!lua
local key = ARGV[1]..'lease:'..ARGV[2]
if redis.call('GET', key) == ARGV[3] then redis.call('DEL', key) end
return 0
"""

# ARGV: prefix, then (bucket, cost, per_min) triples; all buckets are spent or none.
# Returns 0, or the 1-based index of the first bucket short of its cost and what it has.
TAKE_TOKENS = """#!lua
redis.set_repl(redis.REPL_NONE)
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local n = (#ARGV - 1) / 3
local left = {}
for i = 1, n do
  local key = P..'rate:'..ARGV[3 * i - 1]
  local cost, per = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  local h = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = per
  if h[1] then
    tokens = math.min(per, tonumber(h[1]) + math.max(0, now - tonumber(h[2])) * per / 60)
  end
  if tokens < cost then return {i, tostring(tokens)} end
  left[i] = tokens - cost
end
for i = 1, n do
  local key = P..'rate:'..ARGV[3 * i - 1]
  redis.call('HSET', key, 'tokens', tostring(left[i]), 'at', tostring(now))
  redis.call('EXPIRE', key, 61)
end
return {0, ''}
"""

# -- the buffer -----------------------------------------------------------------------


class RedisBuffer:
    """Redis Streams behind the ReplayBuffer protocol; safe to share between threads and
    processes (each call is one script, atomic on the server)."""

    def __init__(self, client: redis.Redis, where: str, timeout_s: int = 30) -> None:
        self.client = client
        self.where = where  # scheme://host:port/db, never the password
        self.timeout_s = timeout_s
        self._closed = False
        self._compact_lock = threading.Lock()
        s = client.register_script
        self._append_generation = s(APPEND_GENERATION)
        self._append_feedback = s(APPEND_FEEDBACK)
        self._withdraw = s(WITHDRAW)
        self._forget = s(FORGET)
        self._delete_before = s(DELETE_BEFORE)
        self._read_samples = s(READ_SAMPLES)
        self._consume = s(CONSUME)
        # this process's consumer in the group; None until its first consume()
        self._consumer: str | None = None
        self._returned = 0  # the last seq consume() returned
        self._read_answers = s(READ_ANSWERS)
        self._generation = s(GENERATION)
        self._owners = s(OWNERS)
        self._lease = s(LEASE)
        self._release = s(RELEASE)
        self._take_tokens = s(TAKE_TOKENS)

    def _call(self, what: Callable[[], T], *, read: bool = False) -> T:
        """Run one command; map Redis' failures to the errors the server reports. A read
        is tried once more (a pooled connection may predate a restart of Redis); a write
        never is: its reply may be what was lost."""
        if self._closed:
            raise Unavailable("replay buffer is closed")
        try:
            try:
                return what()
            except (redis.ConnectionError, redis.TimeoutError):
                if not read:
                    raise
                return what()  # the failed connection was dropped: this one is fresh
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise Unavailable(f"replay buffer: Redis at {self.where}: {exc}") from exc
        except OutOfMemoryError as exc:  # maxmemory reached, and noeviction: nothing written
            raise ResourceExhausted(
                f"replay buffer: Redis at {self.where} is out of memory; retry later"
            ) from exc

    # -- writes ------------------------------------------------------------------------

    def append_generation(self, generation: Generation) -> None:
        row = generation.to_row()
        row["created_at"] = repr(float(generation.created_at))  # exact, as a REAL is
        pairs = [x for kv in row.items() for x in kv]
        args = [PREFIX, generation.response_id, user_sha256(generation.user_id), row["created_at"]]
        if not self._call(lambda: self._append_generation(args=args + pairs)):
            raise AlreadyExists(f"response_id: {generation.response_id!r} is already stored")

    def append_feedback(self, events: Sequence[Feedback]) -> StoreResult:
        """Store events atomically: all of them, or none when one is invalid or conflicting."""
        events = list(events)
        now = time.time()
        args: list[object] = [PREFIX]
        for ev in events:
            args += [
                ev.event_id,
                ev.response_id,
                ev.user_id,
                str(ev.kind),
                repr(float(ev.value)),
                ev.text,
                ev.payload_sha256(),
                repr(float(ev.received_at or now)),
                ev.source,
                user_sha256(ev.user_id),
                _signal(ev),
            ]
        reply = self._call(lambda: self._append_feedback(args=args))
        if reply[0] == "refused":
            refuse = {
                "conflict": conflicting_event,
                "forgotten": forgotten_sender,
                "unknown": unknown_answer,
            }[reply[1]]
            raise refuse(events[int(reply[2])])
        return StoreResult(tuple(bool(x) for x in reply[2:]), int(reply[1]))

    def withdraw(self, response_id: str, user_id: str, kind: str = "") -> int:
        """Withdraw the user's active events on an answer (of `kind`, or all); how many."""
        args = [PREFIX, response_id, user_id, kind]
        return int(self._call(lambda: self._withdraw(args=args)))

    def forget_user(self, user_id: str) -> Forgotten:
        """Delete the user's answers, the feedback on them and the user's own feedback,
        write a tombstone, and rewrite the append-only file so the bytes leave the disk."""
        if not user_id:
            raise InvalidArgument("user_id", "required")
        args = [PREFIX, user_sha256(user_id), repr(time.time())]
        answers, events, already = self._call(lambda: self._forget(args=args))
        self._compact()
        return Forgotten(int(answers), int(events), bool(already))

    def delete_before(self, created_before: float) -> tuple[int, int]:
        """Delete answers created before a time and all feedback on them: (answers, events)."""
        answers = events = 0
        args = [PREFIX, repr(float(created_before)), DELETE_BATCH]
        while True:
            batch, batch_events = self._call(lambda: self._delete_before(args=args))
            answers, events = answers + int(batch), events + int(batch_events)
            if int(batch) < DELETE_BATCH:
                break
        if (answers, events) != (0, 0):
            self._compact()
        return answers, events

    def _compact(self) -> None:
        """Rewrite the append-only file from the data set as it is now, so deleted rows'
        bytes (in old AOF files) leave the disk before we return, as SQLite truncates its
        WAL. A rewrite already running began before the delete: wait, then start ours.
        The delete itself is done: a rewrite that fails is logged, not raised."""
        with self._compact_lock:
            try:
                self._rewrite_aof()
            except redis.RedisError as exc:
                log.warning("replay buffer: the AOF of %s was not rewritten: %s", self.where, exc)

    def _rewrite_aof(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        started = False
        while time.monotonic() < deadline:
            if not started:
                try:
                    self.client.bgrewriteaof()
                    started = True
                except redis.ResponseError as exc:
                    if "already in progress" not in str(exc):
                        raise
            info = self.client.info("persistence")
            if started and not (info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]):
                if info.get("aof_last_bgrewrite_status") != "ok":
                    log.warning("replay buffer: the AOF rewrite of %s failed", self.where)
                return
            time.sleep(0.05)
        log.warning(
            "replay buffer: the AOF rewrite of %s did not finish within %s s; deleted rows "
            "stay in its old AOF files until it does",
            self.where,
            self.timeout_s,
        )

    # -- reads -------------------------------------------------------------------------

    def read_samples(self, after_seq: int, limit: int) -> list[Sample]:
        """Active feedback events after a cursor, in order, each joined to its answer."""
        answers: dict[str, dict[str, str]] = {}
        return [_sample(row, answers) for row in self._scan(self._read_samples, after_seq, limit)]

    def consume(self, after_seq: int, limit: int) -> list[Sample]:
        """The learner's read: as `read_samples`, through the consumer group, so what it
        was handed stays pending until `commit`. The first call (and one whose cursor is
        behind what was returned: the learner went back) joins the group at `after_seq`."""
        if self._consumer is None or after_seq < self._returned:
            self._join(after_seq)
        samples: list[Sample] = []
        answers: dict[str, dict[str, str]] = {}
        while len(samples) < limit:
            want = min(limit - len(samples), SCAN)
            args = [PREFIX, GROUP, self._consumer, want]
            try:
                delivered, rows = self._call(lambda a=args: self._consume(args=a))
            except Unavailable:
                self._consumer = None  # what it handed over may be lost: rejoin next time
                raise
            for row in rows:
                if int(row[0]) > after_seq:
                    samples.append(_sample(row, answers))
                elif row[3]:  # a later row may need its answer
                    answers[row[2]] = _row(row[3])
            if delivered < want:
                break
        if samples:
            self._returned = samples[-1].seq
        return samples

    def _join(self, cursor: int) -> None:
        """Point the group at the cursor and make this process its one consumer: what dead
        learners had pending is taken over and their consumers removed."""
        key = PREFIX + "feedback"
        me = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        where = f"0-{int(cursor)}"

        def join() -> None:
            try:
                self.client.xgroup_create(key, GROUP, id=where, mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
                self.client.xgroup_setid(key, GROUP, id=where)
            self.client.xgroup_createconsumer(key, GROUP, me)
            start = "0-0"
            while True:  # XAUTOCLAIM pages through the pending list
                start, _, _ = self.client.xautoclaim(key, GROUP, me, 0, start, count=1000)
                if start in ("0-0", b"0-0"):
                    break
            for consumer in self.client.xinfo_consumers(key, GROUP):
                if consumer["name"] != me:
                    self.client.xgroup_delconsumer(key, GROUP, consumer["name"])

        self._call(join)
        self._consumer, self._returned = me, int(cursor)
        log.info("replay buffer: learner consumer %s reads %s from seq %d", me, key, cursor)

    def commit(self, cursor: int) -> None:
        """Every event up to `cursor` is in a published version: acknowledge it (XACK)."""
        key, upto = PREFIX + "feedback", f"0-{int(cursor)}"

        def ack() -> None:
            while True:
                pending = self.client.xpending_range(key, GROUP, "-", upto, 1000)
                if not pending:
                    return
                self.client.xack(key, GROUP, *[p["message_id"] for p in pending])

        if self._consumer is not None:
            self._call(ack)

    def read_answers(
        self, after_seq: int, created_before: float, limit: int
    ) -> list[tuple[int, Generation, bool]]:
        """Answers after a cursor (generation seq) given before `created_before`, in order:
        (seq, answer, whether any feedback on it is stored yet)."""
        rows = self._scan(self._read_answers, after_seq, limit, repr(float(created_before)))
        return [(int(gseq), _generation(_row(g)), bool(has)) for gseq, g, has in rows]

    def _scan(self, script, after_seq: int, limit: int, *extra: str) -> list[list]:
        """Page through a read script until `limit` rows (all of them when negative, as
        SQLite's LIMIT) or the end of the stream."""
        rows: list[list] = []
        after = max(int(after_seq), 0)
        while limit < 0 or len(rows) < limit:
            want = -1 if limit < 0 else limit - len(rows)
            args = [PREFIX, after, *extra, want, SCAN]
            last, ended, page = self._call(lambda a=args: script(args=a), read=True)
            rows += page
            after = int(last)
            if ended:
                break
        return rows

    def last_seq(self) -> int:
        newest = self._call(lambda: self.client.xrevrange(PREFIX + "feedback", count=1), read=True)
        return int(newest[0][0].removeprefix("0-")) if newest else 0

    def generation(self, response_id: str) -> Generation | None:
        row = self._call(lambda: self._generation(args=[PREFIX, response_id]), read=True)
        return _generation(_row(row)) if row else None

    def owners(self, response_ids: Sequence[str]) -> dict[str, str]:
        """{response_id: user_id} of those answers still in the buffer (an answer forgotten,
        expired or never logged is absent)."""
        ids = list(dict.fromkeys(response_ids))
        found: dict[str, str] = {}
        for i in range(0, len(ids), 1000):  # keep each script short
            chunk = ids[i : i + 1000]
            flat = self._call(lambda c=chunk: self._owners(args=[PREFIX, *c]), read=True)
            found.update(_row(flat))
        return found

    def lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take `name` for `ttl_s` if it is free, expired or already `holder`'s; whether
        `holder` holds it now."""
        args = [PREFIX, name, holder, max(1, int(ttl_s * 1000))]
        return bool(self._call(lambda: self._lease(args=args)))

    def release(self, name: str, holder: str) -> None:
        self._call(lambda: self._release(args=[PREFIX, name, holder]))

    def take_tokens(self, costs: Sequence[tuple[str, float, float]]) -> tuple[int, float]:
        """Spend from the shared token buckets `(name, cost, per_min)`, all or none, by
        Redis' clock: (0, 0.0), or (i, tokens it has) for the first bucket (1-based) short
        of its cost. A bucket holds a minute's allowance and refills continuously."""
        args: list[object] = [PREFIX]
        for name, cost, per_min in costs:
            args += [name, repr(float(cost)), repr(float(per_min))]
        short, left = self._call(lambda: self._take_tokens(args=args))
        return int(short), float(left or 0.0)

    def feedback_states(self) -> dict[str, int]:
        counts = self._call(lambda: self.client.hgetall(PREFIX + "states"), read=True)
        return {ACTIVE: 0, SUPERSEDED: 0, WITHDRAWN: 0, **{k: int(v) for k, v in counts.items()}}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.client.close()


def _signal(ev: Feedback) -> str:
    """The key of one effective signal: (user, answer, kind), hashed to a fixed length."""
    body = json.dumps([ev.user_id, ev.response_id, str(ev.kind)])
    return hashlib.sha256(body.encode()).hexdigest()


def _sample(row: list, answers: dict[str, dict[str, str]]) -> Sample:
    """One row of a read script, (fseq, event, gseq, answer), as a Sample; a script sends
    each answer once, so `answers` keeps those already seen."""
    fseq, event, gseq, answer = row
    if answer:
        answers[gseq] = _row(answer)
    f = _row(event)
    return Sample(
        seq=int(fseq),
        feedback=Feedback(
            event_id=f["event_id"],
            response_id=f["response_id"],
            user_id=f["user_id"],
            kind=FeedbackKind(f["kind"]),
            value=float(f["value"]),
            text=f["text"],
            received_at=float(f["received_at"]),
            source=f["source"],
        ),
        generation=_generation(answers[gseq]),
    )


def _row(flat: list[str]) -> dict[str, str]:
    """HGETALL's [field, value, field, value, …] as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _generation(row: dict[str, str]) -> Generation:
    return Generation.from_row({**row, "created_at": float(row["created_at"])})
