"""Fuzzing the decoder with mutated real files: every case ends in a DecodedImage or a named error.

The worker reads whatever modalities send. A stray exception (``struct.error``, ``IndexError`` from deep in
pydicom or a codec) would be recorded as an anonymous crash instead of a problem an administrator can act on,
and an allocation sized by a corrupt header could take the worker down. Hypothesis mutates real files from
pydicom's test data (truncation, flipped bytes, edited element lengths, edited Image Pixel attributes), over
3,500 cases in all, and each must end in a :class:`DecodedImage` or a :class:`LookalikeDicomError` subclass
with its own ``code``, while the memory traced during the case stays under :data:`PEAK_BOUND` and the case ends within
:data:`CASE_SECONDS` (a hang fails the case instead of stalling the run).
"""

from __future__ import annotations

import functools
import io
import os
import signal
import tracemalloc
import warnings

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement

from lookalike.dicom import (
    ERRORS_BY_CODE,
    DecodedImage,
    InconsistentAttributesError,
    InvalidDicomError,
    LookalikeDicomError,
    MissingPixelDataError,
    decode_image,
    encoder_for,
    read_dataset,
)

#: Real files of every pixel data encoding the worker meets: native (8-bit RGB, 16-bit signed), RLE, JPEG
#: baseline (YBR), JPEG-LS, JPEG 2000, single and multi-frame, palette colour with ultrasound regions.
BASES = (
    "OBXXXX1A_rle_2frame.dcm",
    "examples_ybr_color.dcm",
    "CT_small.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_small_odd.dcm",
    "JPEG2000.dcm",
    "color-pl.dcm",
)

#: The decoding limit in these tests; the bound below follows from it (4-byte samples at most, a decoded copy
#: and its float32 conversion).
MAX_PIXELS = 10_000_000
#: Peak memory traced while one case decodes.
PEAK_BOUND = 200_000_000

#: Wall-clock limit of one case; a case normally takes milliseconds.
CASE_SECONDS = 20

# Derandomized: CI runs the same 3,500 cases every time, so a red run is reproducible rather than a draw.
# To explore new cases locally: LOOKALIKE_FUZZ_RANDOM=1.
SETTINGS = dict(
    deadline=None, database=None, suppress_health_check=list(HealthCheck),
    derandomize=not os.environ.get("LOOKALIKE_FUZZ_RANDOM"),
)


@functools.cache
def _base(name: str) -> bytes:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not available (install pydicom-data)")
    with open(path, "rb") as fp:
        return fp.read()


@functools.cache
def _length_fields(name: str) -> tuple[tuple[int, int], ...]:
    """``(offset, size)`` of the value length field of every top-level element and encapsulated item."""
    data = _base(name)
    ds = pydicom.dcmread(io.BytesIO(data))
    fields = []
    for tag in list(ds._dict):
        elem = ds.get_item(tag)
        if not isinstance(elem, RawDataElement) or elem.value_tell is None:
            continue
        long_form = elem.is_implicit_VR or elem.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UT", "UN", "UC", "UR", "SV", "UV")
        fields.append((elem.value_tell - 4, 4) if long_form else (elem.value_tell - 2, 2))
    pixel = data.rfind(b"\xe0\x7f\x10\x00")
    start = pixel
    while pixel >= 0:  # Item tags (FFFE,E000) of encapsulated Pixel Data: their 4-byte lengths follow
        start = data.find(b"\xfe\xff\x00\xe0", start + 1)
        if start < 0:
            break
        fields.append((start + 4, 4))
    return tuple(fields)


def _outcome(data: bytes) -> str:
    """Read, route and decode like the worker; the outcome's name, or raise what escaped.

    Memory is traced while the pixel data decodes, where a corrupt header could size an allocation (the
    parsing before it holds no more than the file); tracing the parsing too would make the run ten times
    slower.
    """
    peak = 0

    def hang(_signum: int, _frame: object) -> None:
        raise AssertionError(f"a case ran over {CASE_SECONDS} s: the decoder hangs on this input")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(data)
            try:
                encoder_for(ds)
            except LookalikeDicomError:
                pass  # skipped instances are still decoded here: the decoder must survive them too
            tracemalloc.start()
            try:
                image = decode_image(ds, max_pixels=MAX_PIXELS)
            finally:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
    except LookalikeDicomError as exc:
        assert type(exc) is not LookalikeDicomError and exc.code != "dicom-error", "use a named subclass"
        assert str(exc), "an error needs a message"
        outcome = exc.code
    else:
        assert isinstance(image, DecodedImage)
        assert image.pixels.ndim == 2 and image.pixels.dtype == np.float32
        assert len(image.frames) == len(image.frames_used) >= 1
        assert all(np.isfinite(f).all() and f.min() >= 0.0 and f.max() <= 1.0 for f in image.frames)
        outcome = "decoded"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert peak < PEAK_BOUND, f"decoding peaked at {peak / 1e6:.0f} MB"
    event(outcome)  # pytest --hypothesis-show-statistics shows how the cases ended
    event(f"peak {'<10' if peak < 10e6 else '<50' if peak < 50e6 else '>=50'} MB")
    return outcome


