"""Back-indexing of an existing archive: the studies Orthanc held before Lookalike, or a remote PACS's.

``lookalike backfill`` walks the studies that match (modality, study date range), queues every US/DX/CR instance
that is neither indexed nor recorded as a problem, and keeps at most one batch waiting on the worker, so that the
PACS keeps serving: once a batch is queued it waits for half of it to settle, then tops the queue up again (a
window, not a barrier: the workers never run dry between two batches, nor wait for the slowest of them). A rate
limit spaces the tasks further. Each study whose instances are all settled is written to a checkpoint: a run
stopped for any reason resumes where it stopped. From a remote PACS, the studies are found with C-FIND and brought
into Orthanc with C-MOVE (Orthanc is the DICOM node that asks), then indexed the same way. A remote study counts as
held only when Orthanc has every instance the PACS has (NumberOfStudyRelatedInstances, then series and instance
queries where the counts differ): what is missing is moved, and a study still short afterwards is reported and never
checkpointed, so that a partial move (a C-MOVE cut by a crash, a study stored in part by hand) is finished by a
rerun instead of being taken for done.

The report is the one set of counters: the progress bar, its last line and the JSON all read it.

Tasks are the worker's ordinary ``missing_only`` indexing tasks: short and idempotent, so a task Redis
redelivers, or one queued twice by two runs, is skipped at once by the worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from lookalike.config import ENCODER_FOR_MODALITY, TASK_INDEX_INSTANCE
from lookalike.dicom.sr import MANUFACTURER
from lookalike.files import atomic_write
from lookalike.index.catalogue import Catalogue
from lookalike.orthanc.client import OrthancApi, OrthancError, OrthancNotFoundError, get_json
from lookalike.orthanc.ingest import is_image_modality, series_modality

#: The dry run's count of remote studies Orthanc lacks in whole or in part.
WOULD_MOVE = "would be moved from the remote PACS (dry run)"


class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True) -> object: ...


@dataclass
class BackfillReport:
    """What a run did: instances indexed, skipped by reason, failed by problem code, still waiting."""

    studies: int = 0
    studies_resumed: int = 0
    queued: int = 0
    indexed: int = 0
    skipped: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    waiting: int = 0
    moved_studies: int = 0
    moved_instances: int = 0
    incomplete: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"studies": self.studies, "studies_resumed_from_checkpoint": self.studies_resumed,
                "moved_from_remote": self.moved_studies, "instances_moved_from_remote": self.moved_instances,
                "queued": self.queued, "indexed": self.indexed, "skipped": dict(self.skipped),
                "failed": dict(self.failed), "still_waiting": self.waiting, "incomplete_studies": self.incomplete}

    def progress_fields(self) -> dict[str, int]:
        """What the progress bar shows beside the studies, under the JSON's own names."""
        return {"queued": self.queued, "indexed": self.indexed, "failed": sum(self.failed.values()),
                "still_waiting": self.waiting, "incomplete_studies": len(self.incomplete)}

    def show(self, progress: Progress | None, studies: int = 0) -> None:
        """Advance the bar by ``studies`` and redraw it from these counters (also after the last study)."""
        if progress is not None:
            if studies:
                progress.update(studies)
            progress.set_postfix(self.progress_fields(), refresh=True)


@dataclass(frozen=True)
class StudyFilter:
    """Which studies to index: modalities among US/DX/CR, and a DICOM study date range (``YYYYMMDD``, open ends)."""

    modalities: tuple[str, ...] = tuple(ENCODER_FOR_MODALITY)
    date_from: str = ""
    date_to: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.modalities) - set(ENCODER_FOR_MODALITY)
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be among {sorted(ENCODER_FOR_MODALITY)}, not {sorted(unknown)}")
        for value in (self.date_from, self.date_to):
            if value and not (len(value) == 8 and value.isdigit()):
                raise ValueError(f"study dates are YYYYMMDD, not {value!r}")

    @property
    def study_date(self) -> str:
        """The DICOM range matching value (``a-b``, ``a-``, ``-b``), empty for any date."""
        return f"{self.date_from}-{self.date_to}" if (self.date_from or self.date_to) else ""

    def key(self) -> str:
        """Names the checkpoint: a different filter starts a different walk."""
        return hashlib.sha1(json.dumps([self.modalities, self.date_from, self.date_to]).encode()).hexdigest()[:12]


