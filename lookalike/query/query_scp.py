"""The DICOM query endpoint: a workstation asks "studies similar to this one" with a plain C-FIND.

A pynetdicom SCP in a process of its own (``lookalike query-scp``, started by ``lookalike run``), beside Orthanc
rather than inside it: a plugin's C-FIND callback would take over every C-FIND Orthanc receives, and the PACS's
own study queries would have to be written again. The same process is the *query service*: the only one that
loads the index, it also answers the REST routes' lookups for the plugin (:mod:`lookalike.query.lookup_service`,
over a Unix socket beside the DICOM port), so that Orthanc's process never holds FAISS. It loads the index before
it listens: once it answers, its first lookup is as fast as any.

The conversation, as a workstation sees it:

C-FIND (Study Root or Patient Root, QueryRetrieveLevel STUDY)
    The identifier's StudyInstanceUID names the study on screen (one UID, no wildcard). Each similar study comes
    back as one pending response, best first, with the return keys asked for (StudyInstanceUID, StudyDate,
    ModalitiesInStudy, NumberOfStudyRelatedInstances, StudyDescription, ...) filled from Orthanc. Rank and
    similarity are in the private block :data:`PRIVATE_CREATOR` of group 0x0099 (:data:`RANK` IS,
    :data:`SIMILARITY` DS, :data:`MODEL_VERSION` LO, :data:`QUERY_STUDY` UI) and, unless switched off, at the head
    of StudyDescription, which every workstation lists.
    Matching keys narrow the answer: ModalitiesInStudy (any of the values), StudyDate (a date or a range), and
    PatientID, which asks for that patient's priors only (scope "patient"; a PatientID other than the query
    study's matches nothing).
C-MOVE (STUDY, SERIES or IMAGE level: a result study, or the SR filed into the study on screen)
    Orthanc sends the resources (``POST /modalities/{name}/store``) to the destination, which must be one of
    Orthanc's DICOM modalities. The final response is Success with zero sub-operations of this SCP's own: the
    sub-operations are Orthanc's. A failure names its reason in the response's ErrorComment and in one line of this
    endpoint's log: an unknown destination 0xA801, an unknown UID 0xC001, a destination Orthanc could not reach or
    that refused it, or instances not sent, 0xC003.
C-ECHO
    Success.

Who may ask: the calling AE titles of ``Settings.query_allowed``, each from its listed hosts; any other association
is rejected (calling AE title not recognised), the reason logged and audited. At most
``Settings.query_max_associations`` accepted associations at once (a further one is rejected, local limit exceeded);
a connection counts only once its calling AE title has passed, and every read from a peer is bounded by
``Settings.query_timeout`` (a whole association request, too), so that half-open connections cannot hold the slots. Answers never name another patient (no
PatientID, PatientName, AccessionNumber, ... of a study that is not the query patient's) unless
``Settings.disclose_other_patients``: only the keys of :data:`STUDY_KEYS` are filled for those studies, and the
decision is :meth:`lookalike.index.search.SimilarStudy.as_public_dict`'s. Every C-FIND and C-MOVE is written
to the audit trail (:mod:`lookalike.query.audit`) before it is answered, a C-MOVE's outcome after it, and every
refused association or request with its reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import faiss
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_messages import C_MOVE_RSP
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from lookalike.config import Settings
from lookalike.encoders.floors import SimilarityFloors
from lookalike.orthanc.client import HttpOrthanc, OrthancApi, OrthancError, find_by_uids, get_json

from lookalike.query.audit import AuditLog
from lookalike.index.search import SimilarStudy, StudyNotIndexedError, similar_studies
from lookalike.query.lookup_service import LocalLookups, LookupServer
from lookalike.index.store import IndexStore

log = logging.getLogger("lookalike.query_scp")

PRIVATE_GROUP = 0x0099
PRIVATE_CREATOR = "LOOKALIKE 1.0"
#: Element offsets in the private block: rank (IS), similarity (DS), model version (LO), query study UID (UI).
RANK, SIMILARITY, MODEL_VERSION, QUERY_STUDY = 0x01, 0x02, 0x03, 0x04

#: Return keys that say nothing about who the patient is: filled for every answer. Any other key asked for
#: (PatientID, PatientName, AccessionNumber, PatientBirthDate, ...) is filled only where the answer may name the
#: patient (the query patient's own studies, or a site that discloses other patients), else returned empty.
STUDY_KEYS = frozenset({
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription", "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "RetrieveAETitle", "QueryRetrieveLevel",
    "SpecificCharacterSet",
})

# Status codes (PS3.4 C.4.1.1.4 and C.4.2.1.5); the 0xC0xx "unable to process" ones are this endpoint's own.
SUCCESS = 0x0000
CANCEL = 0xFE00
PENDING = 0xFF00
IDENTIFIER_DOES_NOT_MATCH = 0xA900
MOVE_DESTINATION_UNKNOWN = 0xA801
UNKNOWN_STUDY = 0xC001
STUDY_NOT_INDEXED = 0xC002
ORTHANC_FAILED = 0xC003
AUDIT_FAILED = 0xC004
#: Connections whose association is not accepted yet that pynetdicom holds at once, beside the accepted ones: each
#: is closed within ``query_timeout``, so a burst of half-open connections passes without locking anybody out.
MAX_PENDING_CONNECTIONS = 256


class QueryRefused(Exception):
    """A request this endpoint answers with a failure ``status`` and an ErrorComment (64 characters at most)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment

    def status_dataset(self) -> Dataset:
        ds = Dataset()
        ds.Status = self.status
        ds.ErrorComment = self.comment[:64]
        return ds


