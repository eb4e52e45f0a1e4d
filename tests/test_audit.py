"""The audit trail: what one lookup leaves behind, its file's mode, rotation, several writing processes, --since."""

from __future__ import annotations

import io
import json
import multiprocessing
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lookalike.config import Settings
from lookalike.query.audit import AuditLog, audit_files, parse_since, read_entries, show


def _record(log: AuditLog, i: int, who: str = "FINDSCU") -> dict:
    return log.record(who=who, via="dicom", host="127.0.0.1", study=f"1.2.3.{i}", orthanc_study_id=f"o{i}",
                      scope="archive", results=[f"1.2.4.{i}", f"1.2.5.{i}"], limit=10)


class TestAuditLog:
    def test_one_lookup_is_one_json_line_with_who_what_and_answers(self, tmp_path: Path) -> None:
        path = tmp_path / "logs" / "audit.jsonl"
        with AuditLog(path) as log:
            written = log.record(who="admin", via="rest", host="10.0.0.7", study="1.2.3", orthanc_study_id="abc",
                                 scope="patient", results=["1.2.4", "1.2.5"], limit=5)
        [line] = path.read_text().splitlines()
        entry = json.loads(line)
        assert entry == written
        assert (entry["who"], entry["via"], entry["host"], entry["action"]) == ("admin", "rest", "10.0.0.7", "lookup")
        assert (entry["study"], entry["orthanc_study_id"], entry["scope"]) == ("1.2.3", "abc", "patient")
        assert entry["results"] == ["1.2.4", "1.2.5"] and entry["details"] == {"limit": 5}
        at = datetime.fromisoformat(entry["at"])
        assert at.tzinfo is not None and abs(datetime.now(timezone.utc) - at) < timedelta(minutes=1)

    def test_a_refusal_and_a_retrieves_outcome_say_what_happened_and_why(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.jsonl"
        with AuditLog(path) as log:
            log.refused(who="INTRUDER", via="dicom", host="10.0.0.9", action="associate",
                        reason="calling AE title 'INTRUDER' is not in query_allowed")
            log.record(who="WS1", via="dicom", host="10.0.0.7", study="1.2.3", orthanc_study_id=None,
                       scope="archive", results=["1.2.3"], action="retrieve", outcome="failed",
                       reason="sending to WS1 failed", sent=0, failed=2)
        refusal, retrieve = read_entries(path)
        assert (refusal["who"], refusal["host"], refusal["action"], refusal["outcome"]) == (
            "INTRUDER", "10.0.0.9", "associate", "refused")
        assert "INTRUDER" in refusal["reason"] and refusal["results"] == [] and refusal["scope"] is None
        assert (retrieve["action"], retrieve["outcome"], retrieve["reason"]) == (
            "retrieve", "failed", "sending to WS1 failed")
        assert retrieve["details"] == {"sent": 0, "failed": 2}

    def test_file_is_readable_by_its_owner_only(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.jsonl"
        with AuditLog(path, max_bytes=300, backup_count=3) as log:
            for i in range(6):
                _record(log, i)
        files = audit_files(path)
        assert len(files) > 1, "the small max_bytes should have rotated the file"
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f

    def test_unknown_scope_is_refused_and_nothing_written(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.jsonl"
        with AuditLog(path) as log, pytest.raises(ValueError, match="scope"):
            log.record(who="x", via="rest", study="1", orthanc_study_id=None, scope="everything", results=[])
        assert not path.exists() or path.read_text() == ""

    def test_a_failed_write_raises(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.jsonl"
        log = AuditLog(path)
        _record(log, 0)
        path.unlink()
        path.mkdir()  # the file's place is taken: the line cannot be written
        with pytest.raises(OSError):
            _record(log, 1)

    def test_rotation_keeps_every_entry_in_order_until_the_backups_run_out(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.jsonl"
        with AuditLog(path, max_bytes=1000, backup_count=50) as log:
            for i in range(40):
                _record(log, i)
        assert len(audit_files(path)) > 5
        assert [e["study"] for e in read_entries(path)] == [f"1.2.3.{i}" for i in range(40)]

    def test_at_most_backup_count_old_files_are_kept(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.jsonl"
        with AuditLog(path, max_bytes=1000, backup_count=2) as log:
            for i in range(40):
                _record(log, i)
        assert [p.name for p in audit_files(path)] == ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]
        kept = [int(e["study"].rsplit(".", 1)[1]) for e in read_entries(path)]
        assert kept == list(range(40 - len(kept), 40)) and len(kept) < 40  # the newest, in order; the oldest gone

    def test_two_processes_append_and_rotate_without_losing_a_line(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.jsonl"
        context = multiprocessing.get_context("spawn")
        writers = [context.Process(target=_write_many, args=(str(path), who, 150)) for who in ("A", "B")]
        for p in writers:
            p.start()
        for p in writers:
            p.join(60)
            assert p.exitcode == 0
        entries = list(read_entries(path))
        assert len(audit_files(path)) > 2
        assert sorted((e["who"], e["study"]) for e in entries) == sorted(
            (who, f"1.2.3.{i}") for who in ("A", "B") for i in range(150))
        for who in ("A", "B"):  # each writer's own lines stay in its order across rotations
            mine = [int(e["study"].rsplit(".", 1)[1]) for e in entries if e["who"] == who]
            assert mine == sorted(mine)


def _write_many(path: str, who: str, n: int) -> None:
    with AuditLog(path, max_bytes=4000, backup_count=100) as log:
        for i in range(n):
            _record(log, i, who=who)


class TestReading:
    def test_since_an_age_or_a_time(self) -> None:
        now = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
        assert parse_since("2h", now) == datetime(2026, 12, 2, 10, 0, tzinfo=timezone.utc)
        assert parse_since("7d", now) == datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
        assert parse_since("2026-12-01") == datetime(2026, 12, 1, tzinfo=timezone.utc)
        assert parse_since("2026-12-01T08:00+01:00") == datetime(2026, 12, 1, 7, 0, tzinfo=timezone.utc)
        with pytest.raises(ValueError, match="--since"):
            parse_since("yesterday")

    def test_show_prints_only_entries_since(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.jsonl"
        old = {"at": "2026-11-01T10:00:00.000+00:00", "who": "OLD", "study": "1"}
        new = {"at": "2026-12-01T10:00:00.000+00:00", "who": "NEW", "study": "2"}
        path.write_text(json.dumps(old) + "\n" + json.dumps(new) + "\n")
        out = io.StringIO()
        assert show(path, "2026-11-15", out) == 0
        assert [json.loads(line)["who"] for line in out.getvalue().splitlines()] == ["NEW"]
        out = io.StringIO()
        assert show(path, None, out) == 0 and len(out.getvalue().splitlines()) == 2
        assert show(path, "last week", io.StringIO()) == 2

    def test_command_line_reads_the_settings_audit_file(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.jsonl"
        with AuditLog(path) as log:
            _record(log, 1, who="WS1")
        config = tmp_path / "lookalike.json"
        config.write_text(json.dumps({**Settings().to_dict(), "audit_log": str(path)}))
        exe = Path(sys.executable).with_name("lookalike")
        result = subprocess.run([str(exe), "--config", str(config), "audit", "--since", "1h"], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        [line] = result.stdout.splitlines()
        assert json.loads(line)["who"] == "WS1"
