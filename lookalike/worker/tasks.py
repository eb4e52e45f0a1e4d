"""Celery tasks of the worker: thin wrappers of :mod:`lookalike.worker.pipeline`, run on batches of messages.

Where each stage runs
---------------------
One host (the default; ``lookalike run`` starts this): one worker process does it all. Each batch of
``index_instance`` messages (up to ``batch_size``, or ``batch_wait`` seconds, see
:mod:`lookalike.worker.batching`) is planned against the catalogue, fetched from Orthanc, decoded, embedded in one
forward per encoder and written with one :meth:`~lookalike.index.store.IndexStore.add_many`::

    celery -A lookalike.worker.celery_app worker -Q lookalike,lookalike.embed,lookalike.write --concurrency 1

Several hosts sharing one Redis (``"remote_embedding": true`` in every worker's settings):

- The writer, on the index host: the one process that opens the catalogue and the FAISS files. It takes the
  queue the plugin, the catch-up and ``lookalike backfill``/``reindex`` send to, plans each batch (skips what is
  indexed, names the checkpoint each encoder uses) and sends one ``lookalike.embed`` message per instance; it
  applies each ``lookalike.write`` message (one embedded batch) with one ``add_many``; it runs the catch-up,
  reconcile and forget tasks::

      celery -A lookalike.worker.celery_app worker -Q lookalike,lookalike.write --concurrency 1 -n writer@%h

- Embedding workers, on any host that reaches Orthanc and Redis (no index folder, the checkpoints at the paths
  the settings name): they fetch, decode and embed a batch, then send its vectors and problems to
  ``lookalike.write`` as one message. One pool process per GPU, with ``"device": "auto"``::

      celery -A lookalike.worker.celery_app worker -Q lookalike.embed --concurrency $(nvidia-smi -L | wc -l) \\
          -n embed@%h

The model loads in the pool process, on first use, after the fork: the main process never imports torch, so CUDA
is never initialised before the fork (a CUDA context does not survive one).

Orthanc unreachable is sent again with exponential back-off, ``MAX_RETRIES`` times, then recorded as a problem
(which the catch-up retries later); bad input is recorded on its instance at once. An index folder that refuses a
write (permission, disk full, not a folder) is the same kind of fault, not the instance's: each instance is
recorded at once with the code ``index-unwritable`` and the operating system's own error (errno, path), and sent
again with the same back-off; once the folder takes writes it is indexed and its problem cleared.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import time
from dataclasses import asdict, replace

import billiard.process
import redis
from celery import Task, bootsteps
from celery.signals import worker_init, worker_process_init, worker_process_shutdown
from celery.utils.time import get_exponential_backoff_interval

from lookalike.config import (EMBED_QUEUE, INGEST_MARK_KEY, QUEUE, TASK_CATCH_UP, TASK_EMBED, TASK_FORGET,
                              TASK_INDEX_INSTANCE, TASK_RECONCILE_STUDY, TASK_REINDEX_INSTANCE, TASK_WRITE, WRITE_QUEUE,
                              Settings)
from lookalike.encoders import load_encoder
from lookalike.encoders.base import resolve_device
from lookalike.encoders.shipped import local_checkpoint
from lookalike.index.upgrade import keep_archive_models
from lookalike.orthanc.client import HttpOrthanc, OrthancError
from lookalike.worker.batching import DIED, BatchTask, Item
from lookalike.worker.celery_app import app
from lookalike.worker.change_log import UNWRITABLE, ChangeLogFollower
from lookalike.worker.fetcher import FetchProcess
from lookalike.worker.ingest_gate import IngestGate
from lookalike.worker.pipeline import Embedder, InstanceIndexer, Job, Outcome, Pipeline, Request, Result

log = logging.getLogger(__name__)

#: FAISS snapshots are saved every this many changes and when the worker stops; the catalogue at every change.
SNAPSHOT_EVERY = 200

#: Tries of an instance while Orthanc is unreachable, after the first, spaced 2, 4, 8... s (at most 60 s, jittered).
MAX_RETRIES = 6
RETRY_BACKOFF_MAX = 60

#: SQLite's words for a database it cannot write because of its file or disk (its other errors are bugs).
_SQLITE_UNWRITABLE = ("readonly", "disk", "unable to open", "locked")

#: The worker's main process (set when it starts): no model may load there (see :func:`load_model`).
_MAIN_PID: int | None = None


def settings() -> Settings:
    return app.conf.lookalike_settings


def load_model(name: str, weights: str | None = None):
    """An encoder in this worker process, on the device the settings name (loaded once per process).

    Refused in the worker's main process: a model, or CUDA, loaded there before the pool forks would be copied
    into every pool process (and a CUDA context does not survive a fork).
    """
    if os.getpid() == _MAIN_PID:
        raise RuntimeError("the worker's main process must not load a model: only its pool processes embed")
    device = _device()
    encoder = load_encoder(name, weights=local_checkpoint(weights or "") or settings().weights.get(name), device=device)
    if (encoder.model_version, device) not in _announced:
        _announced.add((encoder.model_version, device))
        log.info("encoder %s on %s in process %d", encoder.model_version, device, os.getpid())
    return encoder


_announced: set[tuple[str, str]] = set()


@functools.cache
def _device() -> str:
    """This pool process's torch device (see ``Settings.device``); torch's threads set once."""
    import torch  # here, not above: torch only in pool processes, never in the main process before it forks

    torch.set_num_threads(settings().torch_threads)
    return resolve_device(settings().device, getattr(billiard.process.current_process(), "index", None) or 0)


@functools.cache
def orthanc_api() -> HttpOrthanc:
    """The worker process's client of Orthanc's REST API."""
    s = settings()
    api = HttpOrthanc(s.orthanc_url, s.orthanc_user, s.orthanc_password)
    # DICOM files as stored: Orthanc gzips them otherwise, which costs it (and us) more CPU than a LAN saves (a
    # 64 KB instance: 5 ms instead of 15).
    api.session.headers["Accept-Encoding"] = "identity"
    return api


@functools.cache
def embedder():
    """The worker process's embedding stage: Orthanc and the models, no index (what an embedding host has)."""
    # The next batch is fetched and decoded in a process of its own: in a thread here it took the GIL from the
    # encoder's forward (see lookalike.worker.fetcher).
    return Embedder(orthanc_api(), load_model, settings().max_pixels, gate=ingest_gate(),
                    fetch_ahead=fetch_process().fetch)