def local_studies(api: OrthancApi, which: StudyFilter) -> list[str]:
    """Orthanc ids of the local studies that match, in a stable order (so a resumed walk keeps its place)."""
    found: set[str] = set()
    for modality in which.modalities:
        query = {"ModalitiesInStudy": modality}
        if which.study_date:
            query["StudyDate"] = which.study_date
        body = json.dumps({"Level": "Study", "Query": query}).encode()
        found.update(json.loads(api.post_bytes("/tools/find", body)))
    return sorted(found)


@dataclass(frozen=True)
class RemoteStudy:
    """A study a remote PACS holds: its Study Instance UID and instance count (None: the PACS did not say)."""

    uid: str
    instances: int | None


@dataclass(frozen=True)
class WalkedStudy:
    """A study to walk: its Orthanc id (None: Orthanc lacks it, in a dry run) and whether Orthanc holds all of it.

    Only a complete study is checkpointed; one that received instances (``moved``) is walked again even if a
    checkpoint names it.
    """

    orthanc_id: str | None
    complete: bool = True
    moved: int = 0


@dataclass
class MovePlan:
    """What Orthanc lacks of a remote study: the C-MOVE requests that bring it, by (level, identifiers)."""

    orthanc_id: str | None
    local_instances: int
    requests: list[tuple[str, dict[str, str]]]


def _count(value: object) -> int | None:
    """A C-FIND count answer (``NumberOf...RelatedInstances``) as a number; None when absent or not a number."""
    try:
        return int(str(value).strip())
    except ValueError:
        return None


class RemotePacs:
    """A remote PACS Orthanc knows under ``DicomModalities``: C-FIND of what it holds, C-MOVE of it into Orthanc.

    Orthanc is the DICOM node that queries and asks for the moves (``/modalities/{name}/query|move``), so the
    PACS needs to know Orthanc only. Orthanc 1.10 answers a move once it is over: give ``api`` an HTTP timeout
    that a whole study's move fits in.
    """

    def __init__(self, api: OrthancApi, name: str, target_aet: str) -> None:
        self.api, self.name, self.target_aet = api, name, target_aet

    def find(self, level: str, query: dict[str, str]) -> list[dict]:
        """The answers of one C-FIND (tag names as keys); ``Normalize`` off so that count keys reach the PACS."""
        body = json.dumps({"Level": level, "Query": query, "Normalize": False}).encode()
        answer = json.loads(self.api.post_bytes(f"/modalities/{self.name}/query", body))
        return get_json(self.api, f"/queries/{answer['ID']}/answers?expand&simplify")

    def studies(self, which: StudyFilter) -> list[RemoteStudy]:
        """The studies the PACS answers for the filter (one query per modality), with their instance counts."""
        found: dict[str, int | None] = {}
        for modality in which.modalities:
            query = {"ModalitiesInStudy": modality, "StudyInstanceUID": "", "StudyDate": which.study_date,
                     "NumberOfStudyRelatedInstances": ""}
            for content in self.find("Study", query):
                if content.get("StudyInstanceUID"):
                    found[content["StudyInstanceUID"]] = _count(content.get("NumberOfStudyRelatedInstances"))
        return [RemoteStudy(uid, n) for uid, n in sorted(found.items())]

    def series(self, study_uid: str) -> dict[str, int | None]:
        """Series Instance UID -> instance count (None: not answered) of one study."""
        query = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": "", "NumberOfSeriesRelatedInstances": ""}
        return {c["SeriesInstanceUID"]: _count(c.get("NumberOfSeriesRelatedInstances"))
                for c in self.find("Series", query) if c.get("SeriesInstanceUID")}

    def instances(self, study_uid: str, series_uid: str) -> set[str]:
        """SOP Instance UIDs of one series."""
        query = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "SOPInstanceUID": ""}
        return {c["SOPInstanceUID"] for c in self.find("Instance", query) if c.get("SOPInstanceUID")}

    def move(self, requests: list[tuple[str, dict[str, str]]]) -> None:
        """C-MOVE the requests into Orthanc, those of one level over one association; what fails shows in the
        recount that follows."""
        by_level: dict[str, list[dict[str, str]]] = {}
        for level, identifiers in requests:
            by_level.setdefault(level, []).append(identifiers)
        for level, resources in by_level.items():
            body = {"Level": level, "Resources": resources, "TargetAet": self.target_aet, "Synchronous": True}
            self.api.post_bytes(f"/modalities/{self.name}/move", json.dumps(body).encode())


