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

from kaizen.auth import local_key
from kaizen.client import connect
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


MARK = ".kaizen-demo"


def fresh_dir(data: Path) -> Path:
    """`data`, emptied: only a directory the demo made itself (it holds MARK) or an empty
    one is wiped, never a directory of someone else's."""
    if data.exists() and any(data.iterdir()) and not (data / MARK).exists():
        raise ValueError(f"--data: {data} is not empty and was not made by kaizen demo")
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    (data / MARK).touch()
    return data


def learner_metrics(port: int) -> dict[str, float]:
    """The learner's /metrics as {sample name with its labels: value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def learner_waits(port: int, sent: int) -> str:
    """Why the learner, having read all `sent` feedback events, publishes nothing more
    without more feedback; empty while it is still reading, training or publishing."""
    try:
        m = learner_metrics(port)
    except OSError:
        return ""  # not listening yet
    read = sum(v for k, v in m.items() if k.startswith("kaizen_learner_samples_total"))
    if read < sent or m.get("kaizen_learner_pending_examples", 0) > 0:
        return ""
    trained = int(m.get("kaizen_learner_examples_since_publish{kind=trained}", 0))
    held = int(m.get("kaizen_learner_examples_since_publish{kind=held_out}", 0))
    every = int(m.get("kaizen_learner_publish_every", 0))
    if trained + held == 0:
        return ""  # nothing read since its last version: that one is on its way to serving
    if trained and trained + held >= every:
        return ""  # a version is due: it is publishing
    return f"the learner has {trained} trained + {held} held out of --publish-every {every}"


def run_demo(
    model: Path,
    rounds: int = 2,
    publish_every: int = 8,
    users_per_round: int = 8,
    data: Path = DATA,
    patience_s: float = 600.0,
) -> int:
    """Run the loop until the server has served `rounds` new versions. Users keep coming
    while the learner waits for feedback: the demo never waits on feedback it will not
    send. It gives up only when nothing at all moves for `patience_s`."""
    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"--model: {model} is not prepared; run `kaizen model prepare`")
    for name, value in (("--rounds", rounds), ("--publish-every", publish_every)):
        if value < 1:
            raise ValueError(f"{name}: must be at least 1, got {value}")
    if users_per_round < 1:
        raise ValueError(f"--users-per-round: must be at least 1, got {users_per_round}")
    data = fresh_dir(Path(data))
    keys, key = local_key(data / "auth")  # auth on, as deployed: one key, every scope
    port, learner_port = free_port(), free_port()
    common = ["--model", str(model), "--buffer", f"sqlite:///{data}/buffer.db"]
    common += ["--registry", str(data / "registry")]
    print(f"kaizen demo: data in {data}/, logs in {data}/serve.log and {data}/learn.log")
    server = start_kaizen(
        [
            "serve",
            *common,
            *("--auth-keys", str(keys)),
            *("--port", str(port), "--metrics-port", str(free_port())),
            *("--canary-share", "0"),  # the demo shows each version taking over at once
        ],
        data / "serve.log",
    )
    learner = start_kaizen(
        [
            "learn",
            *common,
            *("--objective", "reinforce"),  # thumbs up and down, both ways
            *("--publish-every", str(publish_every), "--batch-size", str(publish_every)),
            *("--metrics-port", str(learner_port)),
        ],
        data / "learn.log",
    )
    registry = Registry(data / "registry")
    started = time.monotonic()
    try:
        with connect(f"127.0.0.1:{port}", key) as channel:
            wait_serving(channel, server, data / "serve.log")
            users = Users(channel)
            print(f"server ready in {time.monotonic() - started:.0f} s, serving {users.serving()}")
            for _ in range(rounds):
                before, seen = users.serving(), registry.latest()
                n = users.turn // users_per_round + 1
                print(f"\nround {n}: {users_per_round} users ask, read, and rate")
                users.round(users_per_round)
                print("waiting for the learner to publish a version and the server to serve it …")
                moved = time.monotonic()
                while (now := users.serving()) == before:
                    for proc, name in ((learner, "learn"), (server, "serve")):
                        if proc.poll() is not None:
                            tail = (data / f"{name}.log").read_text()[-3000:]
                            raise RuntimeError(f"kaizen {name} exited:\n{tail}")
                    newest = registry.latest()
                    why = ""
                    if newest != seen and registry.rejected(newest):
                        why = f"{newest} was rejected ({registry.rejected(newest)})"
                        seen = newest
                    elif newest == seen:
                        why = learner_waits(learner_port, users.turn)
                    if why:
                        print(f"{why}: {users_per_round} more users")
                        users.round(users_per_round)
                        moved = time.monotonic()
                    elif time.monotonic() - moved > patience_s:
                        raise RuntimeError(
                            f"nothing moved in {patience_s:.0f} s; see {data}/learn.log and "
                            f"{data}/serve.log"
                        )
                    time.sleep(0.5)
                print(f"the server now serves {now}")
            print(f"\nfinal round: answers from {users.serving()}")
            users.round(users_per_round)
        _summary(registry)
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
    print("  version  parent  trained  held out  mean reward  steps  cursor")
    for version in registry.versions():
        m = registry.manifest(version)
        meta = m.metadata
        mean = meta.get("window_mean_reward")
        mean_text = f"{mean:+.2f}" if isinstance(mean, float) else "  n/a"
        rejected = "  rejected" if registry.rejected(version) else ""
        print(
            f"  {version:>7}  {m.parent:>6}  {meta.get('window_examples', 0):7d}  "
            f"{meta.get('window_held_out', 0):8d}  {mean_text:>11}  {meta.get('steps', 0):5d}  "
            f"{meta.get('cursor', 0):6d}{rejected}"
        )
