"""Faults on a running stack, as an operator meets them: real processes killed, stopped and restarted mid-ingest.

After each fault, every instance Orthanc holds must be indexed exactly once within :data:`RECOVERY_BOUND`
seconds of the stack being whole again, ``/lookalike/status`` must agree with Orthanc's count, and no problem may
be left: whatever the plugin's in-memory events lost is caught up from Orthanc's change log by the worker.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lookalike.lab.samples import wrap_image
from lookalike.ops.stack import ORTHANC_AET, Stack, StackConfig, child_pids, dcmtk_env, storescu
from tests.support import SAMPLES, live_rows, require_programs, wait_for

pytestmark = pytest.mark.stack

#: Instances stored per fault: enough that the fault lands mid-ingest.
N_INSTANCES = 120
#: Seconds between two catch-up passes of the worker in these tests (30 by default).
CATCH_UP_INTERVAL = 2.0
#: The bound stated for recovery: one catch-up pass, the worker's back-off while Orthanc was away, embedding.
RECOVERY_BOUND = 150.0


@pytest.fixture
def fault_stack(tmp_path: Path):
    require_programs("Orthanc", "redis-server", "storescu")
    config = StackConfig.create(tmp_path / "stack", extra_settings={"catch_up_interval": CATCH_UP_INTERVAL})
    with Stack(config) as running:
        yield running


@pytest.fixture(scope="module")
def instances(tmp_path_factory) -> list[Path]:
    """``N_INSTANCES`` distinct US instances, five to a study, from the bundled sample images with noise."""
    out = tmp_path_factory.mktemp("fault-instances")
    base = [pydicom.dcmread(f).pixel_array for f in sorted(SAMPLES.glob("us_*.dcm"))[:8]]
    rng = np.random.default_rng(7)
    files = []
    for study in range(N_INSTANCES // 5):
        study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        for k in range(5):
            pixels = base[(study + k) % len(base)].astype(np.int16) + rng.integers(-8, 9, base[0].shape[:2])
            ds = wrap_image(
                np.clip(pixels, 0, 255).astype(np.uint8), "US",
                patient_id=f"PFAULT{study:04d}", patient_name=f"FAULT^{study}", patient_birth_date="19700101",
                patient_sex="F", study_instance_uid=study_uid, study_date="20260101", study_time="090000",
                accession_number=f"F{study:06d}", study_description="fault test", series_instance_uid=series_uid,
                instance_number=k + 1,
            )
            path = out / f"f{study:03d}_{k}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def _storescu(stack: Stack, files: list[Path]) -> subprocess.Popen:
    """storescu in the background, one association per file so that a stop mid-way refuses only the rest."""
    argv = ["storescu", "--repeat", "1", "-aet", "STORESCU", "-aec", ORTHANC_AET, "127.0.0.1",
            str(stack.config.dicom_port)]
    script = " ; ".join(" ".join([*argv, str(f)]) for f in files)
    return subprocess.Popen(["bash", "-c", script], env=dcmtk_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _catalogue_rows(stack: Stack) -> list[tuple[str, int]]:
    """(Orthanc instance id, live rows) per instance in the catalogue."""
    return sorted(Counter(instance for _, instance, _, _ in live_rows(stack)).items())


def _orthanc_instances(stack: Stack) -> set[str]:
    return set(stack.http().get(f"{stack.config.orthanc_url}/instances", timeout=30).json())


def _status(stack: Stack) -> dict:
    return stack.http().get(f"{stack.config.orthanc_url}/lookalike/status", timeout=30).json()


def _assert_everything_indexed_once(stack: Stack, at_least: int) -> None:
    """Wait for the index to hold exactly what Orthanc holds, then check it holds each instance once."""
    def caught_up() -> bool:
        held = _orthanc_instances(stack)
        return len(held) >= at_least and {i for i, _ in _catalogue_rows(stack)} == held

    wait_for(caught_up, timeout=RECOVERY_BOUND, interval=1.0, what="every instance Orthanc holds to be indexed")
    held = _orthanc_instances(stack)
    rows = _catalogue_rows(stack)
    assert sorted(i for i, _ in rows) == sorted(held)
    assert all(n == 1 for _, n in rows), "an instance indexed twice"
    status = _status(stack)
    assert sum(c["instances"] for c in status["indexed"]) == len(held)
    statistics = stack.http().get(f"{stack.config.orthanc_url}/statistics", timeout=30).json()
    assert int(statistics["CountInstances"]) == len(held)
    assert status["problems"] == []
    # The catch-up has handled every change Orthanc logged: nothing is left behind for a later pass.
    wait_for(lambda: _status(stack)["catch_up"]["behind"] == 0, timeout=30, interval=1.0, what="the catch-up")


def _indexed(stack: Stack) -> int:
    return len(_catalogue_rows(stack))


class TestWorkerKilled:
    def test_kill_9_mid_ingest_then_restart_indexes_everything_once(self, fault_stack: Stack,
                                                                     instances: list[Path]) -> None:
        sender = _storescu(fault_stack, instances)
        wait_for(lambda: _indexed(fault_stack) >= 10, timeout=120, what="indexing to start")
        worker = fault_stack.procs["worker"]
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        assert sender.wait(timeout=300) == 0, "Orthanc refused C-STOREs while the worker was dead"
        assert fault_stack.procs["orthanc"].poll() is None
        fault_stack.restart("worker")
        _assert_everything_indexed_once(fault_stack, at_least=N_INSTANCES)


def _orthanc_log_lines(stack: Stack) -> list[str]:
    """Every line of Orthanc's own log files (``--logdir``: one file per start; ``Orthanc.log`` links the last)."""
    files = sorted(p for p in stack.config.logs.glob("Orthanc.log.*") if not p.is_symlink())
    return [line for p in files for line in p.read_text(errors="replace").splitlines()]


