"""What reaches the encoders: the ultrasound imaging region, frames spread over a clip, large X-rays reduced."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from lookalike.dicom import ImageTooLargeError, decode_image, read_dataset
from lookalike.dicom import decode as decode_module
from lookalike.dicom.decode import MAX_FRAMES, TARGET_SIDE, _frames_to_use
from lookalike.lab.samples import wrap_image
from lookalike.dicom.imaging_region import find_imaging_region


def _path(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not available (install pydicom-data)")
    return path


def _wrap(pixels: np.ndarray, modality: str) -> pydicom.Dataset:
    return wrap_image(
        pixels, modality, patient_id="P1", patient_name="T^T", patient_birth_date="19700101", patient_sex="F",
        study_instance_uid=pydicom.uid.generate_uid(), study_date="20250101", study_time="090000",
        accession_number="A1", study_description="test",
    )


def _region(fmt: int, x0: int, y0: int, x1: int, y1: int) -> Dataset:
    item = Dataset()
    item.RegionSpatialFormat = fmt
    item.RegionDataType = 1 if fmt == 1 else 10
    item.RegionFlags = 0
    item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
    return item


def _scan_with_annotations(seed: int = 0) -> np.ndarray:
    """A 400 x 500 screen: speckle in rows 80-359, columns 100-419; bright text, a ruler and a scale bar outside."""
    rng = np.random.default_rng(seed)
    screen = np.zeros((400, 500), np.uint8)
    screen[80:360, 100:420] = rng.integers(30, 200, (280, 320))
    screen[150:170, 200:260] = 5  # an anechoic area inside the scan does not split it
    for x in range(20, 480, 10):  # a line of burned-in text: bright glyphs 6 px wide, 4 px apart
        screen[10:26, x : x + 6] = 255
    screen[60:390, 470:472] = 255  # a depth ruler, 2 px wide, with ticks
    screen[60:390:20, 464:478] = 255
    screen[385:388, 20:90] = 240  # a scale bar under the image
    return screen


# ---------------------------------------------------------------------------------------------- region


def test_found_region_leaves_text_and_rulers_out() -> None:
    screen = _scan_with_annotations()
    image = decode_image(_wrap(screen, "US"))
    x0, y0, x1, y1 = image.region
    assert 88 <= x0 <= 100 and 68 <= y0 <= 80 and 420 <= x1 <= 432 and 360 <= y1 <= 372, image.region
    assert image.pixels.shape == (y1 - y0, x1 - x0)
    assert screen[y0:y1, x0:x1].max() < 200  # no glyph, ruler or scale bar pixel (255, 240) inside


def test_no_region_found_in_a_full_frame_image() -> None:
    pixels = np.random.default_rng(1).integers(20, 255, (200, 300), dtype=np.uint8)
    image = decode_image(_wrap(pixels, "US"))
    assert image.region is None and image.pixels.shape == (200, 300)


def test_x_ray_is_not_cropped() -> None:
    image = decode_image(_wrap(_scan_with_annotations(), "DX"))
    assert image.region is None and image.pixels.shape == (400, 500)


def test_the_larger_of_two_scan_areas_is_the_region_and_a_dark_frame_has_none() -> None:
    rng = np.random.default_rng(2)
    screen = np.zeros((300, 600), np.float32)
    screen[40:260, 20:260] = rng.uniform(0.2, 0.8, (220, 240))  # the larger area
    screen[100:200, 400:560] = rng.uniform(0.2, 0.8, (100, 160))  # a smaller one (a thumbnail, a second view)
    x0, y0, x1, y1 = find_imaging_region(screen)
    assert 10 <= x0 <= 20 and 30 <= y0 <= 40 and 260 <= x1 <= 270 and 260 <= y1 <= 270, (x0, y0, x1, y1)
    assert find_imaging_region(np.zeros((300, 600), np.float32)) is None
    assert find_imaging_region(np.full((12, 600), 0.5, np.float32)) is None  # too few blocks to search


def test_training_reads_a_png_cropped_as_decoding_crops_the_instance(tmp_path) -> None:
    from PIL import Image

    from lookalike.lab.images import load_image_with_region

    screen = _scan_with_annotations(3)
    Image.fromarray(screen).save(tmp_path / "scan.png")
    pixels, box = load_image_with_region(tmp_path / "scan.png", "us")
    assert box == decode_image(_wrap(screen, "US")).region
    assert pixels.shape == (box[3] - box[1], box[2] - box[0])


def test_declared_2d_region_wins_and_other_regions_are_ignored() -> None:
    ds = _wrap(_scan_with_annotations(), "US")
    # the 2D region as declared (Max inclusive), and a spectral Doppler strip (format 4) at the bottom
    ds.SequenceOfUltrasoundRegions = Sequence([_region(4, 0, 300, 499, 399), _region(1, 110, 90, 409, 349)])
    image = decode_image(ds)
    assert image.region == (110, 90, 410, 350)
    assert image.pixels.shape == (260, 300)
    ds.SequenceOfUltrasoundRegions = Sequence([_region(4, 0, 300, 499, 399)])  # no 2D region: found instead
    assert decode_image(ds).region[1] < 90


def test_two_2d_regions_give_their_bounding_box() -> None:
    ds = read_dataset(_path("gdcm-US-ALOKA-16.dcm"))  # dual display: 2D regions at x 32-335 and 336-639
    image = decode_image(ds)
    assert image.region == (32, 24, 640, 416)
    assert image.pixels.shape == (392, 608)


def test_region_outside_the_frame_is_clipped_or_ignored() -> None:
    ds = _wrap(_scan_with_annotations(), "US")
    ds.SequenceOfUltrasoundRegions = Sequence([_region(1, 100, 80, 5000, 5000)])
    assert decode_image(ds).region == (100, 80, 500, 400)
    ds.SequenceOfUltrasoundRegions = Sequence([_region(1, 600, 500, 700, 600)])  # entirely outside
    assert decode_image(ds).region == decode_image(_wrap(_scan_with_annotations(), "US")).region


def test_real_us_file_with_regions() -> None:
    ds = read_dataset(_path("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert ds.SequenceOfUltrasoundRegions[0].RegionSpatialFormat == 1
    assert decode_image(ds).region == (14, 38, 1011, 759)
    del ds.SequenceOfUltrasoundRegions
    x0, y0, x1, y1 = decode_image(ds).region  # found: the sector, without the text column on the left
    assert 100 < x0 < 250 and x1 > 800 and y1 - y0 > 400


# ---------------------------------------------------------------------------------------------- frames


def test_frames_are_spread_over_the_clip() -> None:
    for n in range(1, 400):
        used = _frames_to_use(n)
        assert list(used) == sorted(set(used)) and len(used) == min(n, MAX_FRAMES), n
        assert n // 2 in used and all(0 <= i < n for i in used)
        if n > 1:
            assert used[0] == 0 and used[-1] == n - 1
        if n > 2 * MAX_FRAMES:  # roughly even: no gap over twice the ideal one
            assert max(np.diff(used)) <= 2 * (n - 1) / (MAX_FRAMES - 1), (n, used)
    assert _frames_to_use(120) == (0, 30, 60, 89, 119)
    assert _frames_to_use(120, budget=1) == (60,)
    assert _frames_to_use(120, budget=3) == (0, 60, 119)
    assert _frames_to_use(120, budget=2) == (0, 60)


def test_size_limit_counts_the_frames_decoded() -> None:
    ds = read_dataset(_path("color3d_jpeg_baseline.dcm"))  # 120 frames of 480 x 640 x 3 = 921,600
    assert decode_image(ds, max_pixels=5 * 921_600).frames_used == (0, 30, 60, 89, 119)
    three = decode_image(ds, max_pixels=3 * 921_600 + 5)
    assert three.frames_used == (0, 60, 119) and len(three.frames) == 3
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(ds, max_pixels=921_599)
    assert info.value.claimed_pixels == 921_600


def test_cine_frames_differ_and_share_the_crop() -> None:
    ds = read_dataset(_path("examples_ybr_color.dcm"))  # US, 30 frames, JPEG baseline
    image = decode_image(ds)
    assert image.frames_used == (0, 7, 15, 22, 29)
    assert len({f.shape for f in image.frames}) == 1
    assert not np.allclose(image.frames[0], image.frames[-1])
    assert image.pixels is image.frames[2]


# ----------------------------------------------------------------------------------------- large X-ray


def _large_xray(modality: str, photometric: str) -> tuple[pydicom.Dataset, np.ndarray]:
    """A 3500 x 3000, 12-bit-in-16 projection radiograph with a full-range window, read from Part 10 bytes."""
    ds = _wrap(np.zeros((8, 8), np.uint8), "DX")
    ds.Modality = modality
    stored = (np.add.outer(np.arange(3500) * 3, np.arange(3000)) % 4096).astype(np.uint16)
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PhotometricInterpretation = photometric
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = stored.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    ds = read_dataset(buf.getvalue())
    _ = ds.PixelData  # convert the raw element now, so that only decoding is measured
    return ds, stored


@pytest.mark.parametrize("modality, photometric", [("DX", "MONOCHROME2"), ("CR", "MONOCHROME1")])
def test_large_xray_is_reduced_on_its_integers(modality: str, photometric: str) -> None:
    ds, stored = _large_xray(modality, photometric)
    tracemalloc.start()
    try:
        image = decode_image(ds)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.downsampling == 4 and image.pixels.shape == (875, 750)
    assert max(image.pixels.shape) <= TARGET_SIDE and image.pixels.dtype == np.float32
    # Block means of the stored values, then the LINEAR window (PS3.3 C.11.2.1.2) to [0, 1].
    means = np.rint(stored.reshape(875, 4, 750, 4).mean(axis=(1, 3)))
    reference = np.clip((means - 2047.5) / 4095 + 0.5, 0, 1)
    if photometric == "MONOCHROME1":
        reference = 1 - reference
    np.testing.assert_allclose(image.pixels, reference, atol=1e-5)
    # The decoded 16-bit frame is 21 MB; one full-size float32 copy would add 42 MB on top of it.
    assert peak < 1.5 * stored.nbytes, f"decoding peaked at {peak / 1e6:.1f} MB"


def test_images_up_to_the_threshold_are_not_reduced() -> None:
    ds = read_dataset(_path("RG1_UNCR.dcm"))  # CR, 1955 x 1841
    image = decode_image(ds)
    assert image.downsampling == 1 and image.pixels.shape == (1955, 1841)


def test_palette_indices_are_subsampled_not_averaged() -> None:
    stored = np.tile(np.array([[0, 255], [255, 0]], np.uint8), (1100, 1100))  # 2200 x 2200
    reduced = decode_module._reduce(stored, 3, "PALETTE COLOR")
    assert set(np.unique(reduced)) <= {0, 255}
    assert set(np.unique(decode_module._reduce(stored, 3, "MONOCHROME2"))) - {0, 255}
