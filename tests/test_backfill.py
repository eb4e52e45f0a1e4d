"""``lookalike backfill`` against real parts: an Orthanc filled before Lookalike was there, and a second real
Orthanc playing a remote PACS that the archive C-FINDs and C-MOVEs from."""

from __future__ import annotations

import json
from collections import Counter
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import redis

from lookalike.config import QUEUE
from lookalike.dicom_io.samples import wrap_image
from lookalike.indexer.catalogue import CATALOGUE_FILE
from lookalike.stack import ORTHANC_AET, Stack, StackConfig, storescu
from tests.conftest import SAMPLES, live_rows, require_programs, wait_for

pytestmark = pytest.mark.stack

#: Studies of the archive: (modality, study date, instances).
ARCHIVE = [("US", "20240105", 4), ("US", "20240220", 4), ("DX", "20240310", 2), ("DX", "20250410", 2),
           ("US", "20250515", 4), ("US", "20250620", 4), ("DX", "20250701", 2), ("US", "20250802", 4)]


def _pixels(modality: str) -> list[np.ndarray]:
    prefix = "us_" if modality == "US" else "xr_"
    return [pydicom.dcmread(f).pixel_array for f in sorted(SAMPLES.glob(f"{prefix}*.dcm"))[:6]]


def _write_studies(out: Path, studies: list[tuple[str, str, int]], seed: int, prefix: str) -> list[Path]:
    rng = np.random.default_rng(seed)
    files = []
    for s, (modality, date, n) in enumerate(studies):
        base = _pixels(modality)
        study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        for k in range(n):
            pixels = base[(s + k) % len(base)].astype(np.int16) + rng.integers(-8, 9, base[0].shape[:2])
            ds = wrap_image(np.clip(pixels, 0, 255).astype(np.uint8), modality,
                            patient_id=f"{prefix}{s:03d}", patient_name=f"BACKFILL^{s}", patient_birth_date="19650101",
                            patient_sex="F", study_instance_uid=study_uid, study_date=date, study_time="080000",
                            accession_number=f"{prefix}{s:05d}", study_description="backfill test",
                            series_instance_uid=series_uid, instance_number=k + 1)
            path = out / f"{prefix}_{s:02d}_{k}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict:
    """An Orthanc that held its studies before Lookalike: no plugin, no catch-up; only backfill indexes."""
    require_programs("Orthanc", "redis-server", "storescu")
    tmp = tmp_path_factory.mktemp("archive")
    files = _write_studies(tmp, ARCHIVE, seed=3, prefix="PBF")
    # Beside the images: an instance of another modality in a US study, and one without pixel data.
    first = pydicom.dcmread(files[0])
    other = first.copy()
    other.Modality, other.SeriesInstanceUID, other.SOPInstanceUID = "OT", pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    other.save_as(tmp / "other_modality.dcm", enforce_file_format=True)
    empty = pydicom.dcmread(files[-1])
    del empty.PixelData
    empty.SOPInstanceUID = pydicom.uid.generate_uid()
    empty.save_as(tmp / "no_pixels.dcm", enforce_file_format=True)
    config = StackConfig.create(tmp / "stack", with_plugin=False, extra_settings={"catch_up_interval": 0})
    with Stack(config) as stack:
        assert storescu(config, [*files, tmp / "other_modality.dcm", tmp / "no_pixels.dcm"]).returncode == 0
        yield {"stack": stack, "settings": config.state_dir / "lookalike.json",
               "images": sum(n for _, _, n in ARCHIVE) + 1}  # the instance without pixels is US too


