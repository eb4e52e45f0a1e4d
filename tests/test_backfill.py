"""``lookalike backfill`` against real parts: an Orthanc filled before Lookalike was there, and a second real
Orthanc playing a remote PACS that the archive C-FINDs and C-MOVEs from."""

from __future__ import annotations

import json
import re
import stat
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
from lookalike.lab.samples import wrap_image
from lookalike.index.catalogue import CATALOGUE_FILE
from lookalike.ops.stack import ORTHANC_AET, Stack, StackConfig, free_port, storescu
from tests.support import SAMPLES, live_rows, require_programs, wait_for

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


def _backfill_run(settings: Path, *args: str, status: int = 0, timeout: float = 600) -> tuple[dict, str]:
    """Run ``lookalike backfill`` as a site would (umask 022); its JSON report and what it wrote on stderr."""
    run = subprocess.run([sys.executable, "-m", "lookalike.cli", "--config", str(settings), "backfill", *args],
                         capture_output=True, text=True, timeout=timeout, umask=0o022)
    assert run.returncode == status, run.stderr[-2000:]
    assert "backfill" in run.stderr  # the progress bar, for the operator
    return json.loads(run.stdout), run.stderr


def _backfill(settings: Path, *args: str, status: int = 0, timeout: float = 600) -> dict:
    return _backfill_run(settings, *args, status=status, timeout=timeout)[0]


def _last_bar(stderr: str) -> tuple[int, int, dict[str, int]]:
    """The progress bar as it was left: studies done, studies in all, and the counters beside them."""
    renders = [part for part in re.split(r"[\r\n]", stderr) if re.search(r"\d+/\d+ \[", part)]
    assert renders, stderr[-2000:]
    done, total = map(int, re.search(r"(\d+)/(\d+) \[", renders[-1]).groups())
    return done, total, {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", renders[-1])}


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
        report, stderr = _backfill_run(archive["settings"], "--modality", "DX", "--from", "20250101",
                                       "--to", "20251231")
        assert report["studies"] == 2 and report["indexed"] == 4 and report["failed"] == {}
        # The bar's last state and the JSON are the same counters (the last batch settles after the last study).
        done, total, shown = _last_bar(stderr)
        assert done == total == report["studies"]
        assert shown["indexed"] == report["indexed"] and shown["queued"] == report["queued"]
        assert shown["failed"] == sum(report["failed"].values()) and shown["still_waiting"] == report["still_waiting"]
        dx_2025 = {stack.http().post(f"{stack.config.orthanc_url}/tools/find", timeout=10, json={
            "Level": "Study", "Query": {"ModalitiesInStudy": "DX", "StudyDate": "20250101-20251231"}}).json()[i]
            for i in range(2)}
        assert {study for study, _, _ in _catalogue(stack)} == dx_2025

    def test_checkpoints_are_owner_only(self, archive: dict) -> None:
        report = _backfill(archive["settings"], "--modality", "US", "--from", "20240101", "--to", "20240131")
        assert report["studies"] == 1 and report["still_waiting"] == 0
        folder = archive["settings"].parent / "index" / "backfill"
        files = list(folder.iterdir())
        assert files and stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}
        assert all(json.loads(f.read_text())["done"] for f in files if f.suffix == ".json")

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


@pytest.fixture(scope="module")
def pacs(archive: dict, tmp_path_factory) -> dict:
    """A second real Orthanc, ``PACS``, that knows the archive's Orthanc as ``archive`` and that the archive knows
    as ``pacs``; each test stores its own studies into it, in a year of its own."""
    stack = archive["stack"]
    tmp = tmp_path_factory.mktemp("pacs")
    config = StackConfig.create(
        tmp / "pacs", with_plugin=False,
        extra_orthanc={"DicomAet": "PACS",
                       "DicomModalities": {"archive": [ORTHANC_AET, "127.0.0.1", stack.config.dicom_port]}})
    with Stack(config, worker=False) as running:
        r = stack.http().put(f"{stack.config.orthanc_url}/modalities/pacs", timeout=10,
                             json={"AET": "PACS", "Host": "127.0.0.1", "Port": config.dicom_port})
        assert r.ok, r.text
        yield {"stack": running, "files": tmp}


def _store(stack: Stack, files: list[Path]) -> None:
    for path in files:
        assert stack.http().post(f"{stack.config.orthanc_url}/instances", data=path.read_bytes(), timeout=30).ok


def _indexed_studies(stack: Stack) -> Counter:
    """Study Instance UID -> instances indexed, read back from Orthanc for every catalogued study."""
    per_study = Counter(study for study, _, _ in _catalogue(stack))
    http = stack.http()
    return Counter({http.get(f"{stack.config.orthanc_url}/studies/{study}", timeout=10).json()["MainDicomTags"]
                    ["StudyInstanceUID"]: n for study, n in per_study.items()})


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