@functools.cache
def fetch_process() -> FetchProcess:
    """The worker process's helper that fetches and decodes ahead (started on its first instance)."""
    return FetchProcess(orthanc_api(), settings().max_pixels)


def ingest_gate() -> IngestGate:
    """Holds fetching back while Orthanc receives (the plugin's mark in Redis; see ``Settings.ingest_quiet``)."""
    s = settings()
    broker = redis.Redis.from_url(s.redis_url, socket_timeout=1, socket_connect_timeout=1)

    def last_stored() -> float | None:
        mark = broker.get(INGEST_MARK_KEY)
        return None if mark is None else float(mark)

    return IngestGate(last_stored, s.ingest_quiet, s.ingest_quiet_max)


@functools.cache
def indexer():
    """The worker process's index side (the index host's): opens the catalogue and the FAISS files.

    Opening it, before the first batch is planned, keeps an archive indexed with an earlier shipped model on that
    model after an update (:func:`lookalike.index.upgrade.keep_archive_models`), once per start of the writer.
    """
    from lookalike.index.store import IndexStore  # here, not above: FAISS only in the index host's pool process

    store = IndexStore.from_settings(settings(), snapshot_every=SNAPSHOT_EVERY)
    keep_archive_models(store.catalogue, settings().weights)
    return InstanceIndexer(orthanc_api(), store)