def orthanc_study_id(api: OrthancApi, study_uid: str) -> str | None:
    """The Orthanc id of a study by its Study Instance UID, if Orthanc holds it."""
    found = json.loads(api.post_bytes("/tools/lookup", study_uid.encode()))
    return next((x["ID"] for x in found if x.get("Type") == "Study"), None)


#: Modalities of the documents Lookalike files into a study (the SR of similar studies, the KOS of priors).
OWN_DOCUMENT_MODALITIES = ("SR", "KO")


def is_own_series(series: dict) -> bool:
    """Whether an Orthanc series holds Lookalike's own documents (Manufacturer "Lookalike", SR or KO), filed into
    the local study after it was received: they are not the PACS's instances, and must not stand in for one."""
    tags = series.get("MainDicomTags", {})
    return tags.get("Manufacturer", "").strip() == MANUFACTURER and tags.get("Modality") in OWN_DOCUMENT_MODALITIES


def plan_move(api: OrthancApi, pacs: RemotePacs, study: RemoteStudy) -> MovePlan:
    """Compare Orthanc's copy of a remote study with the PACS's: equal instance counts mean held; otherwise series
    by series, then instance by instance where a series' counts differ, so that only what is missing moves.

    The local count leaves out the series of Lookalike's own documents (:func:`is_own_series`): a report filed into a
    study that lacks an image would otherwise make up the count and pass the study for complete.
    """
    orthanc_id = orthanc_study_id(api, study.uid)
    if orthanc_id is None:
        return MovePlan(None, 0, [("Study", {"StudyInstanceUID": study.uid})])
    local = {s.get("MainDicomTags", {}).get("SeriesInstanceUID", ""): s
             for s in get_json(api, f"/studies/{orthanc_id}/series")}
    held = sum(len(s.get("Instances", [])) for s in local.values() if not is_own_series(s))
    if study.instances is not None and held == study.instances:
        return MovePlan(orthanc_id, held, [])
    requests: list[tuple[str, dict[str, str]]] = []
    for series_uid, count in pacs.series(study.uid).items():
        ids = {"StudyInstanceUID": study.uid, "SeriesInstanceUID": series_uid}
        if series_uid not in local:
            requests.append(("Series", ids))
        elif count is None or count != len(local[series_uid].get("Instances", [])):
            have = {i.get("MainDicomTags", {}).get("SOPInstanceUID")
                    for i in get_json(api, f"/series/{local[series_uid]['ID']}/instances")}
            requests += [("Instance", {**ids, "SOPInstanceUID": sop})
                         for sop in sorted(pacs.instances(study.uid, series_uid) - have)]
    return MovePlan(orthanc_id, held, requests)


def remote_walk(api: OrthancApi, pacs: RemotePacs, studies: Iterable[RemoteStudy], report: BackfillReport,
                *, dry_run: bool = False) -> Iterator[WalkedStudy]:
    """Bring each remote study into Orthanc in full (what is missing only), then hand it to :meth:`Backfill.run`.

    A study still short after its move (the PACS or the link failed, a move was cut) is listed in
    ``report.incomplete`` by its Study Instance UID and counts, walked for what Orthanc has, and not checkpointed.
    """
    for study in studies:
        try:
            plan = plan_move(api, pacs, study)
        except OrthancError as exc:  # the PACS did not answer the series or instance query
            report.incomplete.append({"study": study.uid, "remote_instances": study.instances, "problem": str(exc)})
            yield WalkedStudy(orthanc_study_id(api, study.uid), complete=False)
            continue
        if not plan.requests:
            yield WalkedStudy(plan.orthanc_id)
            continue
        if dry_run:
            report.skipped[WOULD_MOVE] += 1
            yield WalkedStudy(plan.orthanc_id, complete=False)
            continue
        problem = ""
        try:
            pacs.move(plan.requests)
        except OrthancError as exc:
            problem = str(exc)
        after = plan_move(api, pacs, study)
        moved = after.local_instances - plan.local_instances
        report.moved_studies += moved > 0
        report.moved_instances += max(moved, 0)
        if after.requests:
            entry = {"study": study.uid, "remote_instances": study.instances, "local_instances": after.local_instances}
            report.incomplete.append({**entry, "problem": problem} if problem else entry)
        yield WalkedStudy(after.orthanc_id, complete=not after.requests, moved=moved)


