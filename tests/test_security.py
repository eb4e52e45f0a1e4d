"""What another local user or process can reach on a running stack: Redis, the files holding PHI, credentials."""

from __future__ import annotations

import http.client
import json
import stat
import subprocess
import sys
from base64 import b64encode
from pathlib import Path

import numpy as np
import pydicom
import pytest
import redis
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from lookalike.config import QUEUE, TASK_FORGET
from lookalike.index.catalogue import CATALOGUE_FILE
from lookalike.ops.stack import ORTHANC_AET, Stack, StackConfig
from tests.support import indexed_total, make_study, require_programs, sample_pixels, wait_for

#: Another loopback address: Orthanc and the query endpoint take a peer calling from it as a remote host.
REMOTE = "127.0.0.2"

pytestmark = pytest.mark.stack


class TestRedis:
    def test_a_client_without_the_password_cannot_queue_a_forget(self, stack: Stack) -> None:
        anonymous = redis.Redis(host="127.0.0.1", port=stack.config.redis_port, socket_timeout=5)
        with pytest.raises(redis.AuthenticationError):
            anonymous.lpush(QUEUE, json.dumps({"task": TASK_FORGET}))
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=stack.config.redis_port, password="guess").ping()

    def test_redis_listens_on_loopback_only(self, stack: Stack) -> None:
        # /proc/net/tcp: "local_address" as little-endian hex IPv4:port, state 0A = LISTEN
        listening = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, port = local.rsplit(":", 1)
                if state == "0A" and int(port, 16) == stack.config.redis_port:
                    listening.add(address)
        assert listening == {"0100007F"}, f"Redis listens on {listening}, not 127.0.0.1 alone"


class TestFilesHoldingPhi:
    def test_catalogue_and_orthanc_storage_are_owner_only(self, stack: Stack, tmp_path: Path) -> None:
        from lookalike.ops.stack import storescu

        # Turned upside down: no near copy of an image the shared stack's lookup tests rank.
        pixels = np.ascontiguousarray(np.rot90(sample_pixels("US", 9)[8], 2))
        path, _ = make_study(pixels, "US", "PPERMS0001", tmp_path, "perms")
        before = indexed_total(stack)
        assert storescu(stack.config, [path]).returncode == 0
        wait_for(lambda: indexed_total(stack) > before, timeout=90, what="indexing")
        state = stack.config.state_dir
        files = [state / "index" / CATALOGUE_FILE, *[p for p in (state / "orthanc-storage").rglob("*") if p.is_file()]]
        assert len(files) > 2
        for f in files:
            mode = stat.S_IMODE(f.stat().st_mode)
            assert mode & 0o077 == 0, f"{f} is readable by others: {oct(mode)}"
        for d in (state / "index", state / "orthanc-storage", state / "logs"):
            assert stat.S_IMODE(d.stat().st_mode) & 0o077 == 0, f"{d} is open to others"


    def test_no_file_is_open_to_others_and_no_log_names_a_patient(self, stack: Stack, tmp_path: Path) -> None:
        """A single-component PatientName makes highdicom warn, quoting it, when the SR and the KOS are built."""

        name, patient = "ZQXLOOKNAME", "ZQXLOOKPID7"
        pixels = np.ascontiguousarray(np.flipud(sample_pixels("DX", 10)[9]))
        path, ds = make_study(pixels, "DX", patient, tmp_path, "named")
        ds.PatientName = name
        ds.save_as(path, enforce_file_format=True)
        before = indexed_total(stack)
        from lookalike.ops.stack import storescu

        assert storescu(stack.config, [path]).returncode == 0
        wait_for(lambda: indexed_total(stack) > before, timeout=90, what="indexing")
        url, http = stack.config.orthanc_url, stack.http()
        study = next(x["ID"] for x in http.post(f"{url}/tools/lookup", data=str(ds.StudyInstanceUID), timeout=10)
                     .json() if x["Type"] == "Study")
        for route in ("similar-report", "similar-kos"):
            r = http.post(f"{url}/lookalike/studies/{study}/{route}", json={"limit": 3}, timeout=60)
            assert r.status_code == 200, r.text

        state = stack.config.state_dir
        files = [p for p in state.rglob("*") if p.is_file()]
        assert any(p.suffix == ".out" for p in files), "no process output was written"
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f"{f} is open to others"
        for d in [state, *(p for p in state.rglob("*") if p.is_dir())]:
            assert stat.S_IMODE(d.stat().st_mode) & 0o066 == 0, f"{d} may be listed or written by others"
        # The audit trail is the record of whose study was looked up (it names the patient by design); every other
        # log names instances by Orthanc id or UID.
        logs = {p: p.read_text(errors="replace") for p in files
                if p.parent == stack.config.logs and not p.name.startswith("audit")}
        assert any("Orthanc" in p.name for p in logs) and any(p.suffix == ".out" for p in logs)
        for p, text in logs.items():
            assert name not in text and patient not in text, f"{p} names the patient"


