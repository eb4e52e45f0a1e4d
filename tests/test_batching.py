"""Batched embedding: a batch gives what one instance at a time gives, a bad instance fails alone, and the real worker
embeds batches in its pool process (never in the process that forks it), losing nothing when that process dies."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lookalike.lab.samples import wrap_image
from lookalike.encoders.base import Embedding
from lookalike.worker.pipeline import Embedder, InstanceIndexer, Job, Pipeline, Request, Result
from lookalike.index.store import IndexStore
from lookalike.ops.stack import child_pids
from tests.support import (SAMPLES, FakeEncoder, FakeOrthanc, dicom_bytes, live_rows, random_us, require_programs,
                           wait_for)

RECORD_FIELDS = ("sop_instance_uid", "sop_class_uid", "series_instance_uid", "study_instance_uid", "patient_id",
                 "study_date", "modality", "orthanc_instance_id", "orthanc_series_id", "orthanc_study_id", "encoder",
                 "model_version", "lesion_box")


def _real_encoders():
    from lookalike.encoders import load_encoder

    return lambda name, weights=None: load_encoder(name, weights)


def _cine(seed: int) -> bytes:
    """A US clip of five frames, unlike each other, from a shipped sample."""
    base = pydicom.dcmread(sorted(SAMPLES.glob("us_*.dcm"))[seed]).pixel_array
    base = base if base.ndim == 2 else base[..., 0]
    frames = np.stack([np.roll(base, 7 * k, axis=1) // (1 + k % 2) for k in range(5)]).astype(np.uint8)
    ds = wrap_image(frames[0], "US", patient_id="PCINE", patient_name="C^C", patient_birth_date="19700101",
                    patient_sex="F", study_instance_uid=pydicom.uid.generate_uid(), study_date="20250101",
                    study_time="090000", accession_number="C1", study_description="cine")
    ds.NumberOfFrames = 5
    ds.PixelData = frames.tobytes()
    return dicom_bytes(ds)


@pytest.fixture
def archive() -> tuple[FakeOrthanc, list[str]]:
    """Real ultrasound and radiograph instances (shipped samples, a cine clip), a truncated file and one without
    pixels, in one Orthanc-like source."""
    api = FakeOrthanc()
    ids = []
    for path in sorted(SAMPLES.glob("us_*.dcm"))[:5] + sorted(SAMPLES.glob("xr_*.dcm"))[:4]:
        api.add(path.stem, path.read_bytes())
        ids.append(path.stem)
    api.add("cine", _cine(2))
    good = dicom_bytes(random_us(11))
    api.add("truncated", good[: len(good) - 1000])
    no_pixels = random_us(12)
    del no_pixels.PixelData
    api.add("nopixels", dicom_bytes(no_pixels))
    ids[3:3] = ["truncated"]
    ids[7:7] = ["cine", "nopixels"]
    return api, ids


def _rows(store: IndexStore, ids: list[str]) -> dict[str, tuple]:
    out = {}
    for instance_id in ids:
        for row in store.catalogue.rows_for_study(f"st-{instance_id}"):
            out[row.orthanc_instance_id] = (tuple(getattr(row, f) for f in RECORD_FIELDS), row.vector)
    return out


class TestBatchAgainstOneAtATime:
    def test_same_vectors_rows_and_problems_with_the_real_encoders(self, tmp_path: Path, archive) -> None:
        api, ids = archive
        encoders = _real_encoders()
        with IndexStore(tmp_path / "batch") as batched, IndexStore(tmp_path / "single") as single:
            outcomes = Pipeline.local(api, batched, encoders, 50_000_000).index_many([Request(i) for i in ids])
            one = Pipeline.local(api, single, encoders, 50_000_000)
            singles = [one.index(i) for i in ids]
            assert [(o.status, o.code) for o in outcomes] == [(o.status, o.code) for o in singles]
            assert {o.orthanc_instance_id: o.code for o in outcomes if o.status != "indexed"} == {
                "truncated": "invalid-dicom", "nopixels": "no-pixel-data"}
            a, b = _rows(batched, ids), _rows(single, ids)
            assert sorted(a) == sorted(b) == sorted(set(ids) - {"truncated", "nopixels"})
            assert {r[0][RECORD_FIELDS.index("encoder")] for r in a.values()} == {"us", "xr"}
            for instance_id in a:
                assert a[instance_id][0] == b[instance_id][0], instance_id
                np.testing.assert_allclose(a[instance_id][1], b[instance_id][1], rtol=0, atol=1e-5,
                                           err_msg=instance_id)
            problems = lambda store: {(p.orthanc_instance_id, p.code, p.sop_instance_uid, p.orthanc_study_id)  # noqa: E731
                                      for p in store.catalogue.problems()}
            assert problems(batched) == problems(single) and len(problems(batched)) == 2

    def test_results_sent_to_the_writer_as_json_write_the_same_rows(self, tmp_path: Path, archive) -> None:
        """The split path: embedded on one host, serialised through Redis, written on the index host."""
        import json

        api, ids = archive
        encoders = _real_encoders()
        with IndexStore(tmp_path / "local") as local, IndexStore(tmp_path / "remote") as remote:
            Pipeline.local(api, local, encoders, 50_000_000).index_many([Request(i) for i in ids])
            writer = InstanceIndexer(api, remote)
            jobs = [Job.from_dict(json.loads(json.dumps(job.__dict__))) for job in writer.plan([Request(i) for i in ids])]
            sent = json.loads(json.dumps([r.to_dict() for r in Embedder(api, encoders, 50_000_000).run(jobs)]))
            writer.apply([Result.from_dict(r) for r in sent])
            a, b = _rows(local, ids), _rows(remote, ids)
            assert sorted(a) == sorted(b) and len(a) == len(ids) - 2
            for instance_id in a:
                assert a[instance_id][0] == b[instance_id][0]
                assert np.array_equal(a[instance_id][1], b[instance_id][1])  # float32 through JSON: exact
            assert {p.code for p in remote.catalogue.problems()} == {"invalid-dicom", "no-pixel-data"}

    def test_missing_only_skips_what_is_indexed_and_a_duplicate_is_embedded_once(self, tmp_path: Path) -> None:
        api, encoder = FakeOrthanc(), FakeEncoder()
        for k in range(3):
            api.add(f"m{k}", dicom_bytes(random_us(30 + k)))
        with IndexStore(tmp_path) as store:
            indexer = Pipeline.local(api, store, lambda name, weights=None: encoder, 10_000_000)
            indexer.index("m0")
            outcomes = indexer.index_many([Request("m0", missing_only=True), Request("m1"),
                                           Request("m1", missing_only=True), Request("m2", missing_only=True)])
            assert [o.status for o in outcomes] == ["indexed"] * 4
            assert outcomes[0].message == "indexed already" and outcomes[2].message == "a duplicate in its batch"
            assert [len(batch) for batch in encoder.batches] == [1, 2]  # m0 alone, then m1 and m2 in one call
            assert sorted(i for i in ("m0", "m1", "m2") if store.catalogue.is_indexed(i)) == ["m0", "m1", "m2"]


class RefusingEncoder(FakeEncoder):
    """Embeds like FakeEncoder, but fails on a batch holding an all-black image (as a model may on odd input)."""

    def embed_with_boxes(self, images: list[np.ndarray]) -> Embedding:
        if any(float(np.max(im)) == 0.0 for im in images):
            self.calls += 1
            raise RuntimeError("the model cannot take an all-black image")
        return super().embed_with_boxes(images)


class TestOneBadImage:
    def test_an_image_the_model_refuses_fails_alone_and_its_batch_mates_are_indexed(self, tmp_path: Path) -> None:
        api, encoder = FakeOrthanc(), RefusingEncoder()
        for k in range(4):
            api.add(f"b{k}", dicom_bytes(random_us(40 + k)))
        black = random_us(44)
        black.PixelData = np.zeros((64, 80), np.uint8).tobytes()
        api.add("black", dicom_bytes(black))
        with IndexStore(tmp_path) as store:
            indexer = Pipeline.local(api, store, lambda name, weights=None: encoder, 10_000_000)
            outcomes = indexer.index_many([Request(i) for i in ("b0", "b1", "black", "b2", "b3")])
            assert [o.status for o in outcomes] == ["indexed", "indexed", "failed", "indexed", "indexed"]
            problem = store.catalogue.problem_for("black")
            assert problem.code == "internal-error" and "all-black" in problem.message
            assert problem.sop_instance_uid == black.SOPInstanceUID
            assert all(store.catalogue.is_indexed(f"b{k}") for k in range(4))


class TestDevice:
    def test_settings_name_a_device_or_are_refused(self) -> None:
        import torch

        from lookalike.encoders.base import resolve_device

        assert resolve_device("cpu") == "cpu"
        assert resolve_device("auto", 3) == (f"cuda:{3 % torch.cuda.device_count()}" if torch.cuda.is_available()
                                             else "cpu")
        for bad in ("gpu", "cuda:x", "cuda:99", "tpu:0"):
            with pytest.raises(ValueError):
                resolve_device(bad)

    def test_the_workers_main_process_refuses_to_load_a_model(self, monkeypatch) -> None:
        from lookalike.worker import tasks

        monkeypatch.setattr(tasks, "_MAIN_PID", os.getpid())
        with pytest.raises(RuntimeError, match="main process"):
            tasks.load_model("us")


# -- the real worker --------------------------------------------------------------------------------------------

def _maps_torch(pid: int) -> bool:
    """Whether a process has torch's library mapped (imported torch; CUDA needs it first)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _count(stack) -> int:
    """Live catalogue rows; 0 while the writer's pool process is still creating the catalogue."""
    import sqlite3

    try:
        return len(live_rows(stack))
    except sqlite3.OperationalError:
        return 0


