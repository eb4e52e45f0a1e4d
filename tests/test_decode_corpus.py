"""Every US, DX and CR file of the public test corpora through the worker's three steps.

The corpus is every file of pydicom's own ``test_files`` (subfolders included) and of pydicom-data (what
``pydicom.data.get_testdata_files`` finds, without its download attempts) and in the ``deid_data`` package (zip archives included: the ultrasound cine
clips ship zipped) whose Modality is US, DX or CR, or whose SOP Class is an Ultrasound, Digital X-Ray or
Computed Radiography image storage class. Each file is one test case (id: its file name) and goes through
:func:`read_dataset`, :func:`encoder_for` and :func:`decode_image` as the worker runs them. It must either
decode to a plausible grayscale image, or raise a named :class:`LookalikeDicomError` listed, with its code,
in :data:`EXPECTED_FAILURES`; a file that changes side fails. Grayscale files that pydicom decodes itself are
also compared, pixel for pixel, with pydicom's own decoding plus its Modality and VOI LUT functions.

Coverage (:data:`COVERAGE` holds the same numbers and ``test_corpus_coverage`` keeps the two in step;
``pytest -s -k coverage`` prints them): 38 files, 15 of them MONOCHROME1/2 and all 15 compared with pydicom.

========  =====  =============================================================================  =====
Modality  Files  Transfer syntax                                                                Files
========  =====  =============================================================================  =====
US           26  Explicit VR Little Endian                                                         21
CR           11  Explicit VR Big Endian                                                             4
DX            1  JPEG 2000 Image Compression (Lossless Only)                                        4
                 JPEG 2000 Image Compression                                                        3
                 RLE Lossless                                                                       2
                 JPEG Baseline (Process 1)                                                          2
                 JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [SV1])         1
                 Implicit VR Little Endian                                                          1
========  =====  =============================================================================  =====

The 38: 24 from pydicom-data, 8 from pydicom's own test files (3 of them CR images of its DICOMDIR test
tree), 6 from deid-data (2 of them the cine clips inside its zip archives). Every one decodes today, so
:data:`EXPECTED_FAILURES` is empty. Groups of files that hold the same pixels in different lossless encodings
must also decode alike (``test_lossless_encodings_decode_alike``), which covers the colour and palette paths.
"""

from __future__ import annotations

import collections
import glob
import io
import os
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import pydicom
import pytest
from pydicom.data.data_manager import DATA_ROOT, external_data_sources
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from lookalike.config import ENCODER_FOR_MODALITY
from lookalike.dicom import LookalikeDicomError, decode_image, encoder_for, read_dataset
from lookalike.dicom import decode as decode_module

pytest.importorskip("data_store", reason="pydicom-data is not installed")
deid_data = pytest.importorskip("deid_data")

#: Words of a SOP Class name (as pydicom spells it) that put a file in the corpus whatever its Modality says.
_SOP_CLASS_WORDS = ("Ultrasound", "Digital X-Ray", "Computed Radiography")
_MODALITIES = ("US", "DX", "CR")

#: Files expected to be refused: file name -> error code, each with the reason. Every US, DX and CR file of
#: both corpora decodes today (the JPEG, JPEG-LS and JPEG 2000 plugins are dependencies of the package, and
#: neither corpus holds a FOR PROCESSING radiograph or a broken US/DX/CR file), so the dict is empty; a file
#: that starts failing must either be fixed in the decoder or be added here with the reason, e.g.
#:   "some_file.dcm": "unsupported-transfer-syntax",  # JPEG Extended 12-bit, no installed plugin decodes it
#:   "raw_dx.dcm": "not-indexable",  # Digital X-Ray Image Storage - For Processing (raw detector data)
EXPECTED_FAILURES: dict[str, str] = {}

