"""Training and evaluation read PNGs into exactly what the worker gets from a DICOM instance of the same pixels."""

from __future__ import annotations

import numpy as np
import pydicom
from PIL import Image

from lookalike.dicom_io.decode import decode_image
from lookalike.dicom_io.samples import wrap_image
from lookalike.encoders.preprocessing import load_image


def _scan_with_text() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.zeros((300, 400), np.uint8)
    img[60:260, 90:330] = rng.integers(40, 220, (200, 240))  # the scan area
    img[10:14, 20:380] = 255  # a line of burned-in text above it
    img[280:283, 50:120] = 200  # a ruler below
    return img


def test_ultrasound_png_is_cropped_as_the_worker_crops_the_dicom(tmp_path) -> None:
    pixels = _scan_with_text()
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    ds = wrap_image(
        pixels, "US", patient_id="P", patient_name="T^T", patient_birth_date="19700101", patient_sex="F",
        study_instance_uid=pydicom.uid.generate_uid(), study_date="20250101", study_time="090000",
        accession_number="A", study_description="parity",
    )
    served = decode_image(ds)
    trained = load_image(tmp_path / "scan.png", "us")
    assert served.region is not None
    x0, y0, x1, y1 = served.region
    assert (x1 - x0, y1 - y0) == trained.shape[::-1] and trained.shape[0] < 300
    # The worker min-max scales the 8-bit values of the crop, PNG reading divides by 255: an affine map that the
    # encoders' own preprocessing (per-image min-max) removes. After it, both are the same image.
    def unit(a: np.ndarray) -> np.ndarray:
        return (a - a.min()) / (a.max() - a.min())

    np.testing.assert_allclose(unit(trained), unit(served.pixels), atol=1e-5)


def test_xray_png_is_not_cropped(tmp_path) -> None:
    pixels = _scan_with_text()
    Image.fromarray(pixels).save(tmp_path / "cxr.png")
    assert load_image(tmp_path / "cxr.png", "xr").shape == (300, 400)