def pipeline():
    """The worker process's orchestrator of plan -> embed -> apply, over its one embedder and its index."""
    return Pipeline(indexer(), embedder())


def _holds_index() -> bool:
    """Whether this worker is the index host's: it consumes the queues whose tasks write the index."""
    consumed = set(app.amqp.queues.consume_from or app.amqp.queues)
    return bool(consumed & {QUEUE, WRITE_QUEUE})


@worker_init.connect
def _yield_cpu(sender=None, **_) -> None:
    """Indexing is background work: the worker (and the pool it forks) yields the CPU to Orthanc's ingest.

    Linux's SCHED_IDLE runs it only on CPU time nothing else wants, and any wakeup of Orthanc preempts it at once
    (a niceness alone still lets it finish its time slice while a C-STORE waits); elsewhere, niceness.
    """
    global _MAIN_PID
    if "prefork" in str(getattr(sender, "pool_cls", "prefork")).lower():
        _MAIN_PID = os.getpid()  # a pool that forks: no model in this process (see load_model)
    if settings().worker_idle_priority and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(settings().worker_nice)


@worker_process_init.connect
def _open_index(**_) -> None:
    """Create the catalogue when the index host's worker starts, so that readers find it before the first task."""
    if _holds_index():
        indexer()


@worker_process_shutdown.connect
def _save_index(**_) -> None:
    """Save the FAISS snapshots on the way out, so that the next start replays little; stop the process that
    fetches ahead."""
    if indexer.cache_info().currsize:
        indexer().store.close()
    if fetch_process.cache_info().currsize:
        fetch_process().close()


def send(name: str, args: list, kwargs: dict | None = None, **options) -> None:
    """Queue a task by name (the broker's retries on: a batch is acknowledged only after this returns)."""
    app.send_task(name, args=args, kwargs=kwargs or {}, **options)


def _backoff(retries: int) -> float:
    """Seconds before the try after ``retries`` retries: 2, 4, 8... at most ``RETRY_BACKOFF_MAX``, jittered."""
    return get_exponential_backoff_interval(1, retries + 1, RETRY_BACKOFF_MAX, True)


def _retry_later(task: Task, item: Item, queue: str) -> bool:
    """Send an instance again after its back-off, within ``MAX_RETRIES``; False (nothing sent) past it."""
    if item.retries >= MAX_RETRIES:
        return False
    send(task.name, list(item.args), item.kwargs, queue=queue, countdown=_backoff(item.retries),
         retries=item.retries + 1)
    return True


def _settle(task: Task, items: list[Item], results: list, queue: str) -> list:
    """Send again, later, each instance Orthanc did not answer for, within its budget; past it, a problem.

    One entry per result: the result to write, or None where the instance was sent again.
    """
    settled = []
    for item, result in zip(items, results):
        if result.outcome.status != "retry":
            settled.append(result)
        elif _retry_later(task, item, queue):
            settled.append(None)
        else:
            log.error("instance %s given up after %d tries: %s", item.args and item.args[0], item.retries + 1,
                      result.outcome.message)
            settled.append(replace(result, outcome=Outcome("failed", result.job.instance_id, "orthanc-unavailable",
                                                           result.outcome.message), study_id=result.job.study_id or ""))
    return settled


def _given_up(instance_id: str, study_id: str | None, reason: str = DIED):
    """The problem of an instance whose batches killed the pool process, or failed, again and again."""
    return Result(Job(instance_id, None, study_id), Outcome("failed", instance_id, "internal-error",
                  reason or DIED), study_id=study_id or "")


class IndexUnwritable(Exception):
    """The index folder refused a batch's write; each instance is recorded with the error, none is written."""


def _unwritable(exc: BaseException) -> bool:
    """Whether a failed write is the index folder's fault (a file or disk the OS or SQLite refuses), not a record's."""
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, sqlite3.OperationalError) and any(word in str(exc) for word in _SQLITE_UNWRITABLE)