#: What the corpus holds: per Modality, per Transfer Syntax (pydicom's name), grayscale files compared with
#: pydicom, and files in all. Mirrors the table of the module docstring; ``test_corpus_coverage`` checks it.
COVERAGE: dict[str, dict[str, int]] = {
    "modality": {"US": 26, "CR": 11, "DX": 1},
    "transfer_syntax": {
        "Explicit VR Little Endian": 21,
        "Explicit VR Big Endian": 4,
        "JPEG 2000 Image Compression (Lossless Only)": 4,
        "JPEG 2000 Image Compression": 3,
        "RLE Lossless": 2,
        "JPEG Baseline (Process 1)": 2,
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])": 1,
        "Implicit VR Little Endian": 1,
    },
    "total": {"files": 38, "grayscale": 15},
}


@dataclass(frozen=True)
class CorpusFile:
    """One file of the corpus: where it is (a path, or a member of a zip archive) and what its header says."""

    name: str
    path: str
    member: str | None
    modality: str
    sop_class: str
    transfer_syntax: str
    photometric: str

    def data(self) -> bytes:
        if self.member is None:
            with open(self.path, "rb") as fp:
                return fp.read()
        with zipfile.ZipFile(self.path) as archive:
            return archive.read(self.member)


def _header(fp) -> pydicom.Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(fp, stop_before_pixels=True, force=True)
    except Exception:  # not DICOM at all (JSON, text, icc, ...): not part of the corpus
        return None


def _entry(ds: pydicom.Dataset | None, name: str, path: str, member: str | None) -> CorpusFile | None:
    if ds is None:
        return None
    modality = str(ds.get("Modality", "") or "").strip().upper()
    try:
        sop_class = UID(str(ds.get("SOPClassUID", "") or "")).name
    except Exception:
        sop_class = ""
    if modality not in _MODALITIES and not any(word in sop_class for word in _SOP_CLASS_WORDS):
        return None
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return CorpusFile(
        name=name,
        path=path,
        member=member,
        modality=modality,
        sop_class=sop_class,
        transfer_syntax=syntax.name if syntax is not None else "(none)",
        photometric=str(ds.get("PhotometricInterpretation", "") or "").strip(),
    )


def _collect() -> list[CorpusFile]:
    deid_root = os.path.dirname(deid_data.__file__)
    # The same files as pydicom.data.get_testdata_files, without its attempt to download the files that are
    # not in the local cache (which, offline, costs seconds of timeouts and finds nothing new): pydicom's own
    # test_files and the installed pydicom-data package.
    paths = glob.glob(os.path.join(DATA_ROOT, "test_files", "**", "*"), recursive=True)
    for source in external_data_sources().values():
        paths += source.get_paths("**/*", 0)
    paths = sorted(p for p in set(paths) if os.path.isfile(p))
    paths += sorted(p for p in glob.glob(os.path.join(deid_root, "**", "*"), recursive=True) if os.path.isfile(p))
    found: list[CorpusFile] = []
    for path in paths:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith("/"):
                        continue
                    with archive.open(member) as fp:
                        entry = _entry(_header(fp), os.path.basename(member), path, member)
                    if entry is not None:
                        found.append(entry)
            continue
        entry = _entry(_header(path), os.path.basename(path), path, None)
        if entry is not None:
            found.append(entry)
    return found


CORPUS = _collect()
_BY_NAME = {f.name: f for f in CORPUS}
_GRAYSCALE = [f for f in CORPUS if f.photometric in ("MONOCHROME1", "MONOCHROME2")]


def test_corpus_coverage():
    """The corpus is what the docstring and COVERAGE say; file names are unique (they are the test ids)."""
    names = [f.name for f in CORPUS]
    assert len(names) == len(set(names)), [n for n, c in collections.Counter(names).items() if c > 1]
    counted = {
        "modality": dict(collections.Counter(f.modality for f in CORPUS)),
        "transfer_syntax": dict(collections.Counter(f.transfer_syntax for f in CORPUS)),
        "total": {"files": len(CORPUS), "grayscale": len(_GRAYSCALE)},
    }
    print("\ncorpus coverage:")
    for group, counts in counted.items():
        for key, count in sorted(counts.items(), key=lambda kv: -kv[1]):
            print(f"  {group:16} {key:90} {count:3}")
    assert counted == COVERAGE
    assert set(EXPECTED_FAILURES) <= set(names), "EXPECTED_FAILURES names files that are not in the corpus"


