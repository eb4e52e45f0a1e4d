"""The lookup service: the query service's process answers the REST routes' lookups over its Unix socket.

First its two ends on a small real index in a temporary folder (no Orthanc): the answer is the in-process one, the
secret is required, the socket is owner-only, each lookup is recorded once, a lookup that cannot be recorded is
not answered, and a service that is gone or stuck is reported rather than waited for. Then through the running
stack: Orthanc's process holds no FAISS, and when the query service is killed or stuck the routes answer 503 while
Orthanc keeps serving, until ``Stack.restart`` brings lookups back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import stat
from pathlib import Path

import numpy as np
import pytest
import requests

from lookalike.query.audit import AuditLog, read_entries
from lookalike.index.catalogue import InstanceRecord
from lookalike.index.search import MatchedInstance, SimilarStudy, StudyNotIndexedError, similar_studies
from lookalike.query.lookup_service import (
    AuditUnavailable,
    LocalLookups,
    LookupClient,
    LookupRequest,
    LookupServer,
    LookupUnavailable,
    matches_from_json,
    matches_to_json,
)
from lookalike.index.store import IndexStore
from lookalike.ops.stack import Stack
from tests.support import log_records, make_study, noisy, sample_pixels, store_studies, wait_for

SECRET = "s3cret-for-this-test"


def _record(i: int, study: int, patient: str) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"1.2.826.0.1.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
        series_instance_uid=f"1.2.826.1.{study}", study_instance_uid=f"1.2.826.2.{study}", patient_id=patient,
        study_date=f"2024{study % 12 + 1:02d}01", modality="US", orthanc_instance_id=f"inst-{i}",
        orthanc_series_id=f"series-{study}", orthanc_study_id=f"study-{study}", encoder="us", model_version="us-1",
        lesion_box=(1, 2, 30, 40, 0.9) if i % 2 else None,
    )


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    """Twelve studies of two instances each, random 16-d vectors, written as the worker writes them."""
    folder = tmp_path_factory.mktemp("lookup-index")
    rng = np.random.default_rng(3)
    with IndexStore(folder) as store:
        for i in range(24):
            store.add(_record(i, i // 2, f"P{i // 6}"), rng.normal(size=16))
    return folder


@pytest.fixture
def service(index_dir: Path, tmp_path: Path):
    """A lookup server on a real index, recording into ``tmp_path/audit.jsonl``; its client."""
    store = IndexStore(index_dir, readonly=True)
    audit = AuditLog(tmp_path / "audit.jsonl")
    server = LookupServer(LocalLookups(store, audit), tmp_path / "lookup.sock", SECRET)
    server.start()
    try:
        yield server, LookupClient(server.path, SECRET, 5.0, store.catalogue)
    finally:
        server.stop()
        audit.close()
        store.close()


def _request(study: int = 0, **kw) -> LookupRequest:
    return LookupRequest(**{"orthanc_study_id": f"study-{study}", "study_instance_uid": f"1.2.826.2.{study}",
                            "limit": 5, "scope": "archive", "who": "dr.a", **kw})


class TestEnds:
    def test_the_answer_is_the_in_process_one_and_recorded_once(self, service, index_dir, tmp_path) -> None:
        _, client = service
        answer = client.lookup(_request(3, limit=4, action="report", host="10.1.2.3"))
        with IndexStore(index_dir, readonly=True) as store:
            assert answer == similar_studies(store, "study-3", 4, "archive")
        assert any(m.best_match.lesion_box for m in answer)  # the boxes came back as they went
        [entry] = read_entries(tmp_path / "audit.jsonl")
        assert (entry["who"], entry["via"], entry["action"], entry["scope"], entry["host"]) == (
            "dr.a", "rest", "report", "archive", "10.1.2.3")
        assert (entry["study"], entry["orthanc_study_id"]) == ("1.2.826.2.3", "study-3")
        assert entry["results"] == [m.study_instance_uid for m in answer] and entry["details"] == {"limit": 4}

    def test_patient_scope_and_bad_values(self, service) -> None:
        _, client = service
        priors = client.lookup(_request(2, scope="patient", limit=10))  # study 2 of P0: studies 0 and 1 are earlier
        assert priors and all(m.same_patient and m.patient_id == "P0" for m in priors)
        with pytest.raises(ValueError, match="scope"):
            client.lookup(_request(0, scope="everyone"))
        with pytest.raises(ValueError, match="limit"):
            client.lookup(_request(0, limit=0))

    def test_a_study_without_vectors_is_not_indexed_and_not_recorded(self, service, tmp_path) -> None:
        _, client = service
        with pytest.raises(StudyNotIndexedError):
            client.lookup(_request(99))
        assert not (tmp_path / "audit.jsonl").exists() or list(read_entries(tmp_path / "audit.jsonl")) == []

    def test_a_lookup_that_cannot_be_recorded_is_not_answered(self, index_dir, tmp_path) -> None:
        audit = AuditLog(tmp_path / "gone" / "audit.jsonl")
        shutil.rmtree(tmp_path / "gone")
        with IndexStore(index_dir, readonly=True) as store:
            server = LookupServer(LocalLookups(store, audit), tmp_path / "lookup.sock", SECRET)
            server.start()
            try:
                with pytest.raises(AuditUnavailable):
                    LookupClient(server.path, SECRET, 5.0).lookup(_request(1))
            finally:
                server.stop()
                audit.close()

    def test_the_secret_is_required_and_the_socket_owner_only(self, service, tmp_path, caplog) -> None:
        server, _ = service
        assert stat.S_ISSOCK(server.path.stat().st_mode) and server.path.stat().st_mode & 0o077 == 0
        for wrong in ("", "guess"):
            with pytest.raises(LookupUnavailable, match="401"):
                LookupClient(server.path, wrong, 5.0).lookup(_request(2))
        # A warning per refused request, naming the process that sent it (the socket's peer: this one).
        assert len(log_records(caplog.records, logging.WARNING, f"uid {os.getuid()}", f"pid {os.getpid()}")) == 2
        assert not (tmp_path / "audit.jsonl").exists() or list(read_entries(tmp_path / "audit.jsonl")) == []

    def test_a_killed_services_socket_is_replaced_and_a_live_one_kept(self, index_dir, tmp_path) -> None:
        path = tmp_path / "lookup.sock"
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))
        stale.close()  # the file stays, nobody listens: what kill -9 leaves
        with IndexStore(index_dir, readonly=True) as store:
            server = LookupServer(LocalLookups(store), path, SECRET)
            server.start()
            try:
                LookupClient(path, SECRET, 5.0).ping()
                with pytest.raises(RuntimeError, match="already answers"):
                    LookupServer(LocalLookups(store), path, SECRET).start()
                LookupClient(path, SECRET, 5.0).ping()
            finally:
                server.stop()
        assert not path.exists()

    def test_no_service_and_a_stuck_one_are_reported_not_waited_for(self, tmp_path) -> None:
        path = tmp_path / "lookup.sock"
        with pytest.raises(LookupUnavailable, match="not running") as gone:
            LookupClient(path, SECRET, 5.0).lookup(_request())
        assert "lookalike query-scp" in str(gone.value) and "query-scp.log" in str(gone.value)
        stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stuck.bind(str(path))
        stuck.listen(1)  # connections queue, nothing is ever read or answered
        try:
            with pytest.raises(LookupUnavailable, match="no answer within 0.5 s"):
                LookupClient(path, SECRET, 0.5).lookup(_request())
        finally:
            stuck.close()

    def test_an_empty_secret_is_refused_at_start(self, index_dir, tmp_path) -> None:
        with IndexStore(index_dir, readonly=True) as store, pytest.raises(ValueError, match="lookup_secret"):
            LookupServer(LocalLookups(store), tmp_path / "lookup.sock", "")


class TestWire:
    def test_answers_read_back_as_they_were(self) -> None:
        match = SimilarStudy(
            rank=1, study_instance_uid="1.2", orthanc_study_id="s", patient_id="P", study_date="20240101",
            modality="US", score=0.93125, model_version="us-1", same_patient=True,
            best_match=MatchedInstance(sop_instance_uid="1.3", sop_class_uid="1.4", series_instance_uid="1.5",
                                       orthanc_instance_id="i", query_sop_instance_uid="1.6", score=0.93125,
                                       query_orthanc_instance_id="q", lesion_box=(1, 2, 3, 4, 0.5),
                                       query_lesion_box=None))
        assert matches_from_json(json.loads(json.dumps(matches_to_json([match])))) == [match]

    @pytest.mark.parametrize("data,message", [
        ([], "JSON object"), ({"orthanc_study_id": "s"}, "required"),
        ({**vars(_request()), "limit": "5"}, "limit must be int"), ({**vars(_request()), "limit": True}, "limit"),
        ({**vars(_request()), "who": None}, "who must be str"), ({**vars(_request()), "extra": 1}, "extra"),
    ])
    def test_bad_requests_are_refused(self, data, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            LookupRequest.from_json(data)


# -- through the running stack -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(stack: Stack, tmp_path_factory) -> dict:
    """A US study and a noisy copy of it from another patient; images no other test stores (rotated samples)."""
    tmp = tmp_path_factory.mktemp("lookup-service")
    pixels = np.ascontiguousarray(np.rot90(sample_pixels("US", 11)[10]))
    made = {"query": make_study(pixels, "US", "PLKSV0001", tmp, "query"),
            "copy": make_study(noisy(pixels, 51), "US", "PLKSV0002", tmp, "copy", "20240105")}
    return store_studies(stack, made, "the lookup service corpus")


def _similar(stack: Stack, study: str) -> requests.Response:
    return stack.http().get(f"{stack.config.orthanc_url}/lookalike/studies/{study}/similar?limit=3", timeout=60)


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _answering(stack: Stack) -> bool:
    r = stack.http().get(f"{stack.config.orthanc_url}/lookalike/status", timeout=30)
    return r.ok and r.json()["query_service"]["answering"]


@pytest.mark.stack
class TestThroughOrthanc:
    def test_the_query_service_answers_and_records_orthanc_holds_no_faiss(self, stack: Stack, corpus: dict) -> None:
        audit = Path(stack.config.settings().audit_log)
        seen = len(list(read_entries(audit))) if audit.exists() else 0
        r = _similar(stack, corpus["ids"]["query"])
        assert r.status_code == 200, r.text
        assert r.json()["similar"][0]["orthanc_study_id"] == corpus["ids"]["copy"]
        assert "patient_id" not in r.json()["similar"][0]
        entries = list(read_entries(audit))[seen:]
        assert [(e["who"], e["via"], e["action"], e["orthanc_study_id"]) for e in entries] == [
            ("admin", "rest", "lookup", corpus["ids"]["query"])]
        # After a lookup answered through Orthanc, FAISS is mapped in the query service only.
        assert "faiss" in _maps(stack.procs["query-scp"].pid)
        orthanc_maps = _maps(stack.procs["orthanc"].pid)
        assert "libOrthancPython" in orthanc_maps  # the plugin runs in this process
        assert "faiss" not in orthanc_maps.lower()

    def test_a_killed_query_service_gives_503_orthanc_serves_on_restart_brings_lookups_back(
            self, stack: Stack, corpus: dict) -> None:
        proc = stack.procs["query-scp"]
        try:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            r = _similar(stack, corpus["ids"]["query"])
            assert r.status_code == 503, r.text
            assert r.headers["Content-Type"] == "application/json"
            assert "query service is not answering" in r.json()["error"]
            assert "lookalike query-scp" in r.json()["reason"] and "not running" in r.json()["reason"]
            assert stack.crashed() == ["query-scp"]  # what `lookalike run` restarts
            http, url = stack.http(), stack.config.orthanc_url
            assert http.get(f"{url}/system", timeout=10).ok and http.get(f"{url}/studies", timeout=10).ok
            status = http.get(f"{url}/lookalike/status", timeout=30).json()
            assert status["query_service"]["answering"] is False and status["indexed"]
            log = wait_for(lambda: "answered 503" in _orthanc_log(stack) and _orthanc_log(stack), timeout=10,
                           what="the 503 in Orthanc's log")
            assert "did not answer" in log
        finally:
            stack.restart("query-scp")
        r = _similar(stack, corpus["ids"]["query"])
        assert r.status_code == 200, r.text
        assert r.json()["similar"][0]["orthanc_study_id"] == corpus["ids"]["copy"]
        assert _answering(stack)

    def test_a_stuck_query_service_gives_503_without_holding_orthanc(self, stack: Stack, corpus: dict) -> None:
        pid = stack.procs["query-scp"].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            r = _similar(stack, corpus["ids"]["query"])
            assert r.status_code == 503 and "no answer within" in r.json()["reason"], r.text
            assert stack.http().get(f"{stack.config.orthanc_url}/system", timeout=10).ok
        finally:
            os.kill(pid, signal.SIGCONT)
        assert _similar(stack, corpus["ids"]["query"]).status_code == 200


def _orthanc_log(stack: Stack) -> str:
    return "".join(p.read_text(errors="replace") for p in stack.config.logs.glob("Orthanc*.log*"))
