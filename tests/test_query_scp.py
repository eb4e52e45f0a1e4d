"""The DICOM query endpoint end to end: DCMTK's findscu, movescu and echoscu against ``LOOKALIKE``, with a real
Orthanc, Redis and Celery worker behind it, and a second real Orthanc playing the radiologist's workstation."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
import struct
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove, Verification

from lookalike.config import Settings
from lookalike.lab.samples import wrap_image
from lookalike.query.audit import read_entries
from lookalike.query.query_scp import (
    IDENTIFIER_DOES_NOT_MATCH,
    MOVE_DESTINATION_UNKNOWN,
    ORTHANC_FAILED,
    UNKNOWN_STUDY,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    RANK,
    SIMILARITY,
    FindRequest,
    QueryEndpoint,
    QueryRefused,
    calling_allowed,
    parse_date_range,
)
from lookalike.ops.stack import ORTHANC_AET, Stack, StackConfig, dcmtk_env, free_port, storescu
from tests.support import dimse_failure, findscu, indexed_total, log_lines, log_records, make_study, noisy, orthanc_study_id, sample_pixels, wait_for

pytestmark = pytest.mark.stack

QUERY_PATIENT = "PQSCP0001"
OTHER_PATIENT = "PCSCP0002"
#: What identifies the other patients of the corpus: none of it may appear in a default answer.
OTHER_IDENTITY = ("PCSCP0002", "TEST^PCSCP0002", "PMXSCP0003", "TEST^PMXSCP0003", "CSCP0002", "MXSCP0003")


def _private(ds: pydicom.Dataset, offset: int) -> str:
    value = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[offset].value
    return value.decode().strip("\x00 ") if isinstance(value, bytes) else str(value)


RETURN_KEYS = ("StudyDate", "StudyTime", "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "StudyDescription",
               "PatientID", "PatientName", "PatientBirthDate", "AccessionNumber")


@pytest.fixture(scope="module")
def cases(stack: Stack, tmp_path_factory) -> dict:
    """The study on screen (US), a noisy near copy of it from another patient, a prior of the same patient, and a
    third patient's study holding a US and a DX series; images of the samples no other test module stores."""
    tmp = tmp_path_factory.mktemp("scp")
    us = sample_pixels("US", 18)[15:]
    dx = sample_pixels("DX", 18)[17]
    files, ds = {}, {}
    files["query"], ds["query"] = make_study(us[0], "US", QUERY_PATIENT, tmp, "query", "20250301")
    files["copy"], ds["copy"] = make_study(noisy(us[0], 31), "US", OTHER_PATIENT, tmp, "copy", "20240611")
    files["prior"], ds["prior"] = make_study(us[1], "US", QUERY_PATIENT, tmp, "prior", "20230105")
    uid = pydicom.uid.generate_uid()
    for name, pixels, modality, number in (("mixed_us", noisy(us[2], 32), "US", 1), ("mixed_dx", dx, "DX", 2)):
        d = wrap_image(
            pixels.astype(np.uint8), modality, patient_id="PMXSCP0003", patient_name="TEST^PMXSCP0003",
            patient_birth_date="19600101", patient_sex="M", study_instance_uid=uid, study_date="20240920",
            study_time="091500", accession_number="MXSCP0003", study_description="mixed", series_number=number,
        )
        files[name], ds[name] = tmp / f"{name}.dcm", d
        d.save_as(files[name], enforce_file_format=True)
    before = indexed_total(stack)
    result = storescu(stack.config, list(files.values()))
    assert result.returncode == 0, result.stderr
    wait_for(lambda: indexed_total(stack) >= before + len(files), timeout=180, what="indexing of the SCP corpus")
    return {"files": files, "ds": ds, "tmp": tmp}


