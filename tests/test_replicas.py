"""Server replicas with one rollout authority: three `kaizen serve` processes share a
buffer and a registry; one holds the rollout lease and decides, every one follows the
registry; killing the authority mid-canary hands its test to another, which goes on
from the pooled evidence in the buffer without a second decision."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import grpc

from kaizen.auth import local_key
from kaizen.client import connect
from kaizen.registry import PROMOTED, Registry
from kaizen.v1 import chat_pb2_grpc, feedback_pb2, feedback_pb2_grpc, model_pb2, model_pb2_grpc
from tests.conftest import ask, free_port, publish_random_adapter, wait_until
from tests.test_e2e import kaizen, wait_http

POLL_S = 0.1  # --poll-registry-s
LEASE_S = 2.0  # --rollout-lease-s
USERS = [f"user-{i}" for i in range(48)]


class Replica:
    def __init__(self, tmp_path: Path, i: int, common: list[str], key: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.log = tmp_path / f"serve-{i}.log"
        self.proc = kaizen(
            "serve",
            *common,
            *("--port", str(self.port), "--metrics-port", str(self.metrics_port)),
            log=self.log,
        )
        self.key = key
        self.channel: grpc.Channel | None = None

    def connect(self) -> None:
        wait_http(f"http://127.0.0.1:{self.metrics_port}/metrics", 120, self.proc, self.log)
        self.channel = connect(f"127.0.0.1:{self.port}", self.key)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.chat = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.feedback = feedback_pb2_grpc.FeedbackServiceStub(self.channel)
        self.model = model_pb2_grpc.ModelServiceStub(self.channel)

    def states(self) -> dict[str, str]:
        listed = self.model.ListVersions(model_pb2.ListVersionsRequest()).versions
        return {v.version: v.state for v in listed}

    def authority(self) -> bool:
        metrics = wait_http(
            f"http://127.0.0.1:{self.metrics_port}/metrics", 10, self.proc, self.log
        )
        return "kaizen_rollout_authority 1.0" in metrics

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def lease_holder_pid(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT holder FROM leases WHERE name = 'rollout'").fetchone()
    return int(row[0].split(":")[1]) if row else 0


def thumbs(replicas, answers: dict[str, object], up, rng: random.Random) -> None:
    """Each user's thumb on their answer, sent to a replica at random."""
    for user, a in answers.items():
        rng.choice(replicas).feedback.SubmitFeedback(
            feedback_pb2.Feedback(
                event_id=f"e-{a.response_id}",
                response_id=a.response_id,
                user_id=user,
                thumb=feedback_pb2.THUMB_UP if up(a) else feedback_pb2.THUMB_DOWN,
            )
        )