def _instances(out: Path, n: int, tag: str) -> list[Path]:
    """``n`` US instances of one study, flipped copies of shipped samples (no lookup test ranks them)."""
    base = [pydicom.dcmread(f).pixel_array for f in sorted(SAMPLES.glob("us_*.dcm"))]
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = []
    for k in range(n):
        pixels = base[k % len(base)]
        pixels = np.ascontiguousarray((pixels if pixels.ndim == 2 else pixels[..., 0])[::-1, ::-1])
        ds = wrap_image(pixels, "US", patient_id=f"PBATCH{tag}", patient_name="B^B", patient_birth_date="19700101",
                        patient_sex="F", study_instance_uid=study, study_date="20250101", study_time="090000",
                        accession_number=f"B{tag}", study_description="batch test", series_instance_uid=series,
                        instance_number=k + 1)
        path = out / f"{tag}{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


@pytest.mark.stack
class TestRealWorker:
    def test_batches_in_the_pool_process_and_a_killed_pool_process_loses_nothing(self, tmp_path: Path) -> None:
        """Instances queued while the worker is down arrive together: they are embedded in batches, in the pool
        process only; its pool process killed with -9 mid-batch, every instance is still indexed once, with the
        vector one-at-a-time embedding gives."""
        from lookalike.dicom import decode_image, read_dataset
        from lookalike.encoders import load_encoder
        from lookalike.worker.pipeline import _instance_vector
        from lookalike.ops.stack import Stack, StackConfig, storescu

        require_programs("Orthanc", "redis-server", "storescu")
        config = StackConfig.create(tmp_path / "stack", extra_settings={"catch_up_interval": 0})
        files = _instances(tmp_path, 48, "K")
        with Stack(config, worker=False) as stack:
            assert storescu(config, files).returncode == 0
            log = config.logs / "worker.log"
            stack.start_worker()
            wait_for(lambda: stack.worker_ready(), timeout=60, what="the worker")
            main = stack.procs["worker"].pid
            wait_for(lambda: log.exists() and "embedding a batch" in log.read_text(), timeout=120, what="a batch")
            [child] = child_pids(main)
            os.kill(child, signal.SIGKILL)
            wait_for(lambda: _count(stack) >= len(files), timeout=300, interval=0.5, what="every instance")
            time.sleep(1.0)
            text = log.read_text()
            assert "lost with its pool process" in text, "the pool process was not killed mid-batch"
            sizes = [int(n) for n in re.findall(r"embedding a batch of (\d+)", text)]
            assert max(sizes) > 1 and max(sizes) <= config.settings().batch_size
            rows = live_rows(stack)
            assert len(rows) == len({instance for _, instance, _, _ in rows}) == len(files)
            status = stack.http().get(f"{config.orthanc_url}/lookalike/status", timeout=30).json()
            assert status["problems"] == []
            # The model lives in the pool process; the process that forks it never even imported torch.
            [child] = child_pids(main)
            assert _maps_torch(child) and not _maps_torch(main)
            assert re.search(rf"encoder us-\S+ on cpu in process {child}\b", text)

            encoder = load_encoder("us")
            from lookalike.index.catalogue import Catalogue, CATALOGUE_FILE

            catalogue = Catalogue(config.state_dir / "index" / CATALOGUE_FILE, readonly=True)
            by_sop = {}
            for study, *_ in {r[:1] for r in rows}:
                by_sop.update({row.sop_instance_uid: row.vector for row in catalogue.rows_for_study(study)})
            for path in files[:8]:
                expected, _ = _instance_vector(encoder, decode_image(read_dataset(path.read_bytes())))
                np.testing.assert_allclose(by_sop[pydicom.dcmread(path).SOPInstanceUID], expected, rtol=0, atol=1e-5)
            catalogue.close()

    def test_split_embedding_worker_and_writer(self, tmp_path: Path) -> None:
        """``remote_embedding``: the writer (the plugin's queue and lookalike.write) plans and writes, never loading
        torch; the embedding worker (lookalike.embed) embeds, never opening the index. Every instance indexed once."""
        from lookalike.config import EMBED_QUEUE, QUEUE, WRITE_QUEUE
        from lookalike.index.catalogue import CATALOGUE_FILE
        from lookalike.ops.stack import Stack, StackConfig, storescu

        require_programs("Orthanc", "redis-server", "storescu")
        config = StackConfig.create(tmp_path / "stack", extra_settings={"catch_up_interval": 0,
                                                                        "remote_embedding": True})
        files = _instances(tmp_path, 20, "S")
        with Stack(config, worker=False) as stack:
            stack.start_worker("writer", queues=(QUEUE, WRITE_QUEUE))
            stack.start_worker("embedder", queues=(EMBED_QUEUE,))
            for name in ("writer", "embedder"):
                wait_for(lambda: stack.worker_ready(name), timeout=60, what=name)
            assert storescu(config, files).returncode == 0
            wait_for(lambda: _count(stack) >= len(files), timeout=300, interval=0.5, what="every instance")
            rows = live_rows(stack)
            assert len(rows) == len({instance for _, instance, _, _ in rows}) == len(files)
            [writer] = child_pids(stack.procs["writer"].pid)
            [embedder] = child_pids(stack.procs["embedder"].pid)
            assert _maps_torch(embedder) and not _maps_torch(writer)
            opened = lambda pid: {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()  # noqa: E731
                                  if fd.is_symlink()}
            catalogue = str(config.state_dir / "index" / CATALOGUE_FILE)
            assert catalogue in opened(writer) and not any(str(config.state_dir / "index") in f for f in opened(embedder))
            embed_log = (config.logs / "embedder.log").read_text()
            assert "embedding a batch of" in embed_log and "embedding a batch" not in (config.logs / "writer.log").read_text()