class TestFind:
    def test_near_copy_from_another_patient_answers_first(self, stack: Stack, cases: dict, tmp_path: Path) -> None:
        query = cases["ds"]["query"]
        result, answers = findscu(stack, tmp_path, f"StudyInstanceUID={query.StudyInstanceUID}",
                                  *(f"{k}" for k in RETURN_KEYS))
        assert result.returncode == 0, result.stderr
        assert answers, result.stderr
        first = answers[0]
        assert first.StudyInstanceUID == cases["ds"]["copy"].StudyInstanceUID
        assert first.StudyDate == "20240611" and first.ModalitiesInStudy == "US"
        assert int(first.NumberOfStudyRelatedInstances) == 1
        assert first.RetrieveAETitle == "LOOKALIKE"
        ranks = [int(_private(a, RANK)) for a in answers]
        scores = [float(_private(a, SIMILARITY)) for a in answers]
        assert ranks == list(range(1, len(answers) + 1))
        assert scores == sorted(scores, reverse=True) and scores[0] > scores[1] + 0.1  # the copy stands apart
        assert first.StudyDescription.startswith(f"#1 sim {scores[0]:.4f}")
        assert query.StudyInstanceUID not in {a.StudyInstanceUID for a in answers}
        assert len(answers) <= stack.config.settings().query_max_results

    def test_patient_root_answers_the_same(self, stack: Stack, cases: dict, tmp_path: Path) -> None:
        uid = cases["ds"]["query"].StudyInstanceUID
        _, study_root = findscu(stack, tmp_path / "s", f"StudyInstanceUID={uid}")
        result, patient_root = findscu(stack, tmp_path / "p", f"StudyInstanceUID={uid}", "PatientID", model="-P")
        assert result.returncode == 0, result.stderr
        assert [a.StudyInstanceUID for a in patient_root] == [a.StudyInstanceUID for a in study_root]

    def test_no_other_patients_identity_in_any_answer(self, stack: Stack, cases: dict, tmp_path: Path) -> None:
        result, answers = findscu(stack, tmp_path, f"StudyInstanceUID={cases['ds']['query'].StudyInstanceUID}",
                                  *RETURN_KEYS, "IssuerOfPatientID", "ReferringPhysicianName", "StudyID")
        assert result.returncode == 0, result.stderr
        others = [a for a in answers if a.StudyInstanceUID != cases["ds"]["prior"].StudyInstanceUID]
        assert any(a.StudyInstanceUID == cases["ds"]["copy"].StudyInstanceUID for a in others)
        for answer in others:
            for keyword in ("PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "StudyID"):
                assert keyword in answer and not answer[keyword].value, (keyword, answer[keyword].value)
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("rsp*.dcm"))
        for secret in OTHER_IDENTITY:
            assert secret.encode() not in raw, secret

    def test_patient_id_answers_that_patients_priors_only(self, stack: Stack, cases: dict, tmp_path: Path) -> None:
        uid = cases["ds"]["query"].StudyInstanceUID
        result, answers = findscu(stack, tmp_path / "own", f"StudyInstanceUID={uid}", f"PatientID={QUERY_PATIENT}",
                                  "PatientName", "StudyDate")
        assert result.returncode == 0, result.stderr
        assert [a.StudyInstanceUID for a in answers] == [cases["ds"]["prior"].StudyInstanceUID]
        assert answers[0].PatientID == QUERY_PATIENT and answers[0].PatientName == f"TEST^{QUERY_PATIENT}"
        _, none = findscu(stack, tmp_path / "other", f"StudyInstanceUID={uid}", f"PatientID={OTHER_PATIENT}")
        assert none == []

    def test_study_date_range_and_modalities_narrow_the_answer(self, stack: Stack, cases: dict, tmp_path: Path) -> None:
        uid = cases["ds"]["query"].StudyInstanceUID
        _, in_2024 = findscu(stack, tmp_path / "date", f"StudyInstanceUID={uid}", "StudyDate=20240101-20241231")
        dates = [a.StudyDate for a in in_2024]
        assert all("20240101" <= d <= "20241231" for d in dates), dates
        found = {a.StudyInstanceUID for a in in_2024}
        assert cases["ds"]["copy"].StudyInstanceUID in found and cases["ds"]["prior"].StudyInstanceUID not in found
        _, on_the_day = findscu(stack, tmp_path / "day", f"StudyInstanceUID={uid}", "StudyDate=20240920")
        assert cases["ds"]["mixed_us"].StudyInstanceUID in {a.StudyInstanceUID for a in on_the_day}
        assert {a.StudyDate for a in on_the_day} == {"20240920"}

        _, with_dx = findscu(stack, tmp_path / "dx", f"StudyInstanceUID={uid}", "ModalitiesInStudy=DX\\CR",
                               "NumberOfStudyRelatedInstances")
        assert cases["ds"]["mixed_us"].StudyInstanceUID in {a.StudyInstanceUID for a in with_dx}
        for answer in with_dx:
            assert "DX" in answer.ModalitiesInStudy or "CR" in answer.ModalitiesInStudy, answer.ModalitiesInStudy
        mixed = next(a for a in with_dx if a.StudyInstanceUID == cases["ds"]["mixed_us"].StudyInstanceUID)
        assert list(mixed.ModalitiesInStudy) == ["DX", "US"] and int(mixed.NumberOfStudyRelatedInstances) == 2

    def test_unknown_study_and_wrong_level_fail_with_a_reason(self, stack: Stack, cases: dict, tmp_path: Path) -> None:
        result, answers = findscu(stack, tmp_path / "unknown", "StudyInstanceUID=1.2.3.4.5.6.7.8.9", log="-d")
        status, unknown = dimse_failure(result.stderr)
        assert answers == [] and status == UNKNOWN_STUDY and "StudyInstanceUID" in unknown
        result, answers = findscu(stack, tmp_path / "wild", "StudyInstanceUID=*", log="-d")
        status, wild = dimse_failure(result.stderr)
        assert answers == [] and status == IDENTIFIER_DOES_NOT_MATCH and "StudyInstanceUID" in wild
        assert wild != unknown  # each failure says what is wrong with its own request

    def test_each_lookup_is_audited_with_its_caller_and_answers(self, stack: Stack, cases: dict, tmp_path: Path) -> None:
        uid = cases["ds"]["query"].StudyInstanceUID
        _, answers = findscu(stack, tmp_path, f"StudyInstanceUID={uid}", f"PatientID={QUERY_PATIENT}")
        audit = Path(stack.config.settings().audit_log)
        entry = [json.loads(line) for line in audit.read_text().splitlines()][-1]
        assert (entry["who"], entry["via"], entry["host"], entry["action"]) == ("FINDSCU", "dicom", "127.0.0.1", "lookup")
        assert entry["study"] == uid and entry["scope"] == "patient"
        assert entry["results"] == [a.StudyInstanceUID for a in answers]
        assert entry["details"]["patient_id"] == QUERY_PATIENT  # the matching key that made the scope "patient"
        assert audit.stat().st_mode & 0o077 == 0

    def test_a_refused_query_is_audited_with_its_keys_but_no_patient_name(self, tmp_path: Path) -> None:
        with _bare_endpoint(tmp_path) as endpoint:
            result, answers = findscu(None, tmp_path / "rsp", "StudyInstanceUID=*", f"PatientID={QUERY_PATIENT}",
                                      "PatientName=TEST^SECRETNAME", port=endpoint.settings.query_port, log="-d")
        assert answers == [] and dimse_failure(result.stderr)[0] == IDENTIFIER_DOES_NOT_MATCH
        [entry] = read_entries(endpoint.settings.audit_log)
        assert (entry["who"], entry["host"], entry["action"], entry["outcome"]) == (
            "FINDSCU", "127.0.0.1", "lookup", "refused")
        assert entry["reason"] and entry["details"]["patient_id"] == QUERY_PATIENT
        assert "SECRETNAME" not in Path(endpoint.settings.audit_log).read_text()


