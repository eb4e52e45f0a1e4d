"""Decoding real DICOM files (pydicom's and pydicom-data's test files) and refusing broken ones by name."""

from __future__ import annotations

import copy
import pickle
import sys
import tracemalloc

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from lookalike.dicom import (
    ERRORS_BY_CODE,
    DecodedImage,
    ImageTooLargeError,
    InconsistentAttributesError,
    InvalidDicomError,
    LookalikeDicomError,
    MissingPixelDataError,
    NotIndexableError,
    UnsupportedTransferSyntaxError,
    decode_image,
    encoder_for,
    read_dataset,
)
from lookalike.dicom import decode as decode_module


def _path(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not available (install pydicom-data)")
    return path


def _bytes(name: str) -> bytes:
    with open(_path(name), "rb") as fp:
        return fp.read()


@pytest.fixture(scope="module")
def cr_monochrome1() -> pydicom.Dataset:
    """A real computed radiograph (lower leg) stored MONOCHROME1 with a window, 1760 x 1760 x 12 bits."""
    return read_dataset(_path("RG3_UNCR.dcm"))


def _unit_range(image: DecodedImage) -> None:
    assert image.pixels.dtype == np.float32
    assert image.pixels.ndim == 2
    assert float(image.pixels.min()) >= 0.0 and float(image.pixels.max()) <= 1.0
    assert float(image.pixels.max()) > float(image.pixels.min())


def _luma_min_max(rgb: np.ndarray) -> np.ndarray:
    gray = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return (gray - gray.min()) / (gray.max() - gray.min())


# ------------------------------------------------------------------------------------------ reading


def test_read_dataset_accepts_bytes_and_paths() -> None:
    by_path = read_dataset(_path("US1_UNCR.dcm"))
    by_bytes = read_dataset(_bytes("US1_UNCR.dcm"))
    assert by_path.SOPInstanceUID == by_bytes.SOPInstanceUID
    assert by_bytes.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


@pytest.mark.parametrize(
    "name, cut",
    [
        ("US1_UNCR.dcm", -1000),  # inside native Pixel Data
        ("US1_UNCR.dcm", -1),
        ("US1_J2KR.dcm", -4),  # inside the Sequence Delimitation Item of encapsulated Pixel Data
        ("US1_J2KR.dcm", -5000),  # inside a JPEG 2000 fragment
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", 500),  # early in the data set
        ("US1_UNCR.dcm", 200),  # inside the file meta information
    ],
)
@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_file_is_invalid(name: str, cut: int) -> None:
    data = _bytes(name)
    read_dataset(data)  # the whole file is fine
    with pytest.raises(InvalidDicomError, match="truncated|corrupt"):
        read_dataset(data[:cut])


def test_truncated_inside_element_header_is_invalid() -> None:
    data = _bytes("US1_UNCR.dcm")
    pixel_data_header = data.rindex(b"\xe0\x7f\x10\x00OB")  # (7FE0,0010) OB, explicit VR little endian
    with pytest.raises(InvalidDicomError):
        read_dataset(data[: pixel_data_header + 5])


def test_not_dicom_is_invalid() -> None:
    with pytest.raises(InvalidDicomError, match="not a DICOM Part 10 file"):
        read_dataset(b"\x89PNG\r\n\x1a\n" + bytes(500))
    with pytest.raises(InvalidDicomError):
        read_dataset(b"")


def test_corrupt_encapsulation_is_invalid() -> None:
    ds = read_dataset(_path("US1_J2KR.dcm"))
    ds.PixelData = ds.PixelData[:100] + bytes(len(ds.PixelData) - 100)  # item tags overwritten
    with pytest.raises(InvalidDicomError, match="encapsulated"):
        decode_image(ds)


# ---------------------------------------------------------------------------------------- decoding


def test_us_rgb_is_luma() -> None:
    ds = read_dataset(_path("US1_UNCR.dcm"))
    image = decode_image(ds)
    _unit_range(image)
    assert image.source_shape == (1, 480, 640, 3)
    assert image.frames_used == (0,)
    assert image.photometric_interpretation == "RGB"
    # No Sequence of Ultrasound Regions: the image area is found, leaving out the text above and below it.
    assert image.region is not None
    x0, y0, x1, y1 = image.region
    assert image.pixels.shape == (y1 - y0, x1 - x0)
    assert y0 > 40 and y1 < 400 and x1 - x0 > 600  # text lines at the top and "LYMPH NODE" below are out
    np.testing.assert_allclose(image.pixels, _luma_min_max(ds.pixel_array[y0:y1, x0:x1]), atol=1e-5)


def test_jpeg2000_ybr_rct_matches_uncompressed() -> None:
    reference = decode_image(read_dataset(_path("US1_UNCR.dcm"))).pixels
    image = decode_image(read_dataset(_path("US1_J2KR.dcm")))  # same image, lossless JPEG 2000, YBR_RCT
    assert image.photometric_interpretation == "YBR_RCT"
    np.testing.assert_allclose(image.pixels, reference, atol=1e-5)


def test_jpeg2000_irreversible_ybr_ict_close_to_uncompressed() -> None:
    reference = decode_image(read_dataset(_path("US1_UNCI.dcm"))).pixels
    image = decode_image(read_dataset(_path("US1_J2KI.dcm")))  # same image, lossy JPEG 2000, YBR_ICT
    _unit_range(image)
    assert image.photometric_interpretation == "YBR_ICT"
    assert image.pixels.shape == reference.shape
    assert float(np.abs(image.pixels - reference).mean()) < 0.02


def test_deflated_explicit_little_endian_matches_uncompressed() -> None:
    """Deflate is a whole-dataset encoding: the same US image re-written deflated decodes identically."""
    import io

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(_path("US1_UNCR.dcm"))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert len(buf.getvalue()) < len(open(_path("US1_UNCR.dcm"), "rb").read()) // 2  # really deflated
    reference = decode_image(read_dataset(_path("US1_UNCR.dcm")))
    image = decode_image(read_dataset(buf.getvalue()))
    assert image.region == reference.region
    np.testing.assert_array_equal(image.pixels, reference.pixels)


def test_jpeg_baseline_ybr_full_matches_uncompressed() -> None:
    reference = decode_image(read_dataset(_path("SC_rgb.dcm"))).pixels
    image = decode_image(read_dataset(_path("SC_rgb_jpeg_dcmtk.dcm")))  # same image, lossy JPEG, YBR_FULL
    _unit_range(image)
    assert image.photometric_interpretation == "YBR_FULL"
    assert float(np.abs(image.pixels - reference).mean()) < 0.02


def test_jpeg_lossless_us_window_linear() -> None:
    ds = read_dataset(_path("JPGLosslessP14SV1_1s_1f_8b.dcm"))  # US, MONOCHROME2, Window 127/254
    image = decode_image(ds)
    _unit_range(image)
    assert image.region == (14, 38, 1011, 759)  # the declared 2D ultrasound region, Max inclusive
    assert image.pixels.shape == (759 - 38, 1011 - 14)
    # pydicom's LINEAR window maps to the stored range [0, 255]; ours maps to [0, 1] directly.
    reference = apply_voi_lut(ds.pixel_array, ds)[38:759, 14:1011] / 255.0
    np.testing.assert_allclose(image.pixels, reference, atol=1e-5)


def test_monochrome1_is_inverted(cr_monochrome1: pydicom.Dataset) -> None:
    ds = cr_monochrome1
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.Modality == "CR"
    image = decode_image(ds)
    _unit_range(image)
    assert image.pixels.shape == (1760, 1760)
    assert image.photometric_interpretation == "MONOCHROME1"

    as_monochrome2 = copy.deepcopy(ds)
    as_monochrome2.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_allclose(image.pixels, 1.0 - decode_image(as_monochrome2).pixels, atol=1e-6)

    # Bright means dense: directly exposed air beside the leg is dark, the tibia bright.
    air = image.pixels[700:1100, 480:600].mean()
    bone = image.pixels[400:900, 860:900].mean()
    assert air < 0.2 and bone > 0.6

    # The window is applied exactly (pydicom maps it to the 12-bit stored range, then MONOCHROME1 inverts).
    reference = 1.0 - apply_voi_lut(ds.pixel_array, ds) / (2**ds.BitsStored - 1)
    np.testing.assert_allclose(image.pixels, reference, atol=1e-5)


def test_big_image_never_makes_float64_copies(cr_monochrome1: pydicom.Dataset) -> None:
    ds = cr_monochrome1
    _ = ds.PixelData  # raw element already converted, so only decoding is measured
    tracemalloc.start()
    try:
        image = decode_image(ds)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_float64_copy = image.pixels.size * 8
    assert peak < one_float64_copy, f"decoding peaked at {peak} bytes"


def test_rescale_slope_intercept() -> None:
    ds = read_dataset(_path("CT_small.dcm"))  # signed 16-bit, Rescale -1024, no window
    image = decode_image(ds)
    _unit_range(image)
    reference = apply_modality_lut(ds.pixel_array, ds)
    reference = (reference - reference.min()) / (reference.max() - reference.min())
    np.testing.assert_allclose(image.pixels, reference, atol=1e-5)
    # A window given in rescaled units only agrees with the picture if the rescale was applied first.
    ds.WindowCenter, ds.WindowWidth = 40, 400
    windowed = decode_image(ds).pixels
    # pydicom's window output spans the rescaled stored range [-32768, 32767] - 1024.
    y_min = -(2 ** (ds.BitsStored - 1)) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    reference = (apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds) - y_min) / (2**ds.BitsStored - 1)
    np.testing.assert_allclose(windowed, reference, atol=1e-4)
    assert 0.05 < float((windowed == 0).mean()) < 0.95  # the window really clips (air) and passes (tissue)


