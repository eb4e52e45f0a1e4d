"""What the plugin does when Orthanc reports a change: queue the task the change means, nothing else.

Indexing is per instance on ``NEW_INSTANCE`` (searchable within seconds of the C-STORE, not after
``StableAge``); ``STABLE_STUDY`` queues a reconciliation that picks up any instance whose event was lost.
What a change means (and which instances are queued) is :func:`lookalike.orthanc.ingest.meaning`'s, the function
the worker's catch-up, reconcile and back-indexing ask too; this module only maps the ``orthanc`` module's
constants to the change log's names and sends the task.

The handler remembers the studies whose instances it queued, so that their ``STABLE_STUDY`` costs Orthanc no second
REST call: each call is CPU taken in Orthanc's own process while it stores (see ``bench/cstore_throughput.py``).
"""

from __future__ import annotations

import traceback
from collections import OrderedDict
from typing import Any, Callable

from lookalike.orthanc.client import OrthancApi, OrthancNotFoundError
from lookalike.config import TASK_INDEX_INSTANCE
from lookalike.orthanc.ingest import DELETED, NEW_INSTANCE, STABLE_STUDY, meaning

#: Studies remembered as holding images, the oldest forgotten first: more than a site stores within ``StableAge``.
REMEMBERED_STUDIES = 10_000


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
    remember
        How many studies with a queued instance are remembered until their ``STABLE_STUDY`` (the oldest are
        forgotten first; a forgotten one costs its REST call again, nothing else).
    """

    def __init__(self, orthanc: Any, api: OrthancApi, send: Callable[..., None], log_error: Callable[[str], None],
                 remember: int = REMEMBERED_STUDIES) -> None:
        self.api = api
        self.send = send
        self.log_error = log_error
        ct, rt = orthanc.ChangeType, orthanc.ResourceType
        # The orthanc module's constants -> the names of Orthanc's change log, which ``meaning`` speaks.
        self._kinds = {ct.NEW_INSTANCE: NEW_INSTANCE, ct.STABLE_STUDY: STABLE_STUDY, ct.DELETED: DELETED}
        self._levels = {rt.PATIENT: "Patient", rt.STUDY: "Study", rt.SERIES: "Series", rt.INSTANCE: "Instance"}
        self._image_studies: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    def __call__(self, change_type: int, level: int, resource_id: str) -> None:
        try:
            kind = self._kinds.get(change_type)
            if kind is None:
                return
            work = meaning(self.api, kind, self._levels.get(level), resource_id, self._image_studies)
            if kind != NEW_INSTANCE:  # stable or deleted: a later instance of the study is remembered anew
                self._image_studies.pop(resource_id, None)
            if work is not None:
                self.send(work.task, *work.args)
                if work.task == TASK_INDEX_INSTANCE:
                    self._remember_study(work.args[2])
        except OrthancNotFoundError:
            pass  # deleted between the event and now: nothing to index
        except Exception:
            self.log_error(f"Lookalike: change {change_type} on {resource_id} failed: {traceback.format_exc()}")

    def _remember_study(self, study_id: str) -> None:
        self._image_studies[study_id] = None
        self._image_studies.move_to_end(study_id)
        while len(self._image_studies) > self._remember:
            self._image_studies.popitem(last=False)
