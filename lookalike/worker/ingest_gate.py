"""The worker waits for Orthanc to stop receiving before it fetches: the PACS's ingest comes first.

The worker runs at idle CPU priority, but fetching an instance is work Orthanc does, at Orthanc's priority and
under Orthanc's own locks, while its C-STORE threads write: measured on 2 cores, that and the worker's embedding
beside it took Orthanc's C-STORE rate from 0.9 to about 0.65 of Orthanc alone (``bench/cstore_throughput.py``).
So the plugin marks in Redis when it last queued a new instance (:data:`lookalike.config.INGEST_MARK_KEY`, at most
a few times a second), and before a batch is fetched the worker waits until no instance has arrived for
``ingest_quiet`` seconds. Sustained ingest must still be indexed: a batch never waits more than
``ingest_quiet_max`` seconds, so under a C-STORE stream that never pauses the worker indexes one batch per cap,
and catches up when the stream ends.

A mark that cannot be read (Redis away, no plugin on this Orthanc) counts as quiet: the gate never stops indexing
for a fault of its own, and after a failed read it does not ask again for :data:`RETRY_READ_AFTER` seconds (each
read of an unreachable Redis costs its connection timeout).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger(__name__)

#: Seconds without asking for the mark after a read failed.
RETRY_READ_AFTER = 5.0


class IngestGate:
    """Holds fetching back while Orthanc receives instances.

    Parameters
    ----------
    last_stored
        The wall-clock time (``time.time()``) Orthanc last received an instance to index, or None where unknown;
        may raise (counted as quiet).
    quiet
        Seconds without a new instance before fetching starts; 0 turns the gate off.
    quiet_max
        Seconds one :meth:`wait` lasts at most, however busy Orthanc stays.
    clock, sleep
        Wall clock and sleep (tests replace them).
    """

    def __init__(self, last_stored: Callable[[], float | None], quiet: float, quiet_max: float,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
        self.last_stored = last_stored
        self.quiet, self.quiet_max = quiet, quiet_max
        self.clock, self.sleep = clock, sleep
        self._unreadable_until = float("-inf")

    def _busy_for(self) -> float:
        """Seconds still to wait for the quiet window (0: quiet now)."""
        if self.quiet <= 0 or self.clock() < self._unreadable_until:
            return 0.0
        try:
            last = self.last_stored()
        except Exception as exc:  # noqa: BLE001 (Redis away: index rather than wait on a mark we cannot read)
            log.debug("the ingest mark could not be read: %s: %s", type(exc).__name__, exc)
            self._unreadable_until = self.clock() + RETRY_READ_AFTER
            return 0.0
        if last is None:
            return 0.0
        return max(0.0, last + self.quiet - self.clock())

    def is_quiet(self) -> bool:
        """Whether Orthanc has received nothing to index for ``quiet`` seconds (fetching ahead asks this)."""
        return self._busy_for() == 0.0

    def wait(self) -> float:
        """Block until Orthanc is quiet, or ``quiet_max`` seconds have passed; the seconds waited."""
        start = self.clock()
        deadline = start + self.quiet_max
        while (busy := self._busy_for()) > 0:
            now = self.clock()
            if now >= deadline:
                log.info("Orthanc still receiving after %.1f s: fetching a batch all the same", now - start)
                break
            self.sleep(min(busy, deadline - now, 0.5))
        return self.clock() - start