class TestCredentials:
    def test_plugin_configuration_carries_no_orthanc_credential(self, stack: Stack) -> None:
        section = stack.config.orthanc_config()["Lookalike"]
        assert stack.config.service_password not in json.dumps(section)
        assert "orthanc_password" not in section

    def test_no_password_in_orthancs_log(self, stack: Stack) -> None:
        logs = "".join(p.read_text(errors="replace") for p in stack.config.logs.glob("Orthanc*"))
        assert logs, "Orthanc wrote no log"
        for secret in (stack.config.redis_password, stack.config.service_password, stack.config.admin_password):
            assert secret not in logs

    def test_no_password_on_any_command_line(self, stack: Stack) -> None:
        """Every local user can read every process's command line (ps): no secret may be there."""
        lines = []
        for proc in Path("/proc").iterdir():
            try:
                lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
        assert any(str(stack.config.state_dir) in line for line in lines), "the stack's processes were not found"
        for secret in (stack.config.redis_password, stack.config.service_password, stack.config.admin_password):
            assert not [line for line in lines if secret in line]


def _http_status_from(source: str, stack: Stack) -> int:
    """Orthanc's answer to the administrator's GET /system, sent from ``source``."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.config.http_port, source_address=(source, 0), timeout=10)
    try:
        token = b64encode(f"admin:{stack.config.admin_password}".encode()).decode()
        conn.request("GET", "/system", headers={"Authorization": f"Basic {token}"})
        return conn.getresponse().status
    finally:
        conn.close()


def _association(port: int, called: str, calling: str, source: str, contexts=(Verification,)):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    for context in contexts:
        ae.add_requested_context(context)
    return ae.associate("127.0.0.1", port, ae_title=called, bind_address=(source, 0))


class TestRemotePeers:
    """`make run`'s stack: Orthanc listens on every interface (1.10 cannot bind an address) but serves loopback only."""

    def test_orthanc_http_answers_loopback_only(self, stack: Stack) -> None:
        assert _http_status_from("127.0.0.1", stack) == 200
        assert _http_status_from(REMOTE, stack) in (401, 403)

    @pytest.mark.parametrize("calling", ["STORESCU", "FINDSCU", "INTRUDER"])
    def test_orthanc_dicom_refuses_every_peer_off_loopback(self, stack: Stack, calling: str) -> None:
        local = _association(stack.config.dicom_port, ORTHANC_AET, calling, "127.0.0.1")
        if calling != "INTRUDER":
            assert local.is_established and local.send_c_echo().Status == 0
            local.release()
        remote = _association(stack.config.dicom_port, ORTHANC_AET, calling, REMOTE)
        assert not remote.is_established, f"Orthanc let {calling} in from {REMOTE}"

    def test_query_endpoint_refuses_a_known_title_off_loopback(self, stack: Stack) -> None:
        assert not _association(stack.config.query_port, "LOOKALIKE", "FINDSCU", REMOTE).is_established


def _configure(stack_json: Path, state: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lookalike.cli", "configure", "--state", str(state),
                           "--stack-config", str(stack_json)], capture_output=True, text=True, timeout=60)


class TestWorkstationAccess:
    """The documented way to let a workstation query: ``query_host`` and ``query_allowed`` in stack.json's
    ``extra_settings``, then ``lookalike configure`` (or ``make run``)."""

    def test_a_workstation_on_another_address_queries_and_only_it(self, tmp_path: Path) -> None:
        require_programs("Orthanc", "redis-server")
        state, stack_json = tmp_path / "state", tmp_path / "stack.json"
        StackConfig.create(state, extra_settings={"query_host": "0.0.0.0",
                                                  "query_allowed": {"WS1": [REMOTE]}}).save(stack_json)
        done = _configure(stack_json, state)
        assert done.returncode == 0, done.stderr
        config = StackConfig.load_or_create(stack_json, state)
        with Stack(config, worker=False):
            assoc = _association(config.query_port, "LOOKALIKE", "WS1", REMOTE,
                                 (Verification, StudyRootQueryRetrieveInformationModelFind))
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0
            query = pydicom.Dataset()
            query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", "1.2.3.4.5"
            answers = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
            assert answers and all(status is not None and "Status" in status for status, _ in answers)
            assoc.release()
            assert not _association(config.query_port, "LOOKALIKE", "WS1", "127.0.0.1").is_established
            assert not _association(config.query_port, "LOOKALIKE", "FINDSCU", "127.0.0.1").is_established

    @pytest.mark.parametrize("where, key", [("extra_settings", "query_alowed"), ("top", "modalites")])
    def test_a_mistyped_key_stops_configure_and_is_named(self, tmp_path: Path, where: str, key: str) -> None:
        state, stack_json = tmp_path / "state", tmp_path / "stack.json"
        StackConfig.create(state).save(stack_json)
        data = json.loads(stack_json.read_text())
        (data["extra_settings"] if where == "extra_settings" else data)[key] = {"WS1": [REMOTE]}
        stack_json.write_text(json.dumps(data))
        done = _configure(stack_json, state)
        assert done.returncode != 0 and key in done.stderr
        assert "Traceback" not in done.stderr
        assert not (state / "orthanc.json").exists()

    def test_a_setting_of_the_wrong_type_is_named(self, tmp_path: Path) -> None:
        state, stack_json = tmp_path / "state", tmp_path / "stack.json"
        StackConfig.create(state, extra_settings={"query_max_results": "10"}).save(stack_json)
        done = _configure(stack_json, state)
        assert done.returncode != 0 and "query_max_results" in done.stderr
