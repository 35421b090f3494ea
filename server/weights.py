"""Watches the registry: every replica follows the rollout records; the rollout authority
also offers each new, verified, servable version to the rollout.

Reading and checking a version (sha256 of every file against its manifest, base model
identity) happens on this thread; the engine only installs tensors already in memory,
between two batches. A version that fails a check is never served, and never retried;
nor is one the learner marked rejected or a server rolled back. The same thread renews
the rollout lease, follows the registry and, on the authority, lets the running canary
test decide, at every poll.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time

from kaizen.errors import CorruptVersion
from kaizen.registry import MANIFEST, Registry, version_number
from kaizen.telemetry import tracing
from server import metrics
from server.engine import Adapter, Engine
from server.rollout import Rollout

log = logging.getLogger(__name__)


def read_adapter(registry: Registry, version: str, base_model: str) -> Adapter:
    from peft import LoraConfig
    from safetensors.torch import load_file

    manifest = registry.verify(version)
    if manifest.base_model != base_model:
        raise CorruptVersion(
            f"{version} was trained on base model {manifest.base_model!r}; "
            f"this server serves {base_model!r}"
        )
    root = registry.path(version)
    manifest_sha = hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()
    return Adapter(
        version=version,
        config=LoraConfig.from_pretrained(root),
        state_dict=load_file(root / "adapter_model.safetensors"),
        manifest_sha256=manifest_sha,
        published_at=manifest.created_at,
    )


def _traced_swap(version: str, result: str, started_ns: int | None = None) -> None:
    """A `kaizen.swap` span in the version's trace: read and checked since `started_ns`,
    then staged (as canary or serving; the engine installs it at its next batch
    boundary), refused, or resumed at start."""
    key = tracing.version(version)
    tracing.record("kaizen.swap", key, started_ns, version=version, result=result)


class RegistryWatcher:
    def __init__(
        self, registry: Registry, engine: Engine, rollout: Rollout, base_model: str, poll_s: float
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.rollout = rollout
        self.base_model = base_model
        self.poll_s = poll_s
        self.rejected: dict[str, str] = {}  # version -> why it will never be served
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kaizen-registry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.rollout.tick()
                if self.rollout.leader:
                    self.check()
            except Exception:  # a broken registry must not kill the server: log, retry
                log.exception("checking the registry at %s failed", self.registry.root)

    def read(self, version: str) -> Adapter:
        return read_adapter(self.registry, version, self.base_model)

    def resume(self) -> None:
        """At start: serve what the registry records (the version servers last promoted,
        v0 when none, and the live canary), at once; the authority also offers a version
        published while no server ran, and goes on deciding a canary another started."""
        self.rollout.tick()
        self.engine.install_staged()
        if self.rollout.leader:
            self.check()
            self.engine.install_staged()

    def check(self) -> None:
        metrics.REGISTRY_NEWEST.set(version_number(self.registry.latest()))
        latest = self.registry.latest_servable()
        if latest in self.rejected or latest in self.engine.failed:
            return
        if version_number(latest) <= self.rollout.floor():
            return
        if self.rollout.busy and not self.rollout.would_yield(latest):
            return  # not worth reading it yet
        started = time.time_ns()
        try:
            adapter = self.read(latest)
        except CorruptVersion as exc:
            self.rejected[latest] = str(exc)
            metrics.SWAPS.labels("corrupt").inc()
            log.error("not serving %s: %s", latest, exc)
            _traced_swap(latest, "corrupt", started)
            return
        except (OSError, ValueError) as exc:
            self.rejected[latest] = f"unreadable: {exc}"
            metrics.SWAPS.labels("incompatible").inc()
            log.error("not serving %s: %s", latest, exc)
            _traced_swap(latest, "unreadable", started)
            return
        # one canary at a time: the newest waiting version goes next, or replaces a
        # canary that has stayed undecided too long
        if self.rollout.busy and not self.rollout.yield_to(latest):
            return
        log.info("offering %s for the next batch boundary", latest)
        self.rollout.offer(adapter)
        e = self.rollout.experiment
        staged = "canary" if e is not None and e.canary == latest else "serving"
        _traced_swap(latest, "staged_" + staged, started)
