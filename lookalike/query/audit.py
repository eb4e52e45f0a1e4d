"""The audit trail: one JSON line per similar-case lookup, retrieve or refused request, whoever asked and however.

A lookup shows a user which other studies resemble the one on screen; who asked about which patient's study,
and what came back, is what a privacy officer must be able to trace. Every entry holds:

``at``
    When (UTC, ISO 8601 with milliseconds).
``who`` and ``via``
    The HTTP user (``via`` "rest") or the calling AE title (``via`` "dicom"), and ``host``, the peer's address.
``study`` and ``orthanc_study_id``
    The StudyInstanceUID and Orthanc id of the study looked up.
``action``
    "lookup" (which studies resemble this one), "report" (the answer filed as an SR), "kos" (the priors filed as
    a Key Object Selection), "retrieve" (a study sent to a workstation) or "associate" (a DICOM association).
``outcome`` and ``reason``
    "answered" (a lookup answered), "refused" (an association or request turned down, ``reason`` says why),
    and for a retrieve "requested" (written before anything is sent), then "sent" or "failed" (``reason``).
``scope``
    "archive" (any patient's studies) or "patient" (the same patient's priors only); None where nothing was looked
    up.
``results``
    The StudyInstanceUIDs that came back, in rank order.
``details``
    Anything else the caller finds worth keeping (matching keys such as ``patient_id``, limit, destination,
    instances sent and failed). Never a patient's name: no caller passes one.

The Orthanc plugin and the DICOM query endpoint run in different processes and append to the same file, so the
file is written through ``concurrent_log_handler`` (a ``RotatingFileHandler`` that takes a file lock around each
write and each rotation). The file and its rotated copies are created readable by their owner only (0600): they
say which patients' studies were looked at. A write that fails raises, so that no lookup is answered unrecorded.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, Sequence

from concurrent_log_handler import ConcurrentRotatingFileHandler

#: The audit file's mode: owner read/write only.
AUDIT_FILE_MODE = 0o600
SCOPES = ("archive", "patient")


class _StrictRotatingHandler(ConcurrentRotatingFileHandler):
    """A handler that lets a failed write raise instead of printing it: an audit line is not optional."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        raise  # re-raise what emit() caught  # noqa: PLE0704


class AuditLog:
    """Appends audit entries to ``path`` (JSON lines), rotating it at ``max_bytes`` into ``path.1`` ... ``path.N``.

    Parameters
    ----------
    path
        The audit file (``Settings.audit_log``); its folder is created if missing.
    max_bytes, backup_count
        Rotation: the file is renamed ``path.1`` when it would pass ``max_bytes``, and at most ``backup_count`` old
        files are kept; older entries are deleted with the oldest file.
    """

    def __init__(self, path: str | Path, max_bytes: int = 20_000_000, backup_count: int = 10) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = _StrictRotatingHandler(
            str(self.path), maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8",
            chmod=AUDIT_FILE_MODE,
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._lock = threading.Lock()

    def record(self, *, who: str, via: str, study: str, orthanc_study_id: str | None, scope: str,
               results: Sequence[str], host: str | None = None, action: str = "lookup", outcome: str = "answered",
               reason: str | None = None, **details: object) -> dict:
        """Append one lookup (or retrieve, with its ``outcome``) and return the entry written.

        Raises
        ------
        ValueError
            ``scope`` is not one of :data:`SCOPES`.
        OSError
            The line could not be written; the caller must not answer the lookup.
        """
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
        return self._write(who=who, via=via, host=host, action=action, outcome=outcome, reason=reason, study=study,
                           orthanc_study_id=orthanc_study_id, scope=scope, results=list(results), details=details)

    def refused(self, *, who: str, via: str, host: str | None, action: str, reason: str, study: str | None = None,
                **details: object) -> dict:
        """Append an association or request that was turned down (outcome "refused"), with the reason given.

        Raises
        ------
        OSError
            The line could not be written (the request is refused all the same).
        """
        return self._write(who=who, via=via, host=host, action=action, outcome="refused", reason=reason, study=study,
                           orthanc_study_id=None, scope=None, results=[], details=details)

    def _write(self, **fields: object) -> dict:
        """One JSON line, stamped with the time; a failed write raises."""
        entry = {"at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **fields}
        line = json.dumps(entry, ensure_ascii=False, sort_keys=True, default=str)
        with self._lock:
            self._handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))
        return entry

    def close(self) -> None:
        self._handler.close()

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def audit_files(path: str | Path) -> list[Path]:
    """The audit file and its rotated copies, oldest first (``path.N`` ... ``path.1``, ``path``)."""
    path = Path(path)
    rotated = []
    for candidate in path.parent.glob(path.name + ".*"):
        suffix = candidate.name[len(path.name) + 1:]
        if suffix.isdigit():
            rotated.append((int(suffix), candidate))
    return [p for _, p in sorted(rotated, reverse=True)] + ([path] if path.exists() else [])


def read_entries(path: str | Path, since: datetime | None = None) -> Iterator[dict]:
    """Every entry of the audit file and its rotated copies, oldest first; only those at or after ``since``."""
    for file in audit_files(path):
        with open(file, encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue
                entry = json.loads(line)
                if since is None or datetime.fromisoformat(entry["at"]) >= since:
                    yield entry


_RELATIVE = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO date or date-time (UTC unless it says otherwise), or an age such as ``30m``, ``2h``, ``7d``."""
    now = now or datetime.now(timezone.utc)
    relative = _RELATIVE.match(text.strip())
    if relative:
        return now - timedelta(**{_UNITS[relative.group(2)]: int(relative.group(1))})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since takes an ISO date or time (2026-12-01, 2026-12-01T08:00) or an age "
                         f"(30m, 2h, 7d), not {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def show(path: str | Path, since: str | None = None, out=sys.stdout) -> int:
    """``lookalike audit [--since WHEN]``: print the entries (oldest first) as JSON lines; 2 for a bad ``since``."""
    try:
        when = parse_since(since) if since else None
    except ValueError as exc:
        print(f"lookalike audit: {exc}", file=sys.stderr)
        return 2
    if not audit_files(path):
        print(f"lookalike audit: no audit file at {path} (no lookup recorded yet)", file=sys.stderr)
        return 0
    for entry in read_entries(path, when):
        print(json.dumps(entry, ensure_ascii=False, sort_keys=True), file=out)
    return 0
