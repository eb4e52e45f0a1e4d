"""The worker's indexing step without Orthanc or Celery: a fake REST API, a fake encoder, a real index."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from lookalike.lab.samples import wrap_image
from lookalike.worker.pipeline import Pipeline
from lookalike.index.store import IndexStore
from lookalike.orthanc.client import OrthancUnavailableError
from tests.support import FakeEncoder, FakeOrthanc, dicom_bytes, random_us


@pytest.fixture
def setup(tmp_path):
    api, encoder = FakeOrthanc(), FakeEncoder()
    store = IndexStore(tmp_path)
    yield Pipeline.local(api, store, lambda name, weights=None: encoder, max_pixels=10_000_000), api, store, encoder
    store.close()


class TestInstanceIndexer:
    def test_good_instance_is_indexed_with_its_uids(self, setup) -> None:
        indexer, api, store, _ = setup
        ds = random_us(1)
        api.add("i1", dicom_bytes(ds))
        outcome = indexer.index("i1")
        assert outcome.status == "indexed" and outcome.model_version == "us-test-1"
        [row] = store.catalogue.rows_for_study("st-i1")
        assert row.sop_instance_uid == ds.SOPInstanceUID and row.study_instance_uid == ds.StudyInstanceUID
        assert row.patient_id == "P1" and row.modality == "US" and row.orthanc_series_id == "se-i1"

    def test_lesion_box_is_stored_in_the_instances_own_pixels(self, setup) -> None:
        """The box the encoder saw in the cropped frame is kept in stored pixels: crop offset undone."""
        indexer, api, store, _ = setup
        pixels = np.full((300, 400), 60, np.uint8)
        pixels[150:190, 200:260] = 255  # the "lesion", inside the declared imaging region
        ds = wrap_image(pixels, "US", patient_id="PBOX", patient_name="T^T", patient_birth_date="19700101",
                        patient_sex="F", study_instance_uid=pydicom.uid.generate_uid(), study_date="20250101",
                        study_time="090000", accession_number="A1", study_description="test")
        region = pydicom.Dataset()
        region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
        region.RegionLocationMinX0, region.RegionLocationMinY0 = 100, 50
        region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 349, 279
        ds.SequenceOfUltrasoundRegions = [region]
        api.add("ibox", dicom_bytes(ds))
        assert indexer.index("ibox").status == "indexed"
        [row] = store.catalogue.rows_for_study("st-ibox")
        assert row.lesion_box == (200, 150, 260, 190, 0.9)

        plain_ds = wrap_image(np.full((64, 80), 90, np.uint8), "US", patient_id="PPLAIN", patient_name="T^T",
                              patient_birth_date="19700101", patient_sex="F",
                              study_instance_uid=pydicom.uid.generate_uid(), study_date="20250101",
                              study_time="090000", accession_number="A2", study_description="test")
        api.add("iplain", dicom_bytes(plain_ds))  # nothing bright: the whole image, no box
        indexer.index("iplain")
        [plain] = store.catalogue.rows_for_study("st-iplain")
        assert plain.lesion_box is None

    def test_cine_frames_are_embedded_together_and_averaged(self, setup) -> None:
        indexer, api, store, encoder = setup
        rng = np.random.default_rng(7)
        clip = rng.integers(0, 255, (9, 64, 80), dtype=np.uint8)
        clip[::2] //= 4  # frames unlike each other, so that the mean differs from any one frame
        ds = random_us(8)
        ds.NumberOfFrames = 9
        ds.PixelData = clip.tobytes()
        api.add("cine", dicom_bytes(ds))
        assert indexer.index("cine").status == "indexed"
        [batch] = encoder.batches
        assert len(batch) == 5  # frames 0, 2, 4, 6, 8 in one call
        embedded = FakeEncoder().embed_with_boxes(batch).vectors
        expected = embedded.mean(axis=0) / np.linalg.norm(embedded.mean(axis=0))
        [row] = store.catalogue.rows_for_study("st-cine")
        scores, ids = store.search("us", "us-test-1", expected[None, :], k=1)
        assert ids[0, 0] == row.id and scores[0, 0] > 1 - 1e-5  # the stored vector is the normalised mean
        from lookalike.dicom import decode_image, read_dataset
        from lookalike.worker.pipeline import _instance_vector

        vector, _ = _instance_vector(FakeEncoder(), decode_image(read_dataset(dicom_bytes(ds))))
        np.testing.assert_allclose(vector, expected, atol=1e-6)
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-6
        assert not np.allclose(vector, embedded[2], atol=1e-3)  # not just the middle frame

    def test_bad_input_is_recorded_and_the_next_instance_still_indexes(self, setup) -> None:
        indexer, api, store, _ = setup
        good = dicom_bytes(random_us(2))
        api.add("truncated", good[: len(good) - 1000])
        no_pixels = random_us(3)
        del no_pixels.PixelData
        api.add("nopixels", dicom_bytes(no_pixels))
        api.add("good", good)
        assert indexer.index("truncated").code == "invalid-dicom"
        assert indexer.index("nopixels").code == "no-pixel-data"
        assert indexer.index("good").status == "indexed"
        codes = {p.orthanc_instance_id: p.code for p in store.catalogue.problems()}
        assert codes == {"truncated": "invalid-dicom", "nopixels": "no-pixel-data"}
        problem = store.catalogue.problem_for("nopixels")
        assert problem.orthanc_study_id == "st-nopixels" and problem.sop_instance_uid == no_pixels.SOPInstanceUID

    def test_report_is_skipped_with_a_reason(self, setup) -> None:
        indexer, api, store, encoder = setup
        ds = random_us(4)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
        api.add("sr", dicom_bytes(ds))
        outcome = indexer.index("sr")
        assert outcome.status == "skipped" and outcome.code == "not-indexable"
        assert encoder.calls == 0 and store.catalogue.counts() == []

    def test_orthanc_down_propagates_for_a_retry_and_records_nothing(self, setup) -> None:
        indexer, api, store, _ = setup
        api.add("i1", dicom_bytes(random_us(5)))
        api.down = True
        with pytest.raises(OrthancUnavailableError):
            indexer.index("i1")
        assert store.catalogue.problems() == []

    def test_forget_each_level_removes_only_what_was_deleted(self, setup) -> None:
        """Orthanc reports a deleted patient by its Orthanc id alone (the hash of its PatientID), after it is gone."""
        from lookalike.orthanc.client import orthanc_resource_id

        indexer, api, store, _ = setup
        for i in (21, 22, 23, 24):
            api.add(f"f{i}", dicom_bytes(random_us(i)))  # patients P21..P24, one study each
            indexer.index(f"f{i}")
        live = lambda: sorted(row.patient_id for study in ("st-f21", "st-f22", "st-f23", "st-f24")  # noqa: E731
                              for row in store.catalogue.rows_for_study(study))
        indexer.indexer.forget("patient", orthanc_resource_id("P21"))
        assert live() == ["P22", "P23", "P24"]
        indexer.indexer.forget("study", "st-f22")
        indexer.indexer.forget("series", "se-f23")
        indexer.indexer.forget("instance", "f24")
        assert live() == []
        indexer.indexer.forget("patient", orthanc_resource_id("P-UNKNOWN"))  # nothing of it: nothing happens

    def test_instance_deleted_meanwhile_is_gone_not_failed(self, setup) -> None:
        indexer, _, store, _ = setup
        assert indexer.index("nowhere").status == "gone"
        assert store.catalogue.problems() == []

    def test_a_success_after_a_failure_clears_the_problem(self, setup) -> None:
        indexer, api, store, _ = setup
        good = dicom_bytes(random_us(6))
        api.add("i1", good[:200])
        assert indexer.index("i1").status == "failed"
        api.add("i1", good)
        assert indexer.index("i1").status == "indexed"
        assert store.catalogue.problem_for("i1") is None


class TestIndexTask:
    """The Celery task around the indexer: what a failure of Orthanc itself leaves behind.

    The task's batch runs here as the pool process runs it; what it would queue again is kept by ``send``.
    """

    def _patch(self, monkeypatch, tmp_path, error: Exception):
        from lookalike.worker import tasks

        class Failing(FakeOrthanc):
            def get_bytes(self, path: str) -> bytes:
                raise error

        store = IndexStore(tmp_path)
        pipeline = Pipeline.local(Failing(), store, lambda name, weights=None: FakeEncoder(), max_pixels=10_000_000)
        sent = []
        monkeypatch.setattr(tasks, "indexer", lambda: pipeline.indexer)
        monkeypatch.setattr(tasks, "embedder", lambda: pipeline.embedder)
        monkeypatch.setattr(tasks, "send", lambda name, args, kwargs=None, **options: sent.append((name, args, kwargs, options)))
        return tasks, store, sent

    def test_refused_credentials_are_recorded_at_once_without_retry(self, monkeypatch, tmp_path) -> None:
        from lookalike.orthanc.client import OrthancAuthError

        tasks, store, sent = self._patch(monkeypatch, tmp_path, OrthancAuthError("Orthanc refused the credentials of user 'lookalike'"))
        tasks.index_instance.run("i1")
        problem = store.catalogue.problem_for("i1")
        assert problem.code == "orthanc-auth" and "credentials" in problem.message
        assert sent == []
        store.close()

    def test_orthanc_unreachable_is_sent_again_later_not_recorded(self, monkeypatch, tmp_path) -> None:
        from lookalike.config import QUEUE, TASK_INDEX_INSTANCE
        from lookalike.worker.batching import Item

        tasks, store, sent = self._patch(monkeypatch, tmp_path, OrthancUnavailableError("connection refused"))
        tasks.index_instance.run_batch([Item("t1", ("i1", "se", "st"), {"missing_only": True}, retries=2)])
        [(name, args, kwargs, options)] = sent
        assert (name, args, kwargs) == (TASK_INDEX_INSTANCE, ["i1", "se", "st"], {"missing_only": True})
        assert options["queue"] == QUEUE and options["retries"] == 3 and 0 <= options["countdown"] <= tasks.RETRY_BACKOFF_MAX
        assert store.catalogue.problem_for("i1") is None
        store.close()

    def test_orthanc_unreachable_is_given_up_after_the_retry_budget(self, monkeypatch, tmp_path) -> None:
        from lookalike.worker.batching import Item

        tasks, store, sent = self._patch(monkeypatch, tmp_path, OrthancUnavailableError("connection refused"))
        tasks.index_instance.run_batch([Item("t1", ("i1",), {}, retries=tasks.MAX_RETRIES)])
        assert sent == []
        problem = store.catalogue.problem_for("i1")
        assert problem.code == "orthanc-unavailable" and "connection refused" in problem.message
        store.close()
