"""Back-indexing of an existing archive: the studies Orthanc held before Lookalike, or a remote PACS's.

``lookalike backfill`` walks the studies that match (modality, study date range), queues every US/DX/CR instance
that is neither indexed nor recorded as a problem, and waits for the worker to settle each one before the next
batch, so that the queue never holds more than one batch and the PACS keeps serving. A rate limit spaces the
tasks further. Each study whose instances are all settled is written to a checkpoint: a run stopped for any
reason resumes where it stopped. From a remote PACS, the studies are found with C-FIND and brought into Orthanc
with C-MOVE (Orthanc is the DICOM node that asks), then indexed the same way.

Tasks are the worker's ordinary ``missing_only`` indexing tasks: short and idempotent, so a task Redis
redelivers, or one queued twice by two runs, is skipped at once by the worker.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

from lookalike.config import ENCODER_FOR_MODALITY, TASK_INDEX_INSTANCE
from lookalike.indexer.catalogue import Catalogue
from lookalike.orthanc_rest import OrthancApi, OrthancNotFoundError, get_json

class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...

    def set_postfix_str(self, s: str) -> object: ...


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

    def as_dict(self) -> dict:
        return {"studies": self.studies, "studies_resumed_from_checkpoint": self.studies_resumed,
                "moved_from_remote": self.moved_studies, "queued": self.queued, "indexed": self.indexed,
                "skipped": dict(self.skipped), "failed": dict(self.failed), "still_waiting": self.waiting}


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


def remote_studies(api: OrthancApi, remote: str, which: StudyFilter) -> list[str]:
    """Study Instance UIDs a remote PACS answers for the filter, by C-FIND from Orthanc (one query per modality)."""
    uids: set[str] = set()
    for modality in which.modalities:
        query = {"ModalitiesInStudy": modality, "StudyInstanceUID": "", "StudyDate": which.study_date}
        body = json.dumps({"Level": "Study", "Query": query}).encode()
        answer = json.loads(api.post_bytes(f"/modalities/{remote}/query", body))
        for content in get_json(api, f"/queries/{answer['ID']}/answers?expand&simplify"):
            if content.get("StudyInstanceUID"):
                uids.add(content["StudyInstanceUID"])
    return sorted(uids)


def move_from_remote(api: OrthancApi, remote: str, study_uid: str, target_aet: str) -> None:
    """C-MOVE one study from the remote PACS into Orthanc (``target_aet``), waiting until it is done."""
    body = {"Level": "Study", "Resources": [{"StudyInstanceUID": study_uid}], "TargetAet": target_aet,
            "Synchronous": True}
    api.post_bytes(f"/modalities/{remote}/move", json.dumps(body).encode())


def orthanc_study_id(api: OrthancApi, study_uid: str) -> str | None:
    """The Orthanc id of a study by its Study Instance UID, if Orthanc holds it."""
    found = json.loads(api.post_bytes("/tools/lookup", study_uid.encode()))
    return next((x["ID"] for x in found if x.get("Type") == "Study"), None)


class Checkpoint:
    """The studies a walk has settled, in a JSON file replaced atomically after each one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.done: set[str] = set(json.loads(self.path.read_text())["done"]) if self.path.exists() else set()

    def add(self, study_id: str) -> None:
        self.done.add(study_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_suffix(".tmp")
        temp.write_text(json.dumps({"done": sorted(self.done)}))
        temp.replace(self.path)


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
        Instances queued before waiting for them to settle.
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
        self._walked: set[str] = set()  # studies whose every instance has been looked at (and queued if needed)
        self._last_sent = -1e9

    def run(self, study_ids: Iterable[str], *, dry_run: bool = False, progress: Progress | None = None,
            report: BackfillReport | None = None) -> BackfillReport:
        """Walk studies: queue what each lacks, checkpoint each once it is settled."""
        report = report or BackfillReport()
        for study_id in study_ids:
            report.studies += 1
            if self.checkpoint is not None and study_id in self.checkpoint.done:
                report.studies_resumed += 1
                self._tick(progress, report)
                continue
            for instance_id, series_id, modality in self._instances(study_id):
                if modality not in ENCODER_FOR_MODALITY:
                    report.skipped[f"not an image modality ({modality or 'none'})"] += 1
                else:
                    self._consider(instance_id, series_id, study_id, dry_run, report)
            self._walked.add(study_id)
            if not dry_run and self._unsettled[study_id] == 0:
                self._done(study_id)
            self._tick(progress, report)
        self._settle(report)
        return report

    def run_instances(self, items: Iterable[tuple[str, str, str]], *, progress: Progress | None = None,
                      report: BackfillReport | None = None) -> BackfillReport:
        """Queue what each (instance, series, study) lacks, then wait until every one is settled."""
        report = report or BackfillReport()
        for instance_id, series_id, study_id in items:
            self._consider(instance_id, series_id, study_id, False, report)
            self._tick(progress, report)
        self._settle(report)
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
                self._settle(report)

    def _instances(self, study_id: str) -> list[tuple[str, str, str]]:
        """(instance id, series id, modality) of every instance of a study; none if it was deleted meanwhile."""
        try:
            series_list = get_json(self.api, f"/studies/{study_id}/series")
        except OrthancNotFoundError:
            return []
        return [(instance_id, series["ID"], series.get("MainDicomTags", {}).get("Modality", ""))
                for series in series_list for instance_id in series.get("Instances", [])]

    def _done(self, study_id: str) -> None:
        if self.checkpoint is not None:
            self.checkpoint.add(study_id)

    def _settle(self, report: BackfillReport) -> None:
        """Wait until every outstanding instance is indexed or has a problem; checkpoint the studies completed."""
        deadline = self.clock() + self.settle_timeout
        outstanding, unsettled = self._outstanding, self._unsettled
        while outstanding:
            for instance_id in list(outstanding):
                if self.catalogue.is_indexed(instance_id, self.model_version):
                    report.indexed += 1
                elif (problem := self.catalogue.problem_for(instance_id)) is not None:
                    report.failed[problem.code] += 1
                else:
                    continue
                study_id = outstanding.pop(instance_id)
                unsettled[study_id] -= 1
                if unsettled[study_id] == 0 and study_id in self._walked:
                    self._done(study_id)
            if outstanding and self.clock() >= deadline:
                report.waiting += len(outstanding)
                outstanding.clear()
                return
            if outstanding:
                self.sleep(0.2)

    @staticmethod
    def _tick(progress: Progress | None, report: BackfillReport) -> None:
        if progress is not None:
            progress.update(1)
            progress.set_postfix_str(f"queued {report.queued} indexed {report.indexed} "
                                     f"failed {sum(report.failed.values())}")
