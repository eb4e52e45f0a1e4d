"""Index Orthanc instances in batches: plan, fetch and decode, embed, store. The Celery tasks are thin wrappers.

Three stages, run in one process by :class:`Pipeline` (the one orchestrator), or apart so that embedding can run
on other hosts than the index:

1. :meth:`InstanceIndexer.plan` (the index host: it reads the catalogue) turns requests into :class:`Job`\\ s: an
   instance indexed already is skipped when only a missing one is wanted, and each job names the checkpoint that
   lookups use per encoder (a re-index names its own).
2. :class:`Embedder` (any host: it needs Orthanc and the model, not the index) fetches and decodes each job's
   instance, then embeds every frame of every instance of a batch in one call per encoder.
3. :meth:`InstanceIndexer.apply` (the index host) writes the batch's vectors with one :meth:`IndexStore.add_many`
   and records each instance's problem.

Bad input ends as a recorded problem on its own instance (code and message in the catalogue, shown by
``/lookalike/status``), never as an exception that would fail its batch-mates; Orthanc unreachable is a
``retry`` result, for the task to send again with back-off.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterable, Protocol

import numpy as np

from lookalike.config import ENCODER_FOR_MODALITY
from lookalike.dicom.decode import DecodedImage
from lookalike.dicom.errors import LookalikeDicomError, NotIndexableError
from lookalike.dicom.instance import PreparedInstance
from lookalike.encoders.base import Embedding
from lookalike.index.catalogue import InstanceRecord
from lookalike.orthanc.client import (OrthancApi, OrthancAuthError, OrthancError, OrthancNotFoundError,
                                      OrthancUnavailableError, get_json, orthanc_resource_id)
from lookalike.orthanc.ingest import series_is_queued
from lookalike.worker.fetcher import Fetched, fetch_instance
from lookalike.worker.ingest_gate import IngestGate

if TYPE_CHECKING:  # FAISS: embedding hosts and the worker's main process import this module, and open no index
    from lookalike.index.store import IndexStore

log = logging.getLogger(__name__)


class Encoder(Protocol):
    name: str
    model_version: str

    def embed_with_boxes(self, images: list[np.ndarray]) -> Embedding: ...


@dataclass(frozen=True)
class Outcome:
    """What became of one instance: ``indexed``, ``skipped`` (not for Lookalike), ``failed``, ``gone``, or
    ``retry`` (Orthanc unreachable: the task sends it again later)."""

    status: str
    orthanc_instance_id: str
    code: str = ""
    message: str = ""
    model_version: str = ""


@dataclass(frozen=True)
class Request:
    """One instance to index, as a task names it; ``model`` (encoder, checkpoint path) is a re-index."""

    instance_id: str
    series_id: str | None = None
    study_id: str | None = None
    missing_only: bool = False
    model: tuple[str, str] | None = None


@dataclass(frozen=True)
class Job:
    """One instance to embed, with all an embedding worker needs (JSON-able: it travels through Redis).

    ``weights`` maps each encoder to the checkpoint to embed with ("" for the settings' one); ``only`` restricts a
    re-index to the instances of its encoder.
    """

    instance_id: str
    series_id: str | None
    study_id: str | None
    weights: dict[str, str] = field(default_factory=dict)
    only: str | None = None
    missing_only: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        return cls(**data)


@dataclass
class Result:
    """What the embedding stage made of one job: a record and its vector, a problem, or a retry."""

    job: Job
    outcome: Outcome
    record: InstanceRecord | None = None
    vector: np.ndarray | None = None
    #: For a problem record: the SOP Instance UID and the Orthanc study (the file may not have parsed).
    sop_instance_uid: str = ""
    study_id: str = ""

    def to_dict(self) -> dict:
        """JSON-able; float32 vectors round-trip exactly through JSON's float64 numbers."""
        return {"job": asdict(self.job), "outcome": asdict(self.outcome),
                "record": None if self.record is None else asdict(self.record),
                "vector": None if self.vector is None else self.vector.tolist(),
                "sop_instance_uid": self.sop_instance_uid, "study_id": self.study_id}

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        record = data["record"]
        if record is not None:
            box = record.get("lesion_box")
            record = InstanceRecord(**{**record, "lesion_box": None if box is None else tuple(box)})
        vector = data["vector"]
        return cls(Job.from_dict(data["job"]), Outcome(**data["outcome"]), record,
                   None if vector is None else np.asarray(vector, dtype=np.float32),
                   data["sop_instance_uid"], data["study_id"])


def _text(ds, keyword: str) -> str:
    return str(ds.get(keyword, "") or "")


def _frames(image: DecodedImage) -> list[np.ndarray]:
    return list(image.frames) or [image.pixels]


def _instance_vector(encoder: Encoder, image: DecodedImage) -> tuple[np.ndarray, tuple | None]:
    """One unit vector for an instance and its lesion box, from its own embedding call (see :func:`_pool_frames`)."""
    return _pool_frames(encoder.embed_with_boxes(_frames(image)), image)


def _pool_frames(embedding: Embedding, image: DecodedImage) -> tuple[np.ndarray, tuple | None]:
    """One unit vector for an instance, the L2-normalised mean of its frames' embeddings, and its lesion box.

    Embeddings are unit vectors compared by inner product, and the mean of unit vectors, normalised, is the
    direction whose summed cosine similarity to every sampled frame is highest: the instance is found by a
    query that looks like any part of its sweep, not only like one arbitrary frame. A single-frame image
    gives its own embedding back.

    The box is the one the encoder used in the middle frame (the frame a viewer shows first), moved from the
    decoded frame's pixels to the stored pixels of the full frame (undoing the imaging-region crop and any
    block reduction), or None when the vector came from the whole image.
    """
    vectors = np.asarray(embedding.vectors, dtype=np.float32)
    middle = len(vectors) // 2
    box = _stored_pixel_box(embedding.boxes[middle] if embedding.boxes else None, image)
    mean = vectors.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if not np.isfinite(norm) or norm == 0.0:
        return vectors[middle], box  # opposite frames cancelled out: fall back to the middle one
    return mean / np.float32(norm), box


def _stored_pixel_box(box, image: DecodedImage) -> tuple[int, int, int, int, float] | None:
    """A :class:`~lookalike.encoders.lesion.LesionBox` of a decoded frame in the instance's stored pixels."""
    if box is None:
        return None
    factor = image.downsampling  # frames are reduced first, then cropped on whole reduced pixels
    dx, dy = (image.region[0] // factor, image.region[1] // factor) if image.region else (0, 0)
    return ((dx + box.x0) * factor, (dy + box.y0) * factor, (dx + box.x1) * factor, (dy + box.y1) * factor,
            float(box.confidence))


class Embedder:
    """Fetches, decodes and embeds a batch of jobs: the part of indexing that needs Orthanc and a model, not the index.

    Parameters
    ----------
    api
        Orthanc's REST API (over HTTP, with credentials, in the worker).
    encoders
        ``load_encoder``: an encoder by name ("us", "xr") and checkpoint path (None: the settings' choice); called
        lazily, so torch loads only when needed, in the process that embeds.
    max_pixels
        Instances claiming more pixels than this are refused before any decoding.
    threads
        Instances of a batch fetched and decoded at once: waiting for Orthanc, and the decoders' C code, overlap.
    gate
        Holds each batch's fetching back while Orthanc receives instances (see
        :mod:`lookalike.worker.ingest_gate`); None: fetch at once.
    fetch_ahead
        Fetches and decodes an instance of the next batch, ``(instance, series, study)``, as
        :func:`~lookalike.worker.fetcher.fetch_instance` does (the worker's runs it in a process of its own,
        :class:`~lookalike.worker.fetcher.FetchProcess`, so that it does not take the GIL from the encoder);
        None: :func:`~lookalike.worker.fetcher.fetch_instance` in this process.
    """

    def __init__(self, api: OrthancApi, encoders: Callable[[str, str | None], Encoder], max_pixels: int,
                 threads: int = 4, gate: IngestGate | None = None,
                 fetch_ahead: Callable[[str, str | None, str | None], Fetched] | None = None) -> None:
        self.api = api
        self.encoders = encoders
        self.max_pixels = max_pixels
        self.threads = threads
        self.gate = gate
        self.fetch_ahead = fetch_ahead or functools.partial(fetch_instance, api, max_pixels=max_pixels)
        #: Instances of the next batch fetched and decoded while this one embeds: instance id -> (decoded, series,
        #: study), filled by a thread of their own, used once by the next :meth:`run` and then dropped.
        self._ahead: dict[str, Fetched] = {}
        self._ahead_thread: threading.Thread | None = None
        #: The encoders of the batch :meth:`run` prepares, by (name, checkpoint): looked up once per batch.
        self._batch_encoders: dict[tuple[str, str | None], Encoder] = {}

    def run(self, jobs: list[Job], ahead: Iterable[Job] = ()) -> list[Result]:
        """One result per job, in order; every frame of the batch's instances goes through one call per encoder.

        ``ahead`` (the jobs likely to make the next batch) are fetched and decoded by a thread of their own while
        this batch embeds, for the next call to use. An instance twice in a batch is fetched again: Orthanc may
        have overwritten it since it was fetched ahead (the second request says so).
        """
        started = time.perf_counter()
        if self._ahead_thread is not None:
            self._ahead_thread.join()
        fetched, self._ahead, self._ahead_thread = self._ahead, {}, None
        twice = {i for i, n in Counter(job.instance_id for job in jobs).items() if n > 1}
        fetched = {i: v for i, v in fetched.items() if i not in twice}
        waited = 0.0
        if self.gate is not None and any(job.instance_id not in fetched for job in jobs):
            waited = self.gate.wait()  # the PACS first: no fetch while Orthanc receives, up to a cap
            started += waited
        results: list[Result | None] = [None] * len(jobs)
        ready: dict[int, tuple[Encoder, PreparedInstance, Job]] = {}
        self._batch_encoders = {}
        prepare = lambda job: self._prepare_or_problem(job, fetched.get(job.instance_id))  # noqa: E731
        if all(job.instance_id in fetched for job in jobs):
            all_prepared = [prepare(job) for job in jobs]  # all fetched ahead: nothing to wait for, no threads
        else:
            with ThreadPoolExecutor(max(1, min(self.threads, len(jobs)))) as threads:
                all_prepared = list(threads.map(prepare, jobs))
        ahead = [job for job in ahead if job.instance_id not in fetched]
        if ahead:
            self._ahead_thread = threading.Thread(target=self._fetch_ahead, args=(ahead,), daemon=True,
                                                  name="lookalike-fetch-ahead")
            self._ahead_thread.start()
        for i, prepared in enumerate(all_prepared):
            if isinstance(prepared, Result):
                results[i] = prepared
            else:
                ready[i] = prepared
        prepared_at = time.perf_counter()
        by_encoder: dict[int, list[int]] = {}
        for i, (encoder, _, _) in ready.items():
            by_encoder.setdefault(id(encoder), []).append(i)
        for members in by_encoder.values():
            for i, result in zip(members, self._embed_group([ready[i] for i in members])):
                results[i] = result
        log.info("batch of %d: waited %.3f s for Orthanc's ingest, fetched and decoded in %.3f s (%d ahead), %d"
                 " embedded in %.3f s", len(jobs), waited, prepared_at - started,
                 sum(job.instance_id in fetched for job in jobs), len(ready), time.perf_counter() - prepared_at)
        return results  # type: ignore[return-value]

    def _fetch_ahead(self, jobs: list[Job]) -> None:
        """Fetch and decode instances of the next batch; whatever fails here is done again, and reported, then.

        Stops as soon as Orthanc receives instances: the next batch then waits for its quiet window itself."""
        for job in jobs:
            if self.gate is not None and not self.gate.is_quiet():
                return
            try:
                self._ahead[job.instance_id] = self.fetch_ahead(job.instance_id, job.series_id, job.study_id)
            except Exception:  # noqa: BLE001 (Orthanc away, bad input, anything: the batch itself says what)
                continue

    def _fetch(self, job: Job) -> Fetched:
        """The decoded instance (or why it cannot be), its series and its study (looked up when the job does not
        name them)."""
        return fetch_instance(self.api, job.instance_id, job.series_id, job.study_id, self.max_pixels)

    def _prepare_or_problem(self, job: Job, fetched: tuple | None) -> tuple[Encoder, PreparedInstance, Job] | Result:
        try:
            return self._prepare(job, fetched)
        except Exception as exc:  # a fault of ours on one instance: recorded on it, its batch-mates go on
            log.exception("instance %s: preparing failed", job.instance_id)
            return self._problem(job, "failed", "internal-error", f"{type(exc).__name__}: {exc}")

    def _prepare(self, job: Job, fetched: tuple | None = None) -> tuple[Encoder, PreparedInstance, Job] | Result:
        """Fetch and decode one job's instance (unless ``fetched`` ahead) and pick its encoder (the job with its
        series and study), or say why not."""
        instance_id = job.instance_id
        try:
            prepared, series_id, study_id = fetched or self._fetch(job)
        except OrthancNotFoundError:
            return Result(job, Outcome("gone", instance_id, message="deleted from Orthanc before it could be indexed"))
        except OrthancAuthError as exc:
            return self._problem(job, "failed", "orthanc-auth", str(exc))
        except OrthancUnavailableError as exc:
            return Result(job, Outcome("retry", instance_id, "orthanc-unavailable", str(exc)))
        job = replace(job, series_id=series_id, study_id=study_id)
        if isinstance(prepared, LookalikeDicomError):
            status = "skipped" if isinstance(prepared, NotIndexableError) else "failed"
            log.warning("instance %s %s: %s: %s", instance_id, status, prepared.code, prepared)
            return self._problem(job, status, prepared.code, str(prepared), self._sop_instance_uid(instance_id))
        if job.only is not None and prepared.encoder != job.only:
            return Result(job, Outcome("skipped", instance_id, message=f"a {prepared.encoder} instance, not {job.only}"))
        return self._encoder(prepared.encoder, job.weights.get(prepared.encoder) or None), prepared, job

    def _encoder(self, name: str, weights: str | None) -> Encoder:
        """``encoders(name, weights)``, asked once per batch: the loader checks the checkpoint's file each time it
        is asked (a replaced checkpoint is loaded again), a path resolution and a stat that took about 0.5 ms of
        the worker's CPU per instance when asked per instance. A loader that raises is asked again for the next
        instance."""
        key = (name, weights)
        encoder = self._batch_encoders.get(key)
        if encoder is None:
            encoder = self._batch_encoders[key] = self.encoders(name, weights)
        return encoder

    @staticmethod
    def _problem(job: Job, status: str, code: str, message: str, sop_instance_uid: str = "") -> Result:
        return Result(job, Outcome(status, job.instance_id, code, message), sop_instance_uid=sop_instance_uid,
                      study_id=job.study_id or "")

    def _embed_group(self, ready: list[tuple[Encoder, PreparedInstance, Job]]) -> list[Result]:
        """Embed instances of one encoder in one call; should that call fail, each instance alone, so that one
        image the model cannot take is recorded on itself and the others are indexed."""
        encoder = ready[0][0]
        images = [prepared.image for _, prepared, _ in ready]
        try:
            frames = [frame for image in images for frame in _frames(image)]
            embedding = encoder.embed_with_boxes(frames)
            pooled, start = [], 0
            for image in images:
                n = len(_frames(image))
                part = Embedding(embedding.vectors[start:start + n], list(embedding.boxes[start:start + n]))
                pooled.append(_pool_frames(part, image))
                start += n
        except Exception:
            log.exception("a batch of %d %s instances failed to embed: embedding each alone", len(images),
                          encoder.name)
            return [self._embed_alone(*one) for one in ready]
        return [self._result(job, encoder, prepared, vector, box)
                for (_, prepared, job), (vector, box) in zip(ready, pooled)]

    def _embed_alone(self, encoder: Encoder, prepared: PreparedInstance, job: Job) -> Result:
        try:
            vector, box = _instance_vector(encoder, prepared.image)
        except Exception as exc:
            log.exception("instance %s: embedding failed", job.instance_id)
            return self._problem(job, "failed", "internal-error", f"{type(exc).__name__}: {exc}",
                                 _text(prepared.dataset, "SOPInstanceUID"))
        return self._result(job, encoder, prepared, vector, box)

    @staticmethod
    def _result(job: Job, encoder: Encoder, prepared: PreparedInstance, vector: np.ndarray, box) -> Result:
        ds = prepared.dataset
        record = InstanceRecord(
            sop_instance_uid=_text(ds, "SOPInstanceUID"),
            sop_class_uid=_text(ds, "SOPClassUID"),
            series_instance_uid=_text(ds, "SeriesInstanceUID"),
            study_instance_uid=_text(ds, "StudyInstanceUID"),
            patient_id=_text(ds, "PatientID"),
            study_date=_text(ds, "StudyDate"),
            study_time=_text(ds, "StudyTime"),
            modality=_text(ds, "Modality"),
            orthanc_instance_id=job.instance_id,
            orthanc_series_id=job.series_id or "",
            orthanc_study_id=job.study_id or "",
            encoder=encoder.name,
            model_version=encoder.model_version,
            lesion_box=box,
        )
        return Result(job, Outcome("indexed", job.instance_id, model_version=encoder.model_version), record,
                      np.asarray(vector, dtype=np.float32))

    def _sop_instance_uid(self, instance_id: str) -> str:
        """The SOP Instance UID Orthanc holds for an instance, for a problem record (the file may not parse)."""
        try:
            return get_json(self.api, f"/instances/{instance_id}")["MainDicomTags"].get("SOPInstanceUID", "")
        except (OrthancError, KeyError, ValueError):
            return ""


class InstanceIndexer:
    """The index host's side of indexing: plans requests against the catalogue and applies embedded results to one
    :class:`IndexStore`; also reconciles a study and forgets deleted resources. It embeds nothing (that is the
    :class:`Embedder`'s, and :class:`Pipeline` runs the three stages).

    Parameters
    ----------
    api
        Orthanc's REST API (over HTTP, with credentials, in the worker).
    store
        The writable index.
    """

    def __init__(self, api: OrthancApi, store: IndexStore) -> None:
        self.api = api
        self.store = store

    def plan(self, requests: Iterable[Request]) -> list[Job | Outcome]:
        """A job per request, or its outcome when there is nothing to embed (indexed already, or a duplicate of
        an earlier request of the batch).

        The checkpoint of each encoder is the one lookups use (a re-index switches it), the settings' until one is
        recorded; a re-index embeds with its own.
        """
        active = {name: (found[1] if (found := self.store.catalogue.active_model(name)) else "")
                  for name in sorted(set(ENCODER_FOR_MODALITY.values()))}
        planned: list[Job | Outcome] = []
        seen: dict[tuple, int] = {}
        for request in requests:
            key = (request.instance_id, request.model)
            if key in seen:  # the fast path and the catch-up both queued it: embed it once
                first = planned[seen[key]]
                if isinstance(first, Job) and not request.missing_only:
                    planned[seen[key]] = replace(first, missing_only=False)
                planned.append(Outcome("indexed", request.instance_id, message="a duplicate in its batch"))
                continue
            seen[key] = len(planned)
            if request.model is None and request.missing_only and self.store.catalogue.is_indexed(request.instance_id):
                planned.append(Outcome("indexed", request.instance_id, message="indexed already"))
                continue
            if request.model is None:
                planned.append(Job(request.instance_id, request.series_id, request.study_id, active,
                                   missing_only=request.missing_only))
            else:
                name, weights = request.model
                planned.append(Job(request.instance_id, request.series_id, request.study_id, {name: weights},
                                   only=name, missing_only=request.missing_only))
        return planned

    def apply(self, results: list[Result]) -> list[Outcome]:
        """Write a batch's results: every vector with one :meth:`IndexStore.add_many` per vector size, each problem
        on its own instance. A ``missing_only`` result whose model's vector arrived meanwhile is not written."""
        outcomes = [r.outcome for r in results]
        todo: dict[int, list[int]] = {}
        for i, result in enumerate(results):
            if result.outcome.status == "indexed" and result.record is not None:
                if result.job.missing_only and self.store.catalogue.is_indexed(result.job.instance_id,
                                                                               result.record.model_version):
                    outcomes[i] = replace(result.outcome, message="indexed already")
                    continue
                todo.setdefault(result.vector.shape[0], []).append(i)
            elif result.outcome.status in ("skipped", "failed") and result.outcome.code:
                self.store.catalogue.record_problem(
                    orthanc_instance_id=result.job.instance_id, sop_instance_uid=result.sop_instance_uid,
                    orthanc_study_id=result.study_id, code=result.outcome.code, message=result.outcome.message)
        for members in todo.values():
            self.store.add_many([results[i].record for i in members], np.stack([results[i].vector for i in members]))
        return outcomes

    def reconcile_study(self, study_id: str) -> list[Request]:
        """The US/DX/CR instances of a study that are neither indexed nor recorded as a problem.

        Catches instances whose ``NEW_INSTANCE`` event was lost (Orthanc restarted with events queued).
        """
        requests: list[Request] = []
        try:
            series_list = get_json(self.api, f"/studies/{study_id}/series")
        except OrthancNotFoundError:
            return requests
        for series in series_list:
            if not series_is_queued(series):
                continue
            for instance_id in series.get("Instances", []):
                if self.store.catalogue.is_indexed(instance_id) or self.store.catalogue.problem_for(instance_id):
                    continue
                requests.append(Request(instance_id, series["ID"], study_id, missing_only=True))
        return requests

    def forget(self, level: str, resource_id: str) -> None:
        """Drop a deleted patient, study, series or instance from the index (tombstones; nothing else is touched).

        Orthanc reports a deleted patient by its Orthanc id alone, after the patient is gone: the catalogue's
        PatientIDs are hashed the way Orthanc names patients to find its studies.
        """
        if level == "patient":
            for patient_id, studies in self.store.catalogue.live_studies_by_patient().items():
                if orthanc_resource_id(patient_id) == resource_id:
                    for study_id in studies:
                        self.store.delete_study(study_id)
        elif level == "study":
            self.store.delete_study(resource_id)
        elif level == "instance":
            self.store.delete_instance(resource_id)
        elif level == "series":
            self.store.delete_series(resource_id)


class Pipeline:
    """The one orchestrator of indexing in a process: plan -> embed -> apply, one batch at a time.

    The worker's tasks run every batch through :meth:`index_many` (with their retry and write hooks); where
    embedding runs on other hosts (``remote_embedding``), the same three stages run apart: :meth:`InstanceIndexer.plan`
    on the index host, :meth:`Embedder.run` on the embedding host, :meth:`InstanceIndexer.apply` back on the index
    host. A worker process holds one :class:`Embedder`, this one's.
    """

    def __init__(self, indexer: InstanceIndexer, embedder: Embedder) -> None:
        self.indexer = indexer
        self.embedder = embedder

    @classmethod
    def local(cls, api: OrthancApi, store: IndexStore, encoders: Callable[[str, str | None], Encoder],
              max_pixels: int) -> "Pipeline":
        """The whole pipeline in this process, over one Orthanc and one index (``encoders``: see :class:`Embedder`)."""
        return cls(InstanceIndexer(api, store), Embedder(api, encoders, max_pixels))

    def index(self, instance_id: str, series_id: str | None = None, study_id: str | None = None, *,
              missing_only: bool = False, model: tuple[str, str] | None = None) -> Outcome:
        """Index one instance (:meth:`index_many` of one); Orthanc unreachable raises, for the caller to retry.

        ``missing_only`` (catch-up and retries) skips an instance that is indexed already; the fast path leaves it
        off, so that an instance Orthanc overwrote is embedded again. ``model`` (encoder name, checkpoint path) is
        a re-index: the instance is embedded by that checkpoint, beside its vector of the active model; with
        ``missing_only`` it is not written again if that checkpoint's vector is there already.
        """
        [outcome] = self.index_many([Request(instance_id, series_id, study_id, missing_only, model)])
        if outcome.status == "retry":
            raise OrthancUnavailableError(outcome.message)
        return outcome

    def index_many(self, requests: list[Request], ahead: Iterable[Request] = (), *,
                   settle: Callable[[list[int], list[Result]], list[Result | None]] | None = None,
                   write: Callable[[list[Result]], list[Outcome]] | None = None) -> list[Outcome]:
        """Index a batch: one outcome per request, in order.

        ``ahead`` (requests of the next batch) are fetched and decoded while this batch embeds, but for those only
        missing that are indexed already. ``settle(positions, results)`` sees each embedded result with the
        position of its request and says, for each, the result to write or None (the worker sends that instance
        again later: its outcome stays ``retry``). ``write`` writes the results kept and returns their outcomes
        (default :meth:`InstanceIndexer.apply`).
        """
        planned = self.indexer.plan(requests)
        positions = [i for i, p in enumerate(planned) if isinstance(p, Job)]
        ahead_jobs = [job for job in self.indexer.plan(ahead) if isinstance(job, Job)] if ahead else []
        results = self.embedder.run([planned[i] for i in positions], ahead_jobs)
        settled = settle(positions, results) if settle is not None else results
        written = iter((write or self.indexer.apply)([r for r in settled if r is not None]))
        outcomes: list = list(planned)
        for i, result, kept in zip(positions, results, settled):
            outcomes[i] = next(written) if kept is not None else result.outcome
        return outcomes
