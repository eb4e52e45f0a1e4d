"""Catch-up from Orthanc's own change log: anything Orthanc stored is indexed once Lookalike is back.

The plugin's ``NEW_INSTANCE`` callback is the fast path, but its events live in memory: they are lost when Orthanc
stops with events queued, when Redis is down longer than the plugin's retries, or when the plugin is not loaded.
Orthanc also writes every change to its database (``GET /changes?since=N&limit=M``), in the same transaction as
the instance itself. :class:`ChangeLogFollower` reads that log from a cursor kept in the catalogue and queues
whatever is neither indexed nor recorded as a problem; the worker runs it at start and then periodically
(:mod:`lookalike.worker.tasks`). Tasks it queues are ``missing_only``: if the fast path got there first, the
worker skips them without decoding anything, so a race between the two paths costs a catalogue look-up.

Change numbers belong to one Orthanc database: a reset or replaced one (a new SQLite index, another PostgreSQL
database, a restore) numbers from 1 again. The cursor is kept with an anchor, the change it last read (number,
type, resource, date); a pass that finds the cursor beyond Orthanc's last change, or its anchor no longer in the
log as it was read, reads the log again from the start. Orthanc 1.10 gives no identity of its database (``/system``
has only the schema version), so the log itself is the witness.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from lookalike.config import TASK_INDEX_INSTANCE
from lookalike.index.catalogue import CHANGES_CURSOR, Catalogue
from lookalike.orthanc.client import OrthancApi, OrthancNotFoundError, get_json
from lookalike.orthanc.ingest import (DELETED, NEW_INSTANCE, Remembered, change_anchor, cursor_reset_reason,
                                      meaning)

log = logging.getLogger(__name__)

#: Name of the catalogue cursor that holds the last Orthanc change ``Seq`` handled.
CURSOR = CHANGES_CURSOR

#: Problem code of an instance whose vector the index folder refused (permission, disk full, not a folder).
UNWRITABLE = "index-unwritable"

#: Problem codes that say "try again later" rather than "this instance is bad": retried by the follower.
TRANSIENT_CODES = ("orthanc-unavailable", "internal-error", UNWRITABLE)

#: A transient problem is retried this many times in all, then left for an administrator; but an index folder
#: that refused writes says nothing about the instance: retried for as long as it takes.
MAX_ATTEMPTS = 5


@dataclass
class CatchUpReport:
    """What one pass of the follower did."""

    cursor_before: int
    cursor_after: int
    changes_read: int = 0
    queued: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)


class ChangeLogFollower:
    """Reads Orthanc's change log and queues what the index is missing.

    The cursor stays just before the oldest change still being handled (its instance queued, not yet indexed):
    if the worker dies with tasks in flight, its next start reads from there and queues them again, instead of
    waiting for Redis to redeliver them. Instances queued by this follower are not queued again for
    ``requeue_after`` seconds, so a long backlog is not multiplied at every pass.

    Parameters
    ----------
    api
        Orthanc's REST API (the worker's HTTP client).
    catalogue
        The writable catalogue: it answers "indexed already?" and keeps the cursor.
    send
        Queues a task by name: ``send(name, args, kwargs)``. An exception (broker down) stops the pass; the
        cursor stays before the change, so that the next pass tries it again.
    page
        Changes read per request.
    requeue_after
        Seconds after which an instance queued but still not indexed is queued again.
    clock
        Seconds, monotonic.
    """

    def __init__(self, api: OrthancApi, catalogue: Catalogue, send: Callable[[str, list, dict], None],
                 page: int = 500, requeue_after: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api
        self.catalogue = catalogue
        self.send = send
        self.page = page
        self.requeue_after = requeue_after
        self.clock = clock
        self._queued: dict[str, float] = {}  # instance id -> when this follower queued it
        self._horizon: int | None = None  # the newest change seen by the previous pass
        self._remembered = Remembered()  # series asked once each, not once per instance (a CT series of thousands)

    def step(self) -> CatchUpReport:
        """One periodic pass: every change up to the newest one the previous pass saw (all, the first time)."""
        seen = self.last_change()
        report = self.run(self._horizon)
        self._horizon = seen
        return report

    def last_change(self) -> int:
        """The newest change number Orthanc has written."""
        return int(get_json(self.api, "/changes?last")["Last"])

    def run(self, upto: int | None = None) -> CatchUpReport:
        """Handle every change after the cursor, up to ``upto`` (all when None), then retry transient problems.

        ``upto`` lets the periodic pass leave alone the changes of the last few seconds, which the fast path is
        handling right now. Raises what Orthanc or the broker raise; the cursor then stays before the first
        change not fully handled.
        """
        start = self._checked_cursor()
        report = CatchUpReport(start, start)
        since, pending_from, anchor = start, None, None
        try:
            while True:
                answer = get_json(self.api, f"/changes?since={since}&limit={self.page}")
                changes = answer.get("Changes", [])
                for change in changes:
                    seq = int(change["Seq"])
                    if upto is not None and seq > upto:
                        return self._finish(report)
                    if not self._handle(change, report) and pending_from is None:
                        pending_from = seq - 1
                    if pending_from is None:
                        anchor = change_anchor(change)
                    report.changes_read += 1
                    since = seq
                    report.cursor_after = since if pending_from is None else pending_from
                last = int(answer.get("Last", since))
                if answer.get("Done", True) or not changes or last <= since:
                    return self._finish(report)
                since = last
        finally:
            if report.cursor_after != start:
                self.catalogue.set_cursor(CURSOR, report.cursor_after, anchor)

    def _checked_cursor(self) -> int:
        """The cursor, or 0 after a reset when it was kept for another Orthanc database than the one answering."""
        cursor = self.catalogue.cursor(CURSOR)
        if cursor == 0:
            return 0
        reason = cursor_reset_reason(self.api, cursor, self.catalogue.cursor_anchor(CURSOR), self.last_change())
        if reason is None:
            return cursor
        log.warning("catch-up: Orthanc's change log is not the one the cursor was kept for (%s): its database was"
                    " reset or replaced; reading its change log again from the start", reason)
        self.catalogue.set_cursor(CURSOR, 0, "")
        self._queued.clear()
        self._horizon = None
        return 0

    def _handle(self, change: dict, report: CatchUpReport) -> bool:
        """Queue what one change means (:func:`~lookalike.orthanc.ingest.meaning`, as for the plugin's event);
        True when nothing is left to wait for.

        A ``StableStudy`` is left alone: its instances' own ``NewInstance`` changes are in the same log.
        """
        kind, level, resource = change.get("ChangeType"), change.get("ResourceType"), change.get("ID", "")
        if kind == DELETED:
            # Idempotent and rare: re-sending a deletion the fast path already handled removes nothing more.
            work = meaning(self.api, kind, level, resource, self._remembered)
            if work is not None:
                self.send(work.task, list(work.args), {})
                report.forgotten.append(resource)
            return True
        if kind != NEW_INSTANCE:
            return True
        if self.catalogue.is_indexed(resource) or self.catalogue.problem_for(resource):
            self._queued.pop(resource, None)
            return True
        queued_at = self._queued.get(resource)
        if queued_at is not None and self.clock() - queued_at < self.requeue_after:
            return False
        try:
            work = meaning(self.api, kind, level, resource, self._remembered)
        except OrthancNotFoundError:
            return True  # deleted since: nothing to index
        if work is None:
            return True
        self.send(work.task, list(work.args), {"missing_only": True})
        self._queued[resource] = self.clock()
        report.queued.append(resource)
        return False

    def _finish(self, report: CatchUpReport) -> CatchUpReport:
        """Queue again the instances whose last try failed for a reason that may have passed."""
        for problem in self.catalogue.problems(limit=1000, codes=TRANSIENT_CODES):
            queued_at = self._queued.get(problem.orthanc_instance_id)
            if (problem.attempts >= MAX_ATTEMPTS and problem.code != UNWRITABLE) or (queued_at is not None
                                                    and self.clock() - queued_at < self.requeue_after):
                continue
            self.send(TASK_INDEX_INSTANCE, [problem.orthanc_instance_id], {"missing_only": True})
            self._queued[problem.orthanc_instance_id] = self.clock()
            report.retried.append(problem.orthanc_instance_id)
        if report.queued or report.retried or report.forgotten:
            log.warning("catch-up from Orthanc's change log: changes %d..%d, %d queued, %d retried, %d deletions",
                        report.cursor_before, report.cursor_after, len(report.queued), len(report.retried),
                        len(report.forgotten))
        return report