def test_modality_lut_and_voi_lut_sequences() -> None:
    for name, function in (("mlut_18.dcm", apply_modality_lut), ("vlut_04.dcm", apply_voi_lut)):
        ds = read_dataset(_path(name))
        image = decode_image(ds)
        _unit_range(image)
        reference = function(ds.pixel_array, ds).astype(np.float64)
        assert np.corrcoef(image.pixels.ravel(), reference.ravel())[0, 1] > 0.9999, name


def test_palette_color_multiframe_uses_both_frames() -> None:
    ds = read_dataset(_path("OBXXXX1A_2frame.dcm"))  # US, PALETTE COLOR, 2 frames, a 2D region declared
    image = decode_image(ds)
    _unit_range(image)
    assert image.source_shape == (2, 600, 800, 1)
    assert image.frames_used == (0, 1)
    assert image.region == (120, 60, 800, 519)  # Max X1 = 800 is clipped to the 800 columns
    assert image.frames[1] is image.pixels  # the middle frame (2 // 2)
    for index in (0, 1):
        rgb = apply_color_lut(ds.pixel_array[index], ds)[60:519, 120:800]
        np.testing.assert_allclose(image.frames[index], _luma_min_max(rgb), atol=1e-5)
    assert not np.allclose(image.frames[0], image.frames[1])


