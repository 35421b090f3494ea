"""The load both benchmarks drive: a real `kaizen serve` subprocess and C client threads.

`kaizen_server` starts the server on a fresh buffer and registry in a temporary
directory and stops it with SIGTERM; `run_load` sends N streamed chat requests, at most
C at a time, each asking for exactly T tokens (`ignore_eos`), and records when each
chunk arrived; `run_long_prompt` sends one long prompt while C-1 others decode.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from kaizen.auth import local_key
from kaizen.client import connect
from kaizen.sim.demo import free_port, start_kaizen, wait_serving
from kaizen.v1 import chat_pb2, chat_pb2_grpc

# Short, varied questions: prompts of different lengths exercise the left padding.
PROMPTS = [
    "What is the capital of France?",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Give me one tip for learning Python.",
    "What is a prime number?",
    "How far away is the Moon?",
    "What does a CPU do?",
    "Suggest a book for a long train ride.",
    "How do plants make their food?",
    "What is the difference between weather and climate?",
    "How can I sleep better at night?",
    "Explain gravity to a ten-year-old.",
    "Write a haiku about autumn leaves.",
    "What should I pack for a weekend of hiking in the mountains?",
    "Why do cats purr?",
    "How does a bicycle stay upright when it moves?",
]
TEMPERATURE = 0.7
TOP_P = 1.0
REQUEST_TIMEOUT_S = 600.0  # a request still unanswered after this counts as failed


def say(message: str) -> None:
    """Progress goes to stderr: stdout carries only the result."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class ServerProcess:
    """A `kaizen serve` subprocess and a channel to it."""

    process: subprocess.Popen
    channel: grpc.Channel
    workdir: Path
    exit_code: int | None = None  # set once stopped

    @property
    def registry_dir(self) -> Path:
        return self.workdir / "registry"

    @property
    def buffer_url(self) -> str:
        return f"sqlite:///{self.workdir / 'buffer.db'}"

    @property
    def log(self) -> Path:
        return self.workdir / "serve.log"


@contextmanager
def kaizen_server(
    model: Path,
    workdir: Path,
    max_batch: int,
    new_tokens: int,
    dtype: str,
    extra: Sequence[str] = (),
) -> Iterator[ServerProcess]:
    """Start `kaizen serve` in `workdir` (absolute), wait for SERVING; SIGTERM it on exit.
    `extra` flags come last, so they override the defaults here."""
    port = free_port()
    keys, key = local_key(workdir / "auth")  # auth on, as deployed
    args = [
        "serve",
        "--auth-keys",
        str(keys),
        "--model",
        str(model),
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--registry",
        str(workdir / "registry"),  # ServerProcess.registry_dir
        "--buffer",
        f"sqlite:///{workdir / 'buffer.db'}",  # ServerProcess.buffer_url
        "--max-batch",
        str(max_batch),
        "--canary-share",
        "0",  # every published version serves everyone at once: these measure the engine
        "--max-new-tokens-cap",
        str(max(512, new_tokens)),
        "--dtype",
        dtype,
        # a benchmark's few simulated users send far more than people would
        *("--user-requests-per-min", "1e9", "--user-feedback-per-min", "1e9"),
        *("--key-requests-per-min", "1e9", "--key-feedback-per-min", "1e9"),
        *extra,
    ]
    process = start_kaizen(args, workdir / "serve.log")
    server = ServerProcess(process, connect(f"127.0.0.1:{port}", key), workdir)
    finished = False
    try:
        started = time.monotonic()
        wait_serving(server.channel, process, server.log)
        say(f"server ready in {time.monotonic() - started:.1f} s")
        yield server
        finished = True
    finally:
        server.channel.close()
        process.terminate()  # SIGTERM: finish what is in flight, then exit
        try:
            server.exit_code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            server.exit_code = process.wait()
        if server.exit_code != 0 or not finished:  # the log goes with the temporary directory
            say(f"kaizen serve exited with {server.exit_code}; the end of its log:")
            say(server.log.read_text()[-3000:])


@dataclass(frozen=True)
class RequestRecord:
    """What one streamed request saw. Times are time.perf_counter() seconds."""

    submitted_s: float
    text_chunk_s: tuple[float, ...]  # arrival of each chunk that carried text
    finished_s: float  # the final chunk, or the error
    completion_tokens: int  # from the final chunk; 0 when the request failed
    model_version: str
    response_id: str
    error: str = ""  # gRPC status code name; "" when the request succeeded
    prompt_tokens: int = 0  # as the server counted them, from the final chunk

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def ttft_s(self) -> float | None:
        return self.text_chunk_s[0] - self.submitted_s if self.text_chunk_s else None

    @property
    def itl_s(self) -> list[float]:
        chunks = self.text_chunk_s
        return [b - a for a, b in zip(chunks, chunks[1:], strict=False)]

    @property
    def latency_s(self) -> float:
        return self.finished_s - self.submitted_s


