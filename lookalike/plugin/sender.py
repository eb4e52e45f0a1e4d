"""Hands tasks to Celery from a thread of its own, so that no Orthanc callback ever waits on Redis."""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from typing import Any, Callable

from lookalike.config import QUEUE

log = logging.getLogger(__name__)


class TaskSender:
    """Queue of (task name, args) drained into Celery by a daemon thread.

    Parameters
    ----------
    send_task
        ``celery_app.send_task``: called as ``send_task(name, args=..., queue=...)``.
    on_error
        Called with a message and a traceback when a task could not be sent (Orthanc's log, in the plugin).
    """

    def __init__(self, send_task: Callable[..., Any], on_error: Callable[[str], None] | None = None,
                 pause_after_failure: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._send_task = send_task
        self._on_error = on_error or log.error
        self._queue: queue.Queue[tuple[str, tuple] | None] = queue.Queue()
        self.failed = 0
        self._pause = pause_after_failure
        self._clock = clock
        self._broker_down_until = 0.0
        self._thread = threading.Thread(target=self._run, name="lookalike-sender", daemon=True)
        self._thread.start()

    def send(self, name: str, *args: Any) -> None:
        """Return at once; the task reaches the broker shortly after."""
        self._queue.put((name, args))

    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def join(self) -> None:
        """Wait until everything sent so far has been handed to the broker (for tests)."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                name, args = item
                if self._clock() < self._broker_down_until:
                    # The broker failed a moment ago: drop at once rather than let the backlog grow in Orthanc's
                    # memory. The worker's catch-up from Orthanc's change log queues these once Redis is back.
                    self.failed += 1
                    continue
                try:
                    self._send_task(
                        name, args=list(args), queue=QUEUE,
                        retry=True, retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
                    )
                except Exception:
                    self.failed += 1
                    self._broker_down_until = self._clock() + self._pause
                    self._on_error(f"Lookalike: could not queue {name}{args} (left to the worker's catch-up from"
                                   f" Orthanc's change log; tasks are dropped for {self._pause:.0f} s):"
                                   f" {traceback.format_exc()}")
            finally:
                self._queue.task_done()