# -- reading a C-FIND identifier -----------------------------------------------------------------------------------

def _text(identifier: Dataset, keyword: str) -> str:
    value = identifier.get(keyword)
    if value is None or isinstance(value, (list, MultiValue)):
        return "\\".join(str(v) for v in value or [])
    return str(value).strip()


def _is_universal(value: str) -> bool:
    """An empty value or a lone ``*`` matches everything (PS3.4 C.2.2.2.3): the key is a return key only."""
    return value in ("", "*")


def parse_date_range(value: str) -> tuple[str, str] | None:
    """A DA matching value (``YYYYMMDD``, ``A-``, ``-B``, ``A-B``) as an inclusive ``(low, high)``; None for any date.

    Raises
    ------
    QueryRefused
        Not a date or a range of dates.
    """
    value = value.strip()
    if _is_universal(value):
        return None
    low, sep, high = value.partition("-")
    high = high if sep else low
    for part in (low, high):
        if part and not (len(part) == 8 and part.isdigit()):
            raise QueryRefused(IDENTIFIER_DOES_NOT_MATCH, f"StudyDate {value!r} is not YYYYMMDD or a range")
    return low or "00000000", high or "99999999"


@dataclass(frozen=True)
class FindRequest:
    """What a C-FIND identifier asks: the study on screen and the keys that narrow the answer."""

    study_instance_uid: str
    #: A PatientID given: that patient's priors only.
    patient_id: str | None
    #: Any of these in the study's modalities; empty: any modality.
    modalities: frozenset[str]
    #: Inclusive StudyDate bounds; None: any date.
    study_date: tuple[str, str] | None

    @property
    def scope(self) -> str:
        return "archive" if self.patient_id is None else "patient"

    @property
    def narrowed(self) -> bool:
        return bool(self.modalities) or self.study_date is not None

    @classmethod
    def from_identifier(cls, identifier: Dataset) -> "FindRequest":
        """Read the identifier of a STUDY-level C-FIND.

        Raises
        ------
        QueryRefused
            Another level, or no single StudyInstanceUID naming the study on screen.
        """
        level = _text(identifier, "QueryRetrieveLevel").upper()
        if level != "STUDY":
            raise QueryRefused(IDENTIFIER_DOES_NOT_MATCH, f"QueryRetrieveLevel must be STUDY, not {level!r}")
        uid = _text(identifier, "StudyInstanceUID")
        if not uid or "\\" in uid or "*" in uid or "?" in uid:
            raise QueryRefused(IDENTIFIER_DOES_NOT_MATCH, "StudyInstanceUID must name the one study on screen")
        patient_id = _text(identifier, "PatientID")
        modalities = _text(identifier, "ModalitiesInStudy")
        return cls(
            study_instance_uid=uid,
            patient_id=None if _is_universal(patient_id) else patient_id,
            modalities=frozenset() if _is_universal(modalities) else frozenset(m.strip().upper()
                                                                               for m in modalities.split("\\")),
            study_date=parse_date_range(_text(identifier, "StudyDate")),
        )


