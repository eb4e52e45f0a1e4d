"""The Key Object Selection of a patient's similar priors: what PS3.3 asks of a KOS that spans several studies
(every reference in the Current Requested Procedure Evidence Sequence, an identical copy in each study, all copies
listed in each other's Identical Documents Sequence), that no other patient's image is ever selected, and that the
documents filed from real stored instances pass dicom3tools' dciodvfy, as the SR does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import KeyObjectSelectionDocumentStorage, generate_uid

from lookalike.dicom.kos import DOCUMENT_TITLE, KOS_SERIES_DESCRIPTION, build_prior_selection
from lookalike.dicom.sr import SimilarCase
from lookalike.query.audit import AuditLog, read_entries
from lookalike.query.lookup_service import LocalLookups
from lookalike.index.store import IndexStore
from lookalike.orthanc.client import HttpOrthanc
from lookalike.plugin import rest
from lookalike.ops.stack import Stack
from tests.support import (REPO, Explorer, dciodvfy, make_study, noisy, require_tool, sample_pixels, sr_warnings_unexpected,
                           store_studies, us_instance)

PATIENT = "QUERY-PATIENT-42"


def prior_of(query: Dataset, rank: int, study_date: str, *, patient_id: str = PATIENT) -> tuple[SimilarCase, Dataset]:
    """A prior study's best-matching instance (with its pixels, as stored) and the answer entry that names it."""
    ds = us_instance(generate_uid(), generate_uid(), patient_id=patient_id)
    ds.StudyDate = study_date
    ds.AccessionNumber = f"PRIOR{rank:04d}"
    case = SimilarCase(rank=rank, score=0.95 - 0.05 * rank, study_instance_uid=ds.StudyInstanceUID,
                       study_date=study_date, modality="US", model_version="us-1",
                       series_instance_uid=ds.SeriesInstanceUID, sop_instance_uid=ds.SOPInstanceUID,
                       sop_class_uid=ds.SOPClassUID, query_sop_instance_uid=query.SOPInstanceUID)
    return case, ds


@pytest.fixture
def selection() -> dict:
    study = generate_uid()
    query = [us_instance(study, generate_uid()), us_instance(study, generate_uid())]
    priors, headers = zip(*(prior_of(query[0], rank, f"2023010{rank}") for rank in (1, 2)))
    return {"query": query, "priors": list(priors), "headers": list(headers)}


def build(selection: dict, **kwargs):
    kwargs.setdefault("algorithm_version", "0.1.0")
    return build_prior_selection(selection["query"], selection["priors"], selection["headers"], **kwargs)


def referenced(document: Dataset) -> list[str]:
    return [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in document.ContentSequence
            if item.ValueType in ("IMAGE", "COMPOSITE")]


def evidence(document: Dataset) -> dict[str, set[str]]:
    """Current Requested Procedure Evidence Sequence: SOP Instance UIDs by Study Instance UID."""
    return {study.StudyInstanceUID: {sop.ReferencedSOPInstanceUID for series in study.ReferencedSeriesSequence
                                     for sop in series.ReferencedSOPSequence}
            for study in document.CurrentRequestedProcedureEvidenceSequence}


def identical(document: Dataset) -> set[tuple[str, str, str]]:
    return {(study.StudyInstanceUID, series.SeriesInstanceUID, sop.ReferencedSOPInstanceUID)
            for study in document.IdenticalDocumentsSequence for series in study.ReferencedSeriesSequence
            for sop in series.ReferencedSOPSequence}


# --- What the standard asks of a KOS that spans several studies ------------------------------


def test_one_document_in_the_query_study_and_a_copy_in_each_prior(selection):
    documents = build(selection)

    studies = [d.StudyInstanceUID for d in documents]
    assert studies == [selection["query"][0].StudyInstanceUID, *(p.study_instance_uid for p in selection["priors"])]
    for document, header in zip(documents, [selection["query"][0], *selection["headers"]]):
        assert document.SOPClassUID == KeyObjectSelectionDocumentStorage and document.Modality == "KO"
        # Each copy is filed as its own study's: that study's date and accession number, the same patient.
        assert (str(document.StudyDate), document.AccessionNumber) == (str(header.StudyDate), header.AccessionNumber)
        assert document.PatientID == PATIENT
        assert document.SeriesDescription == KOS_SERIES_DESCRIPTION
    assert len({d.SOPInstanceUID for d in documents}) == len({d.SeriesInstanceUID for d in documents}) == 3