def _private_folder(path: Path) -> None:
    """Create ``path`` and its missing parents owner-only (0700); existing folders are left as they are."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)


class Checkpoint:
    """The studies a walk has settled, in an owner-only JSON file (0600) replaced atomically after each one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.done: set[str] = set(json.loads(self.path.read_text())["done"]) if self.path.exists() else set()

    @classmethod
    def default(cls, index_dir: Path, name: str) -> "Checkpoint":
        """The checkpoint of one walk in the index folder's ``backfill`` folder, made owner-only (0700) if an
        older version left it open."""
        folder = Path(index_dir) / "backfill"
        _private_folder(folder)
        folder.chmod(0o700)
        return cls(folder / f"{name}.json")

    def add(self, study_id: str) -> None:
        self.done.add(study_id)
        self._save()

    def discard(self, study_id: str) -> None:
        """Forget a study found incomplete or changed since it was checkpointed."""
        if study_id in self.done:
            self.done.discard(study_id)
            self._save()

    def _save(self) -> None:
        _private_folder(self.path.parent)
        text = json.dumps({"done": sorted(self.done)})

        def write(temp: str) -> None:
            os.chmod(temp, 0o600)  # before the content: study ids of patients are nobody else's to read
            Path(temp).write_text(text)

        atomic_write(self.path, write)


