"""Catalogue, FAISS index and the store that ties them, on hand-made vectors (no Orthanc, no Celery)."""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lookalike.index.catalogue import Catalogue, InstanceRecord
from lookalike.index.segments import Manifest, Segment, read_deleted
from lookalike.index.store import IndexStore
from lookalike.index.vector_index import VectorIndex


def record(sop: str, study: str = "1", *, modality: str = "US", encoder: str = "us",
           model_version: str = "v1") -> InstanceRecord:
    """A record whose Orthanc ids are derived from its UIDs, enough to tell instances and studies apart."""
    return InstanceRecord(
        sop_instance_uid=f"1.2.3.{sop}", sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
        series_instance_uid=f"1.2.3.{study}.1", study_instance_uid=f"1.2.3.{study}", patient_id=f"P{study}",
        study_date="20240102", modality=modality, orthanc_instance_id=f"inst-{sop}",
        orthanc_series_id=f"series-{study}", orthanc_study_id=f"study-{study}", encoder=encoder,
        model_version=model_version)


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return (v / np.linalg.norm(v)).astype(np.float32)


@pytest.fixture
def catalogue(tmp_path: Path) -> Catalogue:
    with Catalogue(tmp_path / "catalogue.sqlite") as cat:
        yield cat


@pytest.fixture
def store(tmp_path: Path) -> IndexStore:
    # Merges run when a test calls compact(): the files on disk then change only when the test says so.
    with IndexStore(tmp_path / "index", background_compaction=False) as s:
        yield s


def saved(store: IndexStore, encoder: str = "us", model_version: str = "v1") -> dict[int, np.ndarray]:
    """What the saved index of one key holds (live id -> vector), read from its files alone."""
    folder = store.index_path(encoder, model_version)
    manifest = Manifest.read(folder, (encoder, model_version))
    live: dict[int, np.ndarray] = {}
    for entry in manifest.segments:
        segment = Segment.open(folder, entry.name, entry.count)
        positions = read_deleted(folder, entry.deleted_file, entry.count).live_positions()
        for position, vector in zip(positions, segment.vectors(positions)):
            assert int(segment.ids[position]) not in live, "an id live twice"
            live[int(segment.ids[position])] = vector
    return live


def random_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def fill(store: IndexStore, n: int = 30, dim: int = 16) -> np.ndarray:
    """Add ``n`` random instances spread over five studies; returns their vectors in id order."""
    vectors = random_vectors(n, dim)
    for i, v in enumerate(vectors):
        store.add(record(str(i), str(i % 5)), v)
    return vectors


# -- catalogue ----------------------------------------------------------------------------------------------


def test_upsert_stores_the_row_and_its_vector(catalogue: Catalogue) -> None:
    row_id = catalogue.upsert(record("1"), np.array([1.0, 2.0, 3.0]))
    (row,) = catalogue.rows_for_study("study-1")
    assert row.id == row_id
    assert row.record == record("1")
    np.testing.assert_array_equal(row.vector, np.array([1, 2, 3], dtype=np.float32))
    assert (row.dim, row.seq, row.live) == (3, 1, True)
    assert catalogue.is_indexed("inst-1") and not catalogue.is_indexed("inst-2")
    assert catalogue.is_indexed("inst-1", "v1") and not catalogue.is_indexed("inst-1", "v2")


def test_upsert_of_the_same_instance_and_model_keeps_one_row_and_its_id(catalogue: Catalogue) -> None:
    first = catalogue.upsert(record("1"), np.array([1.0, 0.0]))
    other = catalogue.upsert(record("2"), np.array([0.0, 1.0]))
    again = catalogue.upsert(record("1"), np.array([0.5, 0.5]))
    assert again == first != other
    rows = {row.sop_instance_uid: row for row in catalogue.rows_for_study("study-1")}
    assert len(rows) == 2
    np.testing.assert_array_equal(rows["1.2.3.1"].vector, [0.5, 0.5])
    assert rows["1.2.3.1"].seq == 3 == catalogue.max_seq()  # the update is a change readers must replay
    # Another model version is another vector of the same instance: a second row.
    assert catalogue.upsert(record("1", model_version="v2"), np.array([1.0, 0.0])) not in (first, other)


