"""`kaizen bench ingest`: how many durable feedback events a second `kaizen serve` takes in.

Seeds the buffer with answers (append_generation, straight into the buffer, before the
server starts), measures the backend's own limit (C threads calling `append_feedback` with
batches of B events: the same durability, no gRPC), then starts `kaizen serve` on that
buffer and has C clients send the same number of events in calls of B events, each
call's ack timed: through `FeedbackService.StreamFeedback` (B messages a call), then
through `StreamFeedbackBatches` (one FeedbackBatch message of B events a call), each on
answers of its own. Every event refers to a seeded answer and is sent in its owner's
name with a service key, so each one goes the whole way: parse, validation, ownership
lookup, rate limits, group commit. Afterwards every event sent over gRPC is sent to the
buffer again: each must come back a duplicate (none lost), and the buffer must have grown
by exactly the events sent (none stored twice). Last, the same clients send the same
messages to `bench.grpc_floor`, a grpcio server of the same kind that parses each message
and stores nothing: the transport's own floor on this machine, beside which each RPC's
rate is read (`ratio_vs_grpc_floor`).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from bench.config import IngestBench
from bench.load import kaizen_server, percentile, say
from kaizen.auth import local_key
from kaizen.buffer import ReplayBuffer, open_buffer
from kaizen.events import Feedback, FeedbackKind, Generation, Sampling
from kaizen.sim.demo import free_port
from kaizen.v1 import feedback_pb2

METHODS = {
    "stream": "/kaizen.v1.FeedbackService/StreamFeedback",
    "batches": "/kaizen.v1.FeedbackService/StreamFeedbackBatches",
}
TAGS = {"stream": "rpc", "batches": "bat"}  # in the seeded answers' and the events' ids
WARM_TAGS = {"stream": "warm", "batches": "bwarm"}  # in the warm-up events' ids
PREFIXES = {"stream": "", "batches": "batched_"}  # of each RPC's figures in the report
REDIS_DURABLE = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")
WORKERS = 32  # gRPC handler threads of the server and of its floor (serve's default)
SEED_THREADS = 16  # answers are seeded concurrently so they share commits (fsyncs)


def run(config: IngestBench) -> dict[str, object]:
    rpcs = list(METHODS) if config.rpc == "both" else [config.rpc]
    with _workdir(config.data) as workdir, _buffer_url(config, workdir) as url:
        backend = url.split(":", 1)[0]
        run_id = uuid.uuid4().hex[:8]  # ids unique to this run: a kept buffer can be reused
        buffer = open_buffer(url)
        try:
            seeded = (1 + len(rpcs)) * config.answers
            say(f"seeding {seeded} answers into the {backend} buffer")
            raw_answers = _seed(buffer, f"{run_id}-raw", config)
            rpc_answers = {rpc: _seed(buffer, f"{run_id}-{TAGS[rpc]}", config) for rpc in rpcs}
            raw_events = _events(f"{run_id}-raw", raw_answers, config.events)
            cpu_s = time.process_time()
            raw = _raw(buffer, _batches(raw_events, config.batch), config.clients)
            raw_cpu_s = time.process_time() - cpu_s
            say(f"backend limit: {raw['events_per_s']:,.0f} events/s (append_feedback)")
            before = sum(buffer.feedback_states().values())
        finally:
            buffer.close()
        n_warm = config.clients * config.batch  # one call per client before the clock starts
        warm = {
            rpc: _events(f"{run_id}-{WARM_TAGS[rpc]}", answers, n_warm)
            for rpc, answers in rpc_answers.items()
        }
        sent = {
            rpc: _events(f"{run_id}-{TAGS[rpc]}", answers, config.events)
            for rpc, answers in rpc_answers.items()
        }
        _, key = local_key(workdir / "auth", "bench-ingest")  # beside the server's own
        # no answers to guard; the floor gets as many handler threads
        extra = ["--buffer", url, "--guard-evals", "none", "--workers", str(WORKERS)]
        figures: dict[str, dict] = {}

        def measure(target: str, pid: int, rpc: str) -> dict:
            """A warm-up call per client, then `sent[rpc]` timed, with the server's CPU."""
            _send(target, key, rpc, _batches(warm[rpc], config.batch), config.clients)
            cpu_s = _cpu_s(pid)
            measured = _send(target, key, rpc, _batches(sent[rpc], config.batch), config.clients)
            return measured | {"server_cpu_s": _cpu_s(pid) - cpu_s}

        with kaizen_server(config.model, workdir, 1, 8, "auto", extra) as server:
            target = _address(server.log)
            for rpc in rpcs:
                say(
                    f"{METHODS[rpc].rsplit('/', 1)[1]}: {config.events} events, "
                    f"{config.clients} clients, {config.batch} events a call"
                )
                figures[rpc] = measure(target, server.process.pid, rpc)
                say(f"through gRPC: {figures[rpc]['events_per_s']:,.0f} events/s")
        with grpc_floor(WORKERS) as (floor, pid):  # the same messages, parsed and dropped
            for rpc in rpcs:
                figures[rpc]["floor"] = measure(floor, pid, rpc)
                say(f"gRPC floor (nothing stored): {figures[rpc]['floor']['events_per_s']:,.0f}")
        buffer = open_buffer(url)
        try:
            warmed = sum(len(events) for events in warm.values())
            stored = sum(buffer.feedback_states().values()) - before - warmed
            every = [ev for events in sent.values() for ev in events]
            resent = _raw(buffer, _batches(every, config.batch), config.clients)
        finally:
            buffer.close()
    report: dict[str, object] = {
        "backend": backend,
        "rpc": config.rpc,
        "clients": config.clients,
        "batch": config.batch,
        "events": config.events,
        "backend_limit_events_per_s": round(raw["events_per_s"]),
    }
    for rpc, rpc_figures in figures.items():
        report.update(_figures(PREFIXES[rpc], rpc_figures, raw, config.events))
    if len(figures) == 2:  # measured in the same run, on the same server
        speedup = figures["batches"]["events_per_s"] / figures["stream"]["events_per_s"]
        report["batched_vs_stream"] = round(speedup, 2)
    return report | {
        "backend_limit_seconds": round(raw["seconds"], 2),
        "answers_seeded": seeded,
        "events_accepted": sum(f["accepted"] for f in figures.values()),
        "events_stored": stored,
        "events_lost": resent["accepted"],  # stored only now: the server had not
        "server_exit_code": server.exit_code,
        "durability": _durability(url),
        "backend_limit_cpu_us_per_event": round(raw_cpu_s / config.events * 1e6, 1),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def _figures(prefix: str, rpc: dict, raw: dict, events: int) -> dict[str, object]:
    """One RPC's figures, under `prefix`: events/s, its ratio to the backend's limit, ack
    latency, and the server's CPU time per event, which other load on the machine does
    not change (the backend limit's is this process's: the buffer's client side)."""
    acks, floor = rpc["ack_ms"], rpc["floor"]
    return {
        f"{prefix}events_per_s": round(rpc["events_per_s"]),
        f"{prefix}ratio": round(rpc["events_per_s"] / raw["events_per_s"], 3),
        f"{prefix}p50_ack_ms": round(percentile(acks, 50), 1),
        f"{prefix}p99_ack_ms": round(percentile(acks, 99), 1),
        f"{prefix}seconds": round(rpc["seconds"], 2),
        f"{prefix}server_cpu_us_per_event": round(rpc["server_cpu_s"] / events * 1e6, 1),
        f"{prefix}grpc_floor_events_per_s": round(floor["events_per_s"]),
        f"{prefix}ratio_vs_grpc_floor": round(rpc["events_per_s"] / floor["events_per_s"], 3),
        f"{prefix}grpc_floor_server_cpu_us_per_event": round(
            floor["server_cpu_s"] / events * 1e6, 1
        ),
    }


@contextmanager
def grpc_floor(workers: int) -> Iterator[tuple[str, int]]:
    """`bench.grpc_floor` in a process of its own (as `kaizen serve` runs): its address
    and pid. Stopped after."""
    command = [sys.executable, "-m", "bench.grpc_floor", str(workers)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        match = re.match(r"grpc floor on (\S+)", line)
        if match is None:
            raise RuntimeError(f"bench.grpc_floor did not start (exit {process.poll()})")
        yield match.group(1), process.pid
    finally:
        process.stdin.close()  # its cue to stop
        _reap(process)


def _reap(process: subprocess.Popen) -> None:
    """Wait up to 30 s for `process` to exit once told to; kill it after that."""
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def _workdir(data: Path | None) -> Iterator[Path]:
    """The server's directory (keys, registry, log, the SQLite buffer): --data, new or
    empty, kept; or a temporary one."""
    if data is not None:
        data = Path(data).resolve()
        if data.exists() and any(data.iterdir()):
            raise ValueError(f"--data: {data} is not empty; give a new directory")
        data.mkdir(parents=True, exist_ok=True)
        yield data
        return
    with tempfile.TemporaryDirectory(prefix="kaizen-bench-ingest-") as tmp:
        yield Path(tmp)


@contextmanager
def _buffer_url(config: IngestBench, workdir: Path) -> Iterator[str]:
    if config.buffer:
        yield config.buffer
    elif config.redis:
        with redis_server(workdir / "redis") as url:
            yield url
    else:
        yield f"sqlite:///{workdir / 'buffer.db'}"


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """A local redis-server on a free port, append-only with an fsync before every reply
    (what the Redis buffer requires), its data in `directory`; its URL. Stopped after."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise ValueError("--redis: redis-server is not installed (apt-get install redis-server)")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    command += ["--logfile", str(directory / "redis.log"), *REDIS_DURABLE]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start; see {directory}/redis.log")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not answer PING in 20 s") from None
                time.sleep(0.05)
        client.close()
        say(f"redis-server {port} ready (appendonly yes, appendfsync always)")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        _reap(process)


def _address(log: Path) -> str:
    """Where the server listens, from its start-up line: the asyncio clients need their own
    channel (`kaizen serve: gRPC on HOST:PORT (…`)."""
    match = re.search(r"kaizen serve: gRPC on (\S+) \(", log.read_text())
    if match is None:
        raise RuntimeError(f"no 'gRPC on' line in {log}")
    return match.group(1)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _durability(url: str) -> str:
    if url.startswith("sqlite"):
        return "SQLite WAL, synchronous=FULL"
    if "durability=everysec" in url:
        return "Redis appendfsync everysec"
    return "Redis appendfsync always"


def _seed(buffer: ReplayBuffer, prefix: str, config: IngestBench) -> list[tuple[str, str]]:
    """`config.answers` answers of `config.users` users; (response_id, user) of each."""
    from concurrent.futures import ThreadPoolExecutor

    answers = [
        (f"answer-{prefix}-{i}", f"bench-user-{i % config.users}") for i in range(config.answers)
    ]
    now = time.time()

    def one(answer: tuple[str, str]) -> None:
        response_id, user = answer
        buffer.append_generation(
            Generation(
                response_id=response_id,
                user_id=user,
                request_id=response_id,
                model_version="base",
                messages=[{"role": "user", "content": "How far away is the Moon?"}],
                prompt_tokens=[1, 2, 3],
                response_tokens=[4, 5],
                behaviour_logprobs=[-1.0, -1.0],
                text="About 384,000 km.",
                finish_reason="stop",
                sampling=Sampling(max_new_tokens=8, temperature=0.7, seed=1),
                created_at=now,
            )
        )

    with ThreadPoolExecutor(SEED_THREADS) as pool:
        list(pool.map(one, answers))
    return answers


# What users send most: thumbs, ratings, clicks, dwell times, copies; one in 20 comments.
_SIGNALS = [
    (FeedbackKind.THUMB, 1.0, ""),
    (FeedbackKind.DWELL, 5400.0, ""),
    (FeedbackKind.CLICK, 0.0, ""),
    (FeedbackKind.RATING, 4.0, ""),
    (FeedbackKind.THUMB, -1.0, ""),
    (FeedbackKind.COPY, 0.0, ""),
    (FeedbackKind.DWELL, 900.0, ""),
    (FeedbackKind.RATING, 2.0, ""),
    (FeedbackKind.CLICK, 0.0, ""),
    (FeedbackKind.THUMB, 1.0, ""),
    (FeedbackKind.DWELL, 12000.0, ""),
    (FeedbackKind.RATING, 5.0, ""),
    (FeedbackKind.COPY, 0.0, ""),
    (FeedbackKind.THUMB, 1.0, ""),
    (FeedbackKind.DWELL, 3000.0, ""),
    (FeedbackKind.CLICK, 0.0, ""),
    (FeedbackKind.RATING, 3.0, ""),
    (FeedbackKind.THUMB, -1.0, ""),
    (FeedbackKind.DWELL, 700.0, ""),
    (FeedbackKind.COMMENT, 0.0, "too long, get to the point"),
]


def _events(prefix: str, answers: list[tuple[str, str]], n: int) -> list[Feedback]:
    """n events spread over the answers, each in its answer's user's name."""
    step = 7919  # a prime: consecutive events land on answers far apart
    out = []
    for i in range(n):
        response_id, user = answers[(i * step) % len(answers)]
        kind, value, text = _SIGNALS[i % len(_SIGNALS)]
        out.append(Feedback(f"bench-{prefix}-{i}", response_id, user, kind, value, text))
    return out


def _batches(events: list[Feedback], size: int) -> list[list[Feedback]]:
    return [events[i : i + size] for i in range(0, len(events), size)]


def _to_pb(ev: Feedback) -> feedback_pb2.Feedback:
    fb = feedback_pb2.Feedback(event_id=ev.event_id, response_id=ev.response_id)
    fb.user_id = ev.user_id
    if ev.kind == FeedbackKind.THUMB:
        fb.thumb = feedback_pb2.THUMB_UP if ev.value > 0 else feedback_pb2.THUMB_DOWN
    elif ev.kind == FeedbackKind.RATING:
        fb.rating = int(ev.value)
    elif ev.kind == FeedbackKind.DWELL:
        fb.dwell_ms = int(ev.value)
    elif ev.kind in (FeedbackKind.COMMENT, FeedbackKind.CORRECTION):
        setattr(fb, str(ev.kind), ev.text)
    else:
        getattr(fb, str(ev.kind)).SetInParent()  # click, copy, regenerate: an Empty
    return fb


def _parallel(work, batches: list, clients: int) -> tuple[float, list]:
    """Run `work(batch)` over the batches from `clients` threads, client c taking batches
    c, c + clients, …; started together. (wall seconds, every result)."""
    results: list = [None] * len(batches)
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        start.wait()
        try:
            for i in range(c, len(batches), clients):
                results[i] = work(batches[i])
        except Exception as exc:  # noqa: BLE001 - raised in the caller's thread below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    if errors:
        raise errors[0]
    return seconds, results


def _raw(buffer: ReplayBuffer, batches: list[list[Feedback]], clients: int) -> dict:
    """append_feedback from `clients` threads: the backend's own limit."""
    seconds, results = _parallel(buffer.append_feedback, batches, clients)
    accepted = sum(r.accepted for r in results)
    events = sum(len(b) for b in batches)
    return {"events_per_s": events / seconds, "seconds": seconds, "accepted": accepted}


def _send(target: str, key: str, rpc: str, batches: list[list[Feedback]], clients: int) -> dict:
    """Each batch one call of `rpc` ("stream": a message per event; "batches": one
    FeedbackBatch message), `clients` calls in flight: events/s and each call's ack
    latency. The clients share this machine's CPUs with the server, so they cost it as
    little as they can: messages serialised before the clock starts, asyncio (about half
    the CPU per message of blocking stubs in threads)."""
    if rpc == "stream":
        wire = [[_to_pb(ev).SerializeToString() for ev in batch] for batch in batches]
    else:
        wire = [
            [feedback_pb2.FeedbackBatch(events=[_to_pb(ev) for ev in batch]).SerializeToString()]
            for batch in batches
        ]
    metadata = (("authorization", f"Bearer {key}"),)

    async def main() -> tuple[float, list[tuple[int, float]]]:
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.stream_unary(METHODS[rpc], None, feedback_pb2.FeedbackAck.FromString)

            async def one(messages: list[bytes], events: int) -> tuple[int, float]:
                sent = time.perf_counter()
                ack = await call(iter(messages), metadata=metadata, timeout=120)
                if ack.accepted + ack.duplicates != events:
                    got = f"{ack.accepted} accepted + {ack.duplicates} duplicates"
                    raise RuntimeError(f"an ack counted {got} of {events} events")
                return ack.accepted, (time.perf_counter() - sent) * 1e3

            async def client(c: int) -> list[tuple[int, float]]:
                calls = range(c, len(wire), clients)
                return [await one(wire[i], len(batches[i])) for i in calls]

            began = time.perf_counter()
            results = await asyncio.gather(*(client(c) for c in range(clients)))
            return time.perf_counter() - began, [r for rs in results for r in rs]

    seconds, results = asyncio.run(main())
    accepted = sum(a for a, _ in results)
    events = sum(len(b) for b in batches)
    return {
        "events_per_s": events / seconds,
        "seconds": seconds,
        "accepted": accepted,
        "ack_ms": [ms for _, ms in results],
    }
