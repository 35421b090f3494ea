"""A real redis-server for the tests: a free loopback port, its own data directory,
append-only with an fsync per write. A test module imports `redis_server_fixture` and its
tests ask for `redis_server`; it skips with a reason where redis-server is not installed."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from kaizen.sim.demo import free_port

REDIS_SERVER = shutil.which("redis-server")
DURABLE = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")


@dataclass
class RedisServer:
    """One redis-server process; stop, kill and start it again on the same port and data."""

    dir: Path
    args: tuple[str, ...] = DURABLE  # settings after port, bind and dir
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, ready_s: float = 20.0) -> None:
        """Start it and wait until it answers PING."""
        self.dir.mkdir(parents=True, exist_ok=True)
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"), *self.args]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + ready_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start: {self.log()}")
            try:
                with self.client() as client:
                    client.ping()
                return
            except redis.AuthenticationError:
                return  # it answers; this one wants a password
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"redis-server did not answer PING: {self.log()}") from None
                time.sleep(0.02)

    def client(self, **options: object) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, **options)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last fsync."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text()[-2000:] if path.is_file() else "(no log)"

    def files(self) -> bytes:
        """Every file of its data directory, as it lies on disk (the AOF included)."""
        return b"".join(p.read_bytes() for p in sorted(self.dir.rglob("*")) if p.is_file())


def start_redis(dir: Path, args: tuple[str, ...] = DURABLE) -> RedisServer:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(dir, args)
    server.start()
    return server


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path) -> Iterator[RedisServer]:
    """A durable redis-server of this test's own, stopped after it. Import
    `redis_server_fixture` and ask for `redis_server`."""
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()
