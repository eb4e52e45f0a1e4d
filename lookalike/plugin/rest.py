"""The ``/lookalike/...`` REST routes, as plain functions of their inputs: (HTTP status, JSON body).

They read the index the worker writes (read-only) and Orthanc's REST API in-process; no model runs here.
"""

from __future__ import annotations

import io
from dataclasses import asdict
from typing import Any, Callable

import pydicom

import lookalike
from lookalike.indexer.lookup import SimilarStudy, StudyNotIndexedError, similar_studies
from lookalike.indexer.store import IndexStore
from lookalike.orthanc_rest import OrthancApi, OrthancNotFoundError, get_json, store_instance

Response = tuple[int, dict[str, Any]]

DEFAULT_LIMIT = 10
MAX_LIMIT = 100
#: Query-study instances whose headers an SR inherits from; the report needs patient and study, not every image.
MAX_EVIDENCE = 20


def parse_limit(raw: str | None) -> int:
    """``?limit=N``: an integer in 1..MAX_LIMIT, else ValueError with a message for the client."""
    if raw in (None, ""):
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        raise ValueError(f"limit must be an integer, not {raw!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
    return limit


def _not_indexed(api: OrthancApi, store: IndexStore, study_id: str, pending: int) -> Response:
    """409 with the reason a known study has nothing to search with yet."""
    series = get_json(api, f"/studies/{study_id}/series")
    modalities = sorted({s.get("MainDicomTags", {}).get("Modality", "") for s in series})
    problems = store.catalogue.problems(limit=20, orthanc_study_id=study_id)
    if problems:
        reason = "none of the study's instances could be indexed"
    elif not any(m in lookalike.config.ENCODER_FOR_MODALITY for m in modalities):
        reason = f"the study holds no US, DX or CR series (modalities: {', '.join(modalities) or 'none'})"
    else:
        reason = "the study is queued for indexing and not searchable yet"
    body = {
        "error": "study not indexed",
        "reason": reason,
        "study": study_id,
        "modalities": modalities,
        "queued_tasks": pending,
        "problems": [{"instance": p.orthanc_instance_id, "code": p.code, "message": p.message} for p in problems],
    }
    return 409, body


def _study_exists(api: OrthancApi, study_id: str) -> bool:
    try:
        get_json(api, f"/studies/{study_id}")
        return True
    except OrthancNotFoundError:
        return False


def _lookup(api: OrthancApi, store: IndexStore, study_id: str, limit: int, pending: int) -> tuple[list[SimilarStudy] | None, Response | None]:
    if not _study_exists(api, study_id):
        return None, (404, {"error": "unknown study", "study": study_id})
    store.refresh()
    try:
        return similar_studies(store, study_id, limit), None
    except StudyNotIndexedError:
        return None, _not_indexed(api, store, study_id, pending)


def match_to_json(m: SimilarStudy) -> dict[str, Any]:
    return asdict(m)


def similar(api: OrthancApi, store: IndexStore, study_id: str, limit: int, pending: int = 0) -> Response:
    """``GET /lookalike/studies/{id}/similar``: the most similar other studies, best first."""
    matches, error = _lookup(api, store, study_id, limit, pending)
    if error:
        return error
    return 200, {
        "study": study_id,
        "aggregation": "a study scores the cosine similarity of its best-matching image pair with the query study",
        "similar": [match_to_json(m) for m in matches],
    }


def similar_report(api: OrthancApi, store: IndexStore, study_id: str, limit: int, pending: int = 0) -> Response:
    """``POST /lookalike/studies/{id}/similar-report``: the same answer as a Comprehensive SR stored in the study."""
    from lookalike.dicom_io.sr import build_similarity_report

    matches, error = _lookup(api, store, study_id, limit, pending)
    if error:
        return error
    rows = [r for r in store.catalogue.rows_for_study(study_id)][:MAX_EVIDENCE]
    evidence = [
        pydicom.dcmread(io.BytesIO(api.get_bytes(f"/instances/{r.orthanc_instance_id}/file")), stop_before_pixels=True)
        for r in rows
    ]
    versions = sorted({r.model_version for r in rows})
    sr = build_similarity_report(
        evidence, matches, algorithm_version=lookalike.__version__, model_version=", ".join(versions)
    )
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    sr_id = store_instance(api, buf.getvalue())
    return 200, {"study": study_id, "report": sr_id, "sop_instance_uid": str(sr.SOPInstanceUID), "similar": len(matches)}


def status(store: IndexStore, queue_length: Callable[[], int | None], pending: int = 0) -> Response:
    """``GET /lookalike/status``: what is indexed, what waits, what went wrong lately."""
    store.refresh()
    counts = [
        {"modality": modality, "encoder": encoder, "model_version": version, "instances": n}
        for modality, encoder, version, n in store.catalogue.counts()
    ]
    try:
        queued = queue_length()
    except Exception as exc:  # Redis down is itself something the administrator must see here
        queued = None
        broker_error = str(exc)
    else:
        broker_error = None
    return 200, {
        "version": lookalike.__version__,
        "indexed": counts,
        "queue": {"broker": queued, "plugin_pending": pending, "broker_error": broker_error},
        "problems": [
            {"instance": p.orthanc_instance_id, "study": p.orthanc_study_id, "sop_instance_uid": p.sop_instance_uid,
             "code": p.code, "message": p.message, "at": p.at, "attempts": p.attempts}
            for p in store.catalogue.problems(limit=50)
        ],
    }
