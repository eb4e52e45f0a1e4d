"""wrap_image makes valid US / DX instances, and the committed sample studies are sound and reproducible."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, UltrasoundImageStorage

from lookalike.dicom import decode_image, encoder_for, read_dataset
from lookalike.lab.samples import make_sample_studies, wrap_image

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "deploy" / "samples"
DATA_ROOT = Path(os.environ.get("LOOKALIKE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
LABELS = ("benign", "malignant", "normal", "pneumonia")


def _wrap(pixels: np.ndarray, modality: str, **overrides) -> pydicom.Dataset:
    fields = dict(
        patient_id="TEST-001",
        patient_name="SAMPLE^TEST001",
        patient_birth_date="19790214",
        patient_sex="F",
        study_instance_uid=pydicom.uid.generate_uid(),
        study_date="20250317",
        study_time="093015",
        accession_number="LKSTEST0001",
        study_description="TEST STUDY",
    )
    fields.update(overrides)
    return wrap_image(pixels, modality, **fields)


def _to_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def pixels() -> np.ndarray:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, size=(61, 83), dtype=np.uint8)  # odd sizes: pixel data needs a pad byte
    image[0, 0], image[-1, -1] = 0, 255
    return image


@pytest.mark.parametrize(
    "modality, sop_class, encoder",
    [("US", UltrasoundImageStorage, "us"), ("DX", DigitalXRayImageStorageForPresentation, "xr")],
)
def test_wrap_image_round_trip(pixels: np.ndarray, modality: str, sop_class: str, encoder: str) -> None:
    ds = read_dataset(_to_bytes(_wrap(pixels, modality)))  # the strict reader: complete Part 10 file
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == sop_class
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == modality
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 8
    assert ds.PatientID == "TEST-001" and ds.StudyDate == "20250317"
    np.testing.assert_array_equal(ds.pixel_array, pixels)
    assert encoder_for(ds) == encoder
    decoded = decode_image(ds).pixels
    np.testing.assert_allclose(decoded, pixels / 255.0, atol=1e-6)  # DX window 128/256 is the identity too


def test_dx_is_for_presentation(pixels: np.ndarray) -> None:
    ds = _wrap(pixels, "DX")
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert ds.PresentationLUTShape == "IDENTITY"
    assert ds.RescaleSlope == 1 and ds.RescaleIntercept == 0


def test_uids_generated_random_or_reproducible(pixels: np.ndarray) -> None:
    a, b = _wrap(pixels, "US"), _wrap(pixels, "US")
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
    c = _wrap(pixels, "US", uid_entropy=["source-1"])
    d = _wrap(pixels, "US", uid_entropy=["source-1"])
    e = _wrap(pixels, "US", uid_entropy=["source-2"])
    assert (c.SOPInstanceUID, c.SeriesInstanceUID) == (d.SOPInstanceUID, d.SeriesInstanceUID)
    assert c.SOPInstanceUID != e.SOPInstanceUID
    assert c.SOPInstanceUID != c.SeriesInstanceUID
    given = _wrap(pixels, "US", sop_instance_uid="1.2.3.4.5", series_instance_uid="1.2.3.4")
    assert (given.SOPInstanceUID, given.SeriesInstanceUID) == ("1.2.3.4.5", "1.2.3.4")
    for ds in (a, c, given):
        assert pydicom.uid.UID(ds.SOPInstanceUID).is_valid


def test_near_copy_under_another_patient(pixels: np.ndarray) -> None:
    """The use end-to-end tests make of wrap_image: same picture plus noise, another patient and study."""
    original = _wrap(pixels, "US")
    noisy = np.clip(pixels.astype(int) + np.random.default_rng(1).integers(-3, 4, pixels.shape), 0, 255)
    copy_ = _wrap(noisy.astype(np.uint8), "US", patient_id="TEST-002", patient_name="SAMPLE^TEST002")
    assert copy_.PatientID != original.PatientID
    assert copy_.StudyInstanceUID != original.StudyInstanceUID
    assert np.abs(copy_.pixel_array.astype(int) - original.pixel_array).max() <= 3


def test_wrap_image_refuses_bad_input(pixels: np.ndarray) -> None:
    with pytest.raises(TypeError, match="uint8"):
        _wrap(pixels.astype(np.uint16), "US")
    with pytest.raises(TypeError, match="2-D"):
        _wrap(np.stack([pixels] * 3, axis=-1), "US")
    with pytest.raises(ValueError, match="modality"):
        _wrap(pixels, "CT")


def _dciodvfy(path: Path) -> str:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def _error_lines(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("modality, iod", [("US", "USImage"), ("DX", "DXImageForPresentation")])
def test_dciodvfy_finds_no_errors(tmp_path: Path, pixels: np.ndarray, modality: str, iod: str) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not on PATH")
    path = tmp_path / f"{modality}.dcm"
    _wrap(pixels, modality).save_as(path, enforce_file_format=True)
    report = _dciodvfy(path)
    assert report.splitlines()[0].strip() == iod, report  # it recognised the IOD, so it checked the modules
    assert _error_lines(report) == [], report


def test_dciodvfy_reports_errors_it_should(tmp_path: Path, pixels: np.ndarray) -> None:
    """The check above can fail: remove a type 1 DX attribute and dciodvfy must say so."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not on PATH")
    ds = _wrap(pixels, "DX")
    del ds.ImagerPixelSpacing
    path = tmp_path / "broken.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert any("ImagerPixelSpacing" in line for line in _error_lines(_dciodvfy(path)))


