"""The whole loop with `kaizen serve` and `kaizen learn` as separate processes, driven by a
client built only from proto/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kaizen import protogen
from kaizen.auth import local_key
from tests.conftest import free_port
from tests.redis_server import redis_server_fixture  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def build_client_stubs(out: Path) -> Path:
    """What a third party does: protoc on the .proto files alone, flat, no kaizen package."""
    out.mkdir()
    protogen.generate(out, proto_dir=ROOT / "proto" / "kaizen" / "v1")
    assert not (out / "kaizen").exists()
    return out


def kaizen(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kaizen.cli", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited early:\n{log.read_text()}")
        try:
            return urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{url} did not answer:\n{log.read_text()}")


@pytest.fixture(params=["sqlite", "redis"])
def buffer_url(request, tmp_path) -> str:
    """The whole loop on each buffer backend: SQLite, and Redis Streams (a real
    redis-server; skipped with a reason where it is not installed)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/buffer.db"
    return request.getfixturevalue("redis_server").url


def test_serve_and_learn_as_processes_with_an_independent_client(tiny_model, tmp_path, buffer_url):
    port, metrics_port, learner_port = free_port(), free_port(), free_port()
    common = [
        "--model",
        str(tiny_model),
        "--buffer",
        buffer_url,
        "--registry",
        str(tmp_path / "registry"),
    ]
    serve_log, learn_log = tmp_path / "serve.log", tmp_path / "learn.log"
    keys, key = local_key(tmp_path / "auth")
    server = kaizen(
        "serve",
        *common,
        *("--auth-keys", str(keys)),
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--poll-registry-s",
        "0.1",
        *("--canary-share", "0"),
        log=serve_log,
    )
    learner = kaizen(
        "learn",
        *common,
        "--objective",
        "reinforce",  # the client sends thumbs both ways
        "--publish-every",
        "4",
        "--batch-size",
        "4",
        "--batch-wait-s",
        "0.5",
        "--poll-s",
        "0.1",
        "--metrics-port",
        str(learner_port),
        log=learn_log,
    )
    try:
        wait_http(f"http://127.0.0.1:{metrics_port}/metrics", 90, server, serve_log)
        stubs = build_client_stubs(tmp_path / "client_stubs")
        client = subprocess.run(
            [
                sys.executable,
                str(ROOT / "tests" / "independent_client.py"),
                str(stubs),
                f"127.0.0.1:{port}",
                "120",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=tmp_path,
            env={**os.environ, "KAIZEN_API_KEY": key},  # never on the command line
        )
        assert client.returncode == 0, client.stderr
        seen = json.loads(client.stdout)
        assert seen["before"][0] == "v0"  # an answer from the base model
        assert all(a == 1 for a in seen["acks"])  # every feedback event accepted
        assert seen["versions"][-1] != "v0", (serve_log.read_text(), learn_log.read_text())
        assert seen["after"] == seen["versions"][-1]  # a later answer carries the new version
        assert (tmp_path / "registry" / "v000001" / "manifest.json").is_file()
        served = wait_http(f"http://127.0.0.1:{metrics_port}/metrics", 10, server, serve_log)
        assert 'kaizen_weight_swaps_total{result="ok"}' in served
        learned = wait_http(f"http://127.0.0.1:{learner_port}/metrics", 10, learner, learn_log)
        assert "kaizen_learner_versions_published_total" in learned
        argv = " ".join(
            Path(f"/proc/{p.pid}/cmdline").read_bytes().decode().replace("\0", " ")
            for p in (server, learner)
        )
        secret = key.split("_", 2)[2]
        for where, text in (("ps", argv), ("/metrics", served + learned)):
            assert secret not in text, f"the API key shows in {where}"
    finally:
        for proc in (learner, server):
            proc.terminate()
        for proc in (learner, server):
            proc.wait(timeout=30)
    assert server.returncode == 0, serve_log.read_text()
    assert learner.returncode == 0, learn_log.read_text()
    for log in (serve_log, learn_log):
        assert key.split("_", 2)[2] not in log.read_text(), f"the API key shows in {log.name}"
    if buffer_url.startswith("redis"):
        # the learner read through its consumer group and acknowledged what its newest
        # accepted version covers; whatever is still pending came after that cursor
        import redis

        from kaizen.registry import Registry

        registry = Registry(tmp_path / "registry")
        cursor = int(registry.manifest(registry.latest_accepted()).metadata["cursor"])
        raw = redis.Redis.from_url(buffer_url, decode_responses=True)
        [group] = raw.xinfo_groups("kaizen:feedback")
        pending = raw.xpending_range("kaizen:feedback", "learner", "-", "+", 1000)
        raw.close()
        assert group["name"] == "learner" and cursor > 0
        assert all(int(p["message_id"].removeprefix("0-")) > cursor for p in pending)
