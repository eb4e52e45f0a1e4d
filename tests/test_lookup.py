"""Study-level lookup on hand-made vectors whose cosines are known in advance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lookalike.encoders.floors import SimilarityFloors
from lookalike.lab.calibration import write_calibration
from lookalike.index.catalogue import InstanceRecord
from lookalike.dicom.study_order import is_prior
from lookalike.index.search import IDENTITY_FIELDS, SimilarStudy, StudyNotIndexedError, similar_studies
from lookalike.index.store import IndexStore
from tests.support import findscu, make_study, noisy, sample_pixels, store_floor_corpus, store_studies


def record(sop: str, study: str, *, modality: str = "US", encoder: str = "us",
           patient: str | None = None, date: str = "20240102", time: str = "") -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"1.2.3.{study}.{sop}", sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
        series_instance_uid=f"1.2.3.{study}.0", study_instance_uid=f"1.2.3.{study}",
        patient_id=f"P-{study}" if patient is None else patient,
        study_date=date, modality=modality, orthanc_instance_id=f"inst-{study}-{sop}",
        orthanc_series_id=f"series-{study}", orthanc_study_id=f"study-{study}", encoder=encoder,
        model_version="v1", study_time=time)


def cos(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


Q1, Q2 = [1, 0, 0], [0, 1, 0]
#: Study 1: one image nearly identical to Q2, one unrelated: best pair 0.9988, mean over pairs only 0.25.
M1, M2 = [0, 1, 0.05], [0, 0, 1]
#: Study 2: two images fairly close to both query images: best pair 0.8, mean over pairs 0.7.
N1, N2 = [0.8, 0.6, 0], [0.6, 0.8, 0]
#: Study 3: unrelated.
O1 = [0, 0.1, 1]


@pytest.fixture
def store(tmp_path: Path) -> IndexStore:
    with IndexStore(tmp_path / "index") as s:
        for sop, v in (("1", Q1), ("2", Q2)):
            s.add(record(sop, "9"), v)  # the query study
        for sop, v in (("1", M1), ("2", M2)):
            s.add(record(sop, "1"), v)
        for sop, v in (("1", N1), ("2", N2)):
            s.add(record(sop, "2"), v)
        s.add(record("1", "3"), O1)
        yield s


def test_studies_rank_by_their_best_image_pair(store: IndexStore) -> None:
    results = similar_studies(store, "study-9")
    assert [r.orthanc_study_id for r in results] == ["study-1", "study-2", "study-3"]
    assert [r.rank for r in results] == [1, 2, 3]
    assert [r.score for r in results] == pytest.approx([cos(Q2, M1), 0.8, cos(Q2, O1)], abs=1e-6)
    # Study 2 has the better average (0.7 against 0.25): only the max puts study 1 first.
    assert np.mean([cos(q, g) for q in (Q1, Q2) for g in (M1, M2)]) < 0.7


def test_best_match_names_the_image_pair_and_the_study_fields(store: IndexStore) -> None:
    first = similar_studies(store, "study-9")[0]
    assert isinstance(first, SimilarStudy)
    assert (first.study_instance_uid, first.patient_id, first.study_date, first.modality, first.model_version) == (
        "1.2.3.1", "P-1", "20240102", "US", "v1")
    match = first.best_match
    assert (match.sop_instance_uid, match.query_sop_instance_uid) == ("1.2.3.1.1", "1.2.3.9.2")
    assert (match.orthanc_instance_id, match.series_instance_uid) == ("inst-1-1", "1.2.3.1.0")
    assert match.score == first.score


def test_the_query_study_is_never_its_own_answer(store: IndexStore) -> None:
    for study in ("study-9", "study-1"):
        assert study not in [r.orthanc_study_id for r in similar_studies(store, study)]
    # Seen from study 1, the query study is a gallery study like any other.
    assert similar_studies(store, "study-1")[0].orthanc_study_id == "study-9"


def test_limit_keeps_the_best(store: IndexStore) -> None:
    assert [r.orthanc_study_id for r in similar_studies(store, "study-9", limit=1)] == ["study-1"]
    assert [r.orthanc_study_id for r in similar_studies(store, "study-9", limit=2)] == ["study-1", "study-2"]
    assert len(similar_studies(store, "study-9", limit=100)) == 3  # k far beyond the index size
    with pytest.raises(ValueError):
        similar_studies(store, "study-9", limit=0)


def test_a_study_without_live_instances_is_not_indexed(store: IndexStore) -> None:
    with pytest.raises(StudyNotIndexedError) as raised:
        similar_studies(store, "study-unknown")
    assert isinstance(raised.value, LookupError) and raised.value.orthanc_study_id == "study-unknown"
    store.delete_study("study-9")
    with pytest.raises(StudyNotIndexedError):
        similar_studies(store, "study-9")


def test_deleted_studies_drop_out_of_the_answers(store: IndexStore) -> None:
    store.delete_study("study-1")
    assert [r.orthanc_study_id for r in similar_studies(store, "study-9")] == ["study-2", "study-3"]


def test_equal_scores_rank_by_study_instance_uid(store: IndexStore) -> None:
    # Four studies that match equally well, added so that neither id order nor its reverse is the UID order.
    for study in ("5", "4", "6", "8"):
        store.add(record("1", study), [0, 0, 1])
    results = similar_studies(store, "study-9")
    assert [r.orthanc_study_id for r in results[3:]] == ["study-4", "study-5", "study-6", "study-8"]
    assert len({r.score for r in results[3:]}) == 1


def test_other_encoders_are_not_compared(store: IndexStore) -> None:
    store.add(record("1", "7", modality="DX", encoder="xr"), [1, 0, 0])  # Q1's twin, but an X-ray
    assert "study-7" not in [r.orthanc_study_id for r in similar_studies(store, "study-9")]
    store.add(record("3", "9", modality="DX", encoder="xr"), [2, 0, 0])  # the query study has an X-ray too
    first = similar_studies(store, "study-9")[0]
    assert (first.orthanc_study_id, first.modality, first.best_match.query_sop_instance_uid) == (
        "study-7", "DX", "1.2.3.9.3")
    assert first.score == pytest.approx(1.0, abs=1e-6)


def test_a_read_only_store_answers_like_the_writer(store: IndexStore) -> None:
    with IndexStore(store.index_dir, readonly=True) as reader:
        assert similar_studies(reader, "study-9") == similar_studies(store, "study-9")


def test_patient_scope_answers_the_same_patients_other_studies_only(store: IndexStore) -> None:
    # Two priors of the query patient (P-9), both less similar than forty other patients' near twins of Q1: the
    # first k = 4 * limit + n hits hold none of them, so the search has to go deeper to find them.
    store.add(record("1", "20", patient="P-9", date="20230102"), [0.1, 0, 1])
    store.add(record("1", "21", patient="P-9", date="20231231"), [0.3, 0, 1])
    for i in range(40):
        store.add(record("1", str(100 + i)), [1, 0.01 * i, 0])
    results = similar_studies(store, "study-9", limit=2, scope="patient")
    assert [r.orthanc_study_id for r in results] == ["study-21", "study-20"]
    assert [r.rank for r in results] == [1, 2]
    assert all(r.same_patient and r.patient_id == "P-9" for r in results)
    assert results[0].score == pytest.approx(cos(Q1, [0.3, 0, 1]), abs=1e-6)
    archive = similar_studies(store, "study-9", limit=2)
    assert {r.orthanc_study_id for r in archive} <= {f"study-{100 + i}" for i in range(40)}
    assert not any(r.same_patient for r in archive)


def test_archive_scope_finds_enough_studies_when_one_study_takes_the_first_hits(tmp_path: Path) -> None:
    # One study with thirty near copies of the query image fills the first k = 4 * 2 + 1 hits.
    with IndexStore(tmp_path / "index") as s:
        s.add(record("1", "1"), Q1)
        for i in range(30):
            s.add(record(str(i), "50"), [1, 0, 0.001 * i])
        s.add(record("1", "2"), N1)
        s.add(record("1", "3"), O1)
        assert [r.orthanc_study_id for r in similar_studies(s, "study-1", limit=2)] == ["study-50", "study-2"]


def test_patient_scope_with_an_empty_patient_id_matches_no_one(tmp_path: Path) -> None:
    with IndexStore(tmp_path / "index") as s:
        s.add(record("1", "1", patient=""), Q1)
        s.add(record("1", "2", patient=""), Q1)
        assert similar_studies(s, "study-1", scope="patient") == []
        assert [r.orthanc_study_id for r in similar_studies(s, "study-1")] == ["study-2"]
        assert not similar_studies(s, "study-1")[0].same_patient


def test_an_unknown_scope_is_refused(store: IndexStore) -> None:
    with pytest.raises(ValueError, match="scope"):
        similar_studies(store, "study-9", scope="everyone")


def test_the_public_answer_leaves_the_patient_identity_out_unless_disclosed(store: IndexStore) -> None:
    first = similar_studies(store, "study-9")[0]
    hidden = first.as_public_dict(disclose_identity=False)
    assert "P-1" not in repr(hidden) and not set(IDENTITY_FIELDS) & set(hidden)
    assert (hidden["study_instance_uid"], hidden["rank"], hidden["same_patient"]) == ("1.2.3.1", 1, False)
    assert hidden["best_match"]["orthanc_instance_id"] == "inst-1-1"
    shown = first.as_public_dict(disclose_identity=True)
    assert shown["patient_id"] == "P-1" and {k: v for k, v in shown.items() if k != "patient_id"} == hidden


def test_lesion_boxes_round_trip_through_the_catalogue_to_the_best_pair(tmp_path: Path) -> None:
    """The lookup names the two images of the best pair and the lesion box of each, for a side-by-side view."""
    from dataclasses import replace

    with IndexStore(tmp_path / "index") as s:
        s.add(replace(record("1", "9"), lesion_box=(10, 20, 50, 60, 0.8)), Q2)
        s.add(replace(record("2", "9")), Q1)  # no lesion found: the whole image
        s.add(replace(record("1", "1"), lesion_box=(100, 40, 180, 90, 0.65)), M1)
        s.add(record("2", "1"), M2)
        [best] = similar_studies(s, "study-9", limit=1)
        assert best.best_match.orthanc_instance_id == "inst-1-1"
        assert best.best_match.query_orthanc_instance_id == "inst-9-1"
        assert best.best_match.lesion_box == (100, 40, 180, 90, 0.65)
        assert best.best_match.query_lesion_box == (10, 20, 50, 60, 0.8)
        public = best.as_public_dict(disclose_identity=False)["best_match"]
        assert list(public["lesion_box"]) == [100, 40, 180, 90, 0.65]
        # Re-indexing an instance replaces its box with the new one, or with none.
        s.add(record("1", "1"), M1)
        [again] = similar_studies(s, "study-9", limit=1)
        assert again.best_match.lesion_box is None


def test_an_invalid_lesion_box_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from dataclasses import replace

    with IndexStore(tmp_path / "index") as s:
        with pytest.raises(ValueError, match="lesion box"):
            s.add(replace(record("1", "1"), lesion_box=(50, 10, 40, 30, 0.5)), Q1)
        assert s.catalogue.counts() == []


# --- A prior is an earlier study -------------------------------------------------------------------------------


def test_patient_scope_lists_earlier_studies_only(tmp_path: Path) -> None:
    """Issue 17 item 1: opened on a study of 2025-06-01, the patient's studies of 2025-11-17 (later), of the same
    day (no StudyTime to order them) and without a date are not priors; only the earlier one is, however it
    scores against the others."""
    with IndexStore(tmp_path / "index") as s:
        s.add(record("1", "1", patient="P-1", date="20250601"), Q1)
        s.add(record("1", "later", patient="P-1", date="20251117"), Q1)
        s.add(record("1", "same-day", patient="P-1", date="20250601"), Q1)
        s.add(record("1", "undated", patient="P-1", date=""), Q1)
        s.add(record("1", "earlier", patient="P-1", date="2024.12.31"), N1)  # the ACR-NEMA form reads too
        priors = similar_studies(s, "study-1", scope="patient")
        assert [r.orthanc_study_id for r in priors] == ["study-earlier"]
        # The archive scope still lists all of them: a later study of the patient is similar, not a prior.
        assert len(similar_studies(s, "study-1")) == 4


def test_a_same_day_study_is_a_prior_when_both_times_say_it_came_first(tmp_path: Path) -> None:
    """Opened on the afternoon study of 2025-06-01: that morning's study of the patient is a prior; the evening
    one, one of that day without a time, and any study of that day seen from a query without a time are not."""
    with IndexStore(tmp_path / "index") as s:
        s.add(record("1", "afternoon", patient="P-1", date="20250601", time="143000"), Q1)
        s.add(record("1", "morning", patient="P-1", date="20250601", time="0815"), N1)  # TM may stop at minutes
        s.add(record("1", "evening", patient="P-1", date="20250601", time="18:00:00"), Q1)  # ACR-NEMA form
        s.add(record("1", "untimed", patient="P-1", date="20250601"), Q1)
        s.add(record("1", "earlier", patient="P-1", date="20250531", time="235959"), N1)
        s.add(record("1", "query-untimed", patient="P-1", date="20250601"), Q1)

        def priors(study: str) -> list[str]:
            return [r.orthanc_study_id for r in similar_studies(s, f"study-{study}", scope="patient")]

        assert sorted(priors("afternoon")) == ["study-earlier", "study-morning"]
        assert priors("morning") == ["study-earlier"]
        assert sorted(priors("evening")) == ["study-afternoon", "study-earlier", "study-morning"]
        assert priors("untimed") == priors("query-untimed") == ["study-earlier"]


@pytest.mark.parametrize("prior, query, expected", [
    (("20250601", "081500"), ("20250601", "143000"), True),
    (("20250601", "143000"), ("20250601", "081500"), False),
    (("20250601", "1430"), ("20250601", "143000.000"), False),  # the same moment is not earlier
    (("20250601", "143000.25"), ("20250601", "143000.3"), True),  # fractions compare padded
    (("20250601", ""), ("20250601", "143000"), False),
    (("20250601", "081500"), ("20250601", ""), False),
    (("20250601", "8:15"), ("20250601", "143000"), False),  # not a time: unknown
    (("20250531", ""), ("20250601", ""), True),
    (("20250602", "000000"), ("20250601", "235959"), False),
    (("", "081500"), ("20250601", "143000"), False),
])
def test_a_prior_is_earlier_by_date_then_by_time(prior: tuple[str, str], query: tuple[str, str],
                                                 expected: bool) -> None:
    """The rule, as the lookup and as the Key Object Selection (reading the headers) apply it."""
    from pydicom import Dataset

    from lookalike.dicom.kos import _earlier

    assert is_prior(prior[0], query[0], prior[1], query[1]) is expected
    headers = []
    for date, time in (prior, query):
        ds = Dataset()
        ds.StudyDate, ds.StudyTime = date, time
        headers.append(ds)
    assert _earlier(*headers) is expected


def test_a_study_without_a_date_has_no_prior(tmp_path: Path) -> None:
    with IndexStore(tmp_path / "index") as s:
        s.add(record("1", "1", patient="P-1", date=""), Q1)
        s.add(record("1", "2", patient="P-1", date="20200101"), Q1)
        assert similar_studies(s, "study-1", scope="patient") == []


# --- The similarity floor ---------------------------------------------------------------------------------------


def floors_at(tmp_path: Path, floor: float | None) -> SimilarityFloors:
    """Floors read from a calibration beside a checkpoint of model "v1" (the records' model), as a site has it."""
    weights = tmp_path / "site" / "us.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    if floor is not None:
        write_calibration(weights, {"model_version": "v1", "floor": floor})
    return SimilarityFloors([weights])


def test_matches_below_the_models_floor_are_dropped(store: IndexStore, tmp_path: Path) -> None:
    # Study 1 scores 0.9988, study 2 0.8, study 3 cos(Q2, O1) = 0.0995.
    results = similar_studies(store, "study-9", floors=floors_at(tmp_path, 0.5))
    assert [r.orthanc_study_id for r in results] == ["study-1", "study-2"]
    assert results.floors == {"v1": 0.5}


def test_when_nothing_reaches_the_floor_the_answer_is_empty_and_says_why(store: IndexStore, tmp_path: Path) -> None:
    results = similar_studies(store, "study-9", limit=10, floors=floors_at(tmp_path, 0.9999))
    assert results == [] and results.floors == {"v1": 0.9999}


def test_a_model_without_calibration_keeps_every_match(store: IndexStore, tmp_path: Path) -> None:
    results = similar_studies(store, "study-9", floors=floors_at(tmp_path, None))
    assert len(results) == 3 and results.floors == {"v1": None}


def test_the_floor_of_another_model_version_is_not_applied(store: IndexStore, tmp_path: Path) -> None:
    weights = tmp_path / "us.pt"
    write_calibration(weights, {"model_version": "v2", "floor": 0.9999})  # a retrained model's, not this index's
    assert len(similar_studies(store, "study-9", floors=SimilarityFloors([weights]))) == 3


def test_the_floor_is_applied_over_the_lookup_service(store: IndexStore, tmp_path: Path) -> None:
    """The REST routes ask the query service: its answer carries the floor it applied."""
    from lookalike.query.lookup_service import LocalLookups, LookupClient, LookupRequest, LookupServer

    server = LookupServer(LocalLookups(store, floors=floors_at(tmp_path, 0.5)), tmp_path / "l.sock", "secret")
    server.start()
    try:
        answer = LookupClient(server.path, "secret", 5.0).lookup(LookupRequest(
            orthanc_study_id="study-9", study_instance_uid="1.2.3.9", limit=10, scope="archive", who="t"))
    finally:
        server.stop()
    assert [r.orthanc_study_id for r in answer] == ["study-1", "study-2"] and answer.floors == {"v1": 0.5}


# --- On the real stack: REST, SR, KOS and C-FIND ----------------------------------------------------------------


class _NoFloors(SimilarityFloors):
    """What the lookup answered before floors: every match, however low."""

    def floor(self, model_version: str) -> float | None:
        return None


@pytest.fixture(scope="module")
def floor_corpus(stack, tmp_path_factory) -> dict:
    return store_floor_corpus(stack, tmp_path_factory.mktemp("floor"), "PFLR")


@pytest.mark.stack
class TestOnTheStack:
    def test_rest_lists_earlier_studies_above_the_floor_only(self, stack, floor_corpus: dict) -> None:
        ids = floor_corpus["ids"]
        http, url = stack.http(), stack.config.orthanc_url
        with IndexStore(stack.config.settings().index_dir, readonly=True) as index:
            unfloored = similar_studies(index, ids["q"], scope="patient", floors=_NoFloors())
            floor = SimilarityFloors(catalogue=index.catalogue).floor(unfloored[0].model_version)
        # Without the floor the patient's earlier study would be answered, scoring far below it.
        assert floor is not None and [s.orthanc_study_id for s in unfloored] == [ids["low"]]
        assert unfloored[0].score < floor

        answer = http.get(f"{url}/lookalike/studies/{ids['q']}/similar", params={"scope": "patient"},
                          timeout=30).json()
        assert answer["similar"] == [] and answer["floors"] == {unfloored[0].model_version: floor}
        archive = http.get(f"{url}/lookalike/studies/{ids['q']}/similar", timeout=30).json()
        assert ids["later"] in [s["orthanc_study_id"] for s in archive["similar"]]  # similar, but not a prior
        assert all(s["score"] >= floor for s in archive["similar"]) and ids["low"] not in str(archive)
        priors = http.get(f"{url}/lookalike/studies/{ids['r']}/similar", params={"scope": "patient"},
                          timeout=30).json()
        assert [s["orthanc_study_id"] for s in priors["similar"]] == [ids["r_prior"]]

    def test_a_same_day_study_is_a_prior_of_the_afternoon_study_only(self, stack, tmp_path: Path) -> None:
        """Two studies of one patient on one day, stored through DICOM: from the afternoon study the morning one is
        a prior; from the morning study, nothing is."""

        dx = sample_pixels("DX", 8)
        made = {}
        for name, image, time in (("morning", dx[5], "081500"), ("afternoon", noisy(dx[5], 63), "143000")):
            path, ds = make_study(image, "DX", "PSAMEDAY01", tmp_path, name, "20250915")
            ds.StudyTime = time
            ds.save_as(path, enforce_file_format=True)
            made[name] = (path, ds)
        ids = store_studies(stack, made, "two studies of one day")["ids"]
        http, url = stack.http(), stack.config.orthanc_url

        def priors(name: str) -> list[str]:
            r = http.get(f"{url}/lookalike/studies/{ids[name]}/similar", params={"scope": "patient"}, timeout=30)
            assert r.status_code == 200, r.text
            return [s["orthanc_study_id"] for s in r.json()["similar"]]

        assert priors("afternoon") == [ids["morning"]]
        assert priors("morning") == []
        archive = http.get(f"{url}/lookalike/studies/{ids['morning']}/similar", timeout=30).json()["similar"]
        assert ids["afternoon"] in [s["orthanc_study_id"] for s in archive]  # similar, only not a prior

    def test_the_status_gives_each_models_floor(self, stack, floor_corpus: dict) -> None:
        status = stack.http().get(f"{stack.config.orthanc_url}/lookalike/status", timeout=10).json()
        xr = [c for c in status["indexed"] if c["encoder"] == "xr"]
        assert xr and all(isinstance(c["similarity_floor"], float) and "warning" not in c for c in xr)

    def test_the_sr_says_no_earlier_study_reached_the_floor(self, stack, floor_corpus: dict, tmp_path: Path) -> None:
        http, url = stack.http(), stack.config.orthanc_url
        r = http.post(f"{url}/lookalike/studies/{floor_corpus['ids']['q']}/similar-report",
                      json={"scope": "patient"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["similar"] == 0
        import pydicom

        sr = pydicom.dcmread(__import__("io").BytesIO(
            http.get(f"{url}/instances/{r.json()['report']}/file", timeout=10).content))
        summary = next(item.TextValue for item in sr.ContentSequence
                       if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121111")
        floors = http.get(f"{url}/lookalike/studies/{floor_corpus['ids']['q']}/similar",
                          params={"scope": "patient"}, timeout=30).json()["floors"]
        assert summary.lower().startswith("no similar earlier study")
        assert all(f"{floor:.4f}" in summary for floor in floors.values())

    def test_the_key_images_never_show_a_later_study(self, stack, floor_corpus: dict) -> None:
        r = stack.http().post(f"{stack.config.orthanc_url}/lookalike/studies/{floor_corpus['ids']['q']}/similar-kos",
                              json={}, timeout=60)
        assert r.status_code == 200, r.text
        assert (r.json()["similar"], r.json()["documents"]) == (0, [])

    def test_c_find_of_the_patients_priors_answers_no_match_below_the_floor(self, stack, floor_corpus: dict,
                                                                             tmp_path: Path) -> None:
        ds, (p1, p2) = floor_corpus["ds"], floor_corpus["patients"]
        result, none = findscu(stack, tmp_path / "q", f"StudyInstanceUID={ds['q'].StudyInstanceUID}",
                               f"PatientID={p1}", "StudyDate")
        assert result.returncode == 0, result.stderr
        assert none == []
        _, one = findscu(stack, tmp_path / "r", f"StudyInstanceUID={ds['r'].StudyInstanceUID}", f"PatientID={p2}",
                         "StudyDate")
        assert [a.StudyInstanceUID for a in one] == [ds["r_prior"].StudyInstanceUID]


def test_the_status_says_when_a_model_has_no_floor(store: IndexStore) -> None:
    """Issue 17 item 2: a model without a calibration keeps today's answers, and the status page says so."""
    from lookalike.plugin import rest

    status, body = rest.status(store.catalogue, lambda: 0)
    [count] = body["indexed"]
    assert status == 200 and count["model_version"] == "v1"
    assert count["similarity_floor"] is None and "calibrate" in count["warning"]