class TestEcho:
    def test_echo(self, stack: Stack) -> None:
        argv = ["echoscu", "-aet", "FINDSCU", "-aec", "LOOKALIKE", "127.0.0.1", str(stack.config.query_port)]
        assert subprocess.run(argv, env=dcmtk_env(), capture_output=True, timeout=30).returncode == 0


class TestAssociation:
    def test_unknown_calling_ae_is_refused_and_the_reason_logged(self, stack: Stack, cases: dict, tmp_path: Path) -> None:
        log_file = stack.config.logs / "query-scp.log"
        seen = len(log_file.read_text())
        result, answers = findscu(stack, tmp_path, f"StudyInstanceUID={cases['ds']['query'].StudyInstanceUID}",
                                  aet="INTRUDER")
        assert result.returncode != 0 and answers == []
        assert "Calling AE Title Not Recognized" in result.stderr + result.stdout
        # One warning naming the caller, its address and the setting that would admit it.
        said = wait_for(lambda: log_lines(log_file.read_text()[seen:], "WARNING", "INTRUDER", "127.0.0.1"),
                        timeout=10, what="the rejection in query-scp.log")
        assert len(said) == 1 and "query_allowed" in said[0]

    def test_known_ae_from_another_host_is_refused(self, stack: Stack, tmp_path: Path, caplog) -> None:
        with _endpoint(stack, tmp_path, query_allowed={"FINDSCU": ["10.1.2.3"]}) as port:
            argv = ["echoscu", "-aet", "FINDSCU", "-aec", "LOOKALIKE", "127.0.0.1", str(port)]
            result = subprocess.run(argv, env=dcmtk_env(), capture_output=True, text=True, timeout=30)
        assert result.returncode != 0 and "Calling AE Title Not Recognized" in result.stderr
        # One warning naming the caller, the address it called from and the one it may call from.
        assert len(log_records(caplog.records, logging.WARNING, "FINDSCU", "127.0.0.1", "10.1.2.3")) == 1

    def test_wrong_called_ae_title_is_refused(self, stack: Stack) -> None:
        argv = ["echoscu", "-aet", "FINDSCU", "-aec", "NOTLOOKALIKE", "127.0.0.1", str(stack.config.query_port)]
        assert subprocess.run(argv, env=dcmtk_env(), capture_output=True, timeout=30).returncode != 0

    def test_half_open_connections_neither_lock_out_a_workstation_nor_stay_open(self, tmp_path: Path) -> None:
        with _bare_endpoint(tmp_path, query_timeout=10.0, query_max_associations=2) as endpoint:
            port = endpoint.settings.query_port
            half_open = [_half_open(port) for _ in range(12)]
            wait_for(lambda: len(endpoint.server.active_associations) >= len(half_open),
                     what="the half-open connections to be accepted by the server")
            assert _echo(port).returncode == 0  # a workstation that is allowed gets in meanwhile
            assert [_closed_by_peer(sock, wait=120) for sock in half_open] == [True] * len(half_open)

    def test_accepted_associations_beyond_the_limit_are_refused_and_audited(self, tmp_path: Path) -> None:
        with _bare_endpoint(tmp_path, query_max_associations=2) as endpoint:
            scu = AE(ae_title="FINDSCU")
            scu.add_requested_context(Verification)
            port = endpoint.settings.query_port
            held = [scu.associate("127.0.0.1", port, ae_title="LOOKALIKE") for _ in range(2)]
            try:
                assert all(a.is_established for a in held)
                extra = scu.associate("127.0.0.1", port, ae_title="LOOKALIKE")
                assert extra.is_rejected
                held[0].release()
                again = wait_for(lambda: _established(scu, port), what="a slot freed by the release")
                again.release()
            finally:
                for assoc in held:
                    if assoc.is_established:
                        assoc.release()
            intruder = _echo(port, aet="INTRUDER")
        assert intruder.returncode != 0
        refused = [e for e in read_entries(endpoint.settings.audit_log) if e["action"] == "associate"]
        assert [(e["who"], e["host"], e["outcome"]) for e in refused] == [
            ("FINDSCU", "127.0.0.1", "refused"), ("INTRUDER", "127.0.0.1", "refused")]
        assert all(e["reason"] for e in refused) and refused[0]["reason"] != refused[1]["reason"]


