"""What the plugin does when Orthanc reports a change: queue the task the change means, nothing else.

Indexing is per instance on ``NEW_INSTANCE`` (searchable within seconds of the C-STORE, not after
``StableAge``); ``STABLE_STUDY`` queues a reconciliation that picks up any instance whose event was lost.
What a change means (and which instances are queued) is :func:`lookalike.orthanc.ingest.meaning`'s, the function
the worker's catch-up, reconcile and back-indexing ask too; this module only maps the ``orthanc`` module's
constants to the change log's names and sends the task.

The handler keeps what earlier changes told (:class:`~lookalike.orthanc.ingest.Remembered`: series by id, studies
with an image series), so that each change costs Orthanc's own process fewer and smaller REST calls while it stores.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

from lookalike.orthanc.client import OrthancApi, OrthancNotFoundError
from lookalike.orthanc.ingest import DELETED, NEW_INSTANCE, STABLE_STUDY, Remembered, meaning


class ChangeHandler:
    """Orthanc's on-change callback.

    Parameters
    ----------
    orthanc
        The ``orthanc`` module (for its ``ChangeType`` and ``ResourceType`` constants).
    api
        Orthanc's REST API, in-process.
    send
        ``RelayClient.send``: queues a Celery task by name without waiting.
    log_error
        Where errors go (``orthanc.LogError`` in the plugin): a callback never raises into Orthanc.
    remembered
        What earlier changes told (:class:`~lookalike.orthanc.ingest.Remembered`); a fresh one by default.
    """

    def __init__(self, orthanc: Any, api: OrthancApi, send: Callable[..., None], log_error: Callable[[str], None],
                 remembered: Remembered | None = None) -> None:
        self.api = api
        self.send = send
        self.log_error = log_error
        ct, rt = orthanc.ChangeType, orthanc.ResourceType
        # The orthanc module's constants -> the names of Orthanc's change log, which ``meaning`` speaks.
        self._kinds = {ct.NEW_INSTANCE: NEW_INSTANCE, ct.STABLE_STUDY: STABLE_STUDY, ct.DELETED: DELETED}
        self._levels = {rt.PATIENT: "Patient", rt.STUDY: "Study", rt.SERIES: "Series", rt.INSTANCE: "Instance"}
        self._remembered = remembered or Remembered()

    def __call__(self, change_type: int, level: int, resource_id: str) -> None:
        try:
            kind = self._kinds.get(change_type)
            if kind is None:
                return
            work = meaning(self.api, kind, self._levels.get(level), resource_id, self._remembered)
            if work is not None:
                self.send(work.task, *work.args)
        except OrthancNotFoundError:
            pass  # deleted between the event and now: nothing to index
        except Exception:
            self.log_error(f"Lookalike: change {change_type} on {resource_id} failed: {traceback.format_exc()}")
