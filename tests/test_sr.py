"""The similar-cases Comprehensive SR: content, privacy, validation and conformance.

Conformance is checked with two independent tools, DCMTK's ``dsrdump`` (parses the
SR content tree) and dicom3tools' ``dciodvfy`` (checks the IOD), because highdicom
building a document without complaint does not mean a PACS or viewer will accept it.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    UltrasoundImageStorage,
    generate_uid,
)

from lookalike.dicom.sr import (
    CODES,
    CODING_SCHEME_DESIGNATOR,
    MANUFACTURER,
    SR_SERIES_DESCRIPTION,
    SimilarCase,
    build_similarity_report,
    is_lookalike_document,
)
from tests.support import REPO, dciodvfy, require_tool, sr_warnings_unexpected, us_instance

OTHER_PATIENT_ID = "OTHER-PATIENT-7731"
MODEL_VERSION = "us-vaediff-1-3f2a9c1b"
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"


@pytest.fixture
def evidence() -> list[Dataset]:
    study_uid, series_uid = generate_uid(), generate_uid()
    return [us_instance(study_uid, series_uid), us_instance(study_uid, series_uid)]


def make_matches(
    n: int, query_sop_instance_uid: str, *, sop_class_uid: str = UltrasoundImageStorage
) -> list[SimilarCase]:
    """Answers as the REST route serves them where a site discloses other patients, read as the report reads them."""
    matches = []
    for i in range(n):
        score = 0.93 - 0.07 * i + 1.23456e-5  # more decimals than a reader needs
        answer = {
            "rank": i + 1, "study_instance_uid": generate_uid(), "orthanc_study_id": f"orthanc-study-{i}",
            "patient_id": OTHER_PATIENT_ID, "study_date": f"2023010{i + 1}", "modality": "US", "score": score,
            "model_version": MODEL_VERSION, "same_patient": False,
            "best_match": {
                "sop_instance_uid": generate_uid(), "sop_class_uid": sop_class_uid,
                "series_instance_uid": generate_uid(), "orthanc_instance_id": f"orthanc-instance-{i}",
                "query_sop_instance_uid": query_sop_instance_uid, "score": score,
            },
        }
        matches.append(SimilarCase.from_answer(answer))
    return matches


def build(evidence: list[Dataset], matches: list[SimilarCase], **kwargs) -> highdicom.sr.ComprehensiveSR:
    kwargs.setdefault("algorithm_version", "0.1.0")
    kwargs.setdefault("model_version", MODEL_VERSION)
    return build_similarity_report(evidence, matches, **kwargs)


def concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return (code.CodingSchemeDesignator, code.CodeValue)


def key(code: highdicom.sr.CodedConcept) -> tuple[str, str]:
    return (code.scheme_designator, code.value)


def children_by_concept(container: Dataset) -> dict[tuple[str, str], Dataset]:
    """Children of a container by concept name; similar-case containers (repeated) are left out."""
    found: dict[tuple[str, str], Dataset] = {}
    for item in container.ContentSequence:
        if concept(item) == key(CODES.SIMILAR_CASE):
            continue
        assert concept(item) not in found, f"concept {concept(item)} appears twice in one container"
        found[concept(item)] = item
    return found


def similar_case_containers(sr: Dataset) -> list[Dataset]:
    return [
        item
        for item in sr.ContentSequence
        if item.ValueType == "CONTAINER" and concept(item) == key(CODES.SIMILAR_CASE)
    ]


def num_value(item: Dataset) -> float:
    assert item.ValueType == "NUM"
    return float(item.MeasuredValueSequence[0].NumericValue)


def save(sr: Dataset, tmp_path: Path, name: str = "sr.dcm") -> Path:
    path = tmp_path / name
    sr.save_as(path, enforce_file_format=True)
    return path


# --- Header: filed with the query study, in a series of its own ---------------------------


def test_inherits_query_patient_and_study_in_a_new_series(evidence):
    matches = make_matches(3, evidence[0].SOPInstanceUID)
    sr = build(evidence, matches, series_number=9902, instance_number=3, institution_name="General Hospital")

    assert sr.SOPClassUID == ComprehensiveSRStorage
    assert sr.Modality == "SR"
    assert sr.PatientID == evidence[0].PatientID
    assert sr.PatientName == evidence[0].PatientName
    assert sr.StudyInstanceUID == evidence[0].StudyInstanceUID
    assert sr.AccessionNumber == evidence[0].AccessionNumber
    assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in evidence}
    assert sr.SOPInstanceUID not in {ds.SOPInstanceUID for ds in evidence}
    assert sr.SeriesNumber == 9902
    assert sr.InstanceNumber == 3
    assert sr.InstitutionName == "General Hospital"
    assert sr.Manufacturer == MANUFACTURER == "Lookalike"
    assert sr.SeriesDescription == SR_SERIES_DESCRIPTION == "Lookalike similar cases"
    assert "ContentDescription" not in sr  # not in the SR IODs: it would make a Standard Extended SOP Class
    assert sr.SoftwareVersions == "0.1.0"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.VerificationFlag == "UNVERIFIED"


def test_given_uids_are_used(evidence):
    series_uid, sop_uid = generate_uid(), generate_uid()
    sr = build(evidence, [], series_instance_uid=series_uid, sop_instance_uid=sop_uid)
    assert sr.SeriesInstanceUID == series_uid
    assert sr.SOPInstanceUID == sop_uid


def test_generated_uids_differ_between_reports(evidence):
    first, second = build(evidence, []), build(evidence, [])
    assert first.SeriesInstanceUID != second.SeriesInstanceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID


def test_document_title_and_private_coding_scheme_are_declared(evidence):
    sr = build(evidence, make_matches(1, evidence[0].SOPInstanceUID))
    assert concept(sr) == key(CODES.SIMILAR_CASES_REPORT)
    assert sr.ValueType == "CONTAINER"
    designators = [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence]
    assert CODING_SCHEME_DESIGNATOR in designators


def test_algorithm_and_observer_are_identified(evidence):
    sr = build(evidence, [], algorithm_name="Lookalike-US", algorithm_version="1.2.3", model_version="m-9")
    root = children_by_concept(sr)
    assert root[("DCM", "111001")].TextValue == "Lookalike-US"
    assert root[("DCM", "111003")].TextValue == "1.2.3"
    assert root[("DCM", "121005")].ConceptCodeSequence[0].CodeValue == "121007"  # Observer Type: Device
    assert root[("DCM", "121013")].TextValue == "Lookalike-US"  # Device Observer Name
    assert root[key(CODES.ENCODER_MODEL_VERSION)].TextValue == "m-9"


# --- Content tree: one container per similar study ----------------------------------------


def test_one_container_per_match_with_rank_score_and_uids(evidence):
    query_uid = evidence[1].SOPInstanceUID
    matches = make_matches(4, query_uid)
    sr = build(evidence, matches)

    containers = similar_case_containers(sr)
    assert len(containers) == len(matches)
    for container, match in zip(containers, matches, strict=True):
        items = children_by_concept(container)
        rank = items[key(CODES.SIMILARITY_RANK)]
        assert num_value(rank) == match.rank
        assert rank.MeasuredValueSequence[0].NumericValue.original_string == str(match.rank)
        assert rank.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "{rank}"
        score = items[key(CODES.COSINE_SIMILARITY)]
        assert num_value(score) == round(match.score, 4) != match.score  # as every other place shows it
        assert score.MeasuredValueSequence[0].NumericValue.original_string == f"{match.score:.4f}".rstrip("0")
        assert score.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "1"
        assert items[("DCM", "110180")].UID == match.study_instance_uid
        assert items[("DCM", "112002")].UID == match.series_instance_uid
        assert str(items[("DCM", "111060")].Date) == match.study_date
        assert items[("DCM", "121139")].TextValue == match.modality
        assert items[key(CODES.ENCODER_MODEL_VERSION)].TextValue == match.model_version
        best = items[key(CODES.BEST_MATCHING_INSTANCE)]
        assert best.ValueType == "IMAGE"
        assert best.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == match.sop_instance_uid
        assert best.ReferencedSOPSequence[0].ReferencedSOPClassUID == UltrasoundImageStorage
        query = items[key(CODES.MATCHED_QUERY_INSTANCE)]
        assert query.ValueType == "IMAGE"
        assert query.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == query_uid


def test_referenced_instances_are_listed_as_evidence(evidence):
    matches = make_matches(2, evidence[0].SOPInstanceUID)
    sr = build(evidence, matches)

    current = sr.CurrentRequestedProcedureEvidenceSequence
    assert [item.StudyInstanceUID for item in current] == [evidence[0].StudyInstanceUID]
    current_sops = {
        sop.ReferencedSOPInstanceUID
        for series in current[0].ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert current_sops == {ds.SOPInstanceUID for ds in evidence}

    other = {
        (study.StudyInstanceUID, series.SeriesInstanceUID, sop.ReferencedSOPInstanceUID)
        for study in sr.PertinentOtherEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert other == {
        (m.study_instance_uid, m.series_instance_uid, m.sop_instance_uid) for m in matches
    }


def test_non_image_best_match_is_a_composite_reference(evidence):
    matches = make_matches(1, evidence[0].SOPInstanceUID, sop_class_uid=ENCAPSULATED_PDF_STORAGE)
    sr = build(evidence, matches)
    best = children_by_concept(similar_case_containers(sr)[0])[key(CODES.BEST_MATCHING_INSTANCE)]
    assert best.ValueType == "COMPOSITE"
    assert best.ReferencedSOPSequence[0].ReferencedSOPClassUID == ENCAPSULATED_PDF_STORAGE


def test_query_instance_outside_evidence_is_kept_as_uid(evidence):
    outside_uid = generate_uid()
    sr = build(evidence, make_matches(1, outside_uid))
    items = children_by_concept(similar_case_containers(sr)[0])
    assert key(CODES.MATCHED_QUERY_INSTANCE) not in items
    assert items[key(CODES.MATCHED_QUERY_SOP_INSTANCE_UID)].UID == outside_uid


def test_missing_study_date_and_modality_are_left_out(evidence):
    match = make_matches(1, evidence[0].SOPInstanceUID)[0]
    match = replace(match, study_date="", modality="")
    items = children_by_concept(similar_case_containers(build(evidence, [match]))[0])
    assert ("DCM", "111060") not in items
    assert ("DCM", "121139") not in items
    assert items[("DCM", "110180")].UID == match.study_instance_uid


def test_numpy_scalars_from_the_index_are_accepted(evidence):
    match = make_matches(1, evidence[0].SOPInstanceUID)[0]
    match = replace(match, rank=np.int64(1), score=np.float32(0.8125))
    items = children_by_concept(similar_case_containers(build(evidence, [match]))[0])
    assert num_value(items[key(CODES.SIMILARITY_RANK)]) == 1
    assert num_value(items[key(CODES.COSINE_SIMILARITY)]) == 0.8125


def test_empty_matches_says_none_were_found(evidence):
    sr = build(evidence, [])
    assert similar_case_containers(sr) == []
    summary = children_by_concept(sr)[("DCM", "121111")]
    assert summary.ValueType == "TEXT"
    assert "no similar stud" in summary.TextValue.lower()
    assert "PertinentOtherEvidenceSequence" not in sr


def test_the_summary_of_a_patient_scope_report_says_earlier_studies(evidence):
    """Issue 17 item 1: the patient scope lists the patient's earlier studies, and the report says so."""
    for n in (0, 1, 2):
        summary = children_by_concept(build(evidence, make_matches(n, evidence[0].SOPInstanceUID),
                                            priors_only=True))[("DCM", "121111")].TextValue
        assert "earlier stud" in summary and "prior" not in summary.lower()