def _record_unwritable(results: list, exc: BaseException) -> None:
    """Say on each instance of the batch why it is not indexed yet, where ``/lookalike/status`` shows it: the OS's
    own error (``PermissionError: [Errno 13] Permission denied: '/…/write.lock'``), for an administrator to act on.
    The catalogue may refuse too (the same folder): the worker's log has it then."""
    message = f"the index folder refused the write, retried: {type(exc).__name__}: {exc}"
    log.error("instance(s) %s not written, sent again later: %s", " ".join(r.job.instance_id for r in results),
              message)
    try:
        for result in results:
            indexer().store.catalogue.record_problem(
                orthanc_instance_id=result.job.instance_id, code=UNWRITABLE, message=message,
                sop_instance_uid=result.sop_instance_uid or "", orthanc_study_id=result.study_id or "")
    except Exception as again:
        log.error("the catalogue refused to record it too: %s: %s", type(again).__name__, again)


def _write(results: list) -> list:
    """Write a batch's results and return their outcomes, in order; should the batch fail as a whole, each alone,
    so that one bad record is recorded on its own instance and the others are written.

    Raises
    ------
    IndexUnwritable
        The index folder refused the write: nothing is written, each instance's problem says why; the caller
        sends the batch again later.
    """
    if not results:
        return []
    started = time.perf_counter()
    try:
        outcomes = indexer().apply(results)
    except Exception as exc:
        if _unwritable(exc):
            _record_unwritable(results, exc)
            raise IndexUnwritable(f"{type(exc).__name__}: {exc}") from exc
        log.exception("writing a batch of %d failed: writing each alone", len(results))
        outcomes = []
        for result in results:
            try:
                outcomes += indexer().apply([result])
            except Exception as exc:
                log.exception("instance %s: writing failed", result.job.instance_id)
                message = f"{type(exc).__name__}: {exc}"
                indexer().store.catalogue.record_problem(
                    orthanc_instance_id=result.job.instance_id, code="internal-error",
                    message=message, sop_instance_uid="", orthanc_study_id=result.job.study_id or "")
                outcomes.append(Outcome("failed", result.job.instance_id, "internal-error", message))
    for outcome in outcomes:
        log.info("instance %s %s %s", outcome.orthanc_instance_id, outcome.status,
                 outcome.code or outcome.model_version or outcome.message)
    log.info("batch of %d written in %.3f s", len(results), time.perf_counter() - started)
    return outcomes


def _index(task: Task, items: list[Item], requests: list, ahead: list = ()) -> None:
    """A batch through :class:`~lookalike.worker.pipeline.Pipeline` (plan -> embed -> apply), with the worker's
    retries and writes; or, with ``remote_embedding``, planned here and each job sent to the embedding workers.

    ``ahead`` (requests of the next batch) are fetched and decoded while this batch embeds, but for those only
    missing that are indexed already.
    """
    gone = [_given_up(r.instance_id, r.study_id, item.reason) for item, r in zip(items, requests) if item.given_up]
    live = [(item, request) for item, request in zip(items, requests) if not item.given_up]
    if settings().remote_embedding:
        for job in indexer().plan([request for _, request in live]):
            if isinstance(job, Job):
                send(TASK_EMBED, [asdict(job)], queue=EMBED_QUEUE)
        _write(gone)
        return
    log.info("embedding a batch of %d instance(s)", len(live))
    to_write: list[Item] = []  # sent again later should the index folder refuse their write

    def settle(positions: list[int], results: list) -> list:
        items = [live[i][0] for i in positions]
        settled = _settle(task, items, results, task.home_queue)
        to_write.extend(item for item, result in zip(items, settled) if result is not None)
        return settled

    try:
        if live:
            pipeline().index_many([request for _, request in live], ahead, settle=settle,
                                  write=lambda kept: _write(gone + kept)[len(gone):])
        else:
            _write(gone)
    except IndexUnwritable:
        # Past the budget, the recorded problem (``index-unwritable``) stays, and the catch-up queues it again.
        for item in to_write:
            if not _retry_later(task, item, task.home_queue):
                log.error("instance %s given up after %d tries: the index folder refuses writes; the catch-up tries"
                          " again", item.args and item.args[0], item.retries + 1)


