"""Celery tasks that run on batches of their messages: an embedding model wants 32 images per forward, not one.

:class:`BatchTask` replaces Celery's execution strategy (which hands the pool one message per call) for its task:
the worker's main process, where messages arrive, holds the task's requests in a buffer and hands a free pool
process a batch as one call of :meth:`BatchTask.run_batch`, once the buffer holds ``batch_size`` requests or its
oldest has waited ``batch_wait`` seconds. While every process is busy the buffer grows, and the requests of the next
batch go with the current one as its look-ahead (the pool process fetches and decodes them while it embeds). The
worker's prefetch must let that happen: ``worker_prefetch_multiplier`` of three batches (running, next, filling).

Acknowledgement keeps the guarantees of the project's other tasks (``task_acks_late``,
``task_reject_on_worker_lost``):

- a batch's messages are acknowledged when its call has returned, that is once each request's outcome is written
  (or sent on to the next queue, or sent again for a later retry);
- a pool process that dies mid-batch (killed, out of memory) has its batch's messages rejected and requeued at
  once; a message back after such a loss runs in a batch of its own, so that an instance that kills the process
  takes no batch-mate with it again, and after ``max_losses`` losses it is handed to ``run_batch`` as given up
  (recorded as a problem, not run again);
- a batch whose call raised (``run_batch`` handles each item's own faults, so this is the worker's: a bug, or an
  index folder it cannot write) did not kill its process and is not counted as a loss: its messages are held and
  run again, each alone, after a back-off (2, 4, 8 s); after ``max_losses`` such failures it is given up with the
  error it raised as its reason, so that the problem an administrator reads names the real cause;
- a worker killed outright acknowledges nothing: Redis hands its messages out again after the visibility timeout,
  and before that the catch-up queues whatever Orthanc holds and the index lacks.

The library made for this, celery-batches, is not used: it requires Celery below 5.7, and it acknowledges a batch
only from the pool's success callback (a lost pool process leaves its messages unacknowledged until the
visibility timeout).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Task, current_app
from celery.utils.imports import symbol_by_name
from celery.worker.request import create_request_cls
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2
from kombu.asynchronous.timer import to_timestamp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One request of a batch as the pool process receives it: the message's arguments and its retry count."""

    id: str
    args: tuple
    kwargs: dict
    retries: int
    #: Its batches killed the pool process, or failed, ``max_losses`` times: record it as a problem, do not run it.
    given_up: bool = False
    #: Why it was given up, for its recorded problem.
    reason: str = ""


#: The reason of an item whose batches killed the pool process each time.
DIED = "the worker process died on this instance, each time it tried"


def run_batch(task_name: str, items: list[Item], lookahead: list[Item]) -> None:
    """What the pool process runs: the named task's :meth:`BatchTask.run_batch` (a module function: picklable)."""
    current_app.tasks[task_name].run_batch(items, lookahead)


class BatchTask(Task):
    """A task whose messages the worker runs in batches (see the module's docstring).

    Subclasses implement :meth:`run_batch`; the task's own function serves direct calls (``apply``, tests).
    """

    abstract = True
    typing = False
    #: Requests per batch, and seconds the oldest waits for a batch to fill.
    batch_size = 32
    batch_wait = 0.05
    #: Pool processes lost with a request before it is given up.
    max_losses = 3

    def run_batch(self, items: list[Item], lookahead: list[Item] = ()) -> None:
        """Handle every item (never raise for one item's fault: its batch-mates would be run again).

        ``lookahead`` is what the worker holds for the next batch: work that can start early (fetching, decoding)
        while this batch runs, and nothing that must not be done twice.
        """
        raise NotImplementedError

    def Strategy(self, task: "BatchTask", app: Any, consumer: Any, **_: Any) -> "_Batcher":  # noqa: N802 (Celery's name)
        return _Batcher(task, app, consumer)


