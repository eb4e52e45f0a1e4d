"""Celery tasks of the worker: thin wrappers of :class:`~lookalike.indexer.pipeline.InstanceIndexer`.

Transient failures (Orthanc unreachable or failing) are retried with exponential back-off, a bounded number of
times; after the last try the instance is recorded as a problem. Bad input is recorded at once and acknowledged.
"""

from __future__ import annotations

import functools
import logging
import os

from celery.signals import worker_init, worker_process_init, worker_process_shutdown

from lookalike.config import TASK_FORGET, TASK_INDEX_INSTANCE, TASK_RECONCILE_STUDY, Settings
from lookalike.indexer.celery_app import app
from lookalike.orthanc_rest import OrthancAuthError, OrthancUnavailableError

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

    def encoder(name: str):
        import torch

        torch.set_num_threads(settings.torch_threads)
        return load_encoder(name, weights=settings.weights.get(name))

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


@app.task(name=TASK_INDEX_INSTANCE, bind=True, **RETRY)
def index_instance(self, instance_id: str, series_id: str | None = None, study_id: str | None = None) -> dict:
    try:
        outcome = indexer().index(instance_id, series_id, study_id)
    except OrthancAuthError as exc:
        _record_final_failure(self, instance_id, exc)
        return {"status": "failed", "code": "orthanc-auth"}
    except OrthancUnavailableError as exc:
        if self.request.retries >= self.max_retries:
            _record_final_failure(self, instance_id, exc)
            return {"status": "failed", "code": "orthanc-unavailable"}
        raise
    log.info("instance %s %s %s", instance_id, outcome.status, outcome.code or outcome.model_version)
    return outcome.__dict__


@app.task(name=TASK_RECONCILE_STUDY, bind=True, **RETRY)
def reconcile_study(self, study_id: str) -> int:
    outcomes = indexer().reconcile_study(study_id)
    log.info("study %s reconciled: %d instance(s) caught up", study_id, len(outcomes))
    return len(outcomes)


@app.task(name=TASK_FORGET)
def forget(level: str, resource_id: str) -> None:
    indexer().forget(level, resource_id)
    log.info("%s %s removed from the index", level, resource_id)