def test_multiframe_jpeg_us_decodes_only_the_frames_used(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = read_dataset(_path("color3d_jpeg_baseline.dcm"))  # US, 120 frames, JPEG baseline YBR_FULL_422
    seen: list[int | None] = []
    real = decode_module.get_decoder

    def spying_get_decoder(uid):
        decoder = real(uid)

        class Spy:
            is_available = decoder.is_available
            is_native = decoder.is_native

            @staticmethod
            def as_array(src, **kwargs):
                seen.append(kwargs.get("index"))
                return decoder.as_array(src, **kwargs)

        return Spy()

    monkeypatch.setattr(decode_module, "get_decoder", spying_get_decoder)
    image = decode_image(ds)
    _unit_range(image)
    assert image.source_shape == (120, 480, 640, 3)
    assert image.frames_used == (0, 30, 60, 89, 119)  # spread over the clip, the middle one included
    assert seen == [0, 30, 60, 89, 119]
    assert len(image.frames) == 5 and image.pixels is image.frames[2]
    assert all(f.shape == image.pixels.shape and f.dtype == np.float32 for f in image.frames)
    reference = decode_module._to_unit(ds.pixel_array[60][31:415, 84:596], "RGB", ds)
    np.testing.assert_allclose(image.pixels, reference, atol=1e-6)


# ------------------------------------------------------------------------------------------ errors


def test_pixel_data_removed() -> None:
    ds = read_dataset(_path("US1_UNCR.dcm"))
    del ds.PixelData
    with pytest.raises(MissingPixelDataError, match="Pixel Data"):
        decode_image(ds)


def test_huge_rows_columns_refused_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = read_dataset(_path("US1_J2KR.dcm"))
    ds.Rows, ds.Columns = 65535, 65535

    def no_decoding(uid):
        raise AssertionError("the decoder must not be reached")

    monkeypatch.setattr(decode_module, "get_decoder", no_decoding)
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError) as info:
            decode_image(ds)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    assert info.value.claimed_pixels == 65535 * 65535 * 3
    assert info.value.max_pixels == 50_000_000
    assert "max_pixels" in str(info.value)


def test_max_pixels_is_a_parameter() -> None:
    ds = read_dataset(_path("US1_UNCR.dcm"))  # 480 x 640 x 3 = 921,600
    decode_image(ds, max_pixels=921_600)
    with pytest.raises(ImageTooLargeError):
        decode_image(ds, max_pixels=921_599)


def test_rows_larger_than_native_data() -> None:
    ds = read_dataset(_path("US1_UNCR.dcm"))
    ds.Rows = 960
    with pytest.raises(InconsistentAttributesError, match="921600 bytes"):
        decode_image(ds)