def test_three_replicas_one_authority_one_decision_and_a_takeover_after_kill_9(
    tiny_model, tmp_path
):
    db, registry_dir = tmp_path / "buffer.db", tmp_path / "registry"
    keys, key = local_key(tmp_path / "auth")
    common = [
        *("--model", str(tiny_model), "--buffer", f"sqlite:///{db}"),
        *("--registry", str(registry_dir), "--auth-keys", str(keys), "--dtype", "fp32"),
        *("--poll-registry-s", str(POLL_S), "--rollout-lease-s", str(LEASE_S)),
        *("--canary-share", "0.5", "--canary-max-share", "0.5"),
        # each user's first rated answer is their observation; promote what 12 users a
        # side cannot show to be worse by a whole reward point
        *("--canary-user-answers", "1", "--canary-min-feedback", "12"),
        *("--canary-margin", "1.0", "--guard-evals", "none"),
        *("--default-max-new-tokens", "4", "--user-requests-per-min", "1000000"),
        *("--user-feedback-per-min", "1000000"),
    ]
    replicas = [Replica(tmp_path, i, common, key) for i in range(3)]
    rng = random.Random(0)
    try:
        for r in replicas:
            r.connect()
        wait_until(lambda: sum(r.authority() for r in replicas) == 1, what="one authority")
        leader = next(r for r in replicas if r.authority())
        assert lease_holder_pid(db) == leader.proc.pid

        registry = Registry(registry_dir)
        v1 = publish_random_adapter(registry, tiny_model, seed=1)
        published = time.monotonic()
        wait_until(
            lambda: all(r.states().get(v1) == "canary" for r in replicas),
            what="every replica routing to the canary",
        )
        print(f"every replica canaries {v1} {time.monotonic() - published:.2f} s after publish")

        def answers_from(some) -> dict[str, object]:
            """Each user asks a replica at random; their version is the same on every one."""
            out = {}
            for i, user in enumerate(USERS):
                if i % 4 == 0:  # a quarter of them asks every replica: the same version
                    versions = {
                        r.chat.Generate(ask(user_id=user, seed=i + 1)).model_version for r in some
                    }
                    assert len(versions) == 1, (user, versions)
                out[user] = rng.choice(some).chat.Generate(ask(user_id=user, seed=i + 100))
            return out

        answers = answers_from(replicas)
        assert {a.model_version for a in answers.values()} == {"v0", v1}
        # feedback on a third of the users, through every replica: not enough to decide
        first = dict(list(answers.items())[: len(USERS) // 3])
        thumbs(replicas, first, up=lambda a: True, rng=rng)
        wait_until(lambda: leader_counted(leader, len(first)), what="the pooled evidence")
        assert registry.rollout(v1) is None
        follower = next(r for r in replicas if r is not leader)  # shows the authority's figures
        wait_until(
            lambda: canary_events(follower, v1) >= len(first), what="the evidence on a follower"
        )

        leader.proc.send_signal(signal.SIGKILL)  # the authority dies mid-canary
        leader.proc.wait(timeout=10)
        killed = time.monotonic()
        survivors = [r for r in replicas if r is not leader]
        wait_until(
            lambda: sum(r.authority() for r in survivors) == 1,
            timeout_s=LEASE_S + 30,
            what="another replica taking the rollout lease",
        )
        took = time.monotonic() - killed
        print(f"a new authority {took:.2f} s after kill -9 (lease {LEASE_S} s)")
        heir = next(r for r in survivors if r.authority())
        assert lease_holder_pid(db) == heir.proc.pid
        assert all(r.states().get(v1) == "canary" for r in survivors)  # still under test
        # the heir reads the events sent before the kill again, from the buffer
        wait_until(lambda: leader_counted(heir, len(first)), what="the heir's evidence")

        rest = dict(list(answers.items())[len(USERS) // 3 :])
        thumbs(survivors, rest, up=lambda a: True, rng=rng)
        wait_until(lambda: registry.rollout(v1) is not None, what="the decision")
        decided = registry.rollout(v1)
        assert decided["state"] == PROMOTED and decided["by"] == "test"
        evidence = decided["evidence"]
        assert int(evidence["authority"].split(":")[1]) == heir.proc.pid
        counted = sum(arm["events"] for arm in evidence["arms"].values())
        assert len(first) < counted <= len(USERS), evidence  # it decided on all it had
        wait_until(
            lambda: all(r.states().get(v1) == "serving" for r in survivors),
            what="every replica serving the promoted version",
        )
        assert {a.model_version for a in answers_from(survivors).values()} == {v1}
        time.sleep(5 * POLL_S)
        assert registry.rollout(v1) == decided  # one decision, never rewritten

        # an operator's word, sent to a replica that is not the authority, holds on all
        v2 = publish_random_adapter(registry, tiny_model, seed=2)
        wait_until(lambda: all(r.states().get(v2) == "canary" for r in survivors), what="v2")
        follower = next(r for r in survivors if r is not heir)
        follower.model.Rollback(model_pb2.RollbackRequest(version=v2, reason="not today"))
        wait_until(
            lambda: all(r.states().get(v2) == "rolled_back" for r in survivors),
            what="every replica dropping the canary an operator rolled back",
        )
        record = registry.rollout(v2)
        assert (record["state"], record["by"], record["reason"]) == (
            "rolled_back",
            "operator",
            "not today",
        )
        assert {a.model_version for a in answers_from(survivors).values()} == {v1}
    finally:
        for r in replicas:
            r.stop()


def canary_events(replica: Replica, version: str) -> int:
    """Rewarded events in the canary's evidence as `replica`'s ListVersions shows it."""
    listed = replica.model.ListVersions(model_pb2.ListVersionsRequest()).versions
    info = next(v for v in listed if v.version == version)
    evidence = json.loads(info.evidence_json or "{}").get("canary", {})
    return sum(arm["events"] for arm in evidence.get("arms", {}).values())


def leader_counted(leader: Replica, events: int) -> bool:
    metrics = wait_http(
        f"http://127.0.0.1:{leader.metrics_port}/metrics", 10, leader.proc, leader.log
    )
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("kaizen_canary_feedback_events_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total >= events
