"""`kaizen demo`: the whole loop once, on this machine, with simulated users.

Starts `kaizen serve` and `kaizen learn` as separate processes on a fresh buffer and
registry under kaizen-data/demo/, plays users who like short answers (thumbs up for 25
words or fewer, down otherwise) over real gRPC, and waits for the learner to publish new
versions and the server to serve them. Prints every answer's version and reward, then
what each published version saw.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kaizen.registry import Registry
from kaizen.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)

PROMPTS = [
    "What is the capital of France?",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Give me a tip for learning Python.",
    "What is a prime number?",
    "How far is the Moon?",
    "What does a CPU do?",
    "Name a good book for a long train ride.",
    "How do plants make food?",
    "What is the difference between weather and climate?",
    "How can I sleep better?",
    "What is gravity?",
]
LIKED_MAX_WORDS = 25
DATA = Path("kaizen-data/demo")


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_kaizen(args: list[str], log: Path) -> subprocess.Popen:
    """Run `kaizen ARGS…` as a subprocess of this Python, its output going to `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "kaizen.cli", *args], stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def wait_serving(channel: grpc.Channel, server: subprocess.Popen, log: Path) -> None:
    """Block until `server` answers health checks with SERVING; raise if it exits first."""
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"kaizen serve exited:\n{log.read_text()[-3000:]}")
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise RuntimeError("kaizen serve did not become healthy in 300 s")


class Users:
    """Simulated users who like short answers."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.chat = chat_pb2_grpc.ChatServiceStub(channel)
        self.feedback = feedback_pb2_grpc.FeedbackServiceStub(channel)
        self.model = model_pb2_grpc.ModelServiceStub(channel)
        self.turn = 0

    def one(self, i: int) -> tuple[str, int, int, str]:
        prompt = PROMPTS[i % len(PROMPTS)]
        user = f"user-{i % 5}"
        reply = self.chat.Generate(
            chat_pb2.GenerateRequest(
                messages=[chat_pb2.Message(role="user", content=prompt)],
                sampling=chat_pb2.SamplingParams(max_new_tokens=48, temperature=0.8, seed=i + 1),
                user_id=user,
            )
        )
        words = len(reply.text.split())
        liked = words <= LIKED_MAX_WORDS
        self.feedback.SubmitFeedback(
            feedback_pb2.Feedback(
                event_id=str(uuid.uuid4()),
                response_id=reply.response_id,
                user_id=user,
                thumb=feedback_pb2.THUMB_UP if liked else feedback_pb2.THUMB_DOWN,
            )
        )
        return reply.model_version, words, 1 if liked else -1, prompt

    def round(self, n: int) -> list[tuple[str, int, int, str]]:
        start, self.turn = self.turn, self.turn + n
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(self.one, range(start, start + n)))
        for version, words, r, prompt in results:
            print(f"  {version:>4}  reward {r:+d}  {words:3d} words  {prompt}")
        return results

    def serving(self) -> str:
        return self.model.GetModelInfo(model_pb2.GetModelInfoRequest()).versions[0].version


def run_demo(model: Path, rounds: int = 2, publish_every: int = 8) -> int:
    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"--model: {model} is not prepared; run `kaizen model prepare`")
    shutil.rmtree(DATA, ignore_errors=True)
    DATA.mkdir(parents=True)
    port = free_port()
    common = [
        "--model",
        str(model),
        "--buffer",
        f"sqlite:///{DATA}/buffer.db",
        "--registry",
        str(DATA / "registry"),
    ]
    print(f"kaizen demo: data in {DATA}/, logs in {DATA}/serve.log and {DATA}/learn.log")
    server = start_kaizen(
        [
            "serve",
            *common,
            *("--port", str(port), "--metrics-port", str(free_port())),
            *("--canary-share", "0"),  # the demo shows each version taking over at once
        ],
        DATA / "serve.log",
    )
    learner = start_kaizen(
        [
            "learn",
            *common,
            "--objective",
            "reinforce",  # thumbs up and down, both ways
            "--publish-every",
            str(publish_every),
            "--batch-size",
            str(publish_every),
            "--metrics-port",
            "-1",
        ],
        DATA / "learn.log",
    )
    started = time.monotonic()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, server, DATA / "serve.log")
            users = Users(channel)
            print(f"server ready in {time.monotonic() - started:.0f} s, serving {users.serving()}")
            for target in range(1, rounds + 1):
                print(f"\nround {target}: {publish_every} users ask, read, and rate")
                users.round(publish_every)
                wanted = f"v{target}"
                print(f"waiting for the learner to publish {wanted} and the server to serve it …")
                deadline = time.monotonic() + 600
                while users.serving() != wanted:
                    if learner.poll() is not None:
                        raise RuntimeError(
                            f"kaizen learn exited:\n{(DATA / 'learn.log').read_text()[-3000:]}"
                        )
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{wanted} was not served within 600 s")
                    time.sleep(0.5)
                print(f"the server now serves {wanted}")
            print(f"\nfinal round: answers from {users.serving()}")
            users.round(publish_every)
        _summary(Registry(DATA / "registry"))
        print(f"\ndone in {time.monotonic() - started:.0f} s")
        return 0
    finally:
        for proc in (learner, server):
            proc.terminate()
        for proc in (learner, server):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _summary(registry: Registry) -> None:
    print("\nversions published by the learner:")
    print("  version  parent  samples  mean reward  steps  cursor")
    for version in registry.versions():
        m = registry.manifest(version)
        meta = m.metadata
        mean = meta.get("window_mean_reward")
        mean_text = f"{mean:+.2f}" if isinstance(mean, float) else "  n/a"
        print(
            f"  {version:>7}  {m.parent:>6}  {meta.get('window_examples', 0):7d}  "
            f"{mean_text:>11}  {meta.get('steps', 0):5d}  {meta.get('cursor', 0):6d}"
        )