def test_the_summary_states_the_floor_the_matches_had_to_reach(evidence):
    """Issue 17 item 2: a short list or none at all reads as "nothing similar enough", with the floor applied."""
    summary = children_by_concept(build(evidence, [], floors={"us-x-1": 0.0517}))[("DCM", "121111")].TextValue
    assert "0.0517" in summary and "us-x-1" in summary
    uncalibrated = children_by_concept(build(evidence, [], floors={"us-x-2": None}))[("DCM", "121111")].TextValue
    assert "0.0517" not in uncalibrated and "us-x-2" in uncalibrated


def test_one_match_is_counted_in_the_singular(evidence):
    summary = children_by_concept(build(evidence, make_matches(1, evidence[0].SOPInstanceUID)))[("DCM", "121111")]
    assert summary.TextValue.startswith("1 ") and "studies" not in summary.TextValue.split(".")[0]


def test_summary_counts_matches(evidence):
    sr = build(evidence, make_matches(3, evidence[0].SOPInstanceUID))
    assert children_by_concept(sr)[("DCM", "121111")].TextValue.startswith("3 ")


def test_editing_one_report_leaves_the_codes_and_other_reports_alone(evidence):
    first = build(evidence, make_matches(1, evidence[0].SOPInstanceUID))
    similar_case_containers(first)[0].ConceptNameCodeSequence[0].CodeMeaning = "edited"
    first.CodingSchemeIdentificationSequence[0].CodingSchemeName = "edited"
    second = build(evidence, make_matches(1, evidence[0].SOPInstanceUID))
    assert CODES.SIMILAR_CASE.meaning == "Similar case"
    assert similar_case_containers(second)[0].ConceptNameCodeSequence[0].CodeMeaning == "Similar case"
    assert second.CodingSchemeIdentificationSequence[0].CodingSchemeName != "edited"