def test_rows_larger_than_compressed_data() -> None:
    ds = read_dataset(_path("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    ds.Rows = 1000
    with pytest.raises(InconsistentAttributesError):
        decode_image(ds)


def test_missing_rows_is_inconsistent() -> None:
    ds = read_dataset(_path("US1_UNCR.dcm"))
    del ds.Rows
    with pytest.raises(InconsistentAttributesError, match="Rows"):
        decode_image(ds)


def test_unknown_transfer_syntax() -> None:
    ds = read_dataset(_path("US1_UNCR.dcm"))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    with pytest.raises(UnsupportedTransferSyntaxError, match="MPEG2"):
        decode_image(ds)


def test_undecodable_data_maps_to_unsupported_transfer_syntax() -> None:
    ds = read_dataset(_path("OBXXXX1A_rle.dcm"))
    ds.Columns = 1000  # the RLE decoder cannot make 600 x 1000 out of 600 x 800 segments
    with pytest.raises(UnsupportedTransferSyntaxError, match="RLE Lossless"):
        decode_image(ds)


# ----------------------------------------------------------------------------------------- routing


def test_routing_by_modality() -> None:
    assert encoder_for(read_dataset(_path("US1_UNCR.dcm"))) == "us"
    assert encoder_for(pydicom.dcmread(_path("RG3_UNCR.dcm"), stop_before_pixels=True)) == "xr"
    ds = read_dataset(_path("CT_small.dcm"))
    with pytest.raises(NotIndexableError, match="CT") as info:
        encoder_for(ds)
    assert "CT" in info.value.reason
    ds.Modality = "DX"
    assert encoder_for(ds) == "xr"


@pytest.mark.parametrize("name", ["reportsi.dcm", "test-SR.dcm"])
def test_structured_report_not_indexable(name: str) -> None:
    ds = read_dataset(_path(name))
    with pytest.raises(NotIndexableError) as info:
        encoder_for(ds)
    assert "SR Storage" in info.value.reason
    assert info.value.code == "not-indexable"


def test_sr_claiming_us_modality_not_indexable() -> None:
    ds = read_dataset(_path("reportsi.dcm"))
    ds.Modality = "US"
    with pytest.raises(NotIndexableError, match="not an image"):
        encoder_for(ds)


def test_for_processing_not_indexable() -> None:
    ds = pydicom.dcmread(_path("RG3_UNCR.dcm"), stop_before_pixels=True)
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PROCESSING"
    with pytest.raises(NotIndexableError, match="FOR PROCESSING"):
        encoder_for(ds)
    ds.PresentationIntentType = "FOR PRESENTATION"
    assert encoder_for(ds) == "xr"
    ds.SOPClassUID = pydicom.uid.DigitalXRayImageStorageForProcessing
    with pytest.raises(NotIndexableError, match="FOR PROCESSING"):
        encoder_for(ds)


def test_missing_modality_not_indexable() -> None:
    ds = read_dataset(_path("US1_UNCR.dcm"))
    del ds.Modality
    with pytest.raises(NotIndexableError, match="Modality"):
        encoder_for(ds)


# --------------------------------------------------------------------------------------- the errors


def test_error_codes_are_stable_and_distinct() -> None:
    assert {code: cls.__name__ for code, cls in ERRORS_BY_CODE.items()} == {
        "dicom-error": "LookalikeDicomError",
        "invalid-dicom": "InvalidDicomError",
        "no-pixel-data": "MissingPixelDataError",
        "unsupported-transfer-syntax": "UnsupportedTransferSyntaxError",
        "image-too-large": "ImageTooLargeError",
        "inconsistent-attributes": "InconsistentAttributesError",
        "not-indexable": "NotIndexableError",
    }
    for cls in ERRORS_BY_CODE.values():
        assert issubclass(cls, LookalikeDicomError)


@pytest.mark.parametrize(
    "error",
    [
        InvalidDicomError("the file is truncated"),
        ImageTooLargeError("too big", claimed_pixels=10, max_pixels=5),
        NotIndexableError("Modality CT is not indexed"),
    ],
)
def test_errors_survive_pickling(error: LookalikeDicomError) -> None:
    """Celery pickles a task's exception; the catalogue needs the same class, message and attributes back."""
    copy_ = pickle.loads(pickle.dumps(error))
    assert type(copy_) is type(error)
    assert str(copy_) == str(error)
    assert vars(copy_) == vars(error)


def test_dicom_io_does_not_import_torch() -> None:
    """The Orthanc plugin imports lookalike.dicom inside Orthanc's interpreter, where torch must not load."""
    import subprocess

    code = "import sys, lookalike.dicom; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