def test_copies_have_the_same_content_and_name_each_other(selection):
    documents = build(selection)

    for document in documents:
        others = {(d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPInstanceUID) for d in documents if d is not document}
        assert identical(document) == others
        assert document.ContentSequence == documents[0].ContentSequence
        assert (document.ContentDate, document.ContentTime) == (documents[0].ContentDate, documents[0].ContentTime)


def test_every_reference_is_in_the_current_evidence_whatever_its_study(selection):
    document = build(selection)[0]
    query, headers = selection["query"], selection["headers"]

    assert "PertinentOtherEvidenceSequence" not in document  # not part of the KOS IOD
    assert evidence(document) == {query[0].StudyInstanceUID: {query[0].SOPInstanceUID},
                                  **{h.StudyInstanceUID: {h.SOPInstanceUID} for h in headers}}


def test_the_matched_query_image_then_each_priors_best_match_in_rank_order(selection):
    document = build(selection)[0]

    assert referenced(document) == [selection["query"][0].SOPInstanceUID,
                                    *(p.sop_instance_uid for p in selection["priors"])]
    assert document.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    title = document.ConceptNameCodeSequence[0]
    assert (title.CodingSchemeDesignator, title.CodeValue) == (DOCUMENT_TITLE.scheme_designator, DOCUMENT_TITLE.value)
    [description] = [item.TextValue for item in document.ContentSequence
                     if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "113012"]
    assert "#1: study of 2023-01-01, US, score 0.9000" in description
    assert "#2: study of 2023-01-02, US, score 0.8500" in description


def test_given_uids_are_used(selection):
    uids = {d.StudyInstanceUID: (generate_uid(), generate_uid()) for d in build(selection)}

    documents = build(selection, document_uids=uids)

    assert {d.StudyInstanceUID: (d.SeriesInstanceUID, d.SOPInstanceUID) for d in documents} == uids


# --- Never another patient's images ---------------------------------------------------------------


def test_another_patients_study_is_refused(selection):
    case, header = prior_of(selection["query"][0], 3, "20220101", patient_id="OTHER-PATIENT-7731")
    selection["priors"].append(case)
    selection["headers"].append(header)

    with pytest.raises(ValueError, match="another patient's"):
        build(selection)


@pytest.mark.parametrize("date, time", [("20251117", "080000"), ("20240305", "101500"), ("20240305", "1630"),
                                        ("", "")])
def test_a_study_not_dated_before_the_query_is_no_prior(selection, date, time):
    """Issue 17 item 1: the query study is of 2024-03-05 10:15; a later study, one of the same moment or later
    that day, or an undated one is not a prior, and the key images of the patient's priors never show it."""
    case, header = prior_of(selection["query"][0], 3, date)
    header.StudyTime = time
    selection["priors"].append(case)
    selection["headers"].append(header)

    with pytest.raises(ValueError, match="not dated before"):
        build(selection)


def test_an_earlier_study_of_the_same_day_is_a_prior(selection):
    case, header = prior_of(selection["query"][0], 3, "20240305")
    header.StudyTime = "0815"
    selection["priors"].append(case)
    selection["headers"].append(header)

    assert len(build(selection)) == 4


def test_the_description_speaks_of_earlier_studies(selection):
    texts = [item.TextValue for item in build(selection)[0].ContentSequence if item.ValueType == "TEXT"]
    description = next(text for text in texts if "#1" in text)
    assert "earlier studies" in description and "prior stud" not in description


def test_the_same_patient_id_from_another_issuer_is_another_patient(selection):
    selection["headers"][1].IssuerOfPatientID = "OTHER-HOSPITAL"

    with pytest.raises(ValueError, match="another patient's"):
        build(selection)


def test_without_a_patient_id_nothing_is_selected(selection):
    for ds in (*selection["query"], *selection["headers"]):
        ds.PatientID = ""

    with pytest.raises(ValueError, match="no Patient ID"):
        build(selection)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda s: s["priors"].clear(), "at least one prior"),
    (lambda s: s["headers"].pop(), "no evidence"),
    (lambda s: setattr(s["headers"][0], "SeriesInstanceUID", generate_uid()), "SeriesInstanceUID"),
    (lambda s: s["priors"].reverse(), "rank"),
])
def test_inconsistent_input_is_refused(selection, mutate, message):
    mutate(selection)

    with pytest.raises(ValueError, match=message):
        build(selection)