# -- Orthanc ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StudyInfo:
    """A study as Orthanc's database describes it: its main tags and the counts a C-FIND answer computes."""

    orthanc_study_id: str
    #: Orthanc's MainDicomTags of the study and its patient, by DICOM keyword.
    tags: dict[str, str]
    modalities: tuple[str, ...]
    series: int
    instances: int

    def value(self, keyword: str) -> str:
        computed = {
            "ModalitiesInStudy": "\\".join(self.modalities),
            "NumberOfStudyRelatedSeries": str(self.series),
            "NumberOfStudyRelatedInstances": str(self.instances),
        }
        return computed.get(keyword, self.tags.get(keyword, ""))


def studies_info(api: OrthancApi, study_instance_uids: list[str]) -> dict[str, StudyInfo]:
    """The studies with these UIDs as Orthanc's database describes them (no file read), by Orthanc study id.

    Two calls whatever their number (``/tools/find`` with a UID list, at study and at series level), so that an
    answer's cost does not grow with its length. A study Orthanc no longer has is simply absent.
    """
    studies = find_by_uids(api, "Study", study_instance_uids)
    series = find_by_uids(api, "Series", study_instance_uids)
    by_study: dict[str, list[dict]] = {}
    for s in series:
        by_study.setdefault(s["ParentStudy"], []).append(s)
    infos = {}
    for study in studies:
        own = by_study.get(study["ID"], [])
        infos[study["ID"]] = StudyInfo(
            orthanc_study_id=study["ID"],
            tags={**study.get("PatientMainDicomTags", {}), **study.get("MainDicomTags", {})},
            modalities=tuple(sorted({s.get("MainDicomTags", {}).get("Modality", "") for s in own} - {""})),
            series=len(own),
            instances=sum(len(s.get("Instances", [])) for s in own),
        )
    return infos


def lookup_uid(api: OrthancApi, uid: str, resource_type: str) -> str | None:
    """The Orthanc id of the Study, Series or Instance with DICOM UID ``uid``; None if Orthanc has none."""
    found = json.loads(api.post_bytes("/tools/lookup", uid.encode()))
    return next((x["ID"] for x in found if x.get("Type") == resource_type), None)


# -- answering ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FindResult:
    """The answer to one C-FIND: the study on screen (its Orthanc id) and its similar studies, best first."""

    query_orthanc_id: str
    matches: list[tuple[SimilarStudy, StudyInfo]]


def _date_matches(date: str, bounds: tuple[str, str] | None) -> bool:
    return bounds is None or (bool(date) and bounds[0] <= date <= bounds[1])


def find_similar(api: OrthancApi, store: IndexStore, request: FindRequest, max_results: int,
                 floors: SimilarityFloors | None = None) -> FindResult:
    """The similar studies a C-FIND answers, with what Orthanc says of each, at most ``max_results``.

    Only studies at or above their model's similarity floor (``floors``) are answered: with none, no match.

    The matching keys (StudyDate, ModalitiesInStudy) filter the candidates inside the search
    (``similar_studies(accept=...)``), which widens until ``max_results`` matching studies are certain: a narrowed
    C-FIND gets the best studies that match, not merely those among the first candidates.

    A candidate Orthanc no longer has (deleted since it was indexed; the worker forgets it shortly) is left out.
    What Orthanc says of the candidates costs two calls per widening step (:func:`studies_info`).

    Raises
    ------
    QueryRefused
        The study is unknown to Orthanc, or not indexed (yet).
    """
    query_id = lookup_uid(api, request.study_instance_uid, "Study")
    if query_id is None:
        raise QueryRefused(UNKNOWN_STUDY, "no study with this StudyInstanceUID in the archive")
    if request.patient_id is not None:
        patient = get_json(api, f"/studies/{query_id}").get("PatientMainDicomTags", {}).get("PatientID", "")
        if request.patient_id != patient:
            return FindResult(query_id, [])  # the priors of another patient than the study on screen: none
    infos: dict[str, StudyInfo] = {}

    def accept(hits: list) -> set[str]:
        """The candidate studies (one hit row each) that Orthanc still has and that match the request's keys."""
        dated = [h for h in hits if _date_matches(h.study_date, request.study_date)]  # the catalogue's date
        infos.update(studies_info(api, [h.study_instance_uid for h in dated]))
        return {h.orthanc_study_id for h in dated
                if h.orthanc_study_id in infos  # else deleted from Orthanc since it was indexed
                and (not request.modalities or request.modalities & set(infos[h.orthanc_study_id].modalities))}

    try:
        candidates = similar_studies(store, query_id, max_results, request.scope, floors, accept)
    except StudyNotIndexedError:
        raise QueryRefused(STUDY_NOT_INDEXED, "study not indexed (yet): no US, DX or CR image searchable") from None
    return FindResult(query_id, [(c, infos[c.orthanc_study_id]) for c in candidates])