class _Batcher:
    """The message handler of one consumer for one :class:`BatchTask`: buffers requests, hands batches to the pool.

    Everything here runs in the worker's event loop (messages, timer, pool callbacks): no lock is needed.
    """

    def __init__(self, task: BatchTask, app: Any, consumer: Any) -> None:
        self.task, self.app, self.consumer = task, app, consumer
        self.pool = consumer.pool
        self.timer = consumer.timer
        self.Request = create_request_cls(symbol_by_name(task.Request), task, consumer.pool, consumer.hostname,
                                          consumer.event_dispatcher, app=app)
        self.revoked = consumer.controller.state.revoked
        self.buffer: list[Any] = []
        self.first_at: float | None = None
        self.busy = 0
        self.tref = None
        self.losses: dict[str, int] = {}  # request id -> pool processes lost with it
        self.raised: dict[str, tuple[int, str]] = {}  # request id -> (batches that raised with it, the last error)

    def __call__(self, message: Any, body: Any, ack: Any, reject: Any, callbacks: Any = None, **_: Any) -> None:
        if body is None and "args" not in message.payload:
            body, headers, decoded, utc = message.body, message.headers, False, self.app.uses_utc_timezone()
        elif "args" in message.payload:
            body, headers, decoded, utc = hybrid_to_proto2(message, message.payload)
        else:
            body, headers, decoded, utc = proto1_to_proto2(message, body)
        req = self.Request(message, on_ack=ack, on_reject=reject, app=self.app, hostname=self.consumer.hostname,
                           eventer=self.consumer.event_dispatcher, task=self.task,
                           connection_errors=self.consumer.connection_errors, body=body, headers=headers,
                           decoded=decoded, utc=utc)
        if (req.expires or req.id in self.revoked) and req.revoked():
            return
        if req.eta:  # a retry sent with a countdown: it joins a batch when due
            self.timer.call_at(to_timestamp(req.eta), self.add, (req,), priority=6)
            return
        self.add(req)

    def add(self, req: Any) -> None:
        if req.id in self.losses or req.id in self.raised:  # back after its batch failed: alone, so that it takes
            # nobody with it
            self.dispatch([req])
            return
        self.buffer.append(req)
        if self.first_at is None:
            self.first_at = time.monotonic()
        self.maybe_flush()

    def maybe_flush(self) -> None:
        """Hand a free pool process the next batch: a full one at once, a partial one once its oldest request has
        waited ``batch_wait``. While every process is busy the buffer grows (up to the prefetch) and the requests
        that will make the next batch go with the current one as its look-ahead."""
        if not self.buffer:
            self.first_at = None
            return
        size = max(1, int(self.task.batch_size))
        self.first_at = self.first_at or time.monotonic()
        waited = time.monotonic() - self.first_at
        if self.busy >= max(1, self.pool.limit or 1):
            return  # the batch running calls this again when it returns
        if len(self.buffer) >= size or waited >= self.task.batch_wait:
            batch, self.buffer = self.buffer[:size], self.buffer[size:]
            self.first_at = time.monotonic() if self.buffer else None
            self.dispatch(batch, self.buffer[:size])
        elif self.tref is None:
            self.tref = self.timer.call_after(max(self.task.batch_wait - waited, 0.001), self._tick, priority=6)

    def _tick(self) -> None:
        self.tref = None
        self.maybe_flush()

    def _item(self, r: Any) -> Item:
        died = self.losses.get(r.id, 0) >= self.task.max_losses
        raised, error = self.raised.get(r.id, (0, ""))
        failed = raised >= self.task.max_losses
        reason = DIED if died else f"the worker failed on this instance each time it tried: {error}" if failed else ""
        return Item(r.id, tuple(r.args), dict(r.kwargs), int(r.request_dict.get("retries") or 0),
                    given_up=died or failed, reason=reason)

    def _raised(self, batch: list[Any], exc_info: Any) -> None:
        """A batch whose call raised: its process lives on, so no loss is counted; each request is run again
        alone after a back-off (held here, unacknowledged), and carries the error in case it is given up."""
        exc = getattr(exc_info, "exception", None)
        if exc is not None:
            error = f"{type(exc).__name__}: {exc}"
        else:
            error = (str(exc_info).strip().splitlines() or ["an unknown error"])[-1]
        log.error("%s: a batch of %d failed, run again each alone: %s\n%s", self.task.name, len(batch), error,
                  getattr(exc_info, "traceback", ""))
        for r in batch:
            count = self.raised.get(r.id, (0, ""))[0] + 1
            self.raised[r.id] = (count, error)
            self.timer.call_after(float(2 ** min(count, 5)), self.add, (r,), priority=6)

    def dispatch(self, batch: list[Any], ahead: list[Any] = ()) -> None:
        items, lookahead = [self._item(r) for r in batch], [self._item(r) for r in ahead]
        self.busy += 1

        def done(_: Any) -> None:
            self.busy -= 1
            for r in batch:
                self.losses.pop(r.id, None)
                self.raised.pop(r.id, None)
                r.acknowledge()
            self.maybe_flush()

        def failed(exc_info: Any) -> None:
            self.busy -= 1
            kind = getattr(exc_info, "type", None)
            if isinstance(kind, type) and issubclass(kind, WorkerLostError):
                log.error("%s: a batch of %d lost with its pool process: requeued, each alone", self.task.name,
                          len(batch))
                for r in batch:
                    self.losses[r.id] = self.losses.get(r.id, 0) + 1
                    r.reject(requeue=True)
            else:
                self._raised(batch, exc_info)
            self.maybe_flush()

        try:
            self.pool.apply_async(run_batch, args=(self.task.name, items, lookahead), callback=done,
                                  error_callback=failed)
        except Exception:  # the pool is closing (warm shutdown): the broker gets the messages back
            self.busy -= 1
            log.warning("%s: a batch of %d not started: the pool is closing", self.task.name, len(batch))
