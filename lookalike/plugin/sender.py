"""Hands tasks to Celery from a thread of its own, in the relay process (:mod:`lookalike.plugin.relay`): whoever
sends never waits on Redis, and a broker outage drops tasks at once, said in one line."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

from lookalike.config import QUEUE, TASK_INDEX_INSTANCE

log = logging.getLogger(__name__)

#: Seconds between two marks of "Orthanc received an instance" (``mark_ingest``): a Redis write a few times a
#: second during a burst, not one per instance.
MARK_EVERY = 0.25


class TaskSender:
    """Queue of (task name, args) drained into Celery by a daemon thread.

    Parameters
    ----------
    send_task
        ``celery_app.send_task``: called as ``send_task(name, args=..., queue=...)``.
    on_error
        Called with one line when the broker starts failing (Orthanc's log, through the relay): once per outage,
        however long it lasts and however many tasks it drops, and without a traceback (a broker outage is not a
        bug).
    on_recovery
        Called with one line when a task goes through again after an outage, saying how many were dropped.
    mark_ingest
        Called with ``time.time()`` after an ``index_instance`` task went through, at most every
        :data:`MARK_EVERY` seconds: the mark the worker waits on before fetching (see
        :mod:`lookalike.worker.ingest_gate`); its failure is ignored (the worker then fetches at once).
    """

    def __init__(self, send_task: Callable[..., Any], on_error: Callable[[str], None] | None = None,
                 pause_after_failure: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 on_recovery: Callable[[str], None] | None = None,
                 mark_ingest: Callable[[float], Any] | None = None) -> None:
        self._send_task = send_task
        self._mark_ingest = mark_ingest
        self._marked = -1e9
        self._on_error = on_error or log.error
        self._on_recovery = on_recovery or log.warning
        self._queue: queue.Queue[tuple[str, tuple] | None] = queue.Queue()
        self.failed = 0
        self._pause = pause_after_failure
        self._clock = clock
        self._broker_down_until = 0.0
        self._dropped_in_outage: int | None = None  # None while the broker takes tasks
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
                    self._dropped()
                    continue
                try:
                    self._send_task(
                        name, args=list(args), queue=QUEUE,
                        retry=True, retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
                    )
                except Exception as exc:
                    self._broker_down_until = self._clock() + self._pause
                    self._failed(exc)
                else:
                    self._sent()
                    if name == TASK_INDEX_INSTANCE:
                        self._mark()
            finally:
                self._queue.task_done()

    def _mark(self) -> None:
        """Note in Redis that Orthanc is receiving, unless noted less than :data:`MARK_EVERY` seconds ago."""
        if self._mark_ingest is None or self._clock() - self._marked < MARK_EVERY:
            return
        self._marked = self._clock()
        try:
            self._mark_ingest(time.time())
        except Exception as exc:  # noqa: BLE001 (the task went through; a lost mark only lets the worker fetch)
            log.debug("ingest mark not written: %s: %s", type(exc).__name__, exc)

    def _dropped(self) -> None:
        self.failed += 1
        if self._dropped_in_outage is not None:
            self._dropped_in_outage += 1

    def _failed(self, exc: Exception) -> None:
        """A send failed: one line if it starts an outage, nothing more while it lasts."""
        first = self._dropped_in_outage is None
        if first:
            self._dropped_in_outage = 0
        self._dropped()
        if first:
            reason = (str(exc).strip().splitlines() or [""])[0]
            self._on_error(f"Lookalike: the task broker (Redis) does not take tasks ({type(exc).__name__}: {reason});"
                           " new instances are left to the worker's catch-up from Orthanc's change log until it"
                           " does; one line more when it is back")

    def _sent(self) -> None:
        """A send went through: one line if it ends an outage."""
        if self._dropped_in_outage is not None:
            dropped, self._dropped_in_outage = self._dropped_in_outage, None
            self._on_recovery(f"Lookalike: the task broker (Redis) takes tasks again; {dropped} task(s) dropped"
                              " during its outage are left to the worker's catch-up")