def test_problems_are_recorded_newest_first_and_cleared_by_a_success(catalogue: Catalogue) -> None:
    catalogue.record_problem("inst-1", "transient", "Orthanc timed out", orthanc_study_id="study-1")
    catalogue.record_problem("inst-2", "invalid-dicom", "no pixel data", sop_instance_uid="1.2.3.2")
    again = catalogue.record_problem("inst-1", "transient", "Orthanc timed out again")
    assert again.attempts == 2
    assert [p.orthanc_instance_id for p in catalogue.problems()] == ["inst-1", "inst-2"]
    assert [p.orthanc_instance_id for p in catalogue.problems(limit=1)] == ["inst-1"]
    assert catalogue.problem_for("inst-2").code == "invalid-dicom"

    catalogue.upsert(record("1"), np.array([1.0, 0.0]))  # indexing inst-1 succeeded at last
    assert catalogue.problem_for("inst-1") is None
    assert catalogue.clear_problem("inst-2") is True
    assert catalogue.clear_problem("inst-2") is False
    assert catalogue.problems() == []


def test_counts_cover_live_rows_by_modality_encoder_and_model(catalogue: Catalogue) -> None:
    catalogue.upsert(record("1", "1"), np.ones(2))
    catalogue.upsert(record("2", "1"), np.ones(2))
    catalogue.upsert(record("3", "2", modality="DX", encoder="xr"), np.ones(2))
    catalogue.upsert(record("4", "3", modality="CR", encoder="xr"), np.ones(2))
    catalogue.upsert(record("5", "3", modality="CR", encoder="xr"), np.ones(2))
    catalogue.mark_deleted(orthanc_instance_id="inst-5")
    assert catalogue.counts() == [("CR", "xr", "v1", 1), ("DX", "xr", "v1", 1), ("US", "us", "v1", 2)]


def test_deletion_leaves_a_tombstone_that_readers_can_replay(catalogue: Catalogue) -> None:
    a = catalogue.upsert(record("1", "1"), np.ones(2))
    b = catalogue.upsert(record("2", "1"), np.ones(2))
    catalogue.upsert(record("3", "2"), np.ones(2))
    catalogue.record_problem("inst-9", "transient", "x", orthanc_study_id="study-1")
    deleted = catalogue.mark_deleted(orthanc_study_id="study-1")
    assert sorted(row.id for row in deleted) == [a, b]
    assert catalogue.rows_for_study("study-1") == []
    assert {row.live for row in catalogue.rows_for_study("study-1", live_only=False)} == {False}
    assert not catalogue.is_indexed("inst-1")
    assert catalogue.problems() == []  # nothing left to fix in a deleted study
    changes = catalogue.changes_since(3, "v1")
    assert [(c.id, c.vector) for c in changes] == [(a, None), (b, None)]
    assert [c.seq for c in changes] == [4, 5]
    assert catalogue.mark_deleted(orthanc_study_id="study-1") == []  # already gone: no new change
    assert catalogue.max_seq() == 5
    with pytest.raises(ValueError):
        catalogue.mark_deleted()


def test_read_only_catalogue_reads_what_the_writer_commits(tmp_path: Path, catalogue: Catalogue) -> None:
    with Catalogue(catalogue.path, readonly=True) as reader:
        assert reader.max_seq() == 0
        catalogue.upsert(record("1"), np.ones(2))
        assert reader.max_seq() == 1
        with pytest.raises(PermissionError):
            reader.upsert(record("2"), np.ones(2))
    with Catalogue(tmp_path / "absent.sqlite", readonly=True) as missing:
        assert (missing.counts(), missing.max_seq(), missing.rows_for_study("s")) == ([], 0, [])


# -- vector index -------------------------------------------------------------------------------------------


def test_search_returns_exact_cosine_best_first() -> None:
    index = VectorIndex(3)
    gallery = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 2], [-1, 0, 0]], dtype=np.float32)
    index.add_or_replace([10, 11, 12, 13], gallery)
    query = np.array([[2, 1, 0]], dtype=np.float32)
    scores, ids = index.search(query, 10)  # k above the size is capped: no -1 padding
    expected = (gallery / np.linalg.norm(gallery, axis=1, keepdims=True)) @ unit(query[0])
    assert ids.tolist() == [[11, 10, 12, 13]]
    np.testing.assert_allclose(scores[0], expected[[1, 0, 2, 3]], atol=1e-6)