def _established(scu: AE, port: int):
    """An association of ``scu`` with the endpoint if one is accepted now, else None (a rejected one is let go)."""
    assoc = scu.associate("127.0.0.1", port, ae_title="LOOKALIKE")
    return assoc if assoc.is_established else None


def _echo(port: int, aet: str = "FINDSCU") -> subprocess.CompletedProcess:
    argv = ["echoscu", "-aet", aet, "-aec", "LOOKALIKE", "127.0.0.1", str(port)]
    return subprocess.run(argv, env=dcmtk_env(), capture_output=True, text=True, timeout=60)


def _half_open(port: int) -> socket.socket:
    """A connection whose A-ASSOCIATE-RQ header announces 1030 bytes, of which it sends 60 and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(struct.pack(">BBL", 0x01, 0x00, 1024) + bytes(54))
    return sock


def _closed_by_peer(sock: socket.socket, wait: float) -> bool:
    """Whether the endpoint closes ``sock`` within ``wait`` seconds (it sends nothing before that)."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


@contextlib.contextmanager
def _bare_endpoint(tmp_path: Path, **overrides: object) -> Iterator[QueryEndpoint]:
    """An endpoint on an empty index with no Orthanc behind it: enough for associations and refused requests."""
    settings = dataclasses.replace(
        Settings(), index_dir=str(tmp_path / "index"), audit_log=str(tmp_path / "audit.jsonl"),
        lookup_socket=str(tmp_path / "lookup.sock"), lookup_secret="test-secret", query_host="127.0.0.1",
        query_port=free_port(), query_allowed={"FINDSCU": ["127.0.0.1"]}, **overrides)
    endpoint = QueryEndpoint(settings)
    endpoint.start()
    try:
        yield endpoint
    finally:
        endpoint.stop()


