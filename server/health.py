"""Health that means something: SERVING only while the decode loop runs and moves.

The standard grpc.health.v1 service answers for the whole server ("") and each kaizen
service. A watch thread looks at the decode loop every second: a dead loop, or one that
has not finished an iteration for `stuck_after_s`, turns every status NOT_SERVING (a load
balancer or a Kubernetes probe then stops sending traffic), and a recovered one turns
them back. Stopping the server turns them NOT_SERVING for good.
"""

from __future__ import annotations

import logging
import threading

from grpc_health.v1 import health, health_pb2

from server import metrics
from server.engine import Engine

log = logging.getLogger(__name__)


class HealthWatch:
    def __init__(
        self,
        servicer: health.HealthServicer,
        names: tuple[str, ...],
        engine: Engine,
        stuck_after_s: float,
        every_s: float = 1.0,
    ) -> None:
        self.servicer = servicer
        self.names = names
        self.engine = engine
        self.stuck_after_s = stuck_after_s
        self.every_s = every_s
        self.serving: bool | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kaizen-health", daemon=True)

    def _set(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        for name in self.names:
            self.servicer.set(name, status)
        self.serving = serving
        metrics.DECODE_LOOP_UP.set(1 if serving else 0)

    def check(self) -> bool:
        """Look once; set the statuses when they change. Returns whether it serves."""
        ok, why = self.engine.alive(self.stuck_after_s)
        if ok != self.serving and not self._stop.is_set():
            if not ok:
                log.error("health: NOT_SERVING: %s", why)
            elif self.serving is False:
                log.warning("health: SERVING again: the decode loop moves")
            self._set(ok)
        return ok

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.check()

    def start(self) -> None:
        self.check()
        self._thread.start()

    def stop(self) -> None:
        """NOT_SERVING from now on (the server is going away)."""
        self._stop.set()
        self._set(False)
        if self._thread.is_alive():
            self._thread.join(timeout=5)