# --- Privacy and evidence handling ----------------------------------------------------------


def test_no_identifier_of_another_patient_is_written(evidence, tmp_path):
    matches = make_matches(3, evidence[0].SOPInstanceUID)
    path = save(build(evidence, matches), tmp_path)
    data = path.read_bytes()
    assert OTHER_PATIENT_ID.encode() not in data
    for i in range(len(matches)):
        assert f"orthanc-study-{i}".encode() not in data
    assert evidence[0].PatientID.encode() in data  # the query patient is, so the search is meaningful


def test_headers_suffice_and_evidence_is_not_modified(evidence):
    sparse = us_instance(evidence[0].StudyInstanceUID, evidence[0].SeriesInstanceUID, with_pixels=False)
    for keyword in ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "AccessionNumber", "StudyID"):
        delattr(sparse, keyword)
    before = [len(ds) for ds in (sparse, *evidence)]

    sr = build([sparse, *evidence], make_matches(1, sparse.SOPInstanceUID))

    assert [len(ds) for ds in (sparse, *evidence)] == before
    assert "PatientBirthDate" not in sparse
    assert "PixelData" in evidence[0]
    assert "PixelData" not in sr
    assert sr.PatientID == sparse.PatientID
    assert sr.PatientBirthDate == ""


def test_saved_report_reads_back_as_comprehensive_sr(evidence, tmp_path):
    matches = make_matches(2, evidence[0].SOPInstanceUID)
    path = save(build(evidence, matches), tmp_path)
    read = highdicom.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(path))
    assert read.SOPClassUID == ComprehensiveSRStorage
    containers = similar_case_containers(read)
    assert [children_by_concept(c)[("DCM", "110180")].UID for c in containers] == [
        m.study_instance_uid for m in matches
    ]


