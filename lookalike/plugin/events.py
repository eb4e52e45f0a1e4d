"""What the plugin does when Orthanc reports a change: queue indexing for US and X-ray, nothing else.

Indexing is per instance on ``NEW_INSTANCE`` (searchable within seconds of the C-STORE, not after
``StableAge``); ``STABLE_STUDY`` queues a reconciliation that picks up any instance whose event was lost.
SR, KO, PR and Lookalike's own reports have other modalities and are ignored, so writing a report back
into a study never sets off indexing again.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

from lookalike.config import ENCODER_FOR_MODALITY, TASK_FORGET, TASK_INDEX_INSTANCE, TASK_RECONCILE_STUDY
from lookalike.orthanc.client import OrthancApi, OrthancNotFoundError, instance_series, study_series


class ChangeHandler:
    """Orthanc's on-change callback.

    Parameters
    ----------
    orthanc
        The ``orthanc`` module (for its ``ChangeType`` and ``ResourceType`` constants).
    api
        Orthanc's REST API, in-process.
    send
        ``TaskSender.send``: queues a Celery task by name without waiting.
    log_error
        Where errors go (``orthanc.LogError`` in the plugin): a callback never raises into Orthanc.
    """

    def __init__(self, orthanc: Any, api: OrthancApi, send: Callable[..., None], log_error: Callable[[str], None]) -> None:
        self.api = api
        self.send = send
        self.log_error = log_error
        ct, rt = orthanc.ChangeType, orthanc.ResourceType
        self._new_instance, self._stable_study, self._deleted = ct.NEW_INSTANCE, ct.STABLE_STUDY, ct.DELETED
        self._levels = {rt.PATIENT: "patient", rt.STUDY: "study", rt.SERIES: "series", rt.INSTANCE: "instance"}

    def __call__(self, change_type: int, level: int, resource_id: str) -> None:
        try:
            if change_type == self._new_instance:
                series = instance_series(self.api, resource_id)
                if series.get("MainDicomTags", {}).get("Modality") in ENCODER_FOR_MODALITY:
                    # The parents go along: the worker then asks Orthanc for the file alone.
                    self.send(TASK_INDEX_INSTANCE, resource_id, series["ID"], series["ParentStudy"])
            elif change_type == self._stable_study:
                modalities = {s.get("MainDicomTags", {}).get("Modality") for s in study_series(self.api, resource_id)}
                if modalities & set(ENCODER_FOR_MODALITY):
                    self.send(TASK_RECONCILE_STUDY, resource_id)
            elif change_type == self._deleted and level in self._levels:
                self.send(TASK_FORGET, self._levels[level], resource_id)
        except OrthancNotFoundError:
            pass  # deleted between the event and now: nothing to index
        except Exception:
            self.log_error(f"Lookalike: change {change_type} on {resource_id} failed: {traceback.format_exc()}")
