"""The ``/lookalike/...`` REST routes, as plain functions of their inputs: (HTTP status, JSON body).

The lookups themselves are the query service's (:mod:`lookalike.query.lookup_service`): in Orthanc's process
the handlers get a :class:`~lookalike.query.lookup_service.LookupClient`, so that neither FAISS nor the index is
ever loaded there, and read the catalogue read-only for what needs no index (why a study is not indexed, a report's
evidence, the status). The query service records each lookup in the audit trail before it answers; a request the
routes refuse is recorded by the plugin (:func:`audit_refusal`). Every answer
goes through :meth:`SimilarStudy.as_public_dict`, so another patient's identity leaves the server only where the
site's settings disclose it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import uuid
from typing import Any, Callable, Mapping
from urllib.parse import unquote_plus, urlsplit

import pydicom

import lookalike
from lookalike.dicom.kos import build_prior_selection
from lookalike.dicom.sr import SimilarCase, build_similarity_report
from lookalike.encoders.floors import SimilarityFloors
from lookalike.index.catalogue import CHANGES_CURSOR as CURSOR, Catalogue
from lookalike.index.search import SCOPES, SimilarStudy, StudyNotIndexedError
from lookalike.index.upgrade import model_status
from lookalike.query.audit import AuditLog
from lookalike.query.lookup_service import AuditUnavailable, LookupRequest, Lookups, LookupUnavailable
from lookalike.orthanc.client import OrthancApi, OrthancNotFoundError, find_by_uids, get_json, store_instance
from lookalike.orthanc.ingest import cursor_reset_reason, study_is_queued

Response = tuple[int, dict[str, Any]]

DEFAULT_LIMIT = 10
MAX_LIMIT = 100
DEFAULT_SCOPE = "archive"
#: Query-study instances whose headers an SR inherits from; the report needs patient and study, not every image.
MAX_EVIDENCE = 20
#: Namespace of the name-based UUIDs that make a report's UIDs from its answer.
_REPORT_UID_NAMESPACE = uuid.UUID("8f0b6a3e-5c1d-4e77-9a51-6c1f0e2b7d44")


def http_user(headers: Mapping[str, str]) -> str:
    """The user name of a request's Basic credentials (Orthanc checked them before calling us), for the audit trail;
    "anonymous" where Orthanc lets requests in without credentials."""
    value = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic":
        return "anonymous"
    try:
        return base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")[0] or "anonymous"
    except (binascii.Error, UnicodeDecodeError):
        return "anonymous"


def decode_query(raw: Mapping[str, str]) -> dict[str, str]:
    """The query string's names and values URL-decoded: Orthanc's Python plugin hands them over as sent.

    A name given twice (``limit=1&%6Cimit=50``) is refused rather than one of its values used silently. A name
    repeated as the very same text (``limit=1&limit=50``) never reaches the plugin: orthanc-python 4.0 builds a dict
    of the query string before calling it, and only the last value arrives.

    Raises
    ------
    ValueError
        A name given twice.
    """
    decoded: dict[str, str] = {}
    for name, value in raw.items():
        key = unquote_plus(name)
        if key in decoded:
            raise ValueError(f"{key} is given more than once")
        decoded[key] = unquote_plus(value)
    return decoded


#: The form of an Orthanc resource id: the SHA-1 of its DICOM UIDs as five groups of 8 hex digits.
ORTHANC_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")


def is_orthanc_id(value: str) -> bool:
    """Whether ``value`` has the form of an Orthanc id: anything else names no study, and is never sent on to
    Orthanc's own API (a decoded ``?`` or ``/`` there would change the call)."""
    return ORTHANC_ID.fullmatch(value) is not None


