"""End to end: DCMTK's storescu into a real Orthanc with the plugin, a real Celery worker on Redis, lookups over
Orthanc's REST API, the SR back through Orthanc and DCMTK's dsrdump."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from lookalike.index.store import IndexStore
from lookalike.orthanc.client import HttpOrthanc, OrthancAuthError, orthanc_resource_id
from lookalike.ops.stack import ORTHANC_AET, Stack, dcmtk_env, storescu
from tests.support import indexed_total, lookalike_status, make_study, noisy, orthanc_study_id, sample_pixels, store_studies, wait_for

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def corpus(stack: Stack, tmp_path_factory) -> dict:
    """A US and a DX query study, a near-copy of each in another patient's study, and unrelated studies."""
    tmp = tmp_path_factory.mktemp("corpus")
    us = sample_pixels("US", 4)
    dx = sample_pixels("DX", 4)
    files, ds = {}, {}
    files["us_query"], ds["us_query"] = make_study(us[0], "US", "PQUS0001", tmp, "us_query")
    files["us_copy"], ds["us_copy"] = make_study(noisy(us[0], 1), "US", "PCUS0002", tmp, "us_copy", "20240611")
    files["dx_query"], ds["dx_query"] = make_study(dx[0], "DX", "PQDX0003", tmp, "dx_query")
    files["dx_copy"], ds["dx_copy"] = make_study(noisy(dx[0], 2), "DX", "PCDX0004", tmp, "dx_copy", "20231120")
    for i in range(1, 4):
        files[f"us_other{i}"], ds[f"us_other{i}"] = make_study(us[i], "US", f"POUS{i:04d}", tmp, f"us_other{i}")
        files[f"dx_other{i}"], ds[f"dx_other{i}"] = make_study(dx[i], "DX", f"PODX{i:04d}", tmp, f"dx_other{i}")
    stored = store_studies(stack, {name: (files[name], ds[name]) for name in files}, "the corpus")
    return {"files": files, **stored}


class TestAuthentication:
    def test_rest_routes_refuse_anonymous_calls(self, stack: Stack) -> None:
        url = stack.config.orthanc_url
        assert requests.get(f"{url}/lookalike/status", timeout=10).status_code == 401
        assert requests.get(f"{url}/lookalike/studies/x/similar", timeout=10).status_code == 401
        assert requests.post(f"{url}/lookalike/studies/x/similar-report", timeout=10).status_code == 401

    def test_wrong_password_is_refused(self, stack: Stack) -> None:
        r = requests.get(f"{stack.config.orthanc_url}/lookalike/status", auth=("admin", "wrong"), timeout=10)
        assert r.status_code == 401

    def test_worker_client_reports_refused_credentials_by_name(self, stack: Stack) -> None:
        api = HttpOrthanc(stack.config.orthanc_url, "lookalike", "not-the-password")
        with pytest.raises(OrthancAuthError, match="refused the credentials of user 'lookalike'"):
            api.get_bytes("/system")

    def test_unknown_calling_ae_title_cannot_store(self, stack: Stack, tmp_path: Path) -> None:
        path, _ = make_study(sample_pixels("US", 1)[0], "US", "PUNKNOWNAE", tmp_path, "unknown_ae")
        result = storescu(stack.config, [path], aet="INTRUDER")
        assert result.returncode != 0 or "Association Rejected" in result.stderr + result.stdout
        assert stack.http().post(f"{stack.config.orthanc_url}/tools/lookup", data="PUNKNOWNAE", timeout=10).json() == []