def _needs_utf8(ds: Dataset) -> bool:
    return any(isinstance(e.value, str) and not e.value.isascii() for e in ds)


def answer_dataset(identifier: Dataset, similar: SimilarStudy, info: StudyInfo, query_uid: str, *, aet: str,
                   disclose_other_patients: bool, score_in_description: bool) -> Dataset:
    """One pending C-FIND response: the return keys of ``identifier`` filled for ``similar``, plus the private block.

    Whether the patient may be named is :meth:`SimilarStudy.as_public_dict`'s decision (the query patient's own
    studies always may); where it may not, every key outside :data:`STUDY_KEYS` comes back empty.
    """
    may_name = "patient_id" in similar.as_public_dict(disclose_other_patients or similar.same_patient)
    ds = Dataset()
    for elem in identifier:
        if elem.tag.is_private or elem.VR == "SQ" or elem.keyword in ("", "SpecificCharacterSet"):
            continue  # sequences and private keys of the SCU are not matched here: returned as nothing
        keyword = elem.keyword
        value = info.value(keyword) if (keyword in STUDY_KEYS or may_name) else ""
        ds.add_new(elem.tag, elem.VR, value or None)
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = similar.study_instance_uid
    ds.RetrieveAETitle = aet
    if score_in_description and "StudyDescription" in identifier:
        head = f"#{similar.rank} sim {similar.score:.4f}"
        original = info.tags.get("StudyDescription", "")
        ds.StudyDescription = f"{head} | {original}"[:64] if original else head
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(RANK, "IS", similar.rank)
    block.add_new(SIMILARITY, "DS", f"{similar.score:.6f}")
    block.add_new(MODEL_VERSION, "LO", similar.model_version[:64])
    block.add_new(QUERY_STUDY, "UI", query_uid)
    if _needs_utf8(ds):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


# -- the service --------------------------------------------------------------------------------------------------

def _asked(identifier: Dataset) -> dict[str, str]:
    """What a refused request asked about, for the audit trail: its StudyInstanceUID and PatientID where given
    (never the patient's name, whatever the identifier holds)."""
    asked = {"study": _text(identifier, "StudyInstanceUID"), "patient_id": _text(identifier, "PatientID")}
    return {key: value for key, value in asked.items() if not _is_universal(value)}


def _cut_unfinished_request(assoc: object, sock: socket.socket) -> None:
    """Close a connection that has sent no whole association request within ``query_timeout`` (see
    :meth:`QueryEndpoint.on_connection`): the blocked read returns, and pynetdicom closes the association."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return  # closed meanwhile
    log.warning("connection from %s closed: no whole association request within query_timeout",
                getattr(getattr(assoc, "requestor", None), "address", "?"))


class MoveFailed(RuntimeError):
    """Raised by the C-MOVE handler for a refusal it has logged itself: pynetdicom then answers a failure, which
    :meth:`QueryEndpoint.on_dimse_sent` gives the refusal's status and ErrorComment."""