# --- Conformance: DCMTK and dicom3tools --------------------------------------------------


@pytest.mark.parametrize("n_matches", [0, 3])
def test_dsrdump_parses_the_report(evidence, tmp_path, n_matches):
    dsrdump = require_tool("dsrdump")
    matches = make_matches(n_matches, evidence[0].SOPInstanceUID)
    path = save(build(evidence, matches), tmp_path)

    result = subprocess.run([dsrdump, str(path)], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Comprehensive SR" in result.stdout
    assert "Similar cases report" in result.stdout
    for match in matches:
        assert match.study_instance_uid in result.stdout
    assert result.stdout.count('"Similar case")') == n_matches
    assert "error" not in result.stderr.lower(), result.stderr


@pytest.mark.parametrize("n_matches", [0, 3])
def test_dciodvfy_reports_no_errors(evidence, tmp_path, n_matches):
    path = save(build(evidence, make_matches(n_matches, evidence[0].SOPInstanceUID)), tmp_path)

    errors, warnings = dciodvfy(path, "ComprehensiveSR")

    assert errors == []
    assert sr_warnings_unexpected(warnings) == []


# --- Input validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: [m[1], m[0], m[2]], "rank"),
        (lambda m: [replace(x, rank=x.rank - 1) for x in m], "rank"),
        (lambda m: [m[0], replace(m[1], rank=1), m[2]], "rank"),
        (lambda m: [m[0], m[2]], "rank"),
        (lambda m: [m[0], replace(m[1], rank=2.0), m[2]], "rank"),
        (lambda m: [m[0], replace(m[1], score=math.nan), m[2]], "finite"),
        (lambda m: [m[0], replace(m[1], score=np.float32("inf")), m[2]], "finite"),
        (lambda m: [m[0], replace(m[1], score=1.5), m[2]], "cosine"),
        (lambda m: [m[0], replace(m[1], score="high"), m[2]], "not a number"),
        (lambda m: [m[0], replace(m[1], study_instance_uid=m[0].study_instance_uid), m[2]], "already listed"),
        (lambda m: [m[0], replace(m[1], study_instance_uid="1.2.3.abc"), m[2]], "valid DICOM UID"),
        (lambda m: [m[0], replace(m[1], sop_instance_uid=""), m[2]], "valid DICOM UID"),
        (lambda m: [m[0], replace(m[1], study_date="2023-01-02"), m[2]], "study_date"),
    ],
)
def test_bad_matches_raise_value_error(evidence, mutate, message):
    matches = mutate(make_matches(3, evidence[0].SOPInstanceUID))
    with pytest.raises(ValueError, match=message):
        build(evidence, matches)