class TestLookup:
    @pytest.mark.parametrize("modality", ["us", "dx"])
    def test_near_copy_ranks_first(self, stack: Stack, corpus: dict, modality: str) -> None:
        query = corpus["ids"][f"{modality}_query"]
        r = stack.http().get(f"{stack.config.orthanc_url}/lookalike/studies/{query}/similar?limit=5", timeout=30)
        assert r.status_code == 200, r.text
        similar = r.json()["similar"]
        assert similar[0]["orthanc_study_id"] == corpus["ids"][f"{modality}_copy"]
        assert similar[0]["study_instance_uid"] == corpus["ds"][f"{modality}_copy"].StudyInstanceUID
        assert [s["rank"] for s in similar] == list(range(1, len(similar) + 1))
        assert all(s["orthanc_study_id"] != query for s in similar)
        scores = [s["score"] for s in similar]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0.9
        expected_modality = "US" if modality == "us" else "DX"
        assert all(s["modality"] == expected_modality for s in similar)

    def test_unknown_study_is_404(self, stack: Stack) -> None:
        r = stack.http().get(f"{stack.config.orthanc_url}/lookalike/studies/not-a-study/similar", timeout=10)
        assert r.status_code == 404
        assert r.json()["error"].startswith("unknown study")

    def test_bad_limit_is_400(self, stack: Stack, corpus: dict) -> None:
        r = stack.http().get(f"{stack.config.orthanc_url}/lookalike/studies/{corpus['ids']['us_query']}/similar?limit=x", timeout=10)
        assert r.status_code == 400

    def test_restoring_an_instance_leaves_one_entry(self, stack: Stack, corpus: dict) -> None:
        store = IndexStore(stack.config.settings().index_dir, readonly=True)
        sop = corpus["ds"]["us_other1"].SOPInstanceUID
        [before] = [r for r in store.catalogue.rows_for_study(corpus["ids"]["us_other1"]) if r.sop_instance_uid == sop]
        total = indexed_total(stack)
        assert storescu(stack.config, [corpus["files"]["us_other1"]]).returncode == 0

        def reindexed():
            rows = [r for r in store.catalogue.rows_for_study(corpus["ids"]["us_other1"]) if r.sop_instance_uid == sop]
            return rows if rows and rows[0].seq > before.seq else None

        rows = wait_for(reindexed, timeout=60, what="re-indexing of the re-sent instance")
        assert len(rows) == 1 and rows[0].id == before.id
        assert indexed_total(stack) == total


class TestSimilarityReport:
    def test_report_round_trips_and_is_not_indexed(self, stack: Stack, corpus: dict, tmp_path: Path) -> None:
        http, url = stack.http(), stack.config.orthanc_url
        query = corpus["ids"]["us_query"]
        total = indexed_total(stack)
        r = http.post(f"{url}/lookalike/studies/{query}/similar-report", json={}, timeout=60)
        assert r.status_code == 200, r.text
        report_id = r.json()["report"]
        assert http.get(f"{url}/instances/{report_id}/study", timeout=10).json()["ID"] == query
        path = tmp_path / "report.dcm"
        path.write_bytes(http.get(f"{url}/instances/{report_id}/file", timeout=10).content)
        dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, env=dcmtk_env())
        assert dump.returncode == 0, dump.stderr
        assert str(corpus["ds"]["us_copy"].StudyInstanceUID) in dump.stdout
        sr = pydicom.dcmread(path)
        assert sr.Modality == "SR" and sr.PatientID == corpus["ds"]["us_query"].PatientID

        # The report fires NEW_INSTANCE and, after StableAge, STABLE_STUDY: the worker reconciles the study
        # (an INFO line naming it, with the number of instances caught up) and must find nothing to index.
        log = stack.config.logs / "worker.log"
        seen = len(_info_naming(log.read_text(), query))
        wait_for(lambda: _stable_after(stack, report_id, query), timeout=30, what="STABLE_STUDY after the report")
        said = wait_for(lambda: _info_naming(log.read_text(), query)[seen:], timeout=30,
                        what="the worker's reconciliation")
        assert indexed_total(stack) == total
        assert re.findall(r"(?<![\w.-])\d+(?![\w.-])", said[-1].split(query, 1)[1]) == ["0"], said[-1]
        assert all(p["instance"] != report_id for p in lookalike_status(stack)["problems"])


def _info_naming(log: str, what: str) -> list[str]:
    """The INFO lines of a log that name ``what``."""
    return [line for line in log.splitlines() if re.search(r"\bINFO\b", line) and what in line]


def _stable_after(stack: Stack, instance_id: str, study_id: str) -> bool:
    """Orthanc's change log shows STABLE_STUDY for ``study_id`` after NEW_INSTANCE of ``instance_id``."""
    changes = stack.http().get(f"{stack.config.orthanc_url}/changes?limit=10000", timeout=10).json()["Changes"]
    new = [c["Seq"] for c in changes if c["ChangeType"] == "NewInstance" and c["ID"] == instance_id]
    return bool(new) and any(
        c["ChangeType"] == "StableStudy" and c["ID"] == study_id and c["Seq"] > new[0] for c in changes
    )