class TestSettings:
    """An endpoint of its own in this process, on the same Orthanc and index, with other settings."""

    def test_a_site_that_discloses_other_patients_gets_their_identity(self, stack: Stack, cases: dict, tmp_path: Path) -> None:
        uid = cases["ds"]["query"].StudyInstanceUID
        with _endpoint(stack, tmp_path, disclose_other_patients=True, query_score_in_description=False,
                       query_max_results=2) as port:
            result, answers = findscu(stack, tmp_path, f"StudyInstanceUID={uid}", "PatientID", "PatientName",
                                      "StudyDescription", port=port)
        assert result.returncode == 0, result.stderr
        assert len(answers) == 2 and answers[0].StudyInstanceUID == cases["ds"]["copy"].StudyInstanceUID
        assert answers[0].PatientID == OTHER_PATIENT and answers[0].PatientName == f"TEST^{OTHER_PATIENT}"
        assert answers[0].StudyDescription == "test US"  # as stored: no rank and score in front


@contextlib.contextmanager
def _endpoint(stack: Stack, tmp_path: Path, **overrides: object) -> Iterator[int]:
    settings = dataclasses.replace(stack.config.settings(), query_port=free_port(),
                                   audit_log=str(tmp_path / "audit.jsonl"),
                                   lookup_socket=str(tmp_path / "lookup.sock"), **overrides)
    endpoint = QueryEndpoint(settings)
    endpoint.start()
    try:
        yield settings.query_port
    finally:
        endpoint.stop()


