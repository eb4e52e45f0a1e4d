"""``lookalike check``: one line per file with what the worker would make of it, exit 1 when any failed."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from lookalike.dicom import instance as instance_module
from lookalike.ops.check import check_file, main
from lookalike.worker.pipeline import Pipeline
from lookalike.index.store import IndexStore
from tests.support import FakeEncoder, FakeOrthanc


def _path(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not available (install pydicom-data)")
    return Path(path)


def _run(*args: str) -> tuple[int, list[str]]:
    out = io.StringIO()
    status = main([str(a) for a in args], out=out)
    return status, out.getvalue().splitlines()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Good, skipped and broken copies of real files, one of them in a sub-folder and without extension."""
    shutil.copy(_path("US1_UNCR.dcm"), tmp_path / "good_us.dcm")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    shutil.copy(_path("JPGLosslessP14SV1_1s_1f_8b.dcm"), tmp_path / "sub" / "deeper" / "IM0001")
    shutil.copy(_path("CT_small.dcm"), tmp_path / "sub" / "ct.dcm")
    shutil.copy(_path("color3d_jpeg_baseline.dcm"), tmp_path / "sub" / "cine.dcm")
    data = _path("US1_UNCR.dcm").read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[:-1000])
    ds = pydicom.dcmread(_path("US1_UNCR.dcm"))
    ds.Rows = 960
    ds.save_as(tmp_path / "wrong_rows.dcm")
    (tmp_path / "notes.txt").write_text("not an image\n")
    return tmp_path


def _by_name(lines: list[str]) -> dict[str, str]:
    return {Path(line.split(": ", 1)[0]).name: line.split(": ", 1)[1] for line in lines[:-1]}


def test_walks_directories_and_reports_each_file(folder: Path) -> None:
    status, lines = _run(folder)
    assert status == 1
    found = _by_name(lines)
    assert set(found) == {"good_us.dcm", "IM0001", "ct.dcm", "cine.dcm", "truncated.dcm", "wrong_rows.dcm", "notes.txt"}
    # US without declared regions: the image area found; text lines above and below are left out.
    assert found["good_us.dcm"] == (
        "OK encoder=us shape=275x630 frames=0 of 1 region=5,65,635,340 downsampling=1 photometric=RGB"
    )
    assert found["IM0001"] == (
        "OK encoder=us shape=721x997 frames=0 of 1 region=14,38,1011,759 downsampling=1 photometric=MONOCHROME2"
    )
    assert found["cine.dcm"] == (
        "OK encoder=us shape=384x512 frames=0,30,60,89,119 of 120 region=84,31,596,415 downsampling=1 "
        "photometric=YBR_FULL_422"
    )
    assert found["ct.dcm"].startswith("SKIPPED not-indexable: Modality CT is not indexed")
    assert found["truncated.dcm"].startswith("FAILED invalid-dicom: ") and "truncated" in found["truncated.dcm"]
    assert found["wrong_rows.dcm"].startswith("FAILED inconsistent-attributes: Pixel Data holds 921600 bytes")
    assert found["notes.txt"].startswith("IGNORED not-dicom: ")  # in a folder: Orthanc would refuse it
    assert lines[-1] == "7 file(s): 3 ok, 1 skipped, 2 failed, 1 ignored (not DICOM)"
    assert len(lines) == 8  # exactly one line per file, even for multi-line error texts


def test_skipped_and_ignored_files_are_not_failures(folder: Path) -> None:
    (folder / "sub" / "index.csv").write_text("file,label\n")
    status, lines = _run(folder / "good_us.dcm", folder / "sub")
    assert status == 0
    assert lines[-1] == "5 file(s): 3 ok, 1 skipped, 0 failed, 1 ignored (not DICOM)"
    status, lines = _run(folder / "notes.txt")  # named on the command line: checked, and not DICOM
    assert status == 1 and _by_name(lines)["notes.txt"].startswith("FAILED invalid-dicom: ")


def test_size_limit_and_missing_path(folder: Path) -> None:
    status, lines = _run("--max-pixels", "1000", folder / "good_us.dcm", folder / "absent.dcm")
    assert status == 1
    found = _by_name(lines)
    assert found["good_us.dcm"].startswith("FAILED image-too-large: ")
    assert found["absent.dcm"].startswith("FAILED unreadable: FileNotFoundError")


def test_an_unexpected_exception_is_reported_not_raised(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ds, max_pixels):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(instance_module, "decode_image", broken)
    status, lines = _run(folder / "good_us.dcm", folder / "sub" / "ct.dcm")
    assert status == 1
    found = _by_name(lines)
    assert found["good_us.dcm"] == "FAILED internal-error: ZeroDivisionError: a bug"
    assert found["ct.dcm"].startswith("SKIPPED")  # routing comes first, as in the worker


def test_codes_are_those_the_worker_records(folder: Path, tmp_path_factory) -> None:
    api = FakeOrthanc()
    store = IndexStore(tmp_path_factory.mktemp("index"))
    try:
        indexer = Pipeline.local(api, store, lambda name, weights=None: FakeEncoder(), max_pixels=50_000_000)
        for file in ("good_us.dcm", "sub/ct.dcm", "truncated.dcm", "wrong_rows.dcm", "notes.txt"):
            api.add(file.replace("/", "_"), (folder / file).read_bytes())
            outcome = indexer.index(file.replace("/", "_"))
            result = check_file(folder / file)
            assert (outcome.status, outcome.code) == (
                {"OK": "indexed", "SKIPPED": "skipped", "FAILED": "failed"}[result.status], result.code
            ), file
            if result.status != "OK":  # the same text, but for the file's name (the worker reads bytes)
                assert result.message.replace(str(folder / file), "<bytes>") in outcome.message, file
    finally:
        store.close()


def test_console_command(folder: Path) -> None:
    exe = Path(sys.executable).with_name("lookalike")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "lookalike.cli"]
    ok = subprocess.run([*command, "check", str(folder / "good_us.dcm")], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0].endswith(" OK encoder=us shape=275x630 frames=0 of 1 region=5,65,635,340 downsampling=1 photometric=RGB")
    bad = subprocess.run([*command, "check", str(folder / "truncated.dcm")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "FAILED invalid-dicom" in bad.stdout
    usage = subprocess.run([*command, "check"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "FILE|DIR" in usage.stderr