class TestBadInput:
    def test_instance_without_pixels_is_reported_and_the_worker_goes_on(self, stack: Stack, corpus: dict, tmp_path: Path) -> None:
        url, http = stack.config.orthanc_url, stack.http()
        pixels = sample_pixels("DX", 5)[4]  # not an image of the corpus: its near copies must stay unique
        bad_path, bad = make_study(pixels, "DX", "PBADPIX01", tmp_path, "bad")
        del bad.PixelData
        bad.save_as(bad_path, enforce_file_format=True)
        good_path, good = make_study(noisy(pixels, 9), "DX", "PGOOD0001", tmp_path, "good")
        assert storescu(stack.config, [bad_path, good_path]).returncode == 0
        bad_id = orthanc_study_id(stack, bad)

        problem = wait_for(
            lambda: next((p for p in lookalike_status(stack)["problems"] if p["study"] == bad_id), None),
            timeout=60, what="the problem to be recorded",
        )
        assert problem["code"] == "no-pixel-data" and problem["sop_instance_uid"] == bad.SOPInstanceUID
        r = http.get(f"{url}/lookalike/studies/{bad_id}/similar", timeout=10)
        assert r.status_code == 409
        assert r.json()["problems"][0]["code"] == "no-pixel-data"
        good_id = orthanc_study_id(stack, good)
        wait_for(lambda: http.get(f"{url}/lookalike/studies/{good_id}/similar", timeout=10).status_code == 200,
                 timeout=60, what="the good instance after the bad one")
        assert stack.procs["worker"].poll() is None


class TestIngestFirst:
    """The PACS first: the worker fetches an instance only once Orthanc has received nothing for ``ingest_quiet``."""

    def test_instances_are_fetched_after_the_stores_quiet_down_and_all_indexed(self, stack: Stack,
                                                                              tmp_path: Path) -> None:
        import sqlite3
        from datetime import datetime

        import redis

        from lookalike.config import INGEST_MARK_KEY
        from lookalike.index.catalogue import CATALOGUE_FILE

        # Noise, not a sample image: these studies must not become near copies in other tests' rankings.
        shape = sample_pixels("US", 1)[0].shape
        made = {f"quiet{i}": make_study(np.random.default_rng(70 + i).integers(0, 256, shape, dtype=np.uint8), "US",
                                        f"PQUIET{i:03d}", tmp_path, f"quiet{i}")
                for i in range(6)}
        store_studies(stack, made, "a burst of six studies")
        broker = redis.Redis.from_url(stack.config.settings().redis_url)
        mark = float(broker.get(INGEST_MARK_KEY))  # the plugin's note of the burst's last store (or one just before)
        sops = [ds.SOPInstanceUID for _, ds in made.values()]
        path = stack.config.state_dir / "index" / CATALOGUE_FILE
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as conn:
            times = [row[0] for row in conn.execute(
                f"SELECT indexed_at FROM instances WHERE sop_instance_uid IN ({','.join('?' * len(sops))})", sops)]
        assert len(times) == len(sops)
        quiet = stack.config.settings().ingest_quiet
        assert quiet > 0
        # Each was written after the worker waited out the quiet window that followed the last store it saw marked.
        assert all(datetime.fromisoformat(t).timestamp() >= mark + quiet for t in times), (times, mark)


class TestCommandLine:
    def _lookalike(self, stack: Stack, *args: str) -> subprocess.CompletedProcess:
        exe = Path(sys.executable).with_name("lookalike")
        config = stack.config.state_dir / "lookalike.json"
        return subprocess.run([str(exe), "--config", str(config), *args], capture_output=True, text=True, timeout=60)

    def test_lookup_prints_the_ranking(self, stack: Stack, corpus: dict) -> None:
        result = self._lookalike(stack, "lookup", corpus["ids"]["dx_query"], "--limit", "2")
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["similar"][0]["orthanc_study_id"] == corpus["ids"]["dx_copy"] and len(answer["similar"]) == 2

    def test_status_and_an_unknown_study(self, stack: Stack, corpus: dict) -> None:
        status = self._lookalike(stack, "status")
        assert status.returncode == 0 and {c["modality"] for c in json.loads(status.stdout)["indexed"]} >= {"US", "DX"}
        missing = self._lookalike(stack, "lookup", "no-such-study")
        assert missing.returncode == 1 and "not found" in missing.stderr


