"""The REST handlers (``similar``, ``similar_report``, ``status``) as the plain functions they are, called with a real
Orthanc (over HTTP) and lookups made in this process on the index its worker writes, for what needs them (real
rankings, reports stored in and read back from Orthanc, the audit trail of real lookups); and the routes themselves
through Orthanc, where the query service answers the lookups (Orthanc's own query strings and POST bodies, the
disclosure setting, the audit trail written by the query service).

What needs neither (id validation, parameters, the POST guard, 409, 503, floors) is in ``test_rest_handlers.py``."""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
from pathlib import Path

import pydicom
import pytest

from lookalike.query.audit import AuditLog, read_entries
from lookalike.query.lookup_service import LocalLookups
from lookalike.index.store import IndexStore
from lookalike.orthanc.client import HttpOrthanc
from lookalike.plugin import rest
from lookalike.ops.stack import Stack
from tests.support import (identities, make_study, sample_pixels, store_lookup_corpus, store_studies,
                           wait_for)

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def corpus(stack: Stack, tmp_path_factory) -> dict:
    return store_lookup_corpus(stack, tmp_path_factory.mktemp("rest"), "PRST", (12, 13, 14))


@pytest.fixture(scope="module")
def api(stack: Stack) -> HttpOrthanc:
    return HttpOrthanc(stack.config.orthanc_url, "admin", stack.config.admin_password)


@pytest.fixture(scope="module")
def index(stack: Stack):
    with IndexStore(stack.config.settings().index_dir, readonly=True) as s:
        yield s


@pytest.fixture(scope="module")
def lookups(index: IndexStore) -> LocalLookups:
    """Lookups in this process, recording nothing: the answers alone."""
    return LocalLookups(index)


class TestSimilar:
    def test_near_copy_first_without_the_other_patients_identity(self, api, lookups, corpus: dict) -> None:
        status, body = rest.similar(api, lookups, corpus["ids"]["a"], limit=3)
        assert status == 200
        assert (body["study"], body["study_instance_uid"], body["scope"], body["limit"]) == (
            corpus["ids"]["a"], corpus["ds"]["a"].StudyInstanceUID, "archive", 3)
        first = body["similar"][0]
        assert first["orthanc_study_id"] == corpus["ids"]["b"] and first["same_patient"] is False
        assert len(body["similar"]) == 3
        text = json.dumps(body)
        for identity in identities(corpus, "b", "other"):
            assert identity not in text
        assert "patient_id" not in first and "patient_name" not in first

    def test_each_answer_names_the_query_image_it_matched(self, api, lookups, corpus: dict) -> None:
        _, body = rest.similar(api, lookups, corpus["ids"]["a"], limit=1)
        best = body["similar"][0]["best_match"]
        query_instance = json.loads(api.get_bytes(f"/instances/{best['query_orthanc_instance_id']}"))
        assert query_instance["MainDicomTags"]["SOPInstanceUID"] == corpus["ds"]["a"].SOPInstanceUID
        assert best["query_sop_instance_uid"] == corpus["ds"]["a"].SOPInstanceUID
        match_instance = json.loads(api.get_bytes(f"/instances/{best['orthanc_instance_id']}"))
        assert match_instance["MainDicomTags"]["SOPInstanceUID"] == corpus["ds"]["b"].SOPInstanceUID

    def test_disclosure_names_the_other_patients(self, api, lookups, corpus: dict) -> None:
        _, body = rest.similar(api, lookups, corpus["ids"]["a"], limit=1, disclose=True)
        first = body["similar"][0]
        assert (first["patient_id"], first["patient_name"], first["accession_number"]) == tuple(
            identities(corpus, "b"))

    def test_patient_scope_answers_the_same_patients_priors_only(self, api, lookups, corpus: dict) -> None:
        status, body = rest.similar(api, lookups, corpus["ids"]["a"], limit=10, scope="patient")
        assert status == 200 and body["scope"] == "patient"
        assert [s["orthanc_study_id"] for s in body["similar"]] == [corpus["ids"]["prior"]]
        assert body["similar"][0]["same_patient"] is True
        _, archive = rest.similar(api, lookups, corpus["ids"]["a"], limit=100)
        assert {corpus["ids"]["b"], corpus["ids"]["other"], corpus["ids"]["prior"]} <= {
            s["orthanc_study_id"] for s in archive["similar"]}