def test_replacing_an_id_leaves_one_entry() -> None:
    index = VectorIndex(2)
    index.add_or_replace([7, 8], np.array([[1, 0], [0, 1]]))
    index.add_or_replace([7], np.array([[0, 1]]))
    assert len(index) == 2 and sorted(index.ids().tolist()) == [7, 8]
    scores, ids = index.search(np.array([0, 1]), 2)
    np.testing.assert_allclose(scores[0], [1, 1], atol=1e-6)
    assert index.remove([7, 99]) == 1 and index.ids().tolist() == [8]


@pytest.mark.parametrize("bad", [[np.nan, 1, 0], [np.inf, 0, 0], [0, 0, 0], [1, 0], [1, 0, 0, 0], [1e300, 0, 0]])
def test_unusable_vectors_are_rejected_and_change_nothing(bad: list[float]) -> None:
    index = VectorIndex(3)
    index.add_or_replace([1], np.array([[1, 0, 0]]))
    with pytest.raises(ValueError):
        index.add_or_replace([1], np.array([bad], dtype=np.float64))
    assert len(index) == 1
    np.testing.assert_allclose(index.search(np.array([1, 0, 0]), 1)[0], [[1]], atol=1e-6)


def test_extreme_but_valid_vectors_normalise_without_overflow() -> None:
    index = VectorIndex(2)
    index.add_or_replace([1], np.array([[3e38, 3e38]], dtype=np.float32))  # squares overflow float32
    scores, ids = index.search(np.array([1e-30, 1e-30], dtype=np.float32), 1)
    assert ids.tolist() == [[1]] and scores[0][0] == pytest.approx(1.0, abs=1e-6)


# -- store --------------------------------------------------------------------------------------------------


def test_add_then_search_and_one_entry_per_reindexed_instance(store: IndexStore) -> None:
    first = store.add(record("1"), [1, 0, 0])
    store.add(record("2"), [0, 1, 0])
    assert store.add(record("1"), [0, 0, 1]) == first  # re-indexed with the same model
    assert store.size("us", "v1") == 2
    scores, ids = store.search("us", "v1", np.array([0, 0, 5]), 5)
    assert ids[0].tolist()[0] == first and scores[0][0] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        store.add(record("3"), [1, 0, 0, 0])  # wrong dimension: nothing written
    with pytest.raises(ValueError):
        store.add(record("3"), [np.nan, 0, 0])
    assert store.catalogue.max_seq() == 3 and not store.catalogue.is_indexed("inst-3")
    with pytest.raises(ValueError):
        store.add(record("4", model_version="../evil"), [1, 0, 0])  # would name a file outside the folder


def test_rebuild_from_the_catalogue_gives_identical_results(store: IndexStore) -> None:
    vectors = fill(store)
    queries = random_vectors(4, 16, seed=1)
    before = store.search("us", "v1", queries, 10)
    path = store.index_path("us", "v1")
    shutil.rmtree(path)
    with IndexStore(store.index_dir) as fresh:
        after = fresh.search("us", "v1", queries, 10)
    for want, got in zip(before, after):
        np.testing.assert_array_equal(want, got)
    assert store.rebuild("us", "v1") == len(vectors)
    assert len(saved(store)) == len(vectors)  # a writer's rebuild replaces the saved index
    for want, got in zip(before, store.search("us", "v1", queries, 10)):
        np.testing.assert_array_equal(want, got)


def test_a_corrupt_snapshot_is_rebuilt_from_the_catalogue(store: IndexStore) -> None:
    fill(store)
    queries = random_vectors(3, 16, seed=2)
    before = store.search("us", "v1", queries, 8)
    for segment_file in store.index_path("us", "v1").glob("*.faiss"):
        segment_file.write_bytes(b"\0" * 100)
    with IndexStore(store.index_dir, readonly=True) as reader:
        after = reader.search("us", "v1", queries, 8)
    for want, got in zip(before, after):
        np.testing.assert_array_equal(want, got)
    with IndexStore(store.index_dir) as restarted:  # a worker that starts and reads the damaged file ...
        restarted.search("us", "v1", queries, 8)
        restarted.flush()  # ... replaces it, though the catalogue has not changed since
    assert len(saved(store)) == 30