@dataclass(frozen=True)
class LoadResult:
    records: list[RequestRecord]

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ok]

    @property
    def errors(self) -> dict[str, int]:
        """Failed requests by gRPC status code."""
        return dict(Counter(r.error for r in self.records if not r.ok))

    @property
    def wall_s(self) -> float:
        """From the first submit to the last completion."""
        return max(r.finished_s for r in self.records) - min(r.submitted_s for r in self.records)

    @property
    def tokens_per_s(self) -> float:
        return sum(r.completion_tokens for r in self.ok) / self.wall_s

    def latency_ms(self) -> dict[str, float | None]:
        """p50 and p99 of time to first token, inter-token latency and request latency."""
        ok = self.ok
        series = {
            "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
            "itl": [gap for r in ok for gap in r.itl_s],
            "latency": [r.latency_s for r in ok],
        }
        figures: dict[str, float | None] = {}
        for name, values in series.items():
            for q in (50, 99):
                value = percentile(values, q)
                figures[f"{name}_p{q}_ms"] = None if value is None else round(value * 1e3, 1)
        return figures


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile, linearly interpolated (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def chat_request(content: str, new_tokens: int, seed: int) -> chat_pb2.GenerateRequest:
    return chat_pb2.GenerateRequest(
        messages=[chat_pb2.Message(role="user", content=content)],
        sampling=chat_pb2.SamplingParams(
            max_new_tokens=new_tokens,
            temperature=TEMPERATURE,
            top_p=TOP_P,
            seed=seed,
            ignore_eos=True,
        ),
        user_id="bench",
        request_id=f"bench-{seed}",
    )


def stream_one(
    stub: chat_pb2_grpc.ChatServiceStub,
    request: chat_pb2.GenerateRequest,
    on_text: Callable[[int], None] | None = None,
) -> RequestRecord:
    """Stream one request; `on_text(n)` is called as its n-th text chunk arrives."""
    chunks: list[float] = []
    final = None
    error = ""
    submitted = time.perf_counter()
    try:
        for chunk in stub.GenerateStream(request, timeout=REQUEST_TIMEOUT_S):
            now = time.perf_counter()
            if chunk.text_delta:
                chunks.append(now)
                if on_text is not None:
                    on_text(len(chunks))
            if chunk.done:
                final = chunk
        if final is None:
            error = "NO_FINAL_CHUNK"  # the stream ended without its response fields
    except grpc.RpcError as exc:
        error = exc.code().name
    finished = time.perf_counter()
    return RequestRecord(
        submitted_s=submitted,
        text_chunk_s=tuple(chunks),
        finished_s=finished,
        completion_tokens=final.completion_tokens if final is not None else 0,
        model_version=final.model_version if final is not None else "",
        response_id=final.response_id if final is not None else "",
        error=error,
        prompt_tokens=final.prompt_tokens if final is not None else 0,
    )


def run_load(
    channel: grpc.Channel,
    requests: int,
    concurrency: int,
    new_tokens: int,
    first_seed: int,
    progress: bool = True,
) -> LoadResult:
    """Stream `requests` requests, `concurrency` at a time; request i has seed first_seed + i."""
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    done = 0
    lock = threading.Lock()

    def one(i: int) -> RequestRecord:
        nonlocal done
        request = chat_request(PROMPTS[i % len(PROMPTS)], new_tokens, first_seed + i)
        record = stream_one(stub, request)
        with lock:
            done += 1
            if progress and (done % max(1, requests // 4) == 0 or not record.ok):
                status = f"failed: {record.error}" if not record.ok else "ok"
                elapsed_s = time.perf_counter() - started
                say(f"  {done}/{requests} requests done in {elapsed_s:.1f} s (last {status})")
        return record

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency, thread_name_prefix="bench-client") as pool:
        records = list(pool.map(one, range(requests)))
    return LoadResult(records)


def warm_up(channel: grpc.Channel, new_tokens: int, concurrency: int) -> None:
    """A couple of requests through the whole path (and one batch of two) before measuring."""
    result = run_load(channel, 2, min(2, concurrency), new_tokens, first_seed=10**9, progress=False)
    if result.errors:
        raise RuntimeError(f"warm-up requests failed: {result.errors}")


@dataclass(frozen=True)
class LongPromptResult:
    """`concurrency - 1` streams, and one long prompt sent once they were all decoding."""

    others: list[RequestRecord]
    long: RequestRecord

    def others_itl_s(self) -> list[float]:
        """The other streams' inter-token gaps that overlap the long request's life (sent
        to last chunk): what its prefill and decode can delay, whatever the count of
        tokens each stream asked for."""
        start, end = self.long.submitted_s, self.long.finished_s
        return [
            b - a
            for r in self.others
            if r.ok
            for a, b in zip(r.text_chunk_s, r.text_chunk_s[1:], strict=False)
            if b > start and a < end
        ]


DECODING_AFTER_CHUNKS = 3  # a stream that has streamed this many text chunks is decoding


def run_long_prompt(
    channel: grpc.Channel,
    concurrency: int,
    new_tokens: int,
    long_content: str,
    long_new_tokens: int,
    first_seed: int,
) -> LongPromptResult:
    """Start `concurrency - 1` streams of `new_tokens` tokens; once each has streamed a few
    text chunks (or ended), send one request whose user message is `long_content`."""
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    streams = concurrency - 1
    decoding = threading.Semaphore(0)
    gate = min(DECODING_AFTER_CHUNKS, new_tokens)

    def on_text(chunks: int) -> None:
        if chunks == gate:
            decoding.release()

    def one(i: int) -> RequestRecord:
        request = chat_request(PROMPTS[i % len(PROMPTS)], new_tokens, first_seed + i)
        record = stream_one(stub, request, on_text)
        if len(record.text_chunk_s) < gate:  # ended (or failed) before decoding: do not block
            decoding.release()
        return record

    with ThreadPoolExecutor(max(1, streams), thread_name_prefix="bench-client") as pool:
        futures = [pool.submit(one, i) for i in range(streams)]
        for _ in range(streams):
            if not decoding.acquire(timeout=REQUEST_TIMEOUT_S):
                raise RuntimeError("the streams did not start decoding before the long prompt")
        long = stream_one(stub, chat_request(long_content, long_new_tokens, first_seed + streams))
        others = [f.result() for f in futures]
    return LongPromptResult(others, long)
