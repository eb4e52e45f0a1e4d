"""Celery tasks of the worker: thin wrappers of :class:`~lookalike.indexer.pipeline.InstanceIndexer`.

Transient failures (Orthanc unreachable or failing) are retried with exponential back-off, a bounded number of
times; after the last try the instance is recorded as a problem. Bad input is recorded at once and acknowledged.
"""

from __future__ import annotations

import functools
import logging
import os

from celery import Task, bootsteps
from celery.signals import worker_init, worker_process_init, worker_process_shutdown

from lookalike.config import (QUEUE, TASK_CATCH_UP, TASK_FORGET, TASK_INDEX_INSTANCE, TASK_RECONCILE_STUDY,
                              TASK_REINDEX_INSTANCE, Settings)
from lookalike.indexer.celery_app import app
from lookalike.orthanc_rest import OrthancAuthError, OrthancError, OrthancUnavailableError

log = logging.getLogger(__name__)

#: FAISS snapshots are saved every this many changes and when the worker stops; the catalogue at every change.
SNAPSHOT_EVERY = 200

RETRY = dict(autoretry_for=(OrthancUnavailableError,), retry_backoff=1, retry_backoff_max=60, retry_jitter=True, max_retries=6)


@functools.cache
def indexer():
    """The worker process's one indexer: its encoders load on first use and stay loaded."""
    from lookalike.encoders import load_encoder
    from lookalike.indexer.pipeline import InstanceIndexer
    from lookalike.indexer.store import IndexStore
    from lookalike.orthanc_rest import HttpOrthanc

    settings: Settings = app.conf.lookalike_settings
    api = HttpOrthanc(settings.orthanc_url, settings.orthanc_user, settings.orthanc_password)
    store = IndexStore(settings.index_dir, snapshot_every=SNAPSHOT_EVERY)

    def encoder(name: str, weights: str | None = None):
        import torch

        torch.set_num_threads(settings.torch_threads)
        return load_encoder(name, weights=weights or settings.weights.get(name))

    return InstanceIndexer(api, store, encoder, settings.max_pixels)


@worker_init.connect
def _yield_cpu(**_) -> None:
    """Indexing is background work: the worker (and the pool it forks) yields the CPU to Orthanc's ingest.

    Linux's SCHED_IDLE runs it only on CPU time nothing else wants, and any wakeup of Orthanc preempts it at once
    (a niceness alone still lets it finish its time slice while a C-STORE waits); elsewhere, niceness.
    """
    settings: Settings = app.conf.lookalike_settings
    if settings.worker_idle_priority and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(settings.worker_nice)


@worker_process_init.connect
def _open_index(**_) -> None:
    """Create the catalogue when the worker starts, so that readers find it before the first task."""
    indexer()


@worker_process_shutdown.connect
def _save_index(**_) -> None:
    """Save the FAISS snapshots on the way out, so that the next start replays little."""
    indexer().store.close()


def _record_final_failure(task, instance_id: str, exc: Exception) -> None:
    code = "orthanc-auth" if isinstance(exc, OrthancAuthError) else "orthanc-unavailable"
    indexer().store.catalogue.record_problem(
        orthanc_instance_id=instance_id, sop_instance_uid="", orthanc_study_id="", code=code, message=str(exc)
    )
    log.error("instance %s given up after %d tries: %s", instance_id, task.request.retries + 1, exc)


class IndexingTask(Task):
    """A task whose failure, whatever its cause, leaves a recorded problem on the instance: never silence."""

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        instance_id = args[0] if args else kwargs.get("instance_id", "")
        log.error("instance %s: task %s failed: %s\n%s", instance_id, task_id, exc, einfo)
        indexer().store.catalogue.record_problem(
            orthanc_instance_id=instance_id, code="internal-error", message=f"{type(exc).__name__}: {exc}",
            sop_instance_uid="", orthanc_study_id=kwargs.get("study_id") or (args[2] if len(args) > 2 else ""),
        )


def _index(task, instance_id: str, series_id: str | None, study_id: str | None, **options) -> dict:
    """Run the indexer for one instance: Orthanc unreachable is retried by Celery, then recorded like bad input."""
    try:
        outcome = indexer().index(instance_id, series_id, study_id, **options)
    except OrthancAuthError as exc:
        _record_final_failure(task, instance_id, exc)
        return {"status": "failed", "code": "orthanc-auth"}
    except OrthancUnavailableError as exc:
        if task.request.retries >= task.max_retries:
            _record_final_failure(task, instance_id, exc)
            return {"status": "failed", "code": "orthanc-unavailable"}
        raise
    log.info("instance %s %s %s", instance_id, outcome.status, outcome.code or outcome.model_version)
    return outcome.__dict__


@app.task(name=TASK_INDEX_INSTANCE, bind=True, base=IndexingTask, **RETRY)
def index_instance(self, instance_id: str, series_id: str | None = None, study_id: str | None = None,
                   missing_only: bool = False) -> dict:
    return _index(self, instance_id, series_id, study_id, missing_only=missing_only)


@app.task(name=TASK_REINDEX_INSTANCE, bind=True, base=IndexingTask, **RETRY)
def reindex_instance(self, instance_id: str, series_id: str, study_id: str, encoder: str, weights: str) -> dict:
    """Embed an indexed instance again with another checkpoint (``lookalike reindex``), beside its current vector."""
    return _index(self, instance_id, series_id, study_id, missing_only=True, model=(encoder, weights))


@app.task(name=TASK_RECONCILE_STUDY, bind=True, **RETRY)
def reconcile_study(self, study_id: str) -> int:
    outcomes = indexer().reconcile_study(study_id)
    log.info("study %s reconciled: %d instance(s) caught up", study_id, len(outcomes))
    return len(outcomes)


@app.task(name=TASK_FORGET)
def forget(level: str, resource_id: str) -> None:
    indexer().forget(level, resource_id)
    log.info("%s %s removed from the index", level, resource_id)



@functools.cache
def follower():
    """The worker process's reader of Orthanc's change log (it remembers where the previous pass stopped)."""
    from lookalike.indexer.change_log import ChangeLogFollower

    def send(name: str, args: list, kwargs: dict) -> None:
        app.send_task(name, args=args, kwargs=kwargs, queue=QUEUE, retry=False)

    return ChangeLogFollower(indexer().api, indexer().store.catalogue, send)


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
    """Queues a catch-up pass when the worker starts, then every ``catch_up_interval`` seconds.

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
        interval = app.conf.lookalike_settings.catch_up_interval
        if interval <= 0:
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