@pytest.fixture(scope="module")
def workstation(stack: Stack, tmp_path_factory) -> Stack:
    """A second, plain Orthanc (AE WORKSTATION) that accepts C-STORE from the archive; known to the archive."""
    config = StackConfig.create(
        tmp_path_factory.mktemp("workstation"), with_plugin=False,
        extra_orthanc={"DicomAet": "WORKSTATION",
                       "DicomModalities": {"archive": [ORTHANC_AET, "127.0.0.1", stack.config.dicom_port]}},
    )
    with Stack(config, worker=False) as ws:
        r = stack.http().put(f"{stack.config.orthanc_url}/modalities/workstation", timeout=10,
                             json={"AET": "WORKSTATION", "Host": "127.0.0.1", "Port": config.dicom_port})
        assert r.ok, r.text
        yield ws


def movescu(stack: Stack, destination: str, level: str, key: str) -> subprocess.CompletedProcess:
    argv = ["movescu", "-S", "-aet", "MOVESCU", "-aec", "LOOKALIKE", "-aem", destination,
            "-k", f"QueryRetrieveLevel={level}", "-k", key, "127.0.0.1", str(stack.config.query_port)]
    return subprocess.run(argv, env=dcmtk_env(), capture_output=True, text=True, timeout=120)


def _has(ws: Stack, uid: str) -> bool:
    return bool(ws.http().post(f"{ws.config.orthanc_url}/tools/lookup", data=uid, timeout=10).json())


class TestMove:
    def test_move_delivers_the_result_study_to_the_workstation(self, stack: Stack, cases: dict, workstation: Stack) -> None:
        uid = cases["ds"]["copy"].StudyInstanceUID
        assert not _has(workstation, uid)
        result = movescu(stack, "WORKSTATION", "STUDY", f"StudyInstanceUID={uid}")
        assert result.returncode == 0, result.stderr
        assert _has(workstation, uid)
        sop = cases["ds"]["copy"].SOPInstanceUID
        found = workstation.http().post(f"{workstation.config.orthanc_url}/tools/lookup", data=sop, timeout=10).json()
        assert [x["Type"] for x in found] == ["Instance"]
        requested, outcome = [json.loads(line) for line in
                              Path(stack.config.settings().audit_log).read_text().splitlines()[-2:]]
        for entry in (requested, outcome):
            assert (entry["action"], entry["who"], entry["results"]) == ("retrieve", "MOVESCU", [uid])
            assert entry["details"]["destination"] == "WORKSTATION"
        assert (requested["outcome"], outcome["outcome"], outcome["details"]["sent"]) == ("requested", "sent", 1)

    def test_move_of_the_report_filed_into_the_study_on_screen(self, stack: Stack, cases: dict, workstation: Stack) -> None:
        http, url = stack.http(), stack.config.orthanc_url
        query = orthanc_study_id(stack, cases["ds"]["query"])
        r = http.post(f"{url}/lookalike/studies/{query}/similar-report", json={}, timeout=60)
        assert r.status_code == 200, r.text
        sop = http.get(f"{url}/instances/{r.json()['report']}", timeout=10).json()["MainDicomTags"]["SOPInstanceUID"]
        result = movescu(stack, "WORKSTATION", "IMAGE", f"SOPInstanceUID={sop}")
        assert result.returncode == 0, result.stderr
        assert _has(workstation, sop)

    def test_a_failed_move_names_its_reason_without_a_traceback(self, stack: Stack, cases: dict,
                                                                 workstation: Stack) -> None:
        dead_port = free_port()  # nothing listens there: the destination cannot be reached
        r = stack.http().put(f"{stack.config.orthanc_url}/modalities/deadws", timeout=10,
                             json={"AET": "DEADWS", "Host": "127.0.0.1", "Port": dead_port})
        assert r.ok, r.text
        log_file = stack.config.logs / "query-scp.log"
        log_before = len(log_file.read_text())
        uid = cases["ds"]["copy"].StudyInstanceUID
        unreachable = _move_status(stack, "DEADWS", uid)
        unknown = _move_status(stack, "WORKSTATION", "1.2.3.4.5.6.7.8.9")
        nowhere = _move_status(stack, "NOWHERE", uid)
        assert (unreachable.Status, unknown.Status, nowhere.Status) == (
            ORTHANC_FAILED, UNKNOWN_STUDY, MOVE_DESTINATION_UNKNOWN)
        assert "DEADWS" in unreachable.ErrorComment and "NOWHERE" in nowhere.ErrorComment
        assert unknown.ErrorComment and "study" in unknown.ErrorComment
        assert "Traceback" not in log_file.read_text()[log_before:]
        entries = list(read_entries(stack.config.settings().audit_log))
        sent = [e for e in entries if e["action"] == "retrieve" and e["details"].get("destination") == "DEADWS"]
        assert [e["outcome"] for e in sent[-2:]] == ["requested", "failed"] and sent[-1]["reason"]
        assert [e["outcome"] for e in entries[-2:]] == ["refused", "refused"]  # the unknown study, the unknown AE

    def test_unknown_destination_is_refused(self, stack: Stack, cases: dict, workstation: Stack) -> None:
        result = movescu(stack, "NOWHERE", "STUDY", f"StudyInstanceUID={cases['ds']['prior'].StudyInstanceUID}")
        assert result.returncode != 0 and "Refused: MoveDestinationUnknown" in result.stderr, result.stderr
        assert not _has(workstation, cases["ds"]["prior"].StudyInstanceUID)