#: How a mutated file may end: decoded, or one of the named errors.
OUTCOMES = {"decoded", *ERRORS_BY_CODE}


names = st.sampled_from(BASES)


@settings(max_examples=800, **SETTINGS)
@given(name=names, where=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated(name: str, where: float) -> None:
    data = _base(name)
    assert _outcome(data[: int(where * len(data))]) in OUTCOMES


@settings(max_examples=1000, **SETTINGS)
@given(name=names, flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=8))
def test_flipped_bytes(name: str, flips: list[tuple[float, int]]) -> None:
    data = bytearray(_base(name))
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    assert _outcome(bytes(data)) in OUTCOMES


@settings(max_examples=800, **SETTINGS)
@given(name=names, pick=st.floats(0.0, 1.0, exclude_max=True), value=st.one_of(
    st.integers(0, 16), st.integers(0, 0xFFFFFFFF), st.sampled_from([0xFFFFFFFF, 0xFFFFFFFE, 1, 3])))
def test_edited_lengths(name: str, pick: float, value: int) -> None:
    fields = _length_fields(name)
    offset, size = fields[int(pick * len(fields))]
    data = bytearray(_base(name))
    data[offset : offset + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
    assert _outcome(bytes(data)) in OUTCOMES


_ATTRIBUTES = {
    "Rows": st.integers(0, 65535),
    "Columns": st.integers(0, 65535),
    "BitsAllocated": st.sampled_from([0, 1, 7, 8, 12, 16, 24, 32, 64, 65535]),
    "BitsStored": st.integers(0, 40),
    "HighBit": st.integers(0, 40),
    "SamplesPerPixel": st.sampled_from([0, 1, 2, 3, 4, 65535]),
    "PixelRepresentation": st.sampled_from([0, 1, 2]),
    "PlanarConfiguration": st.sampled_from([0, 1, 2]),
    "NumberOfFrames": st.one_of(st.integers(-5, 10), st.integers(0, 2**31 - 1), st.just("")),
    "PhotometricInterpretation": st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "", "XYZ"]),
}


@settings(max_examples=900, **SETTINGS)
@given(name=names, edits=st.dictionaries(st.sampled_from(sorted(_ATTRIBUTES)), st.none(), min_size=1, max_size=3), data=st.data())
def test_edited_image_pixel_attributes(name: str, edits: dict, data) -> None:
    ds = pydicom.dcmread(io.BytesIO(_base(name)))
    for keyword in edits:
        setattr(ds, keyword, data.draw(_ATTRIBUTES[keyword], label=keyword))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    assert _outcome(buf.getvalue()) in OUTCOMES


# ------------------------------------------------------------------- cases the fuzzing found, kept as such


def _saved(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("keyword", ["BitsStored", "PixelRepresentation", "PlanarConfiguration"])
def test_missing_required_image_pixel_attribute(keyword: str) -> None:
    ds = pydicom.dcmread(io.BytesIO(_base("color-pl.dcm")))  # RGB, so Planar Configuration is required
    delattr(ds, keyword)
    with pytest.raises(InconsistentAttributesError, match=keyword):
        decode_image(read_dataset(_saved(ds)))


def test_palette_color_without_lookup_table() -> None:
    ds = pydicom.dcmread(io.BytesIO(_base("OBXXXX1A_rle_2frame.dcm")))
    del ds.RedPaletteColorLookupTableData
    with pytest.raises(InconsistentAttributesError, match="Palette Color Lookup Table"):
        decode_image(read_dataset(_saved(ds)))


def test_corrupt_value_representation_is_invalid_at_reading() -> None:
    data = bytearray(_base("CT_small.dcm"))  # explicit VR little endian
    at = data.index(b"\x28\x00\x02\x00US")  # (0028,0002) Samples per Pixel
    data[at + 4 : at + 6] = b"\x55\xee"
    with pytest.raises(InvalidDicomError, match="corrupt data element"):
        read_dataset(bytes(data))


def test_empty_pixel_data() -> None:
    ds = pydicom.dcmread(io.BytesIO(_base("CT_small.dcm")))
    ds.PixelData = b""
    with pytest.raises(MissingPixelDataError, match="empty"):
        decode_image(read_dataset(_saved(ds)))


def test_offset_table_length_past_the_end_of_encapsulated_pixel_data() -> None:
    data = bytearray(_base("emri_small_jpeg_2k_lossless.dcm"))  # multi-frame: frames located by the table
    offset_table = data.index(b"\xfe\xff\x00\xe0", data.rindex(b"\xe0\x7f\x10\x00"))
    data[offset_table + 4 : offset_table + 8] = (0xFFFFFFF0).to_bytes(4, "little")
    with pytest.raises(InvalidDicomError, match="encapsulated Pixel Data is corrupt"):
        decode_image(read_dataset(bytes(data)))
