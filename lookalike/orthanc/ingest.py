"""What an Orthanc change means for the index, and whether an instance is to be queued: said once, here.

Four paths queue work, and all four ask this module:

- the plugin's change callback (:class:`lookalike.plugin.events.ChangeHandler`, the fast path);
- the worker's catch-up over Orthanc's change log (:class:`lookalike.worker.change_log.ChangeLogFollower`);
- the reconcile of a stable study (:meth:`lookalike.worker.pipeline.InstanceIndexer.reconcile_study`);
- back-indexing (:class:`lookalike.worker.backfill.Backfill`).

An instance is queued when its series' modality is one an encoder takes (US, DX, CR:
:data:`lookalike.config.ENCODER_FOR_MODALITY`); SR, KO, PR and Lookalike's own reports are not, so writing a
report back into a study never sets off indexing again. Changes are named as Orthanc's ``/changes`` names them
(``NewInstance``, ``StableStudy``, ``Deleted``; levels ``Patient`` ... ``Instance``); the plugin maps the
``orthanc`` module's constants to these names.

Imports the configuration and the REST client alone: the plugin runs it in Orthanc's process.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from lookalike.config import ENCODER_FOR_MODALITY, TASK_FORGET, TASK_INDEX_INSTANCE, TASK_RECONCILE_STUDY
from lookalike.orthanc.client import OrthancApi, get_json, study_series

#: Change types as Orthanc's change log names them.
NEW_INSTANCE, STABLE_STUDY, DELETED = "NewInstance", "StableStudy", "Deleted"

#: Resource levels as Orthanc's change log names them -> the level ``forget`` takes.
LEVELS = {"Patient": "patient", "Study": "study", "Series": "series", "Instance": "instance"}


def is_image_modality(modality: str | None) -> bool:
    """Whether instances of this DICOM Modality are embedded (US, DX, CR)."""
    return modality in ENCODER_FOR_MODALITY


def series_modality(series: dict) -> str:
    """The Modality of a series as Orthanc's JSON of it gives it ("" when absent)."""
    return series.get("MainDicomTags", {}).get("Modality", "") or ""


def series_is_queued(series: dict) -> bool:
    """Whether the instances of a series (Orthanc's JSON of it) are to be queued for indexing."""
    return is_image_modality(series_modality(series))


def study_is_queued(series: Iterable[dict]) -> bool:
    """Whether a study (its series, as Orthanc's JSON) holds anything to index."""
    return any(series_is_queued(s) for s in series)


@dataclass(frozen=True)
class Work:
    """A task to queue: its name and positional arguments."""

    task: str
    args: tuple


class Remembered:
    """What earlier changes told about Orthanc's resources, so that the next change costs Orthanc less.

    Each question is CPU taken in Orthanc while it stores (in its own process, for the plugin):

    - an instance's series: ``/instances/{id}`` (an answer of fixed size) names its parent, and the parent's Modality
      and study are asked once per series (``/series/{id}``). ``/instances/{id}/series`` lists every instance of
      the series: in a series of 1000 it took 6.9 ms over HTTP against 1.2 ms, so one such question per instance
      costs Orthanc time that grows with the square of the series;
    - the studies one of whose instances was queued: their ``StableStudy`` is reconciled without asking for the
      study's series.

    A series' Modality and parent never change. Both are bounded (``size`` each), the oldest forgotten first; a
    forgotten one costs its question again, nothing else. A deleted or stable resource is forgotten.
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._series: OrderedDict[str, dict] = OrderedDict()
        self._image_studies: OrderedDict[str, None] = OrderedDict()

    def series_of(self, api: OrthancApi, instance_id: str) -> dict:
        """The series of an instance, as :func:`~lookalike.orthanc.client.instance_series` gives it (its ``ID``,
        ``ParentStudy`` and ``MainDicomTags`` with ``Modality``)."""
        series_id = get_json(api, f"/instances/{instance_id}")["ParentSeries"]
        series = self._series.get(series_id)
        if series is None:
            found = get_json(api, f"/series/{series_id}")
            series = {"ID": series_id, "ParentStudy": found["ParentStudy"],
                      "MainDicomTags": {"Modality": series_modality(found)}}
            self._keep(self._series, series_id, series)
        return series

    def queued_in(self, study_id: str) -> None:
        """An instance of this study was queued: the study holds an image series."""
        self._keep(self._image_studies, study_id, None)

    def holds_images(self, study_id: str) -> bool:
        return study_id in self._image_studies

    def forget(self, resource_id: str) -> None:
        self._series.pop(resource_id, None)
        self._image_studies.pop(resource_id, None)

    def _keep(self, kept: OrderedDict, key: str, value: object) -> None:
        kept[key] = value
        kept.move_to_end(key)
        while len(kept) > self.size:
            kept.popitem(last=False)


def meaning(api: OrthancApi, change_type: str | None, level: str | None, resource_id: str,
            remembered: Remembered) -> Work | None:
    """What one Orthanc change means for the index: the task to queue, or None when it means nothing.

    - ``NewInstance`` of an image modality: index it (with its series and study, so that the worker asks Orthanc
      for the file alone);
    - ``StableStudy`` holding an image series: reconcile it (index what an event lost);
    - ``Deleted`` at any level: forget it (idempotent: a deletion handled twice removes nothing more).

    ``remembered``: what the caller's earlier changes told (:class:`Remembered`, one per stream of changes), used
    and kept up to date here, so that the stream asks Orthanc less.

    Raises :class:`~lookalike.orthanc.client.OrthancNotFoundError` when the resource is gone meanwhile (nothing to
    index), and what Orthanc raises otherwise.
    """
    if change_type == NEW_INSTANCE:
        series = remembered.series_of(api, resource_id)
        if not series_is_queued(series):
            return None
        remembered.queued_in(series["ParentStudy"])
        return Work(TASK_INDEX_INSTANCE, (resource_id, series["ID"], series["ParentStudy"]))
    if change_type == STABLE_STUDY:
        known = remembered.holds_images(resource_id)
        remembered.forget(resource_id)  # a later instance of the study is remembered anew
        if known or study_is_queued(study_series(api, resource_id)):
            return Work(TASK_RECONCILE_STUDY, (resource_id,))
        return None
    if change_type == DELETED and level in LEVELS:
        remembered.forget(resource_id)
        return Work(TASK_FORGET, (LEVELS[level], resource_id))
    return None


def change_anchor(change: dict) -> str:
    """A change of Orthanc's log as the catch-up cursor's anchor: its number, type, resource and date (a new
    database repeats the number, hardly the rest); the catch-up and the status route judge a reset by it."""
    return f"{int(change['Seq'])} {change.get('ChangeType', '')} {change.get('ID', '')} {change.get('Date', '')}"


def cursor_reset_reason(api: OrthancApi, cursor: int, anchor: str, last: int) -> str | None:
    """Why the catch-up's ``cursor`` (kept with ``anchor``, :func:`change_anchor`) was kept for another change log
    than Orthanc's, whose last change is ``last`` (its database reset or replaced); None where it is this log's, or
    where nothing was read yet. The one judgement of a reset: the catch-up's and the status route's."""
    if cursor == 0:
        return None
    if cursor > last:
        return f"the cursor is at change {cursor}, Orthanc's last change is {last}"
    if not anchor:
        return None
    seq = int(anchor.split()[0])
    changes = get_json(api, f"/changes?since={seq - 1}&limit=1").get("Changes", [])
    if changes and change_anchor(changes[0]) == anchor:
        return None
    return f"change {seq} is not the one read there (then: {anchor})"