class CountingOrthanc(FakeOrthanc):
    def __init__(self) -> None:
        super().__init__()
        self.fetched: list[str] = []

    def get_bytes(self, path: str) -> bytes:
        if path.endswith("/file"):
            self.fetched.append(path.split("/")[2])
        return super().get_bytes(path)


class TestLookAhead:
    def test_the_next_batch_is_fetched_while_this_one_embeds_and_gives_the_same_results(self) -> None:
        api, encoder = CountingOrthanc(), FakeEncoder()
        for k in range(6):
            api.add(f"a{k}", dicom_bytes(random_us(50 + k)))
        first, second = [Job(f"a{k}", None, None) for k in range(3)], [Job(f"a{k}", None, None) for k in range(3, 6)]
        embedder = Embedder(api, lambda name, weights=None: encoder, 10_000_000)
        embedder.run(first, ahead=second)
        ahead = embedder.run(second)
        assert sorted(api.fetched) == [f"a{k}" for k in range(6)]  # each fetched once: the second batch ahead
        fresh = Embedder(api, lambda name, weights=None: FakeEncoder(), 10_000_000).run(second)
        for a, b in zip(ahead, fresh):
            assert a.record == b.record and np.array_equal(a.vector, b.vector)

    def test_an_instance_twice_in_a_batch_is_fetched_again(self) -> None:
        """Orthanc overwrote it after it was fetched ahead: the second request is what says so."""
        api, encoder = CountingOrthanc(), FakeEncoder()
        api.add("o1", dicom_bytes(random_us(60)))
        embedder = Embedder(api, lambda name, weights=None: encoder, 10_000_000)
        embedder.run([], ahead=[Job("o1", None, None)])
        overwritten = random_us(61)
        api.add("o1", dicom_bytes(overwritten))
        [first, second] = embedder.run([Job("o1", None, None), Job("o1", None, None)])
        assert api.fetched.count("o1") == 3
        assert first.record.sop_instance_uid == second.record.sop_instance_uid == overwritten.SOPInstanceUID

    def test_the_encoder_is_asked_for_once_per_batch_and_checkpoint(self) -> None:
        """The loader checks a checkpoint's file each time it is asked: a batch asks once per (encoder, checkpoint),
        its instances fetched ahead or not, and each batch asks again (a checkpoint replaced meanwhile is the next
        batch's); instances of another checkpoint are embedded by that checkpoint's encoder."""
        api, asked, made = FakeOrthanc(), [], {}
        for k in range(8):
            api.add(f"e{k}", dicom_bytes(random_us(70 + k)))

        def encoders(name: str, weights: str | None = None) -> FakeEncoder:
            asked.append((name, weights))
            return made.setdefault(weights, FakeEncoder())

        jobs = [Job(f"e{k}", None, None, {"us": "/other.pt"} if k % 2 else {}) for k in range(8)]
        embedder = Embedder(api, encoders, 10_000_000)
        first = embedder.run(jobs[:4], ahead=jobs[4:])
        assert sorted(asked, key=str) == [("us", "/other.pt"), ("us", None)]
        second = embedder.run(jobs[4:])  # fetched ahead: prepared without threads
        assert sorted(asked, key=str) == [("us", "/other.pt"), ("us", "/other.pt"), ("us", None), ("us", None)]
        assert [r.outcome.status for r in first + second] == ["indexed"] * 8
        assert [len(b) for b in made[None].batches] == [len(b) for b in made["/other.pt"].batches] == [2, 2]