def _move_status(stack: Stack, destination: str, study_uid: str) -> pydicom.Dataset:
    """The final status of a STUDY-level C-MOVE sent with pynetdicom, with its ErrorComment if any."""
    scu = AE(ae_title="MOVESCU")
    scu.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = scu.associate("127.0.0.1", stack.config.query_port, ae_title="LOOKALIKE")
    assert assoc.is_established
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel, identifier.StudyInstanceUID = "STUDY", study_uid
    try:
        statuses = [status for status, _ in assoc.send_c_move(identifier, destination,
                                                               StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()
    return statuses[-1]


class TestIdentifier:
    """The identifier's reading, which needs no network."""

    def test_date_ranges(self) -> None:
        assert parse_date_range("") is None and parse_date_range("*") is None
        assert parse_date_range("20240105") == ("20240105", "20240105")
        assert parse_date_range("20240105-") == ("20240105", "99999999")
        assert parse_date_range("-20240105") == ("00000000", "20240105")
        assert parse_date_range("20240101-20241231") == ("20240101", "20241231")
        with pytest.raises(QueryRefused) as refused:
            parse_date_range("2024")
        assert refused.value.status == IDENTIFIER_DOES_NOT_MATCH

    def test_patient_id_makes_the_scope_patient(self) -> None:
        ds = pydicom.Dataset()
        ds.QueryRetrieveLevel, ds.StudyInstanceUID, ds.PatientID, ds.ModalitiesInStudy = "STUDY", "1.2.3", "", ["US", "DX"]
        request = FindRequest.from_identifier(ds)
        assert request.scope == "archive" and request.modalities == {"US", "DX"} and request.narrowed
        ds.PatientID = "P1"
        assert FindRequest.from_identifier(ds).scope == "patient"
        ds.QueryRetrieveLevel = "SERIES"
        with pytest.raises(QueryRefused, match="STUDY"):
            FindRequest.from_identifier(ds)

    def test_calling_hosts(self) -> None:
        allowed = {"WS1": ["10.0.0.5"], "WS2": ["*"]}
        assert calling_allowed(allowed, "WS1", "10.0.0.5") and not calling_allowed(allowed, "WS1", "10.0.0.6")
        assert calling_allowed(allowed, "WS2 ", "192.168.1.1") and not calling_allowed(allowed, "FINDSCU", "10.0.0.5")