# The decoded image of each file that decodes, shared by the two tests below.
_DECODED: dict[str, object] = {}


def _run_worker_steps(entry: CorpusFile):
    """read_dataset, encoder_for, decode_image, as the worker runs them; the dataset and image."""
    ds = read_dataset(entry.data())
    encoder = encoder_for(ds)
    assert encoder == ENCODER_FOR_MODALITY[entry.modality]
    return ds, decode_image(ds)


def _source_frame_constant(data: bytes, index: int) -> bool:
    """Whether pydicom's own decoding of frame `index` is constant (then a constant image is right)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    arr = ds.pixel_array
    frame = arr[index] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else arr
    return bool(frame.min() == frame.max())


@pytest.mark.parametrize("entry", CORPUS, ids=[f.name for f in CORPUS])
def test_decodes_or_fails_as_expected(entry: CorpusFile):
    expected = EXPECTED_FAILURES.get(entry.name)
    try:
        ds, image = _run_worker_steps(entry)
    except LookalikeDicomError as exc:
        assert str(exc).strip(), f"{entry.name}: {type(exc).__name__} has an empty message"
        assert type(exc) is not LookalikeDicomError, "only the named subclasses may be raised"
        assert expected is not None, f"{entry.name} used to decode and now fails: {exc.code}: {exc}"
        assert exc.code == expected, f"{entry.name} fails with {exc.code} instead of {expected}: {exc}"
        return
    assert expected is None, f"{entry.name} was expected to fail with {expected} but now decodes"

    frames, rows, columns, _ = image.source_shape
    for plane in (image.pixels, *image.frames):
        assert plane.dtype == np.float32 and plane.ndim == 2
        assert np.isfinite(plane).all()
        assert float(plane.min()) >= 0.0 and float(plane.max()) <= 1.0
        assert plane.shape == image.pixels.shape
    height, width = image.pixels.shape
    assert min(height, width) >= 16, image.pixels.shape
    assert max(height, width) <= decode_module.DOWNSAMPLE_ABOVE, image.pixels.shape
    assert frames // 2 in image.frames_used
    assert image.pixels is image.frames[image.frames_used.index(frames // 2)]
    if float(image.pixels.max()) == float(image.pixels.min()):
        assert _source_frame_constant(entry.data(), frames // 2 if frames > 1 else 0), (
            f"{entry.name} decodes to a constant image but its pixels are not constant"
        )
    _DECODED[entry.name] = image


# ------------------------------------------------------------------------------------ pydicom reference


def _block_mean(arr: np.ndarray, factor: int) -> np.ndarray:
    """Block mean over whole factor x factor blocks, rounded half up to the stored integers (as stored)."""
    if factor == 1:
        return arr
    rows, columns = arr.shape[0] // factor, arr.shape[1] // factor
    blocks = arr[: rows * factor, : columns * factor].astype(np.int64).reshape(rows, factor, columns, factor)
    area = factor * factor
    return ((blocks.sum(axis=(1, 3)) + area // 2) // area).astype(arr.dtype)


def _has_voi_lut(ds: pydicom.Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]


def _has_window(ds: pydicom.Dataset) -> bool:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center in (None, "") or width in (None, ""):
        return False
    width = width[0] if isinstance(width, pydicom.multival.MultiValue) else width
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    return float(width) > 0 and function in ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def _reference(ds: pydicom.Dataset, frame: np.ndarray, region, factor: int) -> np.ndarray:
    """pydicom's own rendering of one stored frame, cropped and reduced as the decoder says it did."""
    frame = _block_mean(frame, factor)
    if region is not None:
        x0, y0, x1, y1 = region  # stored coordinates of the full frame, reduced like the decoder's box
        frame = frame[y0 // factor : -(-y1 // factor), x0 // factor : -(-x1 // factor)]
    values = apply_modality_lut(frame, ds)
    if _has_voi_lut(ds):
        item = ds.VOILUTSequence[0]
        entries, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
        table = apply_voi_lut(np.arange(first, first + entries), ds, index=0).astype(np.float64)
        lo, hi = float(table.min()), float(table.max())  # the LUT's output range
        values = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0).astype(np.float64)
    elif _has_window(ds):
        # pydicom windows into [y_min, y_max] (the stored or rescaled range): find both ends by windowing
        # values far outside any window.
        lo, hi = (float(v) for v in apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0))
        values = apply_voi_lut(values.astype(np.float64), ds, index=0)
    else:
        values = values.astype(np.float64)
        lo, hi = float(values.min()), float(values.max())
    unit = np.zeros_like(values, dtype=np.float64) if hi <= lo else np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        unit = 1.0 - unit
    return unit