def _records(lines: list[str]) -> dict[str, int]:
    """Orthanc's log records by kind: errors (``E`` lines), the plugin's warnings, and lines of Python traceback."""
    return {"errors": sum(1 for line in lines if line[:1] == "E" and line[1:5].isdigit()),
            "plugin_warnings": sum(1 for line in lines if line[:1] == "W" and "] Lookalike" in line),
            "traceback": sum(1 for line in lines if "Traceback (most recent call last)" in line
                             or line.lstrip().startswith('File "'))}


class TestRelayKilled:
    def test_kill_9_of_the_task_relay_mid_ingest_stops_nothing_and_loses_nothing(self, fault_stack: Stack,
                                                                                  instances: list[Path]) -> None:
        before = len(_orthanc_log_lines(fault_stack))
        orthanc = fault_stack.procs["orthanc"]
        sender = _storescu(fault_stack, instances)
        relay = wait_for(lambda: child_pids(orthanc.pid), timeout=60, what="the plugin's task relay")[0]
        os.kill(relay, signal.SIGKILL)  # tasks keep coming: the plugin writes into a pipe nobody reads any more
        assert sender.wait(timeout=300) == 0, "Orthanc refused C-STOREs after its task relay was killed"
        assert orthanc.poll() is None
        _assert_everything_indexed_once(fault_stack, at_least=N_INSTANCES)
        lines = _orthanc_log_lines(fault_stack)[before:]
        assert [line for line in lines if "task relay" in line and "ended" in line and "-9" in line], \
            "the relay's end is not in Orthanc's log"
        assert relay not in child_pids(orthanc.pid) and child_pids(orthanc.pid), "no new relay took over"