def test_query_study_among_matches_raises(evidence):
    match = replace(make_matches(1, evidence[0].SOPInstanceUID)[0], study_instance_uid=evidence[0].StudyInstanceUID)
    with pytest.raises(ValueError, match="query study itself"):
        build(evidence, [match])


def test_bad_evidence_raises_value_error(evidence):
    matches = make_matches(1, evidence[0].SOPInstanceUID)
    with pytest.raises(ValueError, match="non-empty"):
        build([], matches)
    with pytest.raises(ValueError, match="non-empty"):
        build(evidence[0], matches)
    other_study = us_instance(generate_uid(), generate_uid())
    with pytest.raises(ValueError, match="one study"):
        build([evidence[0], other_study], matches)
    other_patient = us_instance(evidence[0].StudyInstanceUID, generate_uid(), patient_id="SOMEONE-ELSE")
    with pytest.raises(ValueError, match="one patient"):
        build([evidence[0], other_patient], matches)
    no_sop = us_instance(evidence[0].StudyInstanceUID, generate_uid())
    del no_sop.SOPInstanceUID
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        build([no_sop], matches)


@pytest.mark.parametrize("field", ["algorithm_version", "model_version"])
def test_empty_versions_raise_value_error(evidence, field):
    with pytest.raises(ValueError, match=field):
        build(evidence, [], **{field: " "})


# --- Recognising our own output -------------------------------------------------------------


def test_is_lookalike_document_on_datasets(evidence, tmp_path):
    sr = build(evidence, [])
    assert is_lookalike_document(sr)
    assert is_lookalike_document(pydicom.dcmread(save(sr, tmp_path)))
    assert not is_lookalike_document(evidence[0])
    other_sr = Dataset()
    other_sr.Modality = "SR"
    other_sr.Manufacturer = "Other Vendor"
    assert not is_lookalike_document(other_sr)


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"Manufacturer": "Lookalike", "Modality": "SR"}, True),
        ({"Manufacturer": "Lookalike ", "Modality": "SR "}, True),
        ({"0008,0070": {"Name": "Manufacturer", "Type": "String", "Value": "Lookalike"},
          "0008,0060": {"Name": "Modality", "Type": "String", "Value": "SR"}}, True),
        ({"0008,0070": "Lookalike", "0008,0060": "SR"}, True),
        ({"Manufacturer": "Lookalike", "Modality": "US"}, False),
        ({"Manufacturer": "Acme", "Modality": "SR"}, False),
        ({"Modality": "SR"}, False),
        ({}, False),
    ],
)
def test_is_lookalike_document_on_orthanc_tags(tags, expected):
    assert is_lookalike_document(tags) is expected


def test_report_series_has_a_date_and_time(evidence):
    sr = build(evidence, make_matches(1, evidence[0].SOPInstanceUID))
    assert sr.SeriesDate and sr.SeriesTime
    assert (sr.SeriesDate, sr.SeriesTime) == (sr.ContentDate, sr.ContentTime)


def test_an_answer_entry_without_its_best_match_is_refused():
    with pytest.raises(KeyError, match="best_match"):
        SimilarCase.from_answer({"rank": 1, "score": 0.5, "study_instance_uid": "1.2.3"})


def test_module_imports_neither_the_indexer_nor_torch():
    code = ("import sys, lookalike.dicom.sr; "
            "sys.exit(1 if {'torch', 'lookalike.index', 'lookalike.worker', 'lookalike.query', 'faiss'} & set(sys.modules) else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr or "lookalike.dicom.sr imported the indexer or torch"