class TestRemotePacs:
    def test_studies_found_by_c_find_are_moved_into_orthanc_and_indexed(self, archive: dict, pacs: dict) -> None:
        stack = archive["stack"]
        remote = [("US", "20230101", 3), ("US", "20230202", 3), ("DX", "20230303", 2)]
        files = _write_studies(pacs["files"], remote, seed=11, prefix="PRM")
        _store(pacs["stack"], files)
        before = len(_catalogue(stack))

        dry, stderr = _backfill_run(archive["settings"], "--remote", "pacs", "--modality", "US", "--from", "20230101",
                                    "--to", "20231231", "--dry-run")
        assert dry["skipped"]["would be moved from the remote PACS (dry run)"] == 2 and dry["moved_from_remote"] == 0
        # Every study found counts and advances the bar, those Orthanc does not hold yet included.
        assert dry["studies"] == 2 and _last_bar(stderr)[:2] == (2, 2)

        report = _backfill(archive["settings"], "--remote", "pacs", "--modality", "US", "--from", "20230101",
                           "--to", "20231231")
        assert report["moved_from_remote"] == 2 and report["indexed"] == 6 and report["failed"] == {}
        assert report["instances_moved_from_remote"] == 6 and report["incomplete_studies"] == []
        assert len(_catalogue(stack)) == before + 6
        indexed = _indexed_studies(stack)
        assert {uid: indexed[uid] for uid in map(_uid, files[:6])} == {_uid(files[0]): 3, _uid(files[3]): 3}

    def test_a_study_held_in_part_gets_what_it_lacks(self, archive: dict, pacs: dict) -> None:
        """One of a remote study's three instances is already in Orthanc: the other two are moved, all three
        indexed."""
        stack = archive["stack"]
        files = _write_studies(pacs["files"], [("US", "20220105", 3)], seed=12, prefix="PRT")
        _store(pacs["stack"], files)
        _store(stack, files[:1])

        report = _backfill(archive["settings"], "--remote", "pacs", "--from", "20220101", "--to", "20221231")
        assert report["indexed"] == 3 and report["still_waiting"] == 0
        assert _indexed_studies(stack)[_uid(files[0])] == 3
        assert report["studies"] == 1 and report["incomplete_studies"] == []
        assert report["moved_from_remote"] == 1 and report["instances_moved_from_remote"] == 2

    def test_a_report_lookalike_filed_does_not_make_up_for_a_missing_image(self, archive: dict, pacs: dict) -> None:
        """Orthanc holds two of a remote study's three images and a Lookalike SR filed into the study: three
        instances, as many as the PACS counts. The missing image is moved all the same, and all three indexed."""
        import io

        from lookalike.dicom.sr import build_similarity_report

        stack = archive["stack"]
        files = _write_studies(pacs["files"], [("US", "20200105", 3)], seed=14, prefix="PSR")
        _store(pacs["stack"], files)
        _store(stack, files[:2])
        report_sr = build_similarity_report([pydicom.dcmread(files[0], stop_before_pixels=True)], [],
                                            algorithm_version="test", model_version="test")
        buffer = io.BytesIO()
        report_sr.save_as(buffer, enforce_file_format=True)
        assert stack.http().post(f"{stack.config.orthanc_url}/instances", data=buffer.getvalue(), timeout=30).ok
        uid = _uid(files[0])
        study_id = stack.http().post(f"{stack.config.orthanc_url}/tools/lookup", data=uid, timeout=10).json()[0]["ID"]
        held = stack.http().get(f"{stack.config.orthanc_url}/studies/{study_id}/instances", timeout=10).json()
        assert len(held) == 3  # the count alone cannot tell this study from a complete one

        report = _backfill(archive["settings"], "--remote", "pacs", "--from", "20200101", "--to", "20201231")
        assert report["incomplete_studies"] == [] and report["instances_moved_from_remote"] == 1
        assert report["indexed"] == 3 and report["still_waiting"] == 0
        assert _indexed_studies(stack)[uid] == 3
        sops = {i["MainDicomTags"]["SOPInstanceUID"] for i in stack.http().get(
            f"{stack.config.orthanc_url}/studies/{study_id}/instances", timeout=10).json()}
        assert {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files} <= sops

    def test_a_cut_move_is_reported_and_finished_by_the_rerun(self, archive: dict, pacs: dict,
                                                             tmp_path: Path) -> None:
        """A series holds 8 of its 10 instances, as a C-MOVE cut by a crash leaves it. While the PACS cannot
        deliver, the run lists the study, exits non-zero and does not checkpoint it; once it can, the rerun moves
        the two missing instances and the study is complete."""
        stack, remote = archive["stack"], pacs["stack"]
        files = _write_studies(pacs["files"], [("DX", "20210310", 10)], seed=13, prefix="PCM")
        _store(remote, files)
        _store(stack, files[:8])
        uid, checkpoint = _uid(files[0]), tmp_path / "walk.json"
        study_id = stack.http().post(f"{stack.config.orthanc_url}/tools/lookup", data=uid, timeout=10).json()[0]["ID"]
        args = ("--remote", "pacs", "--from", "20210101", "--to", "20211231", "--checkpoint", str(checkpoint))

        url = f"{remote.config.orthanc_url}/modalities/archive"
        dead_end = {"AET": ORTHANC_AET, "Host": "127.0.0.1", "Port": free_port()}  # nobody listens there
        assert remote.http().put(url, json=dead_end, timeout=10).ok
        try:
            failed = _backfill(archive["settings"], *args, status=1)
        finally:
            assert remote.http().put(url, timeout=10, json={"AET": ORTHANC_AET, "Host": "127.0.0.1",
                                                            "Port": stack.config.dicom_port}).ok
        assert [entry["study"] for entry in failed["incomplete_studies"]] == [uid]
        assert failed["incomplete_studies"][0]["remote_instances"] == 10
        assert failed["incomplete_studies"][0]["local_instances"] == 8
        assert failed["instances_moved_from_remote"] == 0 and failed["indexed"] == 8
        assert not checkpoint.exists() or study_id not in json.loads(checkpoint.read_text())["done"]

        report = _backfill(archive["settings"], *args)
        assert report["incomplete_studies"] == [] and report["instances_moved_from_remote"] == 2
        assert report["indexed"] == 2 and report["still_waiting"] == 0
        assert _indexed_studies(stack)[uid] == 10
        assert json.loads(checkpoint.read_text())["done"] == [study_id]