# --- Conformance ----------------------------------------------------------------------------------


def test_every_copy_passes_dciodvfy_and_reads_back(selection, tmp_path):
    for i, document in enumerate(build(selection)):
        path = tmp_path / f"kos{i}.dcm"
        document.save_as(path, enforce_file_format=True)

        errors, warnings = dciodvfy(path, "KeyObjectSelectionDocument")

        assert errors == [] and warnings == []
        assert pydicom.dcmread(path).SOPInstanceUID == document.SOPInstanceUID


def test_dsrdump_reads_the_identical_documents(selection, tmp_path):
    path = tmp_path / "kos.dcm"
    build(selection)[0].save_as(path, enforce_file_format=True)

    result = subprocess.run([require_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "Key Object Selection Document" in result.stdout and "Identical Docs      : 2" in result.stdout
    assert result.stdout.count('IMAGE:(,,"Source")') == 3


def test_module_imports_neither_the_indexer_nor_torch():
    code = ("import sys, lookalike.dicom.kos; "
            "print(any(m == 'torch' or m.startswith(('lookalike.index', 'lookalike.worker', 'lookalike.query')) for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


# --- Filed from real stored instances ---------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(stack: Stack, tmp_path_factory) -> dict:
    """Patient A's study ``a``, two priors of A (a near copy of ``a`` and another image), and a near copy of ``a``
    from patient B that outranks A's second prior in the archive. Images flipped upside down, which no other
    module stores, so that other modules' studies do not compete."""
    tmp = tmp_path_factory.mktemp("kos")
    us = [np.ascontiguousarray(np.flipud(p)) for p in sample_pixels("US", 18)[15:]]
    made = {
        "a": make_study(us[0], "US", "PKOSA0001", tmp, "a", "20250301"),
        "prior_near": make_study(noisy(us[0], 51), "US", "PKOSA0001", tmp, "prior_near", "20240105"),
        # A's later near copy: the most similar of A's studies, and no prior of ``a`` (issue 17 item 1).
        "later": make_study(noisy(us[0], 53), "US", "PKOSA0001", tmp, "later", "20251117"),
        "prior_far": make_study(us[1], "US", "PKOSA0001", tmp, "prior_far", "20230105"),
        "b": make_study(noisy(us[0], 52), "US", "PKOSB0002", tmp, "b", "20240611"),
    }
    return store_studies(stack, made, "the KOS corpus")


@pytest.fixture(scope="module")
def api(stack: Stack) -> HttpOrthanc:
    return HttpOrthanc(stack.config.orthanc_url, "admin", stack.config.admin_password)


@pytest.fixture(scope="module")
def store(stack: Stack):
    with IndexStore(stack.config.settings().index_dir, readonly=True) as s:
        yield LocalLookups(s)


def stored(api: HttpOrthanc, instance: str, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(api.get_bytes(f"/instances/{instance}/file"))
    return path


@pytest.mark.stack
class TestFiledFromStoredInstances:
    def test_kos_lists_the_patients_priors_and_is_filed_in_each(self, api, store, corpus: dict, tmp_path) -> None:
        status, answer = rest.similar_kos(api, store, corpus["ids"]["a"], limit=10)

        assert status == 200, answer
        assert (answer["scope"], answer["similar"], answer["existing"]) == ("patient", 2, False)
        assert [d["study"] for d in answer["documents"]] == [corpus["ids"][n] for n in ("a", "prior_near",
                                                                                        "prior_far")]
        ds = corpus["ds"]
        for i, filed in enumerate(answer["documents"]):
            path = stored(api, filed["report"], tmp_path, f"kos{i}.dcm")
            kos = pydicom.dcmread(path)
            assert kos.StudyInstanceUID == filed["study_instance_uid"] and kos.PatientID == "PKOSA0001"
            assert set(evidence(kos)) == {ds[n].StudyInstanceUID for n in ("a", "prior_near", "prior_far")}
            assert referenced(kos)[1:] == [ds["prior_near"].SOPInstanceUID, ds["prior_far"].SOPInstanceUID]
            assert ds["b"].SOPInstanceUID not in referenced(kos)
            assert b"PKOSB0002" not in path.read_bytes()
            errors, warnings = dciodvfy(path, "KeyObjectSelectionDocument")
            assert errors == [] and warnings == []
        series = json.loads(api.get_bytes(f"/series/{answer['series']}"))
        assert series["ParentStudy"] == corpus["ids"]["a"]
        assert series["MainDicomTags"]["Modality"] == "KO" and answer["series_date"]

    def test_asking_again_returns_the_documents_filed_before(self, api, store, corpus: dict) -> None:
        _, first = rest.similar_kos(api, store, corpus["ids"]["a"], limit=1)
        _, again = rest.similar_kos(api, store, corpus["ids"]["a"], limit=1)

        assert first["existing"] is False and again["existing"] is True
        assert again["documents"] == first["documents"] and len(first["documents"]) == 2

    def test_the_lookup_is_in_the_audit_trail(self, api, store, corpus: dict, tmp_path) -> None:
        audit = AuditLog(tmp_path / "audit.jsonl")

        _, answer = rest.similar_kos(api, LocalLookups(store.store, audit), corpus["ids"]["a"], limit=1, who="reader")

        [entry] = read_entries(tmp_path / "audit.jsonl")
        assert (entry["who"], entry["via"], entry["action"], entry["scope"]) == ("reader", "rest", "kos", "patient")
        assert entry["study"] == corpus["ds"]["a"].StudyInstanceUID
        assert entry["results"] == [corpus["ds"]["prior_near"].StudyInstanceUID] and answer["similar"] == 1

    def test_a_patient_without_priors_gets_no_document(self, api, store, corpus: dict) -> None:
        series_before = json.loads(api.get_bytes(f"/studies/{corpus['ids']['b']}"))["Series"]

        status, answer = rest.similar_kos(api, store, corpus["ids"]["b"], limit=10)

        assert status == 200 and (answer["similar"], answer["documents"], answer["report"]) == (0, [], None)
        assert json.loads(api.get_bytes(f"/studies/{corpus['ids']['b']}"))["Series"] == series_before

    def test_the_sr_filed_from_stored_instances_passes_dciodvfy(self, api, store, corpus: dict, tmp_path) -> None:
        status, answer = rest.similar_report(api, store, corpus["ids"]["a"], limit=3)
        assert status == 200 and answer["similar"] == 3

        errors, warnings = dciodvfy(stored(api, answer["report"], tmp_path, "sr.dcm"), "ComprehensiveSR")

        assert errors == []
        assert sr_warnings_unexpected(warnings) == []

    def test_the_route_takes_a_limit_and_refuses_another_scope(self, stack: Stack, corpus: dict) -> None:
        url = f"{stack.config.orthanc_url}/lookalike/studies/{corpus['ids']['prior_near']}/similar-kos"

        r = stack.http().post(url, json={"limit": 1}, timeout=60)

        assert r.status_code == 200, r.text
        assert (r.json()["similar"], len(r.json()["documents"])) == (1, 2)
        for body in ({"scope": "archive"}, {"limit": 0}, {"limt": 1}):
            assert stack.http().post(url, json=body, timeout=60).status_code == 400, body
        assert stack.http().get(url, timeout=60).status_code == 405


@pytest.mark.stack
class TestExplorerButton:
    """The key images button of the Explorer panel, clicked as a user does (see tests/test_explorer_browser.py)."""

    def test_files_the_priors_into_the_study_on_screen(self, page, stack: Stack, corpus: dict) -> None:
        explorer = Explorer(page, stack, corpus)
        explorer.open("a")

        page.click("#lookalike-kos")
        link = page.wait_for_selector(".lookalike-report-link")

        said = page.inner_text("#lookalike-status")
        assert "of 2 similar earlier studies filed into" in said or said.startswith("Already filed on"), said
        assert "a copy in each of the 2 earlier studies" in said
        series = stack.http().get(f"{stack.config.orthanc_url}/{link.get_attribute('href').split('#')[1]}"
                                  .replace("series?uuid=", "series/"), timeout=10).json()
        assert series["ParentStudy"] == corpus["ids"]["a"] and series["MainDicomTags"]["Modality"] == "KO"

    def test_a_patient_without_priors_is_told_so(self, page, stack: Stack, corpus: dict) -> None:
        explorer = Explorer(page, stack, corpus)
        explorer.open("b")

        page.click("#lookalike-kos")
        page.wait_for_function("$('#lookalike-status').text().indexOf('No similar earlier study of this patient') >= 0")

        assert page.query_selector(".lookalike-report-link") is None