# ------------------------------------------------------------------------------------ committed samples


def _index() -> list[dict[str, str]]:
    with open(SAMPLES / "index.csv", newline="") as fp:
        return list(csv.DictReader(fp))


def test_committed_samples_parse_and_are_small() -> None:
    files = sorted(SAMPLES.glob("*.dcm"))
    assert len(files) >= 30
    assert sum(f.stat().st_size for f in files) < 10 * 1024 * 1024
    rows = {r["file"]: r for r in _index()}
    assert set(rows) == {f.name for f in files}
    assert {r["modality"] for r in rows.values()} == {"US", "DX"}
    assert set(r["label"] for r in rows.values()) == set(LABELS)
    patients: dict[str, set[str]] = {}
    for f in files:
        ds = read_dataset(f)
        row = rows[f.name]
        assert ds.Modality == row["modality"]
        assert ds.StudyInstanceUID == row["study_instance_uid"] and ds.PatientID == row["patient_id"]
        assert "2024" <= ds.StudyDate[:4] <= "2026"
        assert str(ds.PatientName).startswith("SAMPLE^")
        assert encoder_for(ds) == {"US": "us", "DX": "xr"}[ds.Modality]
        decode_image(ds)
        patients.setdefault(ds.PatientID, set()).add(ds.StudyDate)
        # The label must not be in the DICOM, or retrieval would be given away.
        for elem in ds.iterall():
            if elem.VR in ("LO", "SH", "ST", "LT", "UT", "PN", "CS", "UC"):
                assert not any(label in str(elem.value).lower() for label in LABELS), (f.name, elem)
    assert any(len(dates) >= 2 for dates in patients.values()), "no patient with two studies on different dates"


def test_committed_samples_pass_dciodvfy() -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not on PATH")
    for f in sorted(SAMPLES.glob("*.dcm")):
        assert _error_lines(_dciodvfy(f)) == [], f.name


def test_committed_samples_are_reproducible(tmp_path: Path) -> None:
    """Rebuilding from the shared data gives the committed bytes, so the files are what the code says."""
    if not (DATA_ROOT / "busi" / "manifest.csv").is_file() or not (DATA_ROOT / "kermany_cxr" / "manifest.csv").is_file():
        pytest.skip(f"source datasets not found under {DATA_ROOT} (set LOOKALIKE_DATA)")
    written = make_sample_studies(DATA_ROOT, tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in SAMPLES.glob("*.dcm"))
    for path in [*written, tmp_path / "index.csv"]:
        assert path.read_bytes() == (SAMPLES / path.name).read_bytes(), path.name
