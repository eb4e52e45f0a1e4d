"""Index one Orthanc instance: fetch, decode, route, embed, store. The Celery tasks are thin wrappers of this.

Bad input ends here as a recorded problem (the instance's code and message in the catalogue, shown by
``/lookalike/status``), never as an exception that would stop the worker; only a transient failure of Orthanc
propagates, for Celery to retry with back-off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from lookalike.config import ENCODER_FOR_MODALITY
from lookalike.dicom_io.decode import DecodedImage
from lookalike.encoders.base import Embedding
from lookalike.dicom_io.errors import LookalikeDicomError, NotIndexableError
from lookalike.dicom_io.instance import prepare_instance
from lookalike.indexer.catalogue import InstanceRecord
from lookalike.indexer.store import IndexStore
from lookalike.orthanc_rest import (OrthancApi, OrthancError, OrthancNotFoundError, get_json, instance_series,
                                    orthanc_resource_id)

log = logging.getLogger(__name__)


class Encoder(Protocol):
    name: str
    model_version: str

    def embed_with_boxes(self, images: list[np.ndarray]) -> Embedding: ...


@dataclass(frozen=True)
class Outcome:
    """What became of one instance: ``indexed``, ``skipped`` (not for Lookalike), ``failed`` or ``gone``."""

    status: str
    orthanc_instance_id: str
    code: str = ""
    message: str = ""
    model_version: str = ""


def _text(ds, keyword: str) -> str:
    return str(ds.get(keyword, "") or "")


def _instance_vector(encoder: Encoder, image: DecodedImage) -> tuple[np.ndarray, tuple | None]:
    """One unit vector for an instance, the L2-normalised mean of its frames' embeddings, and its lesion box.

    Embeddings are unit vectors compared by inner product, and the mean of unit vectors, normalised, is the
    direction whose summed cosine similarity to every sampled frame is highest: the instance is found by a
    query that looks like any part of its sweep, not only like one arbitrary frame. A single-frame image
    gives its own embedding back.

    The box is the one the encoder used in the middle frame (the frame a viewer shows first), moved from the
    decoded frame's pixels to the stored pixels of the full frame (undoing the imaging-region crop and any
    block reduction), or None when the vector came from the whole image.
    """
    frames = list(image.frames) or [image.pixels]
    embedding = encoder.embed_with_boxes(frames)
    vectors = np.asarray(embedding.vectors, dtype=np.float32)
    box = _stored_pixel_box(embedding.boxes[len(frames) // 2] if embedding.boxes else None, image)
    mean = vectors.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if not np.isfinite(norm) or norm == 0.0:
        return vectors[len(vectors) // 2], box  # opposite frames cancelled out: fall back to the middle one
    return mean / np.float32(norm), box


def _stored_pixel_box(box, image: DecodedImage) -> tuple[int, int, int, int, float] | None:
    """A :class:`~lookalike.encoders.lesion.LesionBox` of a decoded frame in the instance's stored pixels."""
    if box is None:
        return None
    factor = image.downsampling  # frames are reduced first, then cropped on whole reduced pixels
    dx, dy = (image.region[0] // factor, image.region[1] // factor) if image.region else (0, 0)
    return ((dx + box.x0) * factor, (dy + box.y0) * factor, (dx + box.x1) * factor, (dy + box.y1) * factor,
            float(box.confidence))


class InstanceIndexer:
    """Indexes instances of one Orthanc into one :class:`IndexStore`.

    Parameters
    ----------
    api
        Orthanc's REST API (over HTTP, with credentials, in the worker).
    store
        The writable index.
    encoders
        ``load_encoder``: an encoder by name ("us", "xr") and checkpoint path (None: the settings' choice); called
        lazily, so torch loads only when needed.
    max_pixels
        Instances claiming more pixels than this are refused before any decoding.
    """

    def __init__(self, api: OrthancApi, store: IndexStore, encoders: Callable[[str, str | None], Encoder],
                 max_pixels: int) -> None:
        self.api = api
        self.store = store
        self.encoders = encoders
        self.max_pixels = max_pixels

    def index(self, instance_id: str, series_id: str | None = None, study_id: str | None = None, *,
              missing_only: bool = False, model: tuple[str, str] | None = None) -> Outcome:
        """Index one instance; ``series_id`` and ``study_id`` (Orthanc ids) are looked up when not given.

        ``missing_only`` (catch-up and retries) skips an instance that is indexed already; the fast path leaves it
        off, so that an instance Orthanc overwrote is embedded again. ``model`` (encoder name, checkpoint path) is
        a re-index: the instance is embedded by that checkpoint, beside its vector of the active model; with
        ``missing_only`` it is skipped if that checkpoint's vector is there already.
        """
        if model is not None:
            reindexer = self.encoders(*model)
            if missing_only and self.store.catalogue.is_indexed(instance_id, reindexer.model_version):
                return Outcome("indexed", instance_id, message="indexed already", model_version=reindexer.model_version)
        elif missing_only and self.store.catalogue.is_indexed(instance_id):
            return Outcome("indexed", instance_id, message="indexed already")
        try:
            data = self.api.get_bytes(f"/instances/{instance_id}/file")
            if series_id is None or study_id is None:
                series = instance_series(self.api, instance_id)
                series_id, study_id = series["ID"], series["ParentStudy"]
        except OrthancNotFoundError:
            return Outcome("gone", instance_id, message="deleted from Orthanc before it could be indexed")
        try:
            prepared = prepare_instance(data, self.max_pixels)
        except LookalikeDicomError as exc:
            status = "skipped" if isinstance(exc, NotIndexableError) else "failed"
            self.store.catalogue.record_problem(
                orthanc_instance_id=instance_id,
                sop_instance_uid=self._sop_instance_uid(instance_id),
                orthanc_study_id=study_id,
                code=exc.code,
                message=str(exc),
            )
            log.warning("instance %s %s: %s: %s", instance_id, status, exc.code, exc)
            return Outcome(status, instance_id, exc.code, str(exc))

        ds = prepared.dataset
        if model is not None:
            if model[0] != prepared.encoder:
                return Outcome("skipped", instance_id, message=f"a {prepared.encoder} instance, not {model[0]}")
            encoder = reindexer
        else:
            # The model lookups use (a re-index switches it); the settings' checkpoint until one is set.
            active = self.store.catalogue.active_model(prepared.encoder)
            encoder = self.encoders(prepared.encoder, active[1] if active else None)
        vector, lesion_box = _instance_vector(encoder, prepared.image)
        record = InstanceRecord(
            sop_instance_uid=_text(ds, "SOPInstanceUID"),
            sop_class_uid=_text(ds, "SOPClassUID"),
            series_instance_uid=_text(ds, "SeriesInstanceUID"),
            study_instance_uid=_text(ds, "StudyInstanceUID"),
            patient_id=_text(ds, "PatientID"),
            study_date=_text(ds, "StudyDate"),
            modality=_text(ds, "Modality"),
            orthanc_instance_id=instance_id,
            orthanc_series_id=series_id,
            orthanc_study_id=study_id,
            encoder=encoder.name,
            model_version=encoder.model_version,
            lesion_box=lesion_box,
        )
        self.store.add(record, vector)
        return Outcome("indexed", instance_id, model_version=encoder.model_version)

    def _sop_instance_uid(self, instance_id: str) -> str:
        """The SOP Instance UID Orthanc holds for an instance, for a problem record (the file may not parse)."""
        try:
            return get_json(self.api, f"/instances/{instance_id}")["MainDicomTags"].get("SOPInstanceUID", "")
        except (OrthancError, KeyError, ValueError):
            return ""

    def reconcile_study(self, study_id: str) -> list[Outcome]:
        """Index every US/DX/CR instance of a study that is neither indexed nor recorded as a problem.

        Catches instances whose ``NEW_INSTANCE`` event was lost (Orthanc restarted with events queued).
        """
        outcomes = []
        try:
            series_list = get_json(self.api, f"/studies/{study_id}/series")
        except OrthancNotFoundError:
            return outcomes
        for series in series_list:
            if series.get("MainDicomTags", {}).get("Modality") not in ENCODER_FOR_MODALITY:
                continue
            for instance_id in series.get("Instances", []):
                if self.store.catalogue.is_indexed(instance_id) or self.store.catalogue.problem_for(instance_id):
                    continue
                outcomes.append(self.index(instance_id, series["ID"], study_id))
        return outcomes

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