def _backfill(settings: Path, *args: str, timeout: float = 600) -> dict:
    run = subprocess.run([sys.executable, "-m", "lookalike.cli", "--config", str(settings), "backfill", *args],
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "backfill" in run.stderr  # the progress bar, for the operator
    return json.loads(run.stdout)


def _catalogue(stack: Stack) -> list[tuple[str, str, int]]:
    """(Orthanc study id, instance id, live rows) for every instance in the catalogue."""
    counts = Counter((study, instance) for study, instance, _, _ in live_rows(stack))
    return [(study, instance, n) for (study, instance), n in counts.items()]


def _broker(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.config.settings().redis_url)


class TestLocalArchive:
    def test_dry_run_says_what_it_would_do_and_queues_nothing(self, archive: dict) -> None:
        report = _backfill(archive["settings"], "--dry-run")
        assert report["studies"] == len(ARCHIVE)
        assert report["skipped"]["would be queued (dry run)"] == archive["images"]
        assert report["skipped"]["not an image modality (OT)"] == 1
        assert report["queued"] == 0 and _broker(archive["stack"]).llen(QUEUE) == 0
        assert _catalogue(archive["stack"]) == []

    def test_modality_and_date_range_narrow_the_walk(self, archive: dict) -> None:
        stack = archive["stack"]
        report = _backfill(archive["settings"], "--modality", "DX", "--from", "20250101", "--to", "20251231")
        assert report["studies"] == 2 and report["indexed"] == 4 and report["failed"] == {}
        dx_2025 = {stack.http().post(f"{stack.config.orthanc_url}/tools/find", timeout=10, json={
            "Level": "Study", "Query": {"ModalitiesInStudy": "DX", "StudyDate": "20250101-20251231"}}).json()[i]
            for i in range(2)}
        assert {study for study, _, _ in _catalogue(stack)} == dx_2025

    def test_a_stopped_run_resumes_from_its_checkpoint_and_indexes_each_instance_once(self, archive: dict,
                                                                                       tmp_path: Path) -> None:
        stack, checkpoint = archive["stack"], tmp_path / "walk.json"
        argv = [sys.executable, "-m", "lookalike.cli", "--config", str(archive["settings"]), "backfill",
                "--checkpoint", str(checkpoint), "--rate", "2", "--batch", "2"]
        first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: checkpoint.exists() and len(json.loads(checkpoint.read_text())["done"]) >= 2, timeout=180,
                 what="the first run to settle two studies")
        first.send_signal(signal.SIGKILL)  # stopped as hard as a machine can stop it
        first.wait(timeout=30)
        done_before = len(json.loads(checkpoint.read_text())["done"])

        report = _backfill(archive["settings"], "--checkpoint", str(checkpoint), "--rate", "50")
        assert report["studies_resumed_from_checkpoint"] == done_before
        # The instance without pixels fails in whichever run reaches its study (walks go in Orthanc id order).
        assert report["failed"] in ({}, {"no-pixel-data": 1})
        with sqlite3.connect(f"file:{stack.config.state_dir / 'index' / CATALOGUE_FILE}?mode=ro", uri=True) as conn:
            assert conn.execute("SELECT code FROM problems").fetchall() == [("no-pixel-data",)]
        assert report["still_waiting"] == 0
        rows = _catalogue(stack)
        assert len(rows) == archive["images"] - 1 and all(n == 1 for _, _, n in rows)
        assert len(json.loads(checkpoint.read_text())["done"]) == len(ARCHIVE)

        again = _backfill(archive["settings"], "--checkpoint", str(checkpoint))
        assert again["studies_resumed_from_checkpoint"] == len(ARCHIVE) and again["queued"] == 0


class TestRemotePacs:
    def test_studies_found_by_c_find_are_moved_into_orthanc_and_indexed(self, archive: dict,
                                                                        tmp_path: Path) -> None:
        stack = archive["stack"]
        pacs_config = StackConfig.create(
            tmp_path / "pacs", with_plugin=False,
            extra_orthanc={"DicomAet": "PACS",
                           "DicomModalities": {"archive": [ORTHANC_AET, "127.0.0.1", stack.config.dicom_port]}})
        remote = [("US", "20230101", 3), ("US", "20230202", 3), ("DX", "20230303", 2)]
        with Stack(pacs_config, worker=False) as pacs:
            files = _write_studies(tmp_path, remote, seed=11, prefix="PRM")
            for path in files:
                assert pacs.http().post(f"{pacs_config.orthanc_url}/instances", data=path.read_bytes(), timeout=30).ok
            r = stack.http().put(f"{stack.config.orthanc_url}/modalities/pacs", timeout=10,
                                 json={"AET": "PACS", "Host": "127.0.0.1", "Port": pacs_config.dicom_port})
            assert r.ok, r.text
            before = len(_catalogue(stack))

            dry = _backfill(archive["settings"], "--remote", "pacs", "--modality", "US", "--dry-run")
            assert dry["skipped"]["would be moved from the remote PACS (dry run)"] == 2 and dry["moved_from_remote"] == 0

            report = _backfill(archive["settings"], "--remote", "pacs", "--modality", "US", "--to", "20231231")
            assert report["moved_from_remote"] == 2 and report["indexed"] == 6 and report["failed"] == {}
        assert len(_catalogue(stack)) == before + 6
        for path in files[:6]:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
            assert stack.http().post(f"{stack.config.orthanc_url}/tools/lookup", data=uid, timeout=10).json()