class _Batched(BatchTask):
    """A batch task sized by the settings."""

    abstract = True
    home_queue = QUEUE

    @property
    def batch_size(self) -> int:  # type: ignore[override]
        return settings().batch_size

    @property
    def batch_wait(self) -> float:  # type: ignore[override]
        return settings().batch_wait


class IndexBatch(_Batched):
    """``index_instance`` and ``reindex_instance``: their messages taken in batches (see :func:`_index`)."""

    abstract = True

    def request_of(self, item: Item):
        raise NotImplementedError

    def run_batch(self, items: list[Item], lookahead: list[Item] = ()) -> None:
        good, requests = [], []
        for item in items:
            try:
                requests.append(self.request_of(item))
                good.append(item)
            except (TypeError, KeyError) as exc:  # a message no version of ours sends: said, and dropped
                log.error("%s: message %s dropped, its arguments do not fit: %s %s: %s", self.name, item.id,
                          item.args, item.kwargs, exc)
        ahead = []
        for item in lookahead:
            try:
                ahead.append(self.request_of(item))
            except (TypeError, KeyError):  # its own batch says so
                continue
        _index(self, good, requests, ahead)


class _IndexInstance(IndexBatch):
    def request_of(self, item: Item):
        """``(instance_id, series_id=None, study_id=None, missing_only=False)``, by position or name."""
        return Request(*item.args, **item.kwargs)


class _ReindexInstance(IndexBatch):
    def request_of(self, item: Item):
        """``(instance_id, series_id, study_id, encoder, weights)``: embedded again by another checkpoint
        (``lookalike reindex``), beside its current vector; not written if that checkpoint's vector is there."""
        names = ("instance_id", "series_id", "study_id", "encoder", "weights")
        a = {**dict(zip(names, item.args)), **item.kwargs}
        return Request(a["instance_id"], a["series_id"], a["study_id"], missing_only=True,
                       model=(a["encoder"], a["weights"]))


class _Embed(_Batched):
    """``embed``, on embedding hosts: a batch of jobs embedded, its results sent to the writer as one message."""

    home_queue = EMBED_QUEUE

    def run_batch(self, items: list[Item], lookahead: list[Item] = ()) -> None:
        jobs = [Job.from_dict(item.args[0]) for item in items]
        ahead = [Job.from_dict(item.args[0]) for item in lookahead]
        gone = [_given_up(job.instance_id, job.study_id, item.reason) for item, job in zip(items, jobs)
                if item.given_up]
        live = [item for item in items if not item.given_up]
        log.info("embedding a batch of %d instance(s)", len(live))
        results = embedder().run([job for item, job in zip(items, jobs) if not item.given_up], ahead)
        results = gone + [r for r in _settle(self, live, results, EMBED_QUEUE) if r is not None]
        if results:
            send(TASK_WRITE, [[result.to_dict() for result in results]], queue=WRITE_QUEUE)


def _one(task: BatchTask, args: tuple, kwargs: dict) -> None:
    """A direct call (``apply``, tests): a batch of one."""
    task.run_batch([Item(task.request.id or "", args, kwargs, task.request.retries or 0)])


@app.task(name=TASK_INDEX_INSTANCE, base=_IndexInstance, bind=True)
def index_instance(self, *args, **kwargs) -> None:
    _one(self, args, kwargs)


@app.task(name=TASK_REINDEX_INSTANCE, base=_ReindexInstance, bind=True)
def reindex_instance(self, *args, **kwargs) -> None:
    _one(self, args, kwargs)