def test_a_reader_sees_what_the_writer_adds_after_refresh(store: IndexStore) -> None:
    store.add(record("1"), [1, 0, 0])
    with IndexStore(store.index_dir, readonly=True) as reader:
        assert reader.size("us", "v1") == 1
        new_id = store.add(record("2", "2"), [0, 1, 0])
        reader.refresh()
        scores, ids = reader.search("us", "v1", np.array([0, 1, 0]), 1)
        assert ids.tolist() == [[new_id]]
        assert reader.size("us", "v1") == 2
        with pytest.raises(PermissionError):
            reader.add(record("3"), [1, 1, 1])
        with pytest.raises(PermissionError):
            reader.delete_study("study-1")


def test_a_stale_snapshot_is_caught_up_by_replaying_the_catalogue(store: IndexStore, tmp_path: Path,
                                                                 monkeypatch) -> None:
    a = store.add(record("1", "1"), [1, 0, 0])
    b = store.add(record("2", "2"), [0, 1, 0])
    path = store.index_path("us", "v1")
    shutil.copytree(path, tmp_path / "old")
    c = store.add(record("3", "3"), [0, 0, 1])
    store.add(record("1", "1"), [0, 1, 1])  # a replaced vector
    store.delete_study("study-2")  # and a deletion
    shutil.rmtree(path)  # as if the last saves never happened
    shutil.copytree(tmp_path / "old", path)

    with IndexStore(store.index_dir, readonly=True) as reader:
        replayed_from = []
        changes_since = reader.catalogue.changes_since
        monkeypatch.setattr(reader.catalogue, "changes_since",
                            lambda seq, *args, **kw: replayed_from.append(seq) or changes_since(seq, *args, **kw))
        scores, ids = reader.search("us", "v1", np.array([0, 1, 1]), 5)
    assert replayed_from[0] == 2  # the snapshot was used, then made whole from its seq on
    assert ids.tolist() == [[a, c]]
    assert scores[0][0] == pytest.approx(1.0, abs=1e-6)
    assert b not in ids


def test_delete_study_and_instance_remove_from_search(store: IndexStore) -> None:
    a = store.add(record("1", "1"), [1, 0, 0])
    b = store.add(record("2", "1"), [0.9, 0.1, 0])
    c = store.add(record("3", "2"), [0.8, 0.2, 0])
    d = store.add(record("4", "2"), [0.7, 0.3, 0])
    with IndexStore(store.index_dir, readonly=True) as reader:
        assert reader.size("us", "v1") == 4
        assert store.delete_study("study-1") == 2
        assert store.delete_instance("inst-4") == 1
        assert store.delete_instance("inst-4") == 0
        for s in (store, reader):
            _, ids = s.search("us", "v1", np.array([1, 0, 0]), 10)
            assert ids.tolist() == [[c]], s
    assert set(saved(store)) == {c}
    # Re-indexing a deleted instance brings it back under its old id.
    assert store.add(record("1", "1"), [1, 0, 0]) == a
    assert store.search("us", "v1", np.array([1, 0, 0]), 1)[1].tolist() == [[a]]


def test_encoders_keep_separate_indexes(store: IndexStore) -> None:
    us = store.add(record("1", "1"), [1, 0, 0])
    xr = store.add(record("2", "2", modality="DX", encoder="xr"), [1, 0, 0, 0])
    assert store.search("us", "v1", np.array([1, 0, 0]), 5)[1].tolist() == [[us]]
    assert store.search("xr", "v1", np.array([1, 0, 0, 0]), 5)[1].tolist() == [[xr]]
    assert sorted(p.parent.name for p in store.index_dir.glob("*/manifest.json")) == ["us-v1", "xr-v1"]


def test_a_snapshot_ahead_of_the_catalogue_is_not_trusted(store: IndexStore) -> None:
    """A catalogue restored from a backup (or recreated) must win over a snapshot that remembers more."""
    fill(store, n=5, dim=4)
    store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store.catalogue.path}{suffix}").unlink(missing_ok=True)
    with Catalogue(store.catalogue.path) as restored:
        kept = restored.upsert(record("0", "0"), np.array([1, 0, 0, 0], dtype=np.float32))
    with IndexStore(store.index_dir, readonly=True) as reader:
        assert reader.size("us", "v1") == 1
        assert reader.search("us", "v1", np.array([0, 1, 0, 0]), 5)[1].tolist() == [[kept]]