class _QuietRefusals(logging.Filter):
    """Drops pynetdicom's error lines and traceback for a C-MOVE refusal this endpoint raised and logged in one line
    of its own (the thread sets ``active`` just before raising; the response's rewrite clears it); and keeps the
    traceback out of a read that timed out, which is this endpoint's bound on a peer, not a fault."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(self.local, "active", False):
            return False
        if record.exc_info and isinstance(record.exc_info[1], TimeoutError):
            record.exc_info, record.exc_text = None, None
        return True


_QUIET = _QuietRefusals()
for _name in ("pynetdicom.service_class", "pynetdicom.dul"):
    logging.getLogger(_name).addFilter(_QUIET)


def calling_allowed(allowed: dict[str, list[str]], aet: str, host: str) -> bool:
    """Whether AE title ``aet`` may associate from ``host`` (an IP address; ``"*"`` in the list allows any)."""
    hosts = allowed.get(aet.strip())
    return hosts is not None and ("*" in hosts or host in hosts)


class QueryEndpoint:
    """The SCP: one pynetdicom AE with its handlers, the index read-only, Orthanc over HTTP, the audit trail; and
    the lookup service for the REST routes, on the same index and audit trail.

    Each association runs in a thread of its own (pynetdicom's, new for every association); the index store is
    thread-safe, and a request borrows an HTTP session with Orthanc from a pool, so that its kept-alive connection
    outlives the association.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = IndexStore.from_settings(settings, readonly=True)
        self.audit = AuditLog(settings.audit_log)
        # One reader of the models' similarity floors for the C-FIND service and the REST routes' lookups.
        self.floors = SimilarityFloors(settings.weights.values(), self.store.catalogue)
        self.lookup_server = LookupServer(LocalLookups(self.store, self.audit, self.floors), settings.lookup_socket,
                                          settings.lookup_secret)
        self._sessions: queue.SimpleQueue[HttpOrthanc] = queue.SimpleQueue()
        self.ae = AE(ae_title=settings.query_aet)
        for context in (Verification, StudyRootQueryRetrieveInformationModelFind,
                        PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove,
                        PatientRootQueryRetrieveInformationModelMove):
            self.ae.add_supported_context(context)
        self.ae.require_called_aet = True
        # pynetdicom counts every connection, accepted or not, against its limit: the slots of query_max_associations
        # are this endpoint's own (on_requested), and pynetdicom's limit only bounds the threads of pending ones.
        self.ae.maximum_associations = settings.query_max_associations + MAX_PENDING_CONNECTIONS
        self.ae.acse_timeout = self.ae.dimse_timeout = settings.query_timeout
        self.ae.network_timeout = settings.query_timeout * 2
        self._slots: set[object] = set()
        self._slots_lock = threading.Lock()
        #: Refused C-MOVEs whose failure response is on its way: (association, message id) -> the refusal.
        self._failed_moves: dict[tuple[object, int], QueryRefused] = {}
        self.handlers = [
            (evt.EVT_CONN_OPEN, self.on_connection),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_RELEASED, self.on_ended),
            (evt.EVT_ABORTED, self.on_ended),
            (evt.EVT_CONN_CLOSE, self.on_ended),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_DIMSE_SENT, self.on_dimse_sent),
        ]
        self.server = None

    @contextlib.contextmanager
    def _orthanc(self) -> Iterator[OrthancApi]:
        """An HTTP session with Orthanc that no other thread uses meanwhile; back to the pool afterwards."""
        try:
            api = self._sessions.get_nowait()
        except queue.Empty:
            s = self.settings
            api = HttpOrthanc(s.orthanc_url, s.orthanc_user, s.orthanc_password)
        try:
            yield api
        finally:
            self._sessions.put(api)

    def start(self) -> None:
        """Load the index, then listen on ``query_host:query_port`` and on the lookup socket, in background threads.

        Loading first means that a caller finds the service either not there yet (the REST routes answer 503 at
        once) or ready to answer as fast as ever, never half-loaded with a first lookup that waits for the index.
        """
        s = self.settings
        started = time.perf_counter()
        self.store.refresh()
        log.info("index %s loaded in %.1f s", s.index_dir, time.perf_counter() - started)
        self.server = self.ae.start_server((s.query_host, s.query_port), block=False, evt_handlers=self.handlers)
        try:
            self.lookup_server.start()
        except BaseException:
            self.server.shutdown()
            self.server = None
            raise
        log.info("%s listening on %s:%d; allowed: %s", s.query_aet, s.query_host, s.query_port,
                 ", ".join(f"{aet} from {' '.join(hosts)}" for aet, hosts in s.query_allowed.items()) or "nobody")

    def stop(self) -> None:
        self.lookup_server.stop()
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.audit.close()
        self.store.close()

    # -- handlers ---------------------------------------------------------------------------------------------

    def on_connection(self, event: evt.Event) -> None:
        """Bound every read from the peer, and the association request as a whole, by ``query_timeout``.

        pynetdicom waits for a PDU's body with no timeout once its 6-byte header has arrived: a peer that announces
        1030 bytes and sends 60 held its thread, and its share of pynetdicom's association limit, for ever. A read
        that times out closes the connection (pynetdicom's own handling of a broken one); a request trickled in a
        byte at a time is cut when ``query_timeout`` has passed without a whole A-ASSOCIATE-RQ.

        Also TCP_NODELAY, as Orthanc and DCMTK use: pynetdicom sends a response's command and data set as two
        writes, and with Nagle's algorithm each pending response waited for the peer's delayed ACK.
        """
        sock = event.assoc.dul.socket.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.settings.query_timeout)
        deadline = threading.Timer(self.settings.query_timeout, _cut_unfinished_request, (event.assoc, sock))
        deadline.daemon = True
        event.assoc.lookalike_request_deadline = deadline
        deadline.start()

    def on_requested(self, event: evt.Event) -> None:
        """Reject an association whose calling AE title (or host) is not on the list, or one beyond the accepted
        associations' slots; say why in the log and the audit trail."""
        deadline = getattr(event.assoc, "lookalike_request_deadline", None)
        if deadline is not None:
            deadline.cancel()
        requestor = event.assoc.requestor
        aet, host = requestor.primitive.calling_ae_title.strip(), requestor.address
        if not calling_allowed(self.settings.query_allowed, aet, host):
            known = self.settings.query_allowed.get(aet)
            reason = (f"calling AE title {aet!r} is not in query_allowed" if known is None
                      else f"{aet!r} may call from {', '.join(known)} only")
            self._reject(event, aet, host, reason, (0x01, 0x01, 0x03))  # permanent, user, calling AE not recognised
        elif not self._take_slot(event.assoc):
            reason = f"all {self.settings.query_max_associations} association slots are in use (query_max_associations)"
            self._reject(event, aet, host, reason, (0x02, 0x03, 0x02))  # transient, provider, local limit exceeded

    def _reject(self, event: evt.Event, aet: str, host: str, reason: str, result: tuple[int, int, int]) -> None:
        log.warning("association from %s at %s rejected: %s", aet, host, reason)
        self._audit_refusal(aet, host, "associate", reason)
        event.assoc.acse.send_reject(*result)
        event.assoc.kill()  # as pynetdicom's own rejections do: the reject goes out before the socket closes

    def _take_slot(self, assoc: object) -> bool:
        """Count ``assoc`` among the accepted associations if a slot is free (those that ended are let go first)."""
        with self._slots_lock:
            self._slots = {a for a in self._slots if a.is_alive()}
            if len(self._slots) >= self.settings.query_max_associations:
                return False
            self._slots.add(assoc)
            return True

    def on_ended(self, event: evt.Event) -> None:
        """Free the association's slot (released, aborted or its connection closed: whichever comes first)."""
        with self._slots_lock:
            self._slots.discard(event.assoc)
        deadline = getattr(event.assoc, "lookalike_request_deadline", None)
        if deadline is not None:
            deadline.cancel()

    def _audit_refusal(self, who: str, host: str, action: str, reason: str, **details: object) -> None:
        """Record a refusal; one the audit trail cannot take is logged, and the refusal stands all the same."""
        try:
            self.audit.refused(who=who, via="dicom", host=host, action=action, reason=reason, **details)
        except OSError as exc:
            log.error("refusal of %s from %s at %s not recorded in the audit trail: %s", action, who, host, exc)

    def on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        requestor = event.assoc.requestor
        who, host = requestor.ae_title.strip(), requestor.address
        identifier = event.identifier
        started = time.perf_counter()
        try:
            request = FindRequest.from_identifier(identifier)
            with self._orthanc() as api:
                result = find_similar(api, self.store, request, self.settings.query_max_results, self.floors)
        except QueryRefused as refused:
            log.info("C-FIND from %s at %s refused: %s", who, host, refused.comment)
            self._audit_refusal(who, host, "lookup", refused.comment, **_asked(identifier))
            yield refused.status_dataset(), None
            return
        except OrthancError as exc:
            log.error("C-FIND from %s at %s: Orthanc failed: %s", who, host, exc)
            refused = QueryRefused(ORTHANC_FAILED, "the archive could not be read")
            self._audit_refusal(who, host, "lookup", refused.comment, **_asked(identifier))
            yield refused.status_dataset(), None
            return
        try:
            self.audit.record(
                who=who, via="dicom", host=host, study=request.study_instance_uid,
                orthanc_study_id=result.query_orthanc_id, scope=request.scope,
                results=[s.study_instance_uid for s, _ in result.matches], action="lookup",
                modalities=sorted(request.modalities), study_date=request.study_date,
                **({} if request.patient_id is None else {"patient_id": request.patient_id}),
            )
        except OSError as exc:
            log.error("C-FIND from %s at %s not answered: the audit trail could not be written: %s", who, host, exc)
            yield QueryRefused(AUDIT_FAILED, "audit trail unavailable").status_dataset(), None
            return
        log.info("C-FIND from %s at %s: study %s, scope %s, %d answer(s) found in %.0f ms", who, host,
                 request.study_instance_uid, request.scope, len(result.matches), (time.perf_counter() - started) * 1000)
        s = self.settings
        for similar, info in result.matches:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, answer_dataset(identifier, similar, info, request.study_instance_uid, aet=s.query_aet,
                                          disclose_other_patients=s.disclose_other_patients,
                                          score_in_description=s.query_score_in_description)

    def on_move(self, event: evt.Event) -> Iterator[object]:
        """Have Orthanc send the study, series or instance named by the identifier to the move destination.

        pynetdicom's C-MOVE service would open an association to the destination itself; the store is done by
        Orthanc before that point, and zero sub-operations of this SCP's own are reported, which ends the C-MOVE
        with Success without a second association. A refusal is logged here in one line and raised as
        :class:`MoveFailed`: pynetdicom answers a failure, and :meth:`on_dimse_sent` gives it the refusal's status
        and ErrorComment (pynetdicom's handler offers no other way to name the reason before sub-operations).
        """
        requestor = event.assoc.requestor
        who, host = requestor.ae_title.strip(), requestor.address
        destination = (event.move_destination or "").strip()
        try:
            with self._orthanc() as api:
                address = self._move(api, who, host, destination, event.identifier)
        except QueryRefused as refused:
            log.warning("C-MOVE from %s at %s to %s failed (0x%04X): %s", who, host, destination, refused.status,
                        refused.comment)
            self._failed_moves[(event.assoc, event.request.MessageID)] = refused
            _QUIET.local.active = True  # pynetdicom's own lines about the exception below say nothing more
            raise MoveFailed(refused.comment) from None
        yield address
        yield 0

    def on_dimse_sent(self, event: evt.Event) -> None:
        """Give a refused C-MOVE's failure response the refusal's status and ErrorComment, just before it is encoded."""
        message = event.message
        if not isinstance(message, C_MOVE_RSP):
            return
        command = message.command_set
        refused = self._failed_moves.pop((event.assoc, command.MessageIDBeingRespondedTo), None)
        if refused is None:
            return
        _QUIET.local.active = False
        command.Status = refused.status
        command.ErrorComment = refused.comment[:64]
        del command.CommandGroupLength  # recomputed over the command set as it now is (always implicit VR LE)
        command.CommandGroupLength = len(encode(command, True, True))

    def _move(self, api: OrthancApi, who: str, host: str, destination: str, identifier: Dataset) -> tuple[str, int]:
        """Orthanc sends what ``identifier`` names to ``destination``; the destination's (host, port).

        Audited: a refusal with its reason; else "requested" before anything is sent (no answer if that line cannot
        be written), then "sent" or "failed" with the instances sent and failed.
        """
        level = _text(identifier, "QueryRetrieveLevel").upper()
        key = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}.get(level)
        uids = [u for u in _text(identifier, key).split("\\") if u] if key else []
        audited = {"destination": destination, "level": level, **({"study": uids[0]} if uids else {})}
        try:
            ids, name, config = self._move_target(api, level, key, uids, destination)
        except QueryRefused as refused:
            self._audit_refusal(who, host, "retrieve", refused.comment, **audited)
            raise
        entry = {"who": who, "via": "dicom", "host": host, "study": uids[0], "orthanc_study_id": None,
                 "scope": "archive", "results": uids, "action": "retrieve", "destination": destination, "level": level}
        try:
            self.audit.record(**entry, outcome="requested")
        except OSError as exc:
            log.error("C-MOVE from %s at %s not answered: the audit trail could not be written: %s", who, host, exc)
            raise QueryRefused(AUDIT_FAILED, "audit trail unavailable") from None
        body = json.dumps({"Resources": ids, "Synchronous": True}).encode()
        try:
            sent = json.loads(api.post_bytes(f"/modalities/{name}/store", body))
        except OrthancError as exc:
            log.error("C-MOVE from %s at %s: Orthanc could not send to %s: %s", who, host, destination, exc)
            refused = QueryRefused(ORTHANC_FAILED, f"sending to {destination} failed: unreachable or refused")
            self._audit_outcome(entry, "failed", refused.comment)
            raise refused from None
        failed = int(sent.get("FailedInstancesCount") or 0)
        counts = {"sent": int(sent.get("InstancesCount") or 0) - failed, "failed": failed}
        if failed:
            refused = QueryRefused(ORTHANC_FAILED, f"{failed} instance(s) not sent to {destination}")
            self._audit_outcome(entry, "failed", refused.comment, **counts)
            raise refused
        self._audit_outcome(entry, "sent", None, **counts)
        log.info("C-MOVE from %s at %s: Orthanc sent %s instance(s) of %s %s to %s", who, host, counts["sent"],
                 level.lower(), " ".join(uids), destination)
        return str(config.get("Host", "")), int(config.get("Port", 0))

    @staticmethod
    def _move_target(api: OrthancApi, level: str, key: str | None, uids: list[str],
                     destination: str) -> tuple[list[str], str, dict]:
        """The Orthanc ids of what a C-MOVE names, and the name and configuration of its destination modality.

        Raises
        ------
        QueryRefused
            Another level, no UID, a destination that is not one of Orthanc's modalities, or a UID Orthanc lacks.
        """
        if key is None:
            raise QueryRefused(IDENTIFIER_DOES_NOT_MATCH, f"QueryRetrieveLevel {level!r} cannot be moved")
        if not uids:
            raise QueryRefused(IDENTIFIER_DOES_NOT_MATCH, f"{key} is required")
        modalities = get_json(api, "/modalities?expand")
        name = next((n for n, m in modalities.items() if str(m.get("AET", "")).strip() == destination), None)
        if name is None:
            raise QueryRefused(MOVE_DESTINATION_UNKNOWN, f"{destination!r} is not one of the archive's modalities")
        resource_type = {"STUDY": "Study", "SERIES": "Series", "IMAGE": "Instance"}[level]
        ids = []
        for uid in uids:
            found = lookup_uid(api, uid, resource_type)
            if found is None:
                raise QueryRefused(UNKNOWN_STUDY, f"no {resource_type.lower()} with this UID in the archive")
            ids.append(found)
        return ids, name, modalities[name]

    def _audit_outcome(self, entry: dict, outcome: str, reason: str | None, **counts: int) -> None:
        """A C-MOVE's outcome in the audit trail; what was sent is gone either way, so a failed write is logged."""
        try:
            self.audit.record(**entry, outcome=outcome, reason=reason, **counts)
        except OSError as exc:
            log.error("C-MOVE outcome %s not recorded in the audit trail: %s", outcome, exc)


def serve(settings: Settings, logfile: str | Path | None = None) -> int:
    """Run the endpoint until SIGTERM or SIGINT (``lookalike query-scp``)."""
    handler: logging.Handler = logging.FileHandler(logfile) if logfile else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # one line per PDU otherwise
    # ... and pynetdicom formats those lines, and every identifier, even when nobody logs them: about a third of a
    # 10-answer C-FIND's time on this machine. This module logs what an administrator needs.
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = False
    # One thread: a lookup searches a handful of vectors, and OpenMP threads that spin on a machine shared with
    # Orthanc cost more than they save (a search at 2,000 vectors: 3 ms instead of 9).
    faiss.omp_set_num_threads(1)
    endpoint = QueryEndpoint(settings)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    endpoint.start()
    try:
        done.wait()
    finally:
        endpoint.stop()
        log.info("stopped")
    return 0