class TestRedisStopped:
    def test_redis_down_longer_than_every_retry_window(self, fault_stack: Stack, instances: list[Path]) -> None:
        before = len(_orthanc_log_lines(fault_stack))
        fault_stack.stop_process("redis")
        assert _storescu(fault_stack, instances[:100]).wait(timeout=300) == 0
        # Past every retry window: the plugin has given up on every NEW_INSTANCE and STABLE_STUDY task.
        time.sleep(fault_stack.config.stable_age + 8)
        wait_for(lambda: _status(fault_stack)["queue"]["plugin_pending"] == 0, timeout=120, what="the plugin to give up")
        during = _records(_orthanc_log_lines(fault_stack)[before:])
        assert during["errors"] == 1, f"one error record per outage in Orthanc's log, not {during['errors']}"
        assert during["traceback"] == 0, "a broker outage is not a bug: no traceback in Orthanc's log"
        fault_stack.restart("redis")
        if fault_stack.procs["worker"].poll() is not None:  # `lookalike run` restarts a worker that gave up
            fault_stack.restart("worker")
        back = len(_orthanc_log_lines(fault_stack))
        assert storescu(fault_stack.config, instances[100:101]).returncode == 0
        wait_for(lambda: _records(_orthanc_log_lines(fault_stack)[back:])["plugin_warnings"] >= 1, timeout=30,
                 what="the plugin to say that Redis takes tasks again")
        _assert_everything_indexed_once(fault_stack, at_least=101)
        after = _records(_orthanc_log_lines(fault_stack)[back:])
        assert after == {"errors": 0, "plugin_warnings": 1, "traceback": 0}, after


def _redis_down_while(stack: Stack, store) -> None:
    """Run ``store`` with Redis stopped, until the plugin has dropped every task it made (the fast path lost them
    all); then Redis back, and the worker restarted if it gave up meanwhile (as ``lookalike run`` does)."""
    stack.stop_process("redis")
    store()
    time.sleep(stack.config.stable_age + 8)  # STABLE_STUDY too: its reconciliation is dropped as well
    wait_for(lambda: _status(stack)["queue"]["plugin_pending"] == 0, timeout=120, what="the plugin to give up")
    stack.restart("redis")
    if stack.procs["worker"].poll() is not None:
        stack.restart("worker")


class TestOrthancDatabaseReplaced:
    """Orthanc's database replaced by a fresh one on the same ports while the catalogue keeps its cursor: the new
    database numbers its changes from 1 again, so the cursor read for the old one means nothing there."""

    @pytest.mark.parametrize("before, after", [(10, 5), (5, 20)],
                             ids=["fewer-changes-than-the-cursor", "more-changes-than-the-cursor"])
    def test_catch_up_reads_a_new_orthanc_database_from_its_start(self, fault_stack: Stack, instances: list[Path],
                                                                    before: int, after: int) -> None:
        old, new = instances[:before], instances[before:before + after]
        assert storescu(fault_stack.config, old).returncode == 0
        wait_for(lambda: _indexed(fault_stack) == before, timeout=RECOVERY_BOUND, what="the first instances")
        wait_for(lambda: _status(fault_stack)["catch_up"]["behind"] == 0, timeout=60, what="the catch-up")
        old_cursor = _status(fault_stack)["catch_up"]["cursor"]

        fault_stack.stop_process("orthanc")
        storage = fault_stack.config.state_dir / "orthanc-storage"
        storage.rename(storage.with_name("orthanc-storage.replaced"))
        fault_stack.restart("orthanc")
        assert _orthanc_instances(fault_stack) == set(), "Orthanc did not start on a new database"
        # The new instances reach the index by the catch-up alone: the plugin's events are dropped with Redis down.
        _redis_down_while(fault_stack, lambda: storescu(fault_stack.config, new))
        held = _orthanc_instances(fault_stack)
        assert len(held) == after
        last = _status(fault_stack)["catch_up"]["orthanc_last_change"]
        assert (last < old_cursor) == (after < before), "the test does not test the case it names"

        indexed = lambda: held <= {i for i, _ in _catalogue_rows(fault_stack)}  # noqa: E731
        wait_for(indexed, timeout=RECOVERY_BOUND, interval=1.0, what="the new database's instances to be indexed")
        assert all(n == 1 for i, n in _catalogue_rows(fault_stack) if i in held), "an instance indexed twice"
        wait_for(lambda: _status(fault_stack)["catch_up"]["behind"] == 0, timeout=30, interval=1.0,
                 what="the catch-up")
        catch_up = _status(fault_stack)["catch_up"]
        assert catch_up["cursor"] <= catch_up["orthanc_last_change"]


