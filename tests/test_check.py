"""``lookalike check``: one line per file with what the worker would make of it, exit 1 when any failed."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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


OK_LINE = re.compile(r"OK encoder=(?P<encoder>\S+) shape=(?P<h>\d+)x(?P<w>\d+) frames=(?P<frames>[\d,]+) of (?P<total>\d+) "
                     r"region=(?P<region>\S+) downsampling=(?P<ds>\d+) photometric=(?P<photometric>\S+)")


def _ok(text: str) -> dict:
    """The fields of an OK line: encoder, shape, frames used and their total, region, downsampling."""
    found = OK_LINE.fullmatch(text)
    assert found, text
    return {"encoder": found["encoder"], "shape": (int(found["h"]), int(found["w"])),
            "frames": [int(i) for i in found["frames"].split(",")], "total": int(found["total"]),
            "region": None if found["region"] == "none" else tuple(int(v) for v in found["region"].split(",")),
            "downsampling": int(found["ds"]), "photometric": found["photometric"]}


def _summary(lines: list[str]) -> dict[str, int]:
    """The counts of the last line: files, then each outcome."""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (?:file\(s\)|)(\w*)", lines[-1])}
    return {"files": counts.pop(""), **counts}


def _lit(path: Path) -> np.ndarray:
    """Where the middle frame of a file shows something (not the black background)."""
    pixels = pydicom.dcmread(path).pixel_array
    frames = int(pydicom.dcmread(path, stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
    frame = pixels[frames // 2] if frames > 1 else pixels
    return (frame.mean(axis=-1) if frame.ndim == 3 else frame) > 20


def _assert_crop_holds_the_image(path: Path, fields: dict) -> tuple[int, int, int, int]:
    """The region lies within the frame, the encoder gets the region (at its downsampling), and the region holds
    the image: more of it lit than of what it leaves out."""
    lit = _lit(path)
    x0, y0, x1, y1 = fields["region"]
    assert 0 <= x0 < x1 <= lit.shape[1] and 0 <= y0 < y1 <= lit.shape[0], (fields["region"], lit.shape)
    assert fields["shape"] == ((y1 - y0) // fields["downsampling"], (x1 - x0) // fields["downsampling"])
    inside = np.zeros(lit.shape, bool)
    inside[y0:y1, x0:x1] = True
    assert lit[inside].mean() > lit[~inside].mean(), path.name
    return x0, y0, x1, y1


def test_walks_directories_and_reports_each_file(folder: Path) -> None:
    status, lines = _run(folder)
    assert status == 1
    assert len(lines) == 8  # exactly one line per file, even for multi-line error texts, and the summary
    found = _by_name(lines)
    assert set(found) == {"good_us.dcm", "IM0001", "ct.dcm", "cine.dcm", "truncated.dcm", "wrong_rows.dcm", "notes.txt"}
    stills = {"good_us.dcm": folder / "good_us.dcm", "IM0001": folder / "sub" / "deeper" / "IM0001"}
    for name, path in {**stills, "cine.dcm": folder / "sub" / "cine.dcm"}.items():
        fields = _ok(found[name])
        assert fields["encoder"] == "us"
        assert fields["photometric"] == pydicom.dcmread(path, stop_before_pixels=True).PhotometricInterpretation
        _assert_crop_holds_the_image(path, fields)
    for name in stills:
        assert (_ok(found[name])["frames"], _ok(found[name])["total"]) == ([0], 1)
    # US without declared regions: the image area found; the burned-in text lines above it are left out.
    lit = _lit(folder / "good_us.dcm")
    _, y0, _, _ = _ok(found["good_us.dcm"])["region"]
    assert y0 > 0 and lit[:y0].any(), "the text band above the image is not left out"
    # A cine clip: several frames spread over it, the first, middle and last among them.
    cine = _ok(found["cine.dcm"])
    assert cine["total"] == 120 and 1 < len(cine["frames"]) <= 120 and {0, 60, 119} <= set(cine["frames"])
    assert cine["frames"] == sorted(set(cine["frames"]))

    codes = {name: text.split(":", 1)[0].split() for name, text in found.items() if not text.startswith("OK ")}
    assert codes == {"ct.dcm": ["SKIPPED", "not-indexable"], "truncated.dcm": ["FAILED", "invalid-dicom"],
                     "wrong_rows.dcm": ["FAILED", "inconsistent-attributes"], "notes.txt": ["IGNORED", "not-dicom"]}
    # Each reason names what an administrator needs: the modality, the declared size against the data's.
    assert "CT" in found["ct.dcm"] and "960" in found["wrong_rows.dcm"] and "921600" in found["wrong_rows.dcm"]
    assert _summary(lines) == {"files": 7, "ok": 3, "skipped": 1, "failed": 2, "ignored": 1}


def test_skipped_and_ignored_files_are_not_failures(folder: Path) -> None:
    (folder / "sub" / "index.csv").write_text("file,label\n")
    status, lines = _run(folder / "good_us.dcm", folder / "sub")
    assert status == 0
    assert _summary(lines) == {"files": 5, "ok": 3, "skipped": 1, "failed": 0, "ignored": 1}
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
    [line] = ok.stdout.splitlines()[:-1]
    assert line.startswith(f"{folder / 'good_us.dcm'}: ")
    _assert_crop_holds_the_image(folder / "good_us.dcm", _ok(line.split(": ", 1)[1]))
    bad = subprocess.run([*command, "check", str(folder / "truncated.dcm")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "FAILED invalid-dicom" in bad.stdout
    usage = subprocess.run([*command, "check"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "FILE|DIR" in usage.stderr
