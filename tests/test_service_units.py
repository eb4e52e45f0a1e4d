"""The service units in ``deploy/systemd`` start a working stack: each unit's own ExecStart and Environment, run
as written (paths moved to a temporary folder), on the files ``lookalike configure`` writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests

from lookalike.ops.stack import StackConfig, storescu
from tests.support import SAMPLES, UNITS, require_programs, unit_command, unit_section, wait_for

pytestmark = pytest.mark.stack

#: Start order; the worker is a template, started as instance 1.
ORDER = ["lookalike-redis.service", "lookalike-orthanc.service", "lookalike-worker@.service",
         "lookalike-query.service"]


@pytest.fixture
def configured(tmp_path: Path) -> tuple[Path, StackConfig]:
    state, stack_json = tmp_path / "state", tmp_path / "stack.json"
    run = subprocess.run([sys.executable, "-m", "lookalike.cli", "configure", "--state", str(state),
                          "--stack-config", str(stack_json)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return state, StackConfig.load_or_create(stack_json, state)


def test_every_unit_keeps_phi_owner_only_and_restarts_alone() -> None:
    for unit in sorted(UNITS.glob("*.service")):
        service = unit_section(unit, "Service")
        assert service["UMask"] == "0077" and service["Restart"] == "always", unit.name
        # systemd gives up on a unit restarted 5 times in 10 s unless told not to: a failing part is retried for ever.
        assert unit_section(unit, "Unit").get("StartLimitIntervalSec") == "0", unit.name
    orthanc_unit = (UNITS / "lookalike-orthanc.service").read_text()
    assert "Requires=" not in orthanc_unit and "BindsTo=" not in orthanc_unit, "Orthanc must not stop with Redis"


def test_units_start_a_stack_that_indexes_and_answers(configured, tmp_path: Path) -> None:
    require_programs("Orthanc", "redis-server", "storescu", "echoscu")
    state, config = configured
    procs = []
    try:
        for name in ORDER:
            argv, env = unit_command(UNITS / name, state)
            procs.append(subprocess.Popen(argv, env=env, cwd=state, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, umask=0o077, start_new_session=True))
        http = requests.Session()
        http.auth = ("admin", config.admin_password)
        wait_for(lambda: _ok(http, f"{config.orthanc_url}/system"), timeout=60, what="Orthanc")
        wait_for(lambda: (state / "logs" / "worker-1.log").exists()
                 and "ready." in (state / "logs" / "worker-1.log").read_text(), timeout=120, what="the worker")
        echo = lambda: subprocess.run(["echoscu", "-aet", "FINDSCU", "-aec", "LOOKALIKE", "127.0.0.1",
                                       str(config.query_port)], capture_output=True, timeout=30).returncode == 0
        wait_for(echo, timeout=60, what="the query endpoint to answer C-ECHO")

        sample = sorted(SAMPLES.glob("us_*.dcm"))[0]
        assert storescu(config, [sample]).returncode == 0
        study = next(x["ID"] for x in http.post(f"{config.orthanc_url}/tools/lookup", timeout=10, data=str(
            pydicom.dcmread(sample, stop_before_pixels=True).StudyInstanceUID)).json() if x["Type"] == "Study")
        status = lambda: http.get(f"{config.orthanc_url}/lookalike/status", timeout=10).json()
        wait_for(lambda: sum(c["instances"] for c in status()["indexed"]) == 1, timeout=120, what="indexing")
        assert http.get(f"{config.orthanc_url}/lookalike/studies/{study}/similar", timeout=10).status_code == 200
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _ok(http: requests.Session, url: str) -> bool:
    try:
        return http.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def test_configure_keeps_its_secrets_in_owner_only_files(configured) -> None:
    state, config = configured
    for name in ("lookalike.json", "orthanc.json", "redis.conf"):
        assert (state / name).stat().st_mode & 0o077 == 0, name
    assert f"requirepass {config.redis_password}" in (state / "redis.conf").read_text()
    assert json.loads((state / "lookalike.json").read_text())["index_dir"] == str(state / "index")
