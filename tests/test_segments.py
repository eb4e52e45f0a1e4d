"""Segmented index: adds, deletions and compaction against an exact reference; the ANN path's recall; crash safety."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import faiss
import numpy as np
import pytest

from lookalike.index import segments as segments_module
from lookalike.index.catalogue import InstanceRecord
from lookalike.index.segments import IndexParams, Manifest, Segment, size_class
from lookalike.index.store import IndexStore
from tests.support import record, clustered, unit, exact, manifest, bulk_fill

DIM = 16


def check_against_reference(store: IndexStore, reference: dict[int, np.ndarray], seed: int) -> None:
    """Same scores as a brute-force search of the reference, and the same ids wherever scores are not tied."""
    queries = np.random.default_rng(seed).standard_normal((5, DIM)).astype(np.float32)
    k = min(12, len(reference))
    want_scores, want_ids = exact(reference, queries, k)
    scores, ids = store.search("us", "v1", queries, k)
    assert store.size("us", "v1") == len(reference)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert (ids == want_ids).all()


SMALL = IndexParams(ann_above=None, graph_min=48, merge_factor=3, purge_share=0.3)


def test_adds_replacements_deletions_and_compaction_match_an_exact_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    reference: dict[int, np.ndarray] = {}
    instance_ids: dict[int, int] = {}  # instance number -> catalogue id
    with IndexStore(tmp_path, snapshot_every=7, params=SMALL, background_compaction=False) as store:
        for step in range(12):
            # A batch of new instances, some replaced vectors, some deletions.
            new = list(range(len(instance_ids), len(instance_ids) + 25))
            vectors = rng.standard_normal((len(new), DIM)).astype(np.float32)
            for i, cid in zip(new, store.add_many([record(i) for i in new], vectors)):
                instance_ids[i] = cid
            reference.update({instance_ids[i]: unit(v) for i, v in zip(new, vectors)})
            for i in rng.choice(sorted(instance_ids), 4, replace=False):
                vector = rng.standard_normal(DIM).astype(np.float32)
                assert store.add(record(int(i)), vector) == instance_ids[int(i)]
                reference[instance_ids[int(i)]] = unit(vector)
            for i in rng.choice(sorted(instance_ids), 3, replace=False):
                removed = store.delete_instance(f"inst-{i}")
                assert removed == (1 if instance_ids[int(i)] in reference else 0)
                reference.pop(instance_ids[int(i)], None)
            check_against_reference(store, reference, seed=step)
            if step % 3 == 2:
                segments_before = len(manifest(store).segments) if store.index_path("us", "v1").exists() else 0
                merges = store.compact()
                assert merges > 0 or segments_before < SMALL.merge_factor
                check_against_reference(store, reference, seed=100 + step)
        store.flush()
        # merge_factor saves in a row, each sealing 5 new vectors into a segment of its own: segments of one size
        # class, enough of them for a merge to be due.
        segments_before = len(manifest(store).segments)
        for _ in range(SMALL.merge_factor):
            new = list(range(len(instance_ids), len(instance_ids) + 5))
            vectors = rng.standard_normal((len(new), DIM)).astype(np.float32)
            for i, cid in zip(new, store.add_many([record(i) for i in new], vectors)):
                instance_ids[i] = cid
            reference.update({instance_ids[i]: unit(v) for i, v in zip(new, vectors)})
            store.flush()
        before = manifest(store)
        assert len(before.segments) == segments_before + SMALL.merge_factor
        # Compaction merges them into fewer segments, stores no vector twice, leaves nothing its merge policy would
        # merge (at most merge_factor - 1 segments per size class, no segment past purge_share of tombstones), and
        # answers as brute force does.
        assert store.compact() > 0
        saved = manifest(store)
        assert len(saved.segments) < len(before.segments)
        assert len(reference) <= sum(e.count for e in saved.segments) <= sum(e.count for e in before.segments)
        assert store.compact() == 0 and manifest(store).segments == saved.segments
        check_against_reference(store, reference, seed=500)
        # Graphs on the large segments only.
        folder = store.index_path("us", "v1")
        opened = [Segment.open(folder, e.name, e.count) for e in saved.segments]
        assert any(s.graph for s in opened) and all(s.graph == (s.count >= SMALL.graph_min) for s in opened)
        # Nothing but the manifest and the files it names.
        named = {"manifest.json"} | {f"{e.name}{x}" for e in saved.segments for x in (".faiss", ".ids.npy")} | {
            e.deleted_file for e in saved.segments if e.deleted_file}
        assert {p.name for p in folder.iterdir()} == named
    with IndexStore(tmp_path, readonly=True, params=SMALL) as reader:  # a fresh process reads the same index
        check_against_reference(reader, reference, seed=999)


def test_the_ann_path_finds_the_exact_top_10_on_50k_clustered_vectors(tmp_path: Path) -> None:
    """Recall@10 >= 0.98 against exact search, product parameters, the graph used for every vector."""
    n, dim = 50_000, 128
    vectors = clustered(n, dim, seed=1)
    queries = clustered(200, dim, seed=2)
    params = IndexParams(ann_above=0)  # the shipped HNSW settings, but the graph in use at this size already
    with IndexStore(tmp_path, snapshot_every=n, params=params, background_compaction=False) as store:
        ids = np.array(store.add_many([record(i) for i in range(n)], vectors))
        store.flush()
        store.compact()
        folder = store.index_path("us", "v1")
        assert [Segment.open(folder, e.name, e.count).graph for e in manifest(store).segments] == [True]
        scores, found = store.search("us", "v1", queries, 10)
    exact_order = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    truth = ids[exact_order]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())])
    assert recall >= 0.98, recall
    # The scores are exact cosines of the vectors found, best first.
    by_id = dict(zip(ids.tolist(), vectors))
    np.testing.assert_allclose(scores, [[queries[q] @ by_id[i] for i in row] for q, row in enumerate(found.tolist())],
                               atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_tombstones_in_a_graph_segment_are_never_returned(tmp_path: Path) -> None:
    vectors = clustered(400, DIM, seed=3, clusters=20)
    params = IndexParams(ann_above=0, graph_min=100, purge_share=0.9)
    with IndexStore(tmp_path, snapshot_every=1000, params=params, background_compaction=False) as store:
        ids = store.add_many([record(i) for i in range(400)], vectors)
        store.flush()
        store.compact()
        # Delete the exact neighbours of a query: the graph search must step past them, not return them.
        query = vectors[:1]
        _, near = store.search("us", "v1", query, 60)
        gone = set(near[0].tolist())
        for i, cid in enumerate(ids):
            if cid in gone:
                store.delete_instance(f"inst-{i}")
        assert manifest(store).segments[0].deleted_file is None  # not yet saved: the tombstones live in memory
        for s in (store, IndexStore(tmp_path, readonly=True, params=params)):
            _, found = s.search("us", "v1", query, 20)
            assert found.shape == (1, 20) and not gone & set(found[0].tolist())
        store.flush()
        with IndexStore(tmp_path, readonly=True, params=params) as reader:
            assert reader.size("us", "v1") == 340
            assert not gone & set(reader.search("us", "v1", query, 340)[1][0].tolist())


def test_a_save_writes_only_the_changes(tmp_path: Path) -> None:
    """Incremental saves: existing segment files are never rewritten; one instance adds one small segment."""
    with IndexStore(tmp_path, snapshot_every=10_000, params=SMALL, background_compaction=False) as store:
        store.add_many([record(i) for i in range(500)], clustered(500, DIM, seed=4))
        store.flush()
        folder = store.index_path("us", "v1")
        before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("seg-*")}
        store.add(record(500), clustered(1, DIM, seed=5)[0])
        store.delete_instance("inst-3")
        store.flush()
        after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("seg-*")}
    assert {name: after[name] for name in before} == before  # untouched
    new = {name: (folder / name).stat().st_size for name in set(after) - set(before)}
    assert len(new) == 3  # the new one-vector segment (.faiss, .ids.npy) and the old segment's deletion list
    assert sum(new.values()) < 4096


def test_a_merge_that_dies_before_its_manifest_loses_nothing(tmp_path: Path, monkeypatch) -> None:
    vectors = clustered(90, DIM, seed=6, clusters=10)
    with IndexStore(tmp_path, snapshot_every=30, params=SMALL, background_compaction=False) as store:
        ids: list[int] = []
        for j in (0, 30, 60):  # three saves, three segments
            ids += store.add_many([record(i) for i in range(j, j + 30)], vectors[j:j + 30])
        reference = dict(zip(ids, vectors))
        names_before = sorted(e.name for e in manifest(store).segments)
        assert len(names_before) == 3

        def power_cut(*args, **kwargs):
            raise OSError("power cut")

        monkeypatch.setattr(segments_module.Manifest, "write", power_cut)
        with pytest.raises(OSError, match="power cut"):
            store.compact()
        monkeypatch.undo()
        folder = store.index_path("us", "v1")
        assert sorted(e.name for e in manifest(store).segments) == names_before
        assert len(list(folder.glob("seg-*.faiss"))) == 4  # the merged segment, written but named by no manifest
        with IndexStore(tmp_path, readonly=True, params=SMALL) as reader:
            check_against_reference(reader, reference, seed=7)
        assert store.compact() == 1  # the next run clears the leftover and merges again
        assert len(list(folder.glob("seg-*.faiss"))) == 1
        check_against_reference(store, reference, seed=8)


def test_deletions_during_a_merge_are_carried_into_the_merged_segment(tmp_path: Path, monkeypatch) -> None:
    vectors = clustered(90, DIM, seed=8, clusters=10)
    with IndexStore(tmp_path, snapshot_every=30, params=SMALL, background_compaction=False) as store, \
            IndexStore(tmp_path, readonly=True, params=SMALL) as reader:
        ids: list[int] = []
        for j in (0, 30, 60):
            ids += store.add_many([record(i, study=1000 + i) for i in range(j, j + 30)], vectors[j:j + 30])
        reader.refresh()  # holds the three segments open
        write = Segment.write.__func__

        def write_while_another_worker_deletes(cls, *args, **kwargs):
            store.delete_instance("inst-5")  # the merge holds no lock while it builds
            store.add(record(7), -vectors[7])  # a replaced vector, too
            return write(cls, *args, **kwargs)

        monkeypatch.setattr(Segment, "write", classmethod(write_while_another_worker_deletes))
        assert store.compact() == 1
        monkeypatch.undo()
        reference = dict(zip(ids, vectors))
        del reference[ids[5]]
        reference[ids[7]] = -vectors[7]
        for s in (store, reader):  # the reader follows the new manifest although the old files are gone
            check_against_reference(s, reference, seed=9)
        store.flush()
        with IndexStore(tmp_path, readonly=True, params=SMALL) as fresh:
            check_against_reference(fresh, reference, seed=10)


def test_the_background_thread_merges_while_adds_go_on(tmp_path: Path) -> None:
    reference = {}
    with IndexStore(tmp_path, snapshot_every=5, params=SMALL) as store:
        vectors = clustered(200, DIM, seed=11)
        for i in range(200):
            reference[store.add(record(i), vectors[i])] = vectors[i]
        def settled() -> bool:  # no size class holds merge_factor segments: nothing left for the thread to merge
            classes = Counter(size_class(e.count, SMALL.merge_factor) for e in manifest(store).segments)
            return max(classes.values()) < SMALL.merge_factor

        deadline = time.monotonic() + 60
        while not settled() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert settled() and len(manifest(store).segments) < 10  # 40 saves, merged down
        check_against_reference(store, reference, seed=12)
    with IndexStore(tmp_path, readonly=True, params=SMALL) as reader:
        check_against_reference(reader, reference, seed=13)


# -- settling: an index that is fast whenever it is read ----------------------------------------------------------

#: Small enough that a test's few hundred vectors make graphs; the idle time short enough to wait for.
SETTLE = IndexParams(ann_above=None, graph_min=48, merge_factor=3, purge_share=0.3, settle_idle_s=0.2)


def settled(layout: dict, params: IndexParams) -> bool:
    """The shape a settle leaves: nothing left to merge, at most one segment without a graph."""
    return layout["pending_merges"] == 0 and layout["segments"] - layout["graph_segments"] <= 1


# Five batches of 40 and two of 5: the merge policy alone merges three of the 40s and leaves two 40s and two 5s
# flat, searched exactly by every lookup.
BURST = [40, 5, 40, 40, 5, 40, 40]


def test_a_writer_that_closes_after_a_bulk_fill_leaves_the_index_settled(tmp_path: Path) -> None:
    vectors = clustered(sum(BURST), DIM, seed=20)
    with IndexStore(tmp_path, snapshot_every=10_000, params=SETTLE) as store:
        reference = bulk_fill(store, BURST, vectors)
    with IndexStore(tmp_path, readonly=True, params=SETTLE) as reader:  # the next reader, another process's view
        [layout] = reader.layout()
        assert settled(layout, SETTLE), layout
        assert layout["segments"] <= 2 and layout["vectors"] == sum(BURST)
        check_against_reference(reader, reference, seed=21)
    folder = tmp_path / "us-v1"
    assert {p.name for p in folder.iterdir()} == {"manifest.json"} | {
        f"{e.name}{x}" for e in manifest(store).segments for x in (".faiss", ".ids.npy")}


def test_a_writer_gone_idle_settles_its_index_while_it_stays_open(tmp_path: Path) -> None:
    vectors = clustered(sum(BURST), DIM, seed=22)
    with IndexStore(tmp_path, snapshot_every=10_000, params=SETTLE) as store, \
            IndexStore(tmp_path, readonly=True, params=SETTLE) as reader:
        reference = bulk_fill(store, BURST, vectors)
        deadline = time.monotonic() + 60
        while not settled(reader.layout()[0], SETTLE) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert settled(reader.layout()[0], SETTLE), reader.layout()
        check_against_reference(reader, reference, seed=23)
        # Indexing goes on after the settle; the next idle spell settles again.
        more = clustered(60, DIM, seed=24)
        reference.update(zip(store.add_many([record(1000 + i) for i in range(60)], more), more))
        assert store.delete_instance("inst-3") == 1
        del reference[list(reference)[3]]  # ids in the order of the records
        store.flush()
        deadline = time.monotonic() + 60
        while not settled(reader.layout()[0], SETTLE) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert settled(reader.layout()[0], SETTLE), reader.layout()
        check_against_reference(reader, reference, seed=25)


def lookalike_cli(config: Path, *args: str) -> tuple[int, dict]:
    """The real command line, as a site runs it; its exit status and the JSON it prints."""
    exe = Path(sys.executable).with_name("lookalike")
    done = subprocess.run([str(exe), "--config", str(config), *args], capture_output=True, text=True, timeout=300)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def test_lookalike_compact_merges_beside_a_running_writer_and_status_shows_it(tmp_path: Path) -> None:
    with socket.socket() as probe:  # Orthanc is not running: status still shows the index, read from its folder
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    config = tmp_path / "lookalike.json"
    config.write_text(json.dumps({"index_dir": str(tmp_path / "index"), "orthanc_url": f"http://127.0.0.1:{closed_port}"}))
    sizes = [30] * 6
    vectors = clustered(sum(sizes) + 20, DIM, seed=30)
    # A writer that never merges by itself, kept open while the command runs (the worker of a site).
    with IndexStore(tmp_path / "index", snapshot_every=10_000, background_compaction=False) as writer:
        reference = bulk_fill(writer, sizes, vectors)
        code, status = lookalike_cli(config, "status")
        assert code == 1 and "error" in status  # the plugin did not answer
        [before] = status["index_segments"]
        assert (before["encoder"], before["model_version"], before["vectors"]) == ("us", "v1", sum(sizes))
        assert before["segments"] == len(sizes) and before["pending_merges"] > 0
        check_against_reference(writer, reference, seed=31)

        code, compacted = lookalike_cli(config, "compact")
        assert code == 0 and compacted["merges"] == before["pending_merges"]
        [after] = compacted["index_segments"]
        assert after["segments"] == 1 and after["pending_merges"] == 0 and after["vectors"] == sum(sizes)

        # The writer follows the new manifest: its next changes land on the merged index, nothing lost.
        check_against_reference(writer, reference, seed=32)
        extra = list(range(sum(sizes), sum(sizes) + 20))
        reference.update(zip(writer.add_many([record(i) for i in extra], vectors[extra]), vectors[extra]))
        assert writer.delete_instance("inst-0") == 1
        del reference[list(reference)[0]]
        writer.flush()
        check_against_reference(writer, reference, seed=33)
    code, status = lookalike_cli(config, "status")
    [now] = status["index_segments"]
    assert now["segments"] == 2 and now["vectors"] == len(reference) and now["tombstones"] == 1
    with IndexStore(tmp_path / "index", readonly=True) as reader:
        check_against_reference(reader, reference, seed=34)


def test_half_precision_storage_halves_the_vectors_bytes_and_keeps_the_ranking(tmp_path: Path) -> None:
    vectors = clustered(900, DIM, seed=40)
    sizes = {}
    for storage in ("fp32", "fp16"):
        folder = tmp_path / storage
        folder.mkdir()
        segment = Segment.write(folder, np.arange(900), vectors, IndexParams(storage=storage), graph=False)
        sizes[storage] = (folder / f"{segment.name}.faiss").stat().st_size
        np.testing.assert_allclose(segment.vectors(np.arange(900)), vectors, atol=1e-3)
    assert sizes["fp16"] < 0.6 * sizes["fp32"]

    # An index saved in float32 and switched to fp16: merges rewrite its segments in half precision.
    exact32 = IndexParams(ann_above=0, graph_min=200, merge_factor=3)
    half = IndexParams(ann_above=0, graph_min=200, merge_factor=3, storage="fp16")
    with IndexStore(tmp_path / "index", snapshot_every=10_000, params=exact32, background_compaction=False) as store:
        reference = bulk_fill(store, [150, 150, 150], vectors)
    with IndexStore(tmp_path / "index", snapshot_every=10_000, params=half, background_compaction=False) as store:
        more = range(450, 900)
        reference.update(zip(store.add_many([record(i) for i in more], vectors[450:]), vectors[450:]))
        store.flush()
        assert store.compact(settle=True) > 0
        folder = store.index_path("us", "v1")
        opened = [Segment.open(folder, e.name, e.count) for e in manifest(store).segments]
        assert opened and all(isinstance(s.index, (faiss.IndexHNSWSQ, faiss.IndexScalarQuantizer)) for s in opened)
    with IndexStore(tmp_path / "index", readonly=True, params=half) as reader:
        queries = clustered(50, DIM, seed=41)
        want_scores, want_ids = exact(reference, queries, 10)
        scores, ids = reader.search("us", "v1", queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), want_ids.tolist())])
    assert recall >= 0.95, recall
    np.testing.assert_allclose(scores, want_scores, atol=2e-3)


def resident_bytes(path: Path) -> int:
    """How much of ``path`` the page cache holds (util-linux's fincore)."""
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True,
                          text=True, check=True)
    return int(done.stdout.split()[0])


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_reader_reads_the_segments_into_the_page_cache_when_it_opens_them(tmp_path: Path) -> None:
    """After a reboot or memory pressure, a fresh reader's first lookups would fault pages in one at a time."""
    if shutil.which("fincore") is None:
        pytest.skip("fincore (util-linux) is not installed")
    with IndexStore(tmp_path, snapshot_every=100_000, params=SMALL, background_compaction=False) as store:
        store.add_many([record(i) for i in range(20_000)], clustered(20_000, DIM, seed=50))
    files = [p for p in store.index_path("us", "v1").glob("seg-*")]
    for path in files:
        evict(path)
    if sum(resident_bytes(p) for p in files) > sum(p.stat().st_size for p in files) // 2:
        pytest.skip("this file system keeps the files cached whatever it is told (tmpfs)")
    with IndexStore(tmp_path, readonly=True, params=SMALL) as reader:
        assert reader.size("us", "v1") == 20_000  # opens the segment; no lookup yet
        deadline = time.monotonic() + 30
        while (time.monotonic() < deadline
               and any(resident_bytes(p) < p.stat().st_size - 4096 for p in files)):
            time.sleep(0.1)
        assert all(resident_bytes(p) >= p.stat().st_size - 4096 for p in files)