@pytest.mark.parametrize("entry", _GRAYSCALE, ids=[f.name for f in _GRAYSCALE])
def test_grayscale_matches_pydicom(entry: CorpusFile):
    """The decoder's frames equal pydicom's pixel_array + apply_modality_lut + apply_voi_lut.

    Compared by the largest absolute difference (< 1e-3 on the [0, 1] scale) rather than by correlation:
    both sides start from the same decoded integers (pydicom's own plugins) and the test reduces them with
    the same rounded block mean, so the only differences left are float32 against float64 arithmetic
    (~1e-6). A correlation would pass an image whose window, rescale or inversion is off by an affine
    change (every window mistake keeps correlation near 1 inside the window), and would hide a few wrong
    rows; the absolute bound catches both and stays far above rounding noise.
    """
    image = _DECODED.get(entry.name)
    if image is None:
        if entry.name in EXPECTED_FAILURES:
            pytest.skip(f"{entry.name} is an expected failure ({EXPECTED_FAILURES[entry.name]})")
        _, image = _run_worker_steps(entry)
    data = entry.data()
    reference_ds = pydicom.dcmread(io.BytesIO(data))
    try:
        arr = reference_ds.pixel_array
    except Exception as exc:  # pydicom cannot decode it either: nothing to compare with
        pytest.skip(f"pydicom does not decode {entry.name}: {exc}")
    frames = image.source_shape[0]
    for index, plane in zip(image.frames_used, image.frames):
        frame = arr[index] if frames > 1 else arr
        expected = _reference(reference_ds, frame, image.region, image.downsampling)
        assert plane.shape == expected.shape, (plane.shape, expected.shape)
        diff = float(np.abs(plane.astype(np.float64) - expected).max())
        assert diff < 1e-3, f"{entry.name} frame {index}: max |decoder - pydicom| = {diff:.2e}"


#: Files holding the same pixels in different (lossless) encodings: byte order, planar configuration, RLE,
#: JPEG 2000 reversible. They must decode to the same image, which checks the colour and palette paths that
#: have no pydicom reference above. The ``_2frame`` files repeat the single frame as their frame 0.
_SAME_PIXELS = [
    ("US1_UNCR.dcm", "US1_J2KR.dcm", "examples_jpeg2k.dcm"),
    ("OBXXXX1A.dcm", "OBXXXX1A_expb.dcm", "OBXXXX1A_rle.dcm", "OBXXXX1A_2frame.dcm", "OBXXXX1A_expb_2frame.dcm",
     "OBXXXX1A_rle_2frame.dcm"),
    ("gdcm-US-ALOKA-16.dcm", "gdcm-US-ALOKA-16_big.dcm"),
    ("color-pl.dcm", "color-px.dcm"),
    ("RG1_UNCR.dcm", "RG1_J2KR.dcm"),
    ("RG3_UNCR.dcm", "RG3_J2KR.dcm"),
]


@pytest.mark.parametrize("names", _SAME_PIXELS, ids=[group[0] for group in _SAME_PIXELS])
def test_lossless_encodings_decode_alike(names):
    missing = [n for n in names if n not in _BY_NAME]
    assert not missing, f"{missing} left the corpus"
    images = [_DECODED.get(n) or _run_worker_steps(_BY_NAME[n])[1] for n in names]
    first = images[0]
    for name, image in zip(names[1:], images[1:]):
        assert image.region == first.region, name
        np.testing.assert_array_equal(image.frames[0], first.frames[0], err_msg=name)