class Backfill:
    """Queues instances in batches and waits for the worker to settle them.

    Parameters
    ----------
    api
        Orthanc's REST API.
    catalogue
        The catalogue (read-only is enough): it says what is indexed and what failed.
    send
        Queues a task: ``send(name, args, kwargs)``.
    checkpoint
        Where settled studies are remembered (None: nothing is remembered).
    batch
        Instances queued and not yet settled, at most: once there are this many, the walk waits until half of them
        are settled, then queues more.
    rate
        Instances queued per second at most.
    settle_timeout
        Seconds to wait for one batch; instances still unsettled then are reported as waiting, their study is
        not checkpointed, and the walk goes on.
    task, task_kwargs
        The task queued per instance, called with ``(instance, series, study)`` and these keyword arguments:
        by default the worker's ``missing_only`` indexing task.
    model_version
        An instance counts as done once it has a vector of this model (default: of any model).
    """

    def __init__(self, api: OrthancApi, catalogue: Catalogue, send: Callable[[str, list, dict], None],
                 checkpoint: Checkpoint | None, *, batch: int = 32, rate: float = 20.0, settle_timeout: float = 600.0,
                 task: str = TASK_INDEX_INSTANCE, task_kwargs: dict | None = None, model_version: str | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if batch < 1 or rate <= 0:
            raise ValueError("batch must be at least 1 and rate positive")
        self.api, self.catalogue, self.send, self.checkpoint = api, catalogue, send, checkpoint
        self.batch, self.rate, self.settle_timeout = batch, rate, settle_timeout
        self.task, self.task_kwargs = task, task_kwargs if task_kwargs is not None else {"missing_only": True}
        self.model_version = model_version
        self.clock, self.sleep = clock, sleep
        self._outstanding: dict[str, str] = {}  # instance id -> study id
        self._unsettled: Counter = Counter()  # study id -> instances queued and not settled
        self._walked: set[str] = set()  # complete studies whose every instance has been looked at (and queued)
        self._last_sent = -1e9

    def run(self, studies: Iterable[str | WalkedStudy], *, dry_run: bool = False, progress: Progress | None = None,
            report: BackfillReport | None = None) -> BackfillReport:
        """Walk studies (Orthanc ids, or :class:`WalkedStudy`): queue what each lacks, checkpoint each complete one
        once it is settled. Every study counts and advances the bar, the ones Orthanc lacks included."""
        report = report or BackfillReport()
        for item in studies:
            study = item if isinstance(item, WalkedStudy) else WalkedStudy(item)
            report.studies += 1
            if study.orthanc_id is not None and not self._resumed(study, dry_run):
                self._walk(study, dry_run, report)
            elif study.orthanc_id is not None:
                report.studies_resumed += 1
            report.show(progress, 1)
        self._settle(report)
        report.show(progress)
        return report

    def _resumed(self, study: WalkedStudy, dry_run: bool) -> bool:
        """Whether the checkpoint settles the study; a checkpointed study found incomplete or moved into since is
        forgotten there (a checkpoint never names an incomplete study)."""
        if self.checkpoint is None or study.orthanc_id not in self.checkpoint.done:
            return False
        if study.complete and not study.moved:
            return True
        if not dry_run:
            self.checkpoint.discard(study.orthanc_id)
        return False

    def _walk(self, study: WalkedStudy, dry_run: bool, report: BackfillReport) -> None:
        study_id = study.orthanc_id
        for instance_id, series_id, modality in self._instances(study_id):
            if not is_image_modality(modality):
                report.skipped[f"not an image modality ({modality or 'none'})"] += 1
            else:
                self._consider(instance_id, series_id, study_id, dry_run, report)
        if study.complete:
            self._walked.add(study_id)
            if not dry_run and self._unsettled[study_id] == 0:
                self._done(study_id)

    def run_instances(self, items: Iterable[tuple[str, str, str]], *, progress: Progress | None = None,
                      report: BackfillReport | None = None) -> BackfillReport:
        """Queue what each (instance, series, study) lacks, then wait until every one is settled."""
        report = report or BackfillReport()
        for instance_id, series_id, study_id in items:
            self._consider(instance_id, series_id, study_id, False, report)
            report.show(progress, 1)
        self._settle(report)
        report.show(progress)
        return report

    def _consider(self, instance_id: str, series_id: str, study_id: str, dry_run: bool,
                  report: BackfillReport) -> None:
        if self.catalogue.is_indexed(instance_id, self.model_version):
            report.skipped["indexed already"] += 1
        elif (problem := self.catalogue.problem_for(instance_id)) is not None:
            report.failed[problem.code] += 1
        elif dry_run:
            report.skipped["would be queued (dry run)"] += 1
        else:
            wait = self._last_sent + 1.0 / self.rate - self.clock()
            if wait > 0:
                self.sleep(wait)
            self.send(self.task, [instance_id, series_id, study_id], dict(self.task_kwargs))
            self._last_sent = self.clock()
            report.queued += 1
            self._outstanding[instance_id] = study_id
            self._unsettled[study_id] += 1
            if len(self._outstanding) >= self.batch:
                self._settle(report, down_to=self.batch // 2)

    def _instances(self, study_id: str) -> list[tuple[str, str, str]]:
        """(instance id, series id, modality) of every instance of a study; none if it was deleted meanwhile."""
        try:
            series_list = get_json(self.api, f"/studies/{study_id}/series")
        except OrthancNotFoundError:
            return []
        return [(instance_id, series["ID"], series_modality(series))
                for series in series_list for instance_id in series.get("Instances", [])]

    def _done(self, study_id: str) -> None:
        if self.checkpoint is not None:
            self.checkpoint.add(study_id)

    def _settle(self, report: BackfillReport, down_to: int = 0) -> None:
        """Wait until at most ``down_to`` outstanding instances are neither indexed nor with a problem (0: every
        one settled); checkpoint the studies completed. Should none settle for ``settle_timeout`` seconds, those
        still outstanding are reported as waiting and no longer waited for."""
        deadline = self.clock() + self.settle_timeout
        outstanding, unsettled = self._outstanding, self._unsettled
        while len(outstanding) > down_to:
            for instance_id in list(outstanding):
                if self.catalogue.is_indexed(instance_id, self.model_version):
                    report.indexed += 1
                elif (problem := self.catalogue.problem_for(instance_id)) is not None:
                    report.failed[problem.code] += 1
                else:
                    continue
                study_id = outstanding.pop(instance_id)
                unsettled[study_id] -= 1
                deadline = self.clock() + self.settle_timeout  # progress: the worker is at it
                if unsettled[study_id] == 0 and study_id in self._walked:
                    self._done(study_id)
            if len(outstanding) > down_to and self.clock() >= deadline:
                report.waiting += len(outstanding)
                outstanding.clear()
                return
            if len(outstanding) > down_to:
                self.sleep(0.2)