def test_a_writer_waits_for_the_write_lock_of_another_process(store: IndexStore) -> None:
    store.add(record("1"), [1, 0, 0])
    done = threading.Event()
    with open(store.index_dir / "write.lock", "a+b") as other_process:
        fcntl.flock(other_process.fileno(), fcntl.LOCK_EX)
        writer = threading.Thread(target=lambda: (store.add(record("2"), [0, 1, 0]), done.set()))
        writer.start()
        time.sleep(0.3)
        blocked = not done.is_set() and not store.catalogue.is_indexed("inst-2")
        # Searching meanwhile is not held up by the waiting writer.
        assert store.search("us", "v1", np.array([1, 0, 0]), 1)[1].shape == (1, 1)
        fcntl.flock(other_process.fileno(), fcntl.LOCK_UN)
    writer.join(timeout=10)
    assert blocked and done.is_set() and store.catalogue.is_indexed("inst-2")


def test_concurrent_writers_serialise_and_lose_nothing(store: IndexStore) -> None:
    """Two stores (as two worker processes would hold) writing at once: every vector reaches catalogue and file."""
    other = IndexStore(store.index_dir)
    vectors = random_vectors(40, 8, seed=3)
    errors: list[BaseException] = []

    def write(s: IndexStore, start: int) -> None:
        try:
            for i in range(start, len(vectors), 2):
                s.add(record(str(i), str(i % 4)), vectors[i])
        except BaseException as error:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(error)

    threads = [threading.Thread(target=write, args=(s, k)) for k, s in enumerate((store, other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert errors == []
    assert store.catalogue.counts() == [("US", "us", "v1", 40)]
    assert len(saved(store)) == 40
    with IndexStore(store.index_dir, readonly=True) as reader:
        assert reader.size("us", "v1") == 40


def test_delete_series_removes_only_that_series(tmp_path) -> None:
    import numpy as np

    from lookalike.index.catalogue import InstanceRecord
    from lookalike.index.store import IndexStore

    def record(i: int, series: str) -> InstanceRecord:
        return InstanceRecord(
            sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1", series_instance_uid=f"1.2.{series}",
            study_instance_uid="1.2", patient_id="P", study_date="20250101", modality="US",
            orthanc_instance_id=f"i{i}", orthanc_series_id=series, orthanc_study_id="st", encoder="us", model_version="m1",
        )

    with IndexStore(tmp_path) as store:
        for i, series in enumerate(["s1", "s1", "s2"]):
            v = np.zeros(4, np.float32)
            v[i] = 1
            store.add(record(i, series), v)
        store.catalogue.record_problem("i0", "transient", "x", orthanc_study_id="st")
        assert store.delete_series("s1") == 2
        assert [r.orthanc_instance_id for r in store.catalogue.rows_for_study("st")] == ["i2"]
        assert store.size("us", "m1") == 1
        assert store.catalogue.problem_for("i0") is None


def test_reader_sees_an_empty_catalogue_while_the_writer_has_not_committed_its_schema(tmp_path) -> None:
    import sqlite3

    from lookalike.index.catalogue import Catalogue

    sqlite3.connect(tmp_path / "catalogue.sqlite").close()  # the file exists, its schema does not yet
    reader = Catalogue(tmp_path / "catalogue.sqlite", readonly=True)
    assert reader.counts() == [] and reader.problems() == []
    Catalogue(tmp_path / "catalogue.sqlite").close()
    assert reader.counts() == []  # opens for real now that the schema is there
    reader.close()


def test_a_catalogue_of_schema_2_gains_study_time_and_keeps_its_rows(tmp_path) -> None:
    """A catalogue written before StudyTime was kept: opened by the writer, it gets the column; its rows read with an
    unknown time ("") and keep their ids, and new rows keep theirs."""
    import sqlite3

    from lookalike.index import catalogue as module

    path = tmp_path / "catalogue.sqlite"
    old_schema = module._SCHEMA.replace("    study_time          TEXT,\n", "")
    assert old_schema != module._SCHEMA
    with sqlite3.connect(path) as conn:
        conn.executescript(old_schema)
        conn.execute("INSERT INTO instances (sop_instance_uid, sop_class_uid, series_instance_uid, study_instance_uid,"
                     " patient_id, study_date, modality, orthanc_instance_id, orthanc_series_id, orthanc_study_id,"
                     " encoder, model_version, vector, dim, indexed_at, seq) VALUES ('1.2.3.1', '1.2', '1.2.3.1.1',"
                     " '1.2.3.1', 'P1', '20240102', 'US', 'inst-1', 'series-1', 'study-1', 'us', 'v1', ?, 2,"
                     " 'then', 1)", (np.ones(2, "<f4").tobytes(),))
        conn.execute("PRAGMA user_version=2")
    conn.close()
    with Catalogue(path) as catalogue:
        [old] = catalogue.rows_for_study("study-1")
        assert old.study_time == "" and old.id == 1
        catalogue.upsert(InstanceRecord(**{**old.record.__dict__, "sop_instance_uid": "1.2.3.2",
                                           "orthanc_instance_id": "inst-2", "study_time": "101500"}), np.ones(2))
        assert sorted(r.study_time for r in catalogue.rows_for_study("study-1")) == ["", "101500"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == module._SCHEMA_VERSION > 2
    conn.close()
    reader = Catalogue(path, readonly=True)
    assert sorted(r.study_time for r in reader.rows_for_study("study-1", with_vectors=False)) == ["", "101500"]
    reader.close()


def test_problems_of_one_study(tmp_path) -> None:
    from lookalike.index.catalogue import Catalogue

    with Catalogue(tmp_path / "catalogue.sqlite") as catalogue:
        catalogue.record_problem("i1", "invalid-dicom", "cut short", orthanc_study_id="st1")
        catalogue.record_problem("i2", "no-pixel-data", "none", orthanc_study_id="st2")
        assert [p.orthanc_instance_id for p in catalogue.problems(orthanc_study_id="st2")] == ["i2"]
        assert len(catalogue.problems()) == 2


def test_snapshots_are_saved_in_batches_and_readers_miss_nothing_meanwhile(tmp_path) -> None:
    import numpy as np

    from lookalike.index.catalogue import InstanceRecord
    from lookalike.index.store import IndexStore

    def record(i: int) -> InstanceRecord:
        return InstanceRecord(
            sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1", series_instance_uid="1.2.9",
            study_instance_uid=f"1.2.{i}", patient_id="P", study_date="20250101", modality="US",
            orthanc_instance_id=f"i{i}", orthanc_series_id=f"se{i}", orthanc_study_id=f"st{i}", encoder="us",
            model_version="m1",
        )

    writer = IndexStore(tmp_path, snapshot_every=3)
    reader = IndexStore(tmp_path, readonly=True)
    snapshot = writer.index_path("us", "m1") / "manifest.json"
    for i in range(2):
        writer.add(record(i), np.eye(4, dtype=np.float32)[i])
    assert not snapshot.exists()  # two changes: no snapshot yet
    reader.refresh()
    assert reader.size("us", "m1") == 2  # replayed from the catalogue
    writer.add(record(2), np.eye(4, dtype=np.float32)[2])
    assert snapshot.exists()
    writer.add(record(3), np.eye(4, dtype=np.float32)[3])
    writer.close()  # saves the fourth
    fresh = IndexStore(tmp_path, readonly=True)
    fresh.refresh()
    assert fresh.size("us", "m1") == 4
    import json

    assert json.loads(snapshot.read_text())["seq"] == fresh.catalogue.max_seq()


def test_add_many_writes_a_batch_like_one_add_at_a_time(tmp_path: Path) -> None:
    vectors = random_vectors(12, 8, seed=5)
    records = [record(str(i), str(i % 3)) for i in range(12)]
    with IndexStore(tmp_path / "one") as one, IndexStore(tmp_path / "batch") as batch:
        single_ids = [one.add(r, v) for r, v in zip(records, vectors)]
        assert batch.add_many(records[:5], vectors[:5]) + batch.add_many(records[5:], vectors[5:]) == single_ids
        queries = random_vectors(3, 8, seed=6)
        for want, got in zip(one.search("us", "v1", queries, 6), batch.search("us", "v1", queries, 6)):
            np.testing.assert_array_equal(want, got)
        # A batch holding one unusable vector writes nothing at all.
        bad = random_vectors(2, 8, seed=7)
        bad[1] = np.nan
        with pytest.raises(ValueError):
            batch.add_many([record("20"), record("21")], bad)
        assert not batch.catalogue.is_indexed("inst-20") and batch.size("us", "v1") == 12
        # The same instance twice in one batch: one row, the last vector.
        twice = batch.add_many([record("30"), record("30")], np.eye(8, dtype=np.float32)[:2])
        assert twice[0] == twice[1] and batch.size("us", "v1") == 13
        assert batch.search("us", "v1", np.eye(8)[1], 1)[1].tolist() == [[twice[0]]]