class TestSimilarReport:
    def _report(self, api: HttpOrthanc, answer: dict) -> pydicom.Dataset:
        return pydicom.dcmread(io.BytesIO(api.get_bytes(f"/instances/{answer['report']}/file")))

    def test_limit_is_honoured_and_the_series_is_dated(self, api, lookups, corpus: dict) -> None:
        status, answer = rest.similar_report(api, lookups, corpus["ids"]["a"], limit=2)
        assert status == 200 and answer["limit"] == 2 and answer["similar"] == 2
        sr = self._report(api, answer)
        assert sr.StudyInstanceUID == corpus["ds"]["a"].StudyInstanceUID
        assert sr.SOPInstanceUID == answer["sop_instance_uid"]
        cases = [item for item in sr.ContentSequence if item.ValueType == "CONTAINER"]
        assert len(cases) == 2
        assert sr.SeriesDate and sr.SeriesTime
        assert (answer["series_date"], answer["series_time"]) == (sr.SeriesDate, sr.SeriesTime)
        series = json.loads(api.get_bytes(f"/series/{answer['series']}"))
        assert series["ParentStudy"] == corpus["ids"]["a"] and answer["report"] in series["Instances"]
        data = api.get_bytes(f"/instances/{answer['report']}/file")
        for identity in identities(corpus, "b", "other"):
            assert identity.encode() not in data

    def test_asking_again_returns_the_report_filed_before(self, api, lookups, corpus: dict) -> None:
        study = corpus["ids"]["other"]
        series_before = json.loads(api.get_bytes(f"/studies/{study}"))["Series"]
        _, first = rest.similar_report(api, lookups, study, limit=3)
        _, again = rest.similar_report(api, lookups, study, limit=3)
        assert first["existing"] is False and again["existing"] is True
        assert (again["report"], again["series"]) == (first["report"], first["series"])
        _, other_limit = rest.similar_report(api, lookups, study, limit=2)
        assert other_limit["existing"] is False and other_limit["report"] != first["report"]
        _, other_scope = rest.similar_report(api, lookups, study, limit=3, scope="patient")
        assert other_scope["existing"] is False and other_scope["similar"] == 0
        series_after = json.loads(api.get_bytes(f"/studies/{study}"))["Series"]
        assert len(series_after) == len(series_before) + 3


class TestAudit:
    def test_lookups_and_reports_are_recorded_with_the_user(self, api, index, corpus: dict, tmp_path: Path) -> None:
        path = tmp_path / "audit.jsonl"
        with AuditLog(path) as audit:
            lookups = LocalLookups(index, audit)
            _, answer = rest.similar(api, lookups, corpus["ids"]["a"], limit=2, scope="archive", who="radiologist1")
            rest.similar_report(api, lookups, corpus["ids"]["a"], limit=1, scope="patient", who="rad2")
        lookup, report = list(read_entries(path))
        assert (lookup["who"], lookup["via"], lookup["action"], lookup["scope"]) == (
            "radiologist1", "rest", "lookup", "archive")
        assert lookup["study"] == corpus["ds"]["a"].StudyInstanceUID
        assert lookup["orthanc_study_id"] == corpus["ids"]["a"]
        assert lookup["results"] == [s["study_instance_uid"] for s in answer["similar"]]
        assert lookup["details"] == {"limit": 2}
        assert (report["who"], report["action"], report["scope"]) == ("rad2", "report", "patient")
        assert report["results"] == [corpus["ds"]["prior"].StudyInstanceUID]

    def test_a_lookup_that_cannot_be_recorded_is_not_answered(self, api, index, corpus: dict,
                                                              tmp_path: Path) -> None:
        audit = AuditLog(tmp_path / "gone" / "audit.jsonl")
        shutil.rmtree(tmp_path / "gone")
        lookups = LocalLookups(index, audit)
        try:
            status, body = rest.similar(api, lookups, corpus["ids"]["a"], limit=2, who="x")
            assert status == 503 and "similar" not in body and "audit" in body["error"]
            series = json.loads(api.get_bytes(f"/studies/{corpus['ids']['other']}"))["Series"]
            status, _ = rest.similar_report(api, lookups, corpus["ids"]["other"], limit=4, who="x")
            assert status == 503
            assert json.loads(api.get_bytes(f"/studies/{corpus['ids']['other']}"))["Series"] == series
        finally:
            audit.close()