class TestMixedBatch:
    """One storescu association carrying good and broken instances, as a misconfigured modality would send."""

    def test_good_instances_are_indexed_and_broken_ones_listed_by_code(self, stack: Stack, tmp_path: Path) -> None:
        url, http = stack.config.orthanc_url, stack.http()
        us, dx = sample_pixels("US", 7)[5:], sample_pixels("DX", 6)[5:]  # images the corpus does not use
        good = [
            make_study(noisy(us[0], 21), "US", "PMIXGOOD1", tmp_path, "good1"),
            make_study(noisy(us[1], 22), "US", "PMIXGOOD2", tmp_path, "good2"),
            make_study(noisy(dx[0], 23), "DX", "PMIXGOOD3", tmp_path, "good3"),
        ]
        broken: dict[str, tuple[Path, pydicom.Dataset]] = {}

        path, ds = make_study(noisy(us[0], 24), "US", "PMIXROWS1", tmp_path, "wrong_rows")
        ds.Rows = ds.Rows * 2  # twice the rows the Pixel Data holds
        ds.save_as(path, enforce_file_format=True)
        broken["inconsistent-attributes"] = (path, ds)

        path, ds = make_study(noisy(dx[0], 25), "DX", "PMIXTRUNC", tmp_path, "truncated_pixels")
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3 * 2]  # a transfer cut short, re-wrapped
        ds.save_as(path, enforce_file_format=True)
        broken["inconsistent-attributes-truncated"] = (path, ds)

        path, ds = make_study(noisy(us[1], 27), "US", "PMIXHUGE", tmp_path, "memory_bomb")
        ds.Rows = ds.Columns = 60000  # claims 3.6 G pixels per frame over a few kB of data
        ds.NumberOfFrames = 50
        ds.save_as(path, enforce_file_format=True)
        broken["image-too-large"] = (path, ds)

        path, ds = make_study(noisy(us[1], 26), "US", "PMIXMPEG4", tmp_path, "mpeg4")
        ds.PixelData = pydicom.encaps.encapsulate([bytes(range(256)) * 64])  # an MPEG-4 stream, as far as Orthanc knows
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG4HP41
        ds.save_as(path, enforce_file_format=True)
        broken["unsupported-transfer-syntax"] = (path, ds)

        mpeg4 = broken["unsupported-transfer-syntax"][0]
        files = [p for p, _ in good] + [p for p, _ in broken.values() if p != mpeg4]
        result = storescu(stack.config, files)
        assert result.returncode == 0, result.stderr
        # A modality sending video proposes its transfer syntax (-xn: MPEG-4 AVC/H.264 HP / Level 4.1).
        argv = ["storescu", "-xn", "-aet", "STORESCU", "-aec", ORTHANC_AET, "127.0.0.1", str(stack.config.dicom_port), str(mpeg4)]
        result = subprocess.run(argv, env=dcmtk_env(), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        for _, ds in broken.values():  # Orthanc accepted every one of them
            assert http.post(f"{url}/tools/lookup", data=str(ds.SOPInstanceUID), timeout=10).json(), ds.PatientID

        for expected, (_, ds) in broken.items():
            study = orthanc_study_id(stack, ds)
            problem = wait_for(
                lambda: next((p for p in lookalike_status(stack)["problems"] if p["study"] == study), None),
                timeout=90, what=f"the problem of {ds.PatientID}",
            )
            assert problem["code"] == expected.removesuffix("-truncated"), problem
            assert problem["sop_instance_uid"] == ds.SOPInstanceUID
        for _, ds in good:
            study = orthanc_study_id(stack, ds)
            wait_for(lambda: http.get(f"{url}/lookalike/studies/{study}/similar", timeout=10).status_code == 200,
                     timeout=90, what=f"indexing of {ds.PatientID}")
            assert not [p for p in lookalike_status(stack)["problems"] if p["study"] == study]
        assert stack.procs["worker"].poll() is None


class TestDeletion:
    def test_deleting_a_patient_in_orthanc_removes_its_instances_from_the_index(self, stack: Stack, corpus: dict, tmp_path: Path) -> None:
        url, http = stack.config.orthanc_url, stack.http()
        # a near copy of the query's image: listed whatever the model's similarity floor (removed again below)
        path, ds = make_study(noisy(sample_pixels("US", 1)[0], 21), "US", "PDELETE01", tmp_path, "to_delete")
        total = indexed_total(stack)
        assert storescu(stack.config, [path]).returncode == 0
        study_id = orthanc_study_id(stack, ds)
        wait_for(lambda: indexed_total(stack) == total + 1, timeout=60, what="indexing")
        query = corpus["ids"]["us_query"]
        hits = http.get(f"{url}/lookalike/studies/{query}/similar?limit=100", timeout=10).json()["similar"]
        assert study_id in {s["orthanc_study_id"] for s in hits}

        patient_id = http.get(f"{url}/studies/{study_id}", timeout=10).json()["ParentPatient"]
        assert orthanc_resource_id(str(ds.PatientID)) == patient_id  # how the worker finds a deleted patient
        assert http.delete(f"{url}/patients/{patient_id}", timeout=10).ok
        wait_for(lambda: indexed_total(stack) == total, timeout=60, what="the deletion to reach the index")
        hits = http.get(f"{url}/lookalike/studies/{query}/similar?limit=100", timeout=10).json()["similar"]
        assert study_id not in {s["orthanc_study_id"] for s in hits}


def _pids_with(text: str) -> list[int]:
    """Processes whose command line holds ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


class TestSupervisor:
    """``lookalike run`` as an administrator starts it: a component that dies, even before it is ready, is restarted
    with back-off and reported; Orthanc is never stopped for it."""

    @pytest.mark.parametrize("component", ["worker", "query-scp"])
    def test_a_component_killed_during_start_up_is_restarted_reported_and_orthanc_keeps_running(
            self, tmp_path: Path, component: str) -> None:
        import os
        import signal

        from lookalike.ops.stack import FAILING_AFTER, StackConfig

        state, stack_json = tmp_path / "state", tmp_path / "stack.json"
        config = StackConfig.create(state)
        config.save(stack_json)
        exe = Path(sys.executable).with_name("lookalike")
        with open(tmp_path / "run.out", "wb") as out:
            run = subprocess.Popen([str(exe), "run", "--no-samples", "--state", str(state), "--stack-config",
                                    str(stack_json)], stdout=out, stderr=subprocess.STDOUT)
        http = requests.Session()
        http.auth = ("admin", config.admin_password)

        def status() -> dict | None:
            try:
                r = http.get(f"{config.orthanc_url}/lookalike/status", timeout=5)
            except requests.RequestException:
                return None
            return r.json() if r.status_code == 200 else None

        # What only this component's processes have on their command line.
        tag = {"worker": f"lookalike-worker-{config.redis_port}@", "query-scp": str(state / "logs" / "query-scp.log")}

        def reported() -> dict:
            return ((status() or {}).get("components") or {}).get(component) or {}

        try:
            wait_for(status, timeout=120, what="/lookalike/status to answer 200")
            killed: set[int] = set()
            for _ in range(FAILING_AFTER):
                pids = wait_for(lambda: [p for p in _pids_with(tag[component]) if p not in killed], timeout=120,
                                interval=0.05, what=f"a {component} process")
                for pid in pids:
                    try:
                        os.killpg(os.getpgid(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                killed.update(pids)
                assert reported().get("state") != "ready", f"{component} was ready: this would not test its start-up"
                wait_for(lambda: not set(_pids_with(tag[component])) & killed, timeout=30, what="the kill")
                assert run.poll() is None, (tmp_path / "run.out").read_text()
                assert http.get(f"{config.orthanc_url}/system", timeout=10).ok

            failing = wait_for(lambda: reported().get("state") == "failing" and reported(), timeout=30,
                               what=f"{component} reported as failing")
            assert failing["exits_in_a_row"] >= FAILING_AFTER
            back = wait_for(lambda: reported().get("state") == "ready" and reported(), timeout=240,
                            what=f"{component} to come back")
            assert back["restarts"] >= FAILING_AFTER and back["last_exit_status"] == -signal.SIGKILL
            assert run.poll() is None and http.get(f"{config.orthanc_url}/system", timeout=10).ok
            assert all(c["state"] == "ready" for c in status()["components"].values())
            assert component in (state / "logs" / "supervisor.log").read_text()
        finally:
            if run.poll() is None:
                run.send_signal(signal.SIGINT)
                try:
                    run.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    run.kill()
            for pid in _pids_with(str(state)):  # whatever the stopped stack left behind (none, normally)
                os.kill(pid, signal.SIGKILL)
        assert run.returncode == 0, (tmp_path / "run.out").read_text()