def post_refusal(headers: Mapping[str, str]) -> Response | None:
    """Why a POST may not file a document, or None: the guard against a cross-site request riding on the
    browser's cached Basic credentials.

    A POST must say ``Content-Type: application/json`` (a form or a no-CORS fetch from another site cannot send
    it without a CORS preflight, which Orthanc does not grant), and a POST that carries ``Origin`` must come from
    Orthanc's own origin (its scheme-less host and port equal the request's ``Host``).
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    media_type = lowered.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        return 415, {"error": f"a POST must send Content-Type: application/json, not {media_type or 'none'!r}"}
    origin = lowered.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or parts.netloc.lower() != lowered.get("host", "").lower():
            return 403, {"error": f"a POST from another origin ({origin}) is refused: it may only come from "
                                  f"Orthanc's own pages"}
    return None


#: What the body of ``POST .../similar-report`` may hold.
POST_FIELDS = ("limit", "scope")


def parse_post_body(body: bytes | str) -> dict[str, Any]:
    """The parameters of a POST: a JSON object with :data:`POST_FIELDS` (empty body: the defaults).

    Orthanc's Python plugin passes no query string to a POST callback, so ``?limit=`` cannot reach it; an unknown
    field or a body that is not a JSON object is refused rather than ignored, so that no setting is dropped
    silently.
    """
    text = body.decode() if isinstance(body, bytes) else body
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ValueError(f'the body must be a JSON object such as {{"limit": 10, "scope": "archive"}}, not '
                         f'{text[:80]!r}')
    unknown = sorted(set(data) - set(POST_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(POST_FIELDS)}")
    return data


def parse_limit(raw: str | int | None) -> int:
    """``limit``: an integer in 1..MAX_LIMIT (a query-string text or a JSON number), else ValueError."""
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise ValueError(f"limit must be an integer, not {raw!r}")
    try:
        limit = int(raw)
    except ValueError:
        raise ValueError(f"limit must be an integer, not {raw!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, not {limit}")
    return limit


def parse_scope(raw: str | None) -> str:
    """``scope``: archive or patient (default archive), else ValueError with a message for the client."""
    if raw is None or raw == "":
        return DEFAULT_SCOPE
    if raw not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {raw!r}")
    return raw


def _not_indexed(api: OrthancApi, catalogue: Catalogue, study_id: str, pending: int,
                 study_instance_uid: str = "") -> Response:
    """409 with the reason a known study has nothing to search with yet."""
    series = get_json(api, f"/studies/{study_id}/series")
    modalities = sorted({s.get("MainDicomTags", {}).get("Modality", "") for s in series})
    problems = catalogue.problems(limit=20, orthanc_study_id=study_id)
    if problems:
        reason = "none of the study's instances could be indexed"
    elif not study_is_queued(series):
        reason = f"the study holds no US, DX or CR series (modalities: {', '.join(modalities) or 'none'})"
    else:
        reason = "the study is queued for indexing and not searchable yet"
    body = {
        "error": "study not indexed",
        "reason": reason,
        "study": study_id,
        "study_instance_uid": study_instance_uid,
        "modalities": modalities,
        "queued_tasks": pending,
        "problems": [{"instance": p.orthanc_instance_id, "code": p.code, "message": p.message} for p in problems],
    }
    return 409, body


def _lookup(api: OrthancApi, lookups: Lookups, study_id: str, limit: int, scope: str, pending: int, who: str,
            action: str, host: str = "") -> tuple[dict | None, list[SimilarStudy] | None, Response | None]:
    """The query study's Orthanc record and its answer, recorded in the audit trail as ``who``'s ``action``; or
    the error response (404, 409, and 503 when the audit trail cannot be written: nothing is answered unrecorded).

    Raises
    ------
    LookupUnavailable
        The query service did not answer (the route answers 503 and says so in Orthanc's log).
    """
    if not is_orthanc_id(study_id):
        return None, None, (404, {"error": "unknown study: not an Orthanc study id", "study": study_id})
    try:
        study = get_json(api, f"/studies/{study_id}")
    except OrthancNotFoundError:
        return None, None, (404, {"error": "unknown study", "study": study_id})
    request = LookupRequest(orthanc_study_id=study_id,
                            study_instance_uid=study.get("MainDicomTags", {}).get("StudyInstanceUID", ""),
                            limit=limit, scope=scope, who=who, action=action, host=host)
    try:
        matches = lookups.lookup(request)
    except StudyNotIndexedError:
        return None, None, _not_indexed(api, lookups.catalogue, study_id, pending, request.study_instance_uid)
    except AuditUnavailable as exc:
        return None, None, (503, {"error": "audit trail unavailable; the lookup is not answered unrecorded",
                                  "reason": str(exc)})
    return study, matches, None


#: Statuses of a lookup route that turn a request down for what it asked (bad parameters, a cross-site POST, an
#: unknown or not-indexed study, a body that is not JSON): recorded in the audit trail as refused.
REFUSALS = (400, 403, 404, 409, 415)
#: Longest study id from a request's path that a refusal records: the path is the caller's, not Orthanc's.
_MAX_AUDITED_ID = 128


def audit_refusal(audit: AuditLog, response: Response, *, action: str, study_id: str, who: str,
                  host: str = "") -> dict | None:
    """Record a lookup route's refusal (outcome "refused", the HTTP status and the reason it answered), or None
    where ``response`` is no refusal. The reason is the answer's own error text, which names no patient: a
    refused lookup is traced like an answered one, without writing down more than was asked.

    Raises
    ------
    OSError
        The line could not be written (the request is refused all the same).
    """
    status, body = response
    if status not in REFUSALS:
        return None
    reason = str(body.get("error", "")) + (f": {body['reason']}" if body.get("reason") else "")
    return audit.refused(who=who, via="rest", host=host or None, action=action, reason=reason,
                         study=body.get("study_instance_uid") or None, status=status,
                         orthanc_study_id=study_id[:_MAX_AUDITED_ID])


def unavailable(exc: LookupUnavailable) -> Response:
    """503 for a lookup the query service did not answer, in words an administrator can act on."""
    return 503, {"error": "similar-study lookups are unavailable right now: the query service is not answering",
                 "reason": str(exc)}


def _answer_entries(api: OrthancApi, matches: list[SimilarStudy], disclose: bool) -> list[dict[str, Any]]:
    """Each match as served: public fields (with the two images of its best pair and their lesion boxes, for
    previews side by side), and, only where disclosed, the other patient's name and accession number (every
    match's at once: one call to Orthanc, as the query service does)."""
    entries = [match.as_public_dict(disclose_identity=disclose) for match in matches]
    if disclose and matches:
        studies = {s["ID"]: s for s in find_by_uids(api, "Study", [m.study_instance_uid for m in matches])}
        for entry, match in zip(entries, matches):
            other = studies.get(match.orthanc_study_id, {})
            entry["patient_name"] = other.get("PatientMainDicomTags", {}).get("PatientName", "")
            entry["accession_number"] = other.get("MainDicomTags", {}).get("AccessionNumber", "")
    return entries


def similar(api: OrthancApi, lookups: Lookups, study_id: str, limit: int, scope: str = DEFAULT_SCOPE, *,
            disclose: bool = False, pending: int = 0, who: str = "", host: str = "") -> Response:
    """``GET /lookalike/studies/{id}/similar``: the most similar other studies, best first.

    The answer names the study it answers for (Orthanc id and StudyInstanceUID), its scope and limit, so that a
    page can check it is showing the answer of the study on screen. The lookup is recorded as ``who``'s (where
    ``lookups`` records) before it is answered.
    """
    study, matches, error = _lookup(api, lookups, study_id, limit, scope, pending, who, "lookup", host)
    if error:
        return error
    return 200, {
        "study": study_id,
        "study_instance_uid": study.get("MainDicomTags", {}).get("StudyInstanceUID", ""),
        "scope": scope,
        "limit": limit,
        "aggregation": "a study scores the cosine similarity of its best-matching image pair with the query study",
        # Per model searched: the score below which a study is no match (null: the model has no calibration).
        "floors": getattr(matches, "floors", {}),
        "similar": _answer_entries(api, matches, disclose),
    }


def _report_uids(study_instance_uid: str, evidence_uids: list[str], model_versions: list[str], limit: int,
                 scope: str, matches: list[SimilarStudy]) -> tuple[str, str]:
    """Series and SOP Instance UIDs that follow from the answer alone: the same question with nothing new gives
    the same UIDs, so a report filed before is found instead of filed twice."""
    digest = _answer_digest(study_instance_uid, evidence_uids, model_versions, limit, scope, matches)
    return _derived_uid(digest, "series"), _derived_uid(digest, "instance")


def _answer_digest(study_instance_uid: str, evidence_uids: list[str], model_versions: list[str], limit: int,
                   scope: str, matches: list[SimilarStudy]) -> str:
    """SHA-256 of what a document filed from an answer depends on: the same question with nothing new, the same."""
    answer = {
        "algorithm_version": lookalike.__version__, "model_versions": model_versions, "study": study_instance_uid,
        "evidence": evidence_uids, "limit": limit, "scope": scope, "floors": getattr(matches, "floors", {}),
        "matches": [[m.rank, m.study_instance_uid, m.best_match.sop_instance_uid,
                     m.best_match.query_sop_instance_uid, f"{m.score:.6f}"] for m in matches],
    }
    return hashlib.sha256(json.dumps(answer, sort_keys=True).encode()).hexdigest()


def _derived_uid(digest: str, name: str) -> str:
    """A name-based UUID (PS3.5 B.2: "2.25." and the UUID as an integer) of the answer's digest and a name."""
    return f"2.25.{uuid.uuid5(_REPORT_UID_NAMESPACE, f'{digest}/{name}').int}"


def _filed_report(api: OrthancApi, study_id: str, sop_instance_uid: str) -> dict | None:
    """The report with this SOP Instance UID if it is already in this study: its instance and series records."""
    found = json.loads(api.post_bytes("/tools/lookup", sop_instance_uid.encode()))
    for resource in found:
        if resource.get("Type") != "Instance":
            continue
        instance = get_json(api, f"/instances/{resource['ID']}")
        series = get_json(api, f"/series/{instance['ParentSeries']}")
        if series.get("ParentStudy") == study_id:
            return {"instance": instance, "series": series}
    return None


def similar_report(api: OrthancApi, lookups: Lookups, study_id: str, limit: int, scope: str = DEFAULT_SCOPE, *,
                   pending: int = 0, who: str = "", host: str = "") -> Response:
    """``POST /lookalike/studies/{id}/similar-report``: the same answer as a Comprehensive SR stored in the study.

    Asked again for the same study, limit and scope with nothing new (same models, same answer), it returns the
    report filed before (``"existing": true``) rather than a second copy.
    """
    study, matches, error = _lookup(api, lookups, study_id, limit, scope, pending, who, "report", host)
    if error:
        return error
    rows = lookups.catalogue.rows_for_study(study_id, with_vectors=False)[:MAX_EVIDENCE]
    versions = sorted({r.model_version for r in rows})
    study_uid = study.get("MainDicomTags", {}).get("StudyInstanceUID", "")
    series_uid, sop_uid = _report_uids(study_uid, sorted(r.sop_instance_uid for r in rows), versions, limit, scope,
                                       matches)
    filed = _filed_report(api, study_id, sop_uid)
    if filed is None:
        evidence = _headers(api, [r.orthanc_instance_id for r in rows])
        cases = [SimilarCase.from_answer(m.as_public_dict(disclose_identity=False)) for m in matches]
        sr = build_similarity_report(evidence, cases, algorithm_version=lookalike.__version__,
                                     model_version=", ".join(versions), series_instance_uid=series_uid,
                                     sop_instance_uid=sop_uid, priors_only=scope == "patient",
                                     floors=getattr(matches, "floors", {}))
        buf = io.BytesIO()
        sr.save_as(buf, enforce_file_format=True)
        store_instance(api, buf.getvalue())
        filed = _filed_report(api, study_id, sop_uid)
        if filed is None:
            raise RuntimeError(f"the report {sop_uid} was stored but Orthanc does not list it in study {study_id}")
        existing = False
    else:
        existing = True
    series_tags = filed["series"].get("MainDicomTags", {})
    return 200, {
        "study": study_id,
        "report": filed["instance"]["ID"],
        "series": filed["series"]["ID"],
        "sop_instance_uid": sop_uid,
        "series_instance_uid": series_uid,
        "series_description": series_tags.get("SeriesDescription", ""),
        "series_date": series_tags.get("SeriesDate", ""),
        "series_time": series_tags.get("SeriesTime", ""),
        "similar": len(matches),
        "limit": limit,
        "scope": scope,
        "existing": existing,
    }


def _headers(api: OrthancApi, orthanc_instance_ids: list[str]) -> list[pydicom.Dataset]:
    """The stored instances' headers, as a document's evidence (no pixel data)."""
    return [pydicom.dcmread(io.BytesIO(api.get_bytes(f"/instances/{i}/file")), stop_before_pixels=True)
            for i in orthanc_instance_ids]


def similar_kos(api: OrthancApi, lookups: Lookups, study_id: str, limit: int, *, pending: int = 0,
                who: str = "", host: str = "") -> Response:
    """``POST /lookalike/studies/{id}/similar-kos``: the same patient's most similar priors as a Key Object Selection.

    The scope is the patient's own studies by construction. The document goes into the study on screen and, as
    PS3.3 C.17.6.2.1 requires of a KOS that references several studies, an identical copy into each prior study
    it references (see :mod:`lookalike.dicom.kos`). Asked again with nothing new, it returns the documents
    filed before (``"existing": true``) and files only a copy that went missing.
    """
    scope = "patient"
    study, matches, error = _lookup(api, lookups, study_id, limit, scope, pending, who, "kos", host)
    if error:
        return error
    if any(not m.same_patient for m in matches):  # the lookup's own rule; a KOS must never show another patient
        raise RuntimeError(f"a patient-scope lookup of study {study_id} answered another patient's study")
    answer: dict[str, Any] = {"study": study_id, "similar": len(matches), "limit": limit, "scope": scope}
    if not matches:
        return 200, {**answer, "report": None, "documents": [], "existing": False}
    rows = lookups.catalogue.rows_for_study(study_id, with_vectors=False)[:MAX_EVIDENCE]
    study_uid = study.get("MainDicomTags", {}).get("StudyInstanceUID", "")
    digest = _answer_digest(study_uid, sorted(r.sop_instance_uid for r in rows),
                            sorted({r.model_version for r in rows}), limit, scope, matches)
    # One document per study it is filed in: the study on screen, then each prior.
    filed_in = {study_uid: study_id, **{m.study_instance_uid: m.orthanc_study_id for m in matches}}
    uids = {uid: (_derived_uid(digest, f"kos/{uid}/series"), _derived_uid(digest, f"kos/{uid}/instance"))
            for uid in filed_in}
    filed = {uid: _filed_report(api, filed_in[uid], uids[uid][1]) for uid in filed_in}
    existing = all(f is not None for f in filed.values())
    if not existing:
        documents = build_prior_selection(
            _headers(api, [r.orthanc_instance_id for r in rows]),
            [SimilarCase.from_answer(m.as_public_dict(disclose_identity=False)) for m in matches],
            _headers(api, [m.best_match.orthanc_instance_id for m in matches]),
            algorithm_version=lookalike.__version__, document_uids=uids)
        for document in documents:
            uid = str(document.StudyInstanceUID)
            if filed[uid] is None:
                buf = io.BytesIO()
                document.save_as(buf, enforce_file_format=True)
                store_instance(api, buf.getvalue())
                filed[uid] = _filed_report(api, filed_in[uid], uids[uid][1])
                if filed[uid] is None:
                    raise RuntimeError(f"the KOS {uids[uid][1]} was stored but Orthanc does not list it in study "
                                       f"{filed_in[uid]}")
    here = filed[study_uid]
    series_tags = here["series"].get("MainDicomTags", {})
    return 200, {
        **answer,
        "report": here["instance"]["ID"],
        "series": here["series"]["ID"],
        "sop_instance_uid": uids[study_uid][1],
        "series_instance_uid": uids[study_uid][0],
        "series_description": series_tags.get("SeriesDescription", ""),
        "series_date": series_tags.get("SeriesDate", ""),
        "series_time": series_tags.get("SeriesTime", ""),
        # Where each document went: this study's first, then the identical copies in the priors.
        "documents": [{"study": filed_in[uid], "study_instance_uid": uid, "report": filed[uid]["instance"]["ID"],
                       "series": filed[uid]["series"]["ID"], "sop_instance_uid": uids[uid][1]} for uid in filed_in],
        "existing": existing,
    }


def catch_up_state(catalogue: Catalogue, api: OrthancApi) -> dict[str, Any]:
    """How far the worker's catch-up is behind Orthanc's change log, judged as its next pass will judge it.

    A cursor kept for another change log (Orthanc's database reset or replaced: the cursor is beyond Orthanc's
    last change, or the change it last read is no longer there as read) is no progress: the next pass reads the
    new log from its start, so every change of it is behind (``reset_detected``), not none.
    """
    cursor = catalogue.cursor(CURSOR)
    last = int(get_json(api, "/changes?last")["Last"])
    reset = cursor_reset_reason(api, cursor, catalogue.cursor_anchor(CURSOR), last) is not None
    state: dict[str, Any] = {"cursor": cursor, "orthanc_last_change": last, "behind": last if reset else
                             max(0, last - cursor), "reset_detected": reset}
    if reset:
        state["note"] = ("the cursor was kept for another Orthanc change log (database reset or replaced): the "
                         "catch-up reads this one again from its start")
    return state


def status(catalogue: Catalogue, queue_length: Callable[[], int | None], pending: int = 0,
           api: OrthancApi | None = None, lookups: Lookups | None = None,
           floors: SimilarityFloors | None = None, weights: Mapping[str, str] | None = None) -> Response:
    """``GET /lookalike/status``: what is indexed, what waits, what went wrong lately, how far the catch-up is,
    whether the query service answers lookups, and per encoder the model lookups use and whether a newer shipped
    one waits for ``lookalike reindex`` (:func:`lookalike.index.upgrade.model_status`; ``weights`` are
    ``Settings.weights``).

    Read from the catalogue alone, so that it answers while the query service is down. ``catch_up`` compares
    Orthanc's newest change with the last one the worker's catch-up has handled (:func:`catch_up_state`): a gap
    that does not close says the worker is not running or cannot keep up. ``floors`` are the floors the lookups
    apply (the query service's: beside ``Settings.weights`` first); default the shipped and reindexed models' only.
    """
    catch_up: dict[str, Any] = {"cursor": catalogue.cursor(CURSOR)} if api is None else catch_up_state(catalogue, api)
    counts = [
        {"modality": modality, "encoder": encoder, "model_version": version, "instances": n}
        for modality, encoder, version, n in catalogue.counts()
    ]
    floors = floors if floors is not None else SimilarityFloors(catalogue=catalogue)
    for count in counts:
        # The score below which a lookup drops a match; null: the model has no calibration, and every study is
        # answered however low it scores.
        count["similarity_floor"] = floors.floor(count["model_version"])
        if count["similarity_floor"] is None:
            count["warning"] = "similarity floor missing: run `lookalike calibrate` for this model"
    try:
        queued = queue_length()
    except Exception as exc:  # Redis down is itself something the administrator must see here
        queued = None
        broker_error = str(exc)
    else:
        broker_error = None
    body: dict[str, Any] = {
        "version": lookalike.__version__,
        "indexed": counts,
        "queue": {"broker": queued, "plugin_pending": pending, "broker_error": broker_error},
        "catch_up": catch_up,
        "models": model_status(catalogue, weights or {}),
        "problems": [
            {"instance": p.orthanc_instance_id, "study": p.orthanc_study_id, "sop_instance_uid": p.sop_instance_uid,
             "code": p.code, "message": p.message, "at": p.at, "attempts": p.attempts}
            for p in catalogue.problems(limit=50)
        ],
    }
    if lookups is not None:
        try:
            lookups.ping()
        except LookupUnavailable as exc:
            body["query_service"] = {"answering": False, "error": str(exc)}
        else:
            body["query_service"] = {"answering": True, "error": None}
    return 200, body