class TestStatus:
    def test_counts_and_an_unreachable_broker(self, index, corpus: dict) -> None:
        def broken() -> int:
            raise ConnectionError("broker down")

        status, body = rest.status(index.catalogue, broken, pending=4)
        assert status == 200
        assert body["queue"] == {"broker": None, "plugin_pending": 4, "broker_error": "broker down"}
        us = [c for c in body["indexed"] if c["modality"] == "US"]
        assert us and us[0]["instances"] >= len(corpus["ids"])


class TestRoutes:
    """Through Orthanc: what the plugin's wiring adds to the handlers."""

    def test_an_encoded_limit_is_decoded(self, stack: Stack, corpus: dict) -> None:
        url = f"{stack.config.orthanc_url}/lookalike/studies/{corpus['ids']['a']}/similar?limit=%32&scope=pati%65nt"
        r = stack.http().get(url, timeout=30)
        assert r.status_code == 200, r.text
        assert (r.json()["limit"], r.json()["scope"]) == (2, "patient")

    @pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=x", "limit=%2D1", "scope=all"])
    def test_bad_parameters_are_400(self, stack: Stack, corpus: dict, query: str) -> None:
        url = f"{stack.config.orthanc_url}/lookalike/studies/{corpus['ids']['a']}/similar?{query}"
        r = stack.http().get(url, timeout=30)
        assert r.status_code == 400 and r.json()["error"]

    def test_a_limit_given_twice_is_400(self, stack: Stack, corpus: dict) -> None:
        # Sent as written: requests would turn %6C back into "l" (and Orthanc's Python plugin keeps only the last of
        # two names written alike).
        connection = http.client.HTTPConnection("127.0.0.1", stack.config.http_port, timeout=30)
        token = base64.b64encode(f"admin:{stack.config.admin_password}".encode()).decode()
        connection.request("GET", f"/lookalike/studies/{corpus['ids']['a']}/similar?limit=1&%6Cimit=50",
                           headers={"Authorization": f"Basic {token}"})
        response = connection.getresponse()
        assert response.status == 400 and "limit" in json.loads(response.read())["error"]
        connection.close()

    def test_report_takes_its_limit_from_the_body(self, stack: Stack, corpus: dict) -> None:
        url = f"{stack.config.orthanc_url}/lookalike/studies/{corpus['ids']['prior']}/similar-report"
        r = stack.http().post(url, json={"limit": 1}, timeout=60)
        assert r.status_code == 200, r.text
        assert (r.json()["limit"], r.json()["similar"]) == (1, 1)
        for body in ({"limit": 0}, {"limit": "many"}, {"scope": "all"}, {"limt": 2}):
            r = stack.http().post(url, json=body, timeout=60)
            assert r.status_code == 400, body
        r = stack.http().post(url, data='{"limit": 2}', headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 200, r.text

    def test_a_post_that_a_cross_site_form_could_send_is_refused(self, stack: Stack, corpus: dict) -> None:
        url = f"{stack.config.orthanc_url}/lookalike/studies/{corpus['ids']['prior']}/similar-report"
        study = f"{stack.config.orthanc_url}/studies/{corpus['ids']['prior']}"
        series = stack.http().get(study, timeout=10).json()["Series"]
        form = stack.http().post(url, data="limit=2", timeout=60)
        plain = stack.http().post(url, data='{"limit": 2}', headers={"Content-Type": "text/plain"}, timeout=60)
        foreign = stack.http().post(url, json={"limit": 2}, headers={"Origin": "http://evil.example"}, timeout=60)
        assert (form.status_code, plain.status_code, foreign.status_code) == (415, 415, 403)
        assert all(r.headers["Content-Type"] == "application/json" and r.json()["error"] for r in (form, foreign))
        assert stack.http().get(study, timeout=10).json()["Series"] == series  # nothing filed
        own = stack.http().post(url, json={"limit": 2}, headers={"Origin": stack.config.orthanc_url}, timeout=60)
        assert own.status_code == 200, own.text

    def test_an_id_not_of_orthancs_form_is_404_not_500(self, stack: Stack, corpus: dict) -> None:
        for path in (f"{corpus['ids']['a']}%3Fexpand", "abc%3F"):
            r = stack.http().get(f"{stack.config.orthanc_url}/lookalike/studies/{path}/similar", timeout=30)
            assert r.status_code == 404, (path, r.status_code, r.text)
            assert r.headers["Content-Type"] == "application/json" and r.json()["error"]

    def test_route_lookups_are_in_the_audit_trail(self, stack: Stack, corpus: dict) -> None:
        path = Path(stack.config.settings().audit_log)
        seen = len(list(read_entries(path))) if path.exists() else 0
        r = stack.http().get(f"{stack.config.orthanc_url}/lookalike/studies/{corpus['ids']['other']}/similar?limit=1",
                             timeout=30)
        assert r.status_code == 200
        entries = list(read_entries(path))[seen:]
        assert [(e["who"], e["via"], e["host"], e["orthanc_study_id"], e["results"]) for e in entries] == [
            ("admin", "rest", "127.0.0.1", corpus["ids"]["other"], [r.json()["similar"][0]["study_instance_uid"]])]

    def test_refused_requests_are_in_the_audit_trail(self, stack: Stack, corpus: dict, tmp_path: Path) -> None:
        """A lookup, report or key-image request turned down (400, 404, 409, 415) is traced like an answered one:
        who, from where, which study, the outcome and the reason, and no patient's name."""
        path, url = Path(stack.config.settings().audit_log), stack.config.orthanc_url
        other, ds = make_study(sample_pixels("DX", 1)[0], "DX", "PREFUSED01", tmp_path, "not-an-image")
        ds.Modality, ds.SOPClassUID = "OT", pydicom.uid.SecondaryCaptureImageStorage  # never indexed
        ds.save_as(other, enforce_file_format=True)
        assert stack.http().post(f"{url}/instances", data=other.read_bytes(), timeout=30).ok
        not_indexed = stack.http().post(f"{url}/tools/lookup", data=str(ds.StudyInstanceUID), timeout=10).json()
        not_indexed = next(x["ID"] for x in not_indexed if x["Type"] == "Study")
        unknown = "00000000-00000000-00000000-00000000-00000000"
        seen = len(list(read_entries(path))) if path.exists() else 0

        asked = [
            (stack.http().get(f"{url}/lookalike/studies/{corpus['ids']['a']}/similar?limit=0", timeout=30), "lookup"),
            (stack.http().get(f"{url}/lookalike/studies/{unknown}/similar", timeout=30), "lookup"),
            (stack.http().get(f"{url}/lookalike/studies/{not_indexed}/similar", timeout=30), "lookup"),
            (stack.http().post(f"{url}/lookalike/studies/{corpus['ids']['a']}/similar-report", data="limit=2",
                               timeout=30), "report"),
            (stack.http().post(f"{url}/lookalike/studies/{not_indexed}/similar-kos", json={}, timeout=30), "kos"),
        ]
        assert [r.status_code for r, _ in asked] == [400, 404, 409, 415, 409]
        lines = path.read_text(encoding="utf-8").splitlines()
        entries = [e for e in list(read_entries(path))[seen:] if e["outcome"] == "refused"]
        assert [(e["action"], e["details"]["status"], e["who"], e["via"], e["host"]) for e in entries] == [
            (action, r.status_code, "admin", "rest", "127.0.0.1") for r, action in asked]
        assert [e["details"]["orthanc_study_id"] for e in entries] == [
            corpus["ids"]["a"], unknown, not_indexed, corpus["ids"]["a"], not_indexed]
        assert all(e["reason"] for e in entries)
        assert "limit" in entries[0]["reason"] and "US, DX or CR" in entries[2]["reason"]
        assert entries[2]["study"] == entries[4]["study"] == ds.StudyInstanceUID
        assert not any(str(ds.PatientName) in line or "PREFUSED01" in line for line in lines[-len(entries):])

    def test_the_default_answer_names_no_other_patient(self, stack: Stack, corpus: dict) -> None:
        r = stack.http().get(f"{stack.config.orthanc_url}/lookalike/studies/{corpus['ids']['a']}/similar?limit=100",
                             timeout=30)
        assert r.status_code == 200
        for identity in identities(corpus, "b", "other"):
            assert identity not in r.text


# --- A site's own weights, and Orthanc's database reset: the status tells what the lookups and the catch-up do ---


#: The floor a site measured for its copy of the shipped X-ray model (a value the shipped file does not hold).
SITE_FLOOR = -0.25


@pytest.fixture(scope="module")
def site_stack(tmp_path_factory):
    """A stack whose X-ray weights are the site's copy of the shipped checkpoint (same model version), with the
    site's own calibration beside it; the catch-up runs every second."""
    from lookalike.encoders.base import WEIGHTS_DIR
    from lookalike.encoders.floors import calibration_path, read_calibrations
    from lookalike.lab.calibration import write_calibration
    from lookalike.ops.stack import StackConfig
    from tests.conftest import require_programs

    require_programs("Orthanc", "redis-server", "storescu")
    tmp = tmp_path_factory.mktemp("site")
    weights = tmp / "site-weights" / "xr.pt"
    weights.parent.mkdir()
    shutil.copyfile(WEIGHTS_DIR / "xr.pt", weights)
    for calibration in read_calibrations(calibration_path(WEIGHTS_DIR / "xr.pt")).values():
        write_calibration(weights, {**calibration, "floor": SITE_FLOOR})
    config = StackConfig.create(tmp / "stack", weights={"xr": str(weights)}, extra_settings={"catch_up_interval": 1})
    with Stack(config) as running:
        yield running


def _site_status(stack: Stack) -> dict:
    r = stack.http().get(f"{stack.config.orthanc_url}/lookalike/status", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


class TestStatusOfASite:
    def test_the_status_gives_the_floor_the_lookups_apply_from_the_sites_weights(self, site_stack: Stack,
                                                                                 tmp_path: Path) -> None:
        dx = sample_pixels("DX", 3)
        made = {f"s{i}": make_study(dx[i], "DX", f"PSITE{i:04d}", tmp_path, f"site{i}") for i in range(2)}
        ids = store_studies(site_stack, made, "the site's studies")["ids"]
        [xr] = [c for c in _site_status(site_stack)["indexed"] if c["encoder"] == "xr"]
        answer = site_stack.http().get(f"{site_stack.config.orthanc_url}/lookalike/studies/{ids['s0']}/similar",
                                       timeout=30).json()
        assert answer["floors"] == {xr["model_version"]: SITE_FLOOR}  # the query service reads the site's file
        assert xr["similarity_floor"] == SITE_FLOOR and "warning" not in xr

    def test_after_a_database_reset_the_status_says_the_catch_up_is_behind(self, site_stack: Stack,
                                                                           tmp_path: Path) -> None:
        """The catch-up has read Orthanc's change log to its end; the worker is stopped, and Orthanc restarted on a
        new, shorter database. Until the worker's next pass the status must not say that nothing is behind."""
        dx = sample_pixels("DX", 4)
        made = {f"r{i}": make_study(dx[i], "DX", f"PRESET{i:04d}", tmp_path, f"reset{i}") for i in range(2)}
        store_studies(site_stack, made, "studies before the reset")
        wait_for(lambda: _caught_up(site_stack), timeout=60, what="the catch-up to read the whole change log")
        old_cursor = _site_status(site_stack)["catch_up"]["cursor"]

        site_stack.stop_process("worker")
        site_stack.stop_process("orthanc")
        storage = site_stack.config.state_dir / "orthanc-storage"
        storage.rename(storage.with_name("orthanc-storage.reset"))
        site_stack.restart("orthanc")
        path, _ = make_study(dx[3], "DX", "PRESET0009", tmp_path, "after")
        _store_file(site_stack, path)
        catch_up = _site_status(site_stack)["catch_up"]
        assert 0 < catch_up["orthanc_last_change"] < old_cursor == catch_up["cursor"]
        assert catch_up["reset_detected"] is True
        assert catch_up["behind"] == catch_up["orthanc_last_change"]  # all of the new log is still to read

        site_stack.restart("worker")
        wait_for(lambda: _caught_up(site_stack), timeout=120, interval=1.0, what="the catch-up of the new log")


def _caught_up(stack: Stack) -> bool:
    """The catch-up has read the change log Orthanc has now to its end."""
    catch_up = _site_status(stack)["catch_up"]
    return catch_up["cursor"] > 0 and catch_up["behind"] == 0 and not catch_up["reset_detected"]


def _store_file(stack: Stack, path: Path) -> None:
    r = stack.http().post(f"{stack.config.orthanc_url}/instances", data=path.read_bytes(), timeout=30)
    assert r.ok, r.text