class TestIndexFolderUnwritable:
    def test_refused_writes_are_recorded_with_their_cause_and_indexed_once_it_is_back(
            self, fault_stack: Stack, instances: list[Path]) -> None:
        assert storescu(fault_stack.config, instances[:5]).returncode == 0
        wait_for(lambda: _indexed(fault_stack) == 5, timeout=RECOVERY_BOUND, what="the first instances")
        _status(fault_stack)  # the plugin opens its read-only catalogue now, as a running site's has
        index = fault_stack.config.state_dir / "index"
        away = index.with_name("index.away")
        # Root ignores file modes: the folder is replaced by a file instead, so that every file the writer opens
        # there fails (ENOTDIR) as it would on a folder it may not write. The processes' open files stay valid.
        index.rename(away)
        index.write_text("not a folder\n")
        try:
            assert storescu(fault_stack.config, instances[5:15]).returncode == 0

            def refused() -> list[dict]:
                problems = _status(fault_stack)["problems"]
                return problems if len(problems) == 10 else []

            problems = wait_for(refused, timeout=RECOVERY_BOUND, interval=1.0, what="the refused writes recorded")
        finally:
            index.unlink()
            away.rename(index)
        assert all(str(index) in p["message"] and os.strerror(errno.ENOTDIR) in p["message"] for p in problems), \
            "a problem does not name the operating system's error and the path it refused"
        assert {p["code"] for p in problems} == {"index-unwritable"}
        _assert_everything_indexed_once(fault_stack, at_least=15)


class TestOrthancStopped:
    @pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "clean-stop"])
    def test_orthanc_stopped_mid_ingest_while_c_stores_arrive(self, fault_stack: Stack, instances: list[Path],
                                                               how: signal.Signals) -> None:
        sender = _storescu(fault_stack, instances)
        wait_for(lambda: len(_orthanc_instances(fault_stack)) >= 30, timeout=120, what="ingest to start")
        orthanc = fault_stack.procs["orthanc"]
        (os.killpg if how == signal.SIGKILL else os.kill)(orthanc.pid, how)
        if how == signal.SIGKILL:
            # The modality gives up too: no later instance of the same studies sets off a STABLE_STUDY
            # reconciliation after the restart, so what Orthanc's lost events held is found by the catch-up alone.
            os.killpg(sender.pid, signal.SIGKILL)
        orthanc.wait(timeout=60)
        sender.wait(timeout=300)  # some C-STOREs were refused while Orthanc was down: the sender's business
        fault_stack.restart("orthanc")
        held = len(_orthanc_instances(fault_stack))
        assert 0 < held <= N_INSTANCES
        _assert_everything_indexed_once(fault_stack, at_least=held)
        assert fault_stack.procs["worker"].poll() is None, "the worker died with Orthanc"


class TestPortsTaken:
    def test_ports_another_program_holds_are_replaced_at_start(self, tmp_path: Path) -> None:
        import socket

        from lookalike.ops.stack import free_port

        config = StackConfig.create(tmp_path / "stack")
        squatters = []
        for port in (config.http_port, config.redis_port):
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            s.listen()
            squatters.append(s)
        taken = (config.http_port, config.redis_port)
        try:
            with Stack(config) as stack:
                assert set(config.moved_ports) == {"http_port", "redis_port"}
                assert (config.http_port, config.redis_port) != taken
                assert stack.http().get(f"{config.orthanc_url}/system", timeout=10).ok
                saved = tmp_path / "stack.json"
                config.save(saved)
                reloaded = StackConfig.load_or_create(saved, tmp_path / "stack")
                assert (reloaded.http_port, reloaded.redis_port) == (config.http_port, config.redis_port)
                assert free_port(config.dicom_port) != config.dicom_port  # ours now: Orthanc holds it
        finally:
            for s in squatters:
                s.close()
