"""`--retention-days`: answers older than the window, and their feedback, are deleted on a
schedule (the bytes too: the buffer overwrites deleted rows and truncates its WAL)."""

from __future__ import annotations

import logging
import threading
import time

from kaizen.buffer import ReplayBuffer
from server import metrics

log = logging.getLogger(__name__)


class Retention:
    """Deletes what is older than `days` every `every_s` seconds, in its own thread."""

    def __init__(self, buffer: ReplayBuffer, days: float, every_s: float = 3600.0) -> None:
        if days <= 0:
            raise ValueError(f"--retention-days: must be positive, got {days}")
        self.buffer = buffer
        self.window_s = days * 86400.0
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kaizen-retention", daemon=True)

    def sweep(self) -> tuple[int, int]:
        """Delete now; (answers, feedback events) deleted."""
        answers, events = self.buffer.delete_before(time.time() - self.window_s)
        metrics.ROWS_DELETED.labels("retention").inc(answers + events)
        if answers or events:
            log.info("retention: deleted %d answers and %d feedback events", answers, events)
        return answers, events

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - logged; the next sweep tries again
                log.exception("retention sweep failed")
            self._stop.wait(self.every_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