@app.task(name=TASK_EMBED, base=_Embed, bind=True)
def embed(self, *args, **kwargs) -> None:
    _one(self, args, kwargs)


@app.task(name=TASK_WRITE, bind=True, max_retries=MAX_RETRIES)
def write(self, results: list[dict]) -> None:
    """On the index host: one embedded batch (``Result.to_dict`` each) written with one ``add_many``; sent again
    with back-off while the index folder refuses it (past the budget, the catch-up finds its instances)."""
    try:
        _write([Result.from_dict(r) for r in results])
    except IndexUnwritable as exc:
        if self.request.retries >= MAX_RETRIES:
            log.error("a batch of %d given up: %s; the catch-up tries again", len(results), exc)
            return
        raise self.retry(countdown=_backoff(self.request.retries))


@app.task(name=TASK_RECONCILE_STUDY)
def reconcile_study(study_id: str) -> int:
    """Index what a study holds and the index lacks (its instances' events were lost), in batches."""
    requests = indexer().reconcile_study(study_id)
    size = max(1, settings().batch_size)
    for start in range(0, len(requests), size):
        batch = requests[start:start + size]
        items = [Item("", (r.instance_id, r.series_id, r.study_id), {"missing_only": True}, 0) for r in batch]
        _index(index_instance, items, batch, requests[start + size:start + 2 * size])
    log.info("study %s reconciled: %d instance(s) caught up", study_id, len(requests))
    return len(requests)


@app.task(name=TASK_FORGET)
def forget(level: str, resource_id: str) -> None:
    indexer().forget(level, resource_id)
    log.info("%s %s removed from the index", level, resource_id)


@functools.cache
def follower():
    """The worker process's reader of Orthanc's change log (it remembers where the previous pass stopped)."""
    def queue(name: str, args: list, kwargs: dict) -> None:
        app.send_task(name, args=args, kwargs=kwargs, queue=QUEUE, retry=False)

    return ChangeLogFollower(indexer().api, indexer().store.catalogue, queue)


@app.task(name=TASK_CATCH_UP)
def catch_up() -> dict:
    """One pass over Orthanc's change log; Orthanc or Redis down postpones it to the next pass."""
    try:
        report = follower().step()
    except OrthancError as exc:
        log.warning("catch-up from Orthanc's change log postponed: %s", exc)
        return {"status": "postponed", "reason": str(exc)}
    return {"status": "done", "cursor": report.cursor_after, "queued": len(report.queued),
            "retried": len(report.retried)}


class CatchUpTimer(bootsteps.StartStopStep):
    """Queues a catch-up pass when the index host's worker starts, then every ``catch_up_interval`` seconds.

    It runs on the worker's own timer, in the consumer's thread: no thread of ours lives in the process that forks
    the pool (a fork while another thread holds a lock hangs the child). The pass itself runs in the pool like
    any task; one that waited longer than an interval in the queue expires unrun, so a backlog never piles up
    passes.
    """

    requires = ("celery.worker.components:Timer",)

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self._refs: list = []

    def start(self, parent) -> None:
        interval = settings().catch_up_interval
        if interval <= 0 or not _holds_index():
            return
        self._refs = [parent.timer.call_after(1.0, self._queue_pass, (interval,)),
                      parent.timer.call_repeatedly(interval, self._queue_pass, (interval,))]

    def stop(self, parent) -> None:
        for ref in self._refs:
            ref.cancel()

    @staticmethod
    def _queue_pass(interval: float) -> None:
        try:
            app.send_task(TASK_CATCH_UP, queue=QUEUE, expires=max(interval, 10.0), retry=False)
        except Exception as exc:  # Redis down: the next tick tries again
            log.warning("catch-up pass not queued: %s: %s", type(exc).__name__, exc)


app.steps["worker"].add(CatchUpTimer)
