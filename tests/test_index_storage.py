"""The index's storage as a site's setting (``index_storage``): an index written in one storage stays searchable after
the setting changes, new segments take the new one, ``lookalike compact`` converts the rest; status reads the index
without reading it ahead."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from lookalike import cli
from lookalike.config import Settings, SettingsError
from lookalike.index import store as store_module
from lookalike.index.segments import IndexParams, Segment
from lookalike.index.store import IndexStore
from tests.support import bulk_fill, clustered, exact, manifest, record

DIM = 16
#: Exact searches (so that fp32 results can be compared id for id), graphs from 200 vectors (so that conversion
#: rewrites a graph segment too).
SHAPE = dict(ann_above=None, graph_min=200, merge_factor=3)


def segment_storages(store: IndexStore) -> list[str]:
    folder = store.index_path("us", "v1")
    return [Segment.open(folder, e.name, e.count).storage for e in manifest(store).segments]


def test_an_fp32_index_reopened_as_fp16_searches_alike_takes_fp16_segments_and_converts_on_compact(
        tmp_path: Path) -> None:
    vectors = clustered(700, DIM, seed=50)
    queries = clustered(40, DIM, seed=51)
    fp32, fp16 = IndexParams(**SHAPE, storage="fp32"), IndexParams(**SHAPE, storage="fp16")
    with IndexStore(tmp_path, snapshot_every=10_000, params=fp32, background_compaction=False) as store:
        reference = bulk_fill(store, [100, 100, 100, 50], vectors)
        store.compact(settle=True)  # one graph segment of 300, one flat one of 50
        assert sorted(segment_storages(store)) == ["fp32", "fp32"]
        before_scores, before_ids = store.search("us", "v1", queries, 10)

    with IndexStore(tmp_path, readonly=True, params=fp16) as reader:  # the query service after the change
        scores, ids = reader.search("us", "v1", queries, 10)
    assert (ids == before_ids).all()
    np.testing.assert_allclose(scores, before_scores, atol=1e-6)

    with IndexStore(tmp_path, snapshot_every=10_000, params=fp16, background_compaction=False) as store:
        scores, ids = store.search("us", "v1", queries, 10)
        assert (ids == before_ids).all()
        rows = range(350, 420)
        reference.update(zip(store.add_many([record(i) for i in rows], vectors[350:420]), vectors[350:420]))
        store.flush()
        assert sorted(segment_storages(store)) == ["fp16", "fp32", "fp32"]  # the new adds, in the new storage
        [layout] = store.layout()
        assert layout["storage"] == "fp32+fp16" and layout["configured_storage"] == "fp16"
        assert layout["segments_by_storage"] == {"fp32": 2, "fp16": 1} and layout["convert_pending"] == 2

        store.compact(settle=True)  # what a writer does by itself: merges write fp16, the graph segment stays
        assert sorted(segment_storages(store)) == ["fp16", "fp32"]
        assert store.compact(settle=True, convert=True) == 1  # `lookalike compact`
        assert segment_storages(store) == ["fp16", "fp16"]
        [layout] = store.layout()
        assert layout["storage"] == "fp16" and layout["convert_pending"] == 0 and layout["pending_merges"] == 0
        assert layout["vectors"] == len(reference)

    with IndexStore(tmp_path, readonly=True, params=fp16) as reader:
        scores, ids = reader.search("us", "v1", queries, 10)
    want_scores, want_ids = exact(reference, queries, 10)
    assert (ids[:, 0] == want_ids[:, 0]).mean() >= 0.95
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), want_ids.tolist())])
    assert recall >= 0.95, recall
    np.testing.assert_allclose(scores, want_scores, atol=2e-3)


def write_settings(path: Path, index_dir: Path, **values: object) -> Path:
    with socket.socket() as probe:  # Orthanc is not running: status still shows the index, read from its folder
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    path.write_text(json.dumps({"index_dir": str(index_dir), "orthanc_url": f"http://127.0.0.1:{closed_port}",
                                **values}))
    return path


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = cli.main(list(argv))
    return code, json.loads(capsys.readouterr().out)


def test_a_site_switches_index_storage_in_its_settings_and_lookalike_compact_converts(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_settings(tmp_path / "lookalike.json", tmp_path / "index")
    vectors = clustered(300, DIM, seed=52)
    with IndexStore.from_settings(Settings.load(config), snapshot_every=10_000,
                                  background_compaction=False) as writer:
        assert writer.params.storage == "fp32"  # the default
        reference = bulk_fill(writer, [100, 100], vectors)

    write_settings(config, tmp_path / "index", index_storage="fp16")
    settings = Settings.load(config)
    with IndexStore.from_settings(settings, snapshot_every=10_000, background_compaction=False) as writer:
        reference.update(zip(writer.add_many([record(i) for i in range(200, 300)], vectors[200:]), vectors[200:]))
        writer.flush()
    _, status = run_cli(capsys, "--config", str(config), "status")
    [layout] = status["index_segments"]
    assert layout["storage"] == "fp32+fp16" and layout["configured_storage"] == "fp16"
    assert layout["convert_pending"] >= 1 and layout["vectors"] == 300

    code, compacted = run_cli(capsys, "--config", str(config), "compact")
    [layout] = compacted["index_segments"]
    assert code == 0 and layout["storage"] == "fp16" and layout["convert_pending"] == 0 and layout["vectors"] == 300
    with IndexStore.from_settings(settings, readonly=True) as reader:
        assert reader.params.storage == "fp16"
        queries = clustered(20, DIM, seed=53)
        scores, ids = reader.search("us", "v1", queries, 5)
    want_scores, want_ids = exact(reference, queries, 5)
    assert (ids[:, 0] == want_ids[:, 0]).mean() >= 0.95
    np.testing.assert_allclose(scores, want_scores, atol=2e-3)


@pytest.mark.parametrize("value", ["fp8", "float16", "FP16", ""])
def test_a_bad_index_storage_is_refused_with_its_name(value: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SettingsError, match=f"'index_storage'.*{value!r}"):
        Settings.from_dict({"index_storage": value})
    config = write_settings(tmp_path / "lookalike.json", tmp_path / "index", index_storage=value)
    assert cli.main(["--config", str(config), "status"]) == 2  # refused at start, before anything is opened
    assert "index_storage" in capsys.readouterr().err
    with pytest.raises(ValueError, match=repr(value)):
        IndexParams(storage=value)


def test_status_reads_the_index_without_starting_the_prefetch_threads(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_settings(tmp_path / "lookalike.json", tmp_path / "index")
    with IndexStore.from_settings(Settings.load(config), background_compaction=False) as writer:
        bulk_fill(writer, [50, 50], clustered(100, DIM, seed=54))
    release, reads = threading.Event(), []

    def read_ahead(folder: Path, names: list[str]) -> int:  # held open, as a large index's read would be
        reads.append(names)
        release.wait(30)
        return 0

    monkeypatch.setattr(store_module, "read_into_page_cache", read_ahead)
    try:
        with IndexStore.from_settings(Settings.load(config), readonly=True) as reader:  # a query service: reads ahead
            reader.refresh()
        assert reads and any(t.name == "index-prefetch" for t in threading.enumerate())
        release.set()
        for thread in threading.enumerate():
            if thread.name == "index-prefetch":
                thread.join(10)
        release.clear()
        reads.clear()

        _, status = run_cli(capsys, "--config", str(config), "status")
        assert status["index_segments"][0]["segments"] == 2
        assert reads == [] and not any(t.name == "index-prefetch" for t in threading.enumerate())
    finally:
        release.set()


def test_the_worker_opens_its_index_in_the_configured_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer is the worker: the store it opens takes ``index_storage`` from the site's settings."""
    from lookalike.worker import tasks

    settings = Settings.from_dict({"index_dir": str(tmp_path / "index"), "index_storage": "fp16"})
    monkeypatch.setattr(tasks, "settings", lambda: settings)
    tasks.embedder.cache_clear()
    try:
        indexer = tasks.indexer()
        try:
            assert indexer.store.params.storage == "fp16"
            assert indexer.store.index_dir == Path(settings.index_dir)
        finally:
            indexer.store.close()
    finally:
        tasks.embedder.cache_clear()
