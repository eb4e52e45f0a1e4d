"""Read a DICOM instance and turn its pixel data into one grayscale image in [0, 1].

Every image that reaches an encoder goes through :func:`decode_image`, so that an ultrasound clip stored as
YBR JPEG, an RGB screenshot and a MONOCHROME1 radiograph all arrive the same way: a 2-D ``float32`` array in
which bright means "more signal" (echo, attenuation) whatever the stored Photometric Interpretation.

Failures raise the errors of :mod:`lookalike.dicom_io.errors`, each with a stable ``code`` the worker
records. Checks that protect the worker (size limit, pixel data length) run before any pixel is decoded.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.pixels.processing import apply_voi
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import DeflatedExplicitVRLittleEndian

from lookalike.dicom_io.errors import (
    ImageTooLargeError,
    InconsistentAttributesError,
    InvalidDicomError,
    MissingPixelDataError,
    UnsupportedTransferSyntaxError,
)

__all__ = ["DecodedImage", "read_dataset", "decode_image", "DEFAULT_MAX_PIXELS"]

#: Default limit on decoded samples (Rows x Columns x Samples per Pixel x frames decoded); see
#: :attr:`lookalike.config.Settings.max_pixels`.
DEFAULT_MAX_PIXELS = 50_000_000

_PIXEL_DATA_TAG = 0x7FE00010
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
#: ITU-R BT.601 luma weights, the same Y as DICOM's YBR_FULL.
_LUMA = (np.float32(0.299), np.float32(0.587), np.float32(0.114))


@dataclass(frozen=True)
class DecodedImage:
    """One decoded image ready for an encoder.

    Attributes
    ----------
    pixels
        2-D ``float32`` array in [0, 1], grayscale; higher values are brighter in the intended display
        (MONOCHROME1 has been inverted).
    source_shape
        ``(frames, rows, columns, samples_per_pixel)`` as the instance declares it.
    frames_used
        0-based indices of the frames that ``pixels`` was made from.
    photometric_interpretation
        The Photometric Interpretation as stored in the instance (before any conversion).
    """

    pixels: np.ndarray
    source_shape: tuple[int, int, int, int]
    frames_used: tuple[int, ...]
    photometric_interpretation: str


# --------------------------------------------------------------------------------------------------- reading


def read_dataset(data: bytes | bytearray | memoryview | str | os.PathLike) -> pydicom.Dataset:
    """Parse a DICOM Part 10 file and make sure it is complete.

    pydicom reads a truncated file without complaint (it stops where the bytes end), which would later
    surface as a confusing decoding error or, worse, a silently wrong image. This function therefore checks
    that the last data element read is complete and ends exactly at the end of the file.

    Parameters
    ----------
    data
        The file's bytes, or a path to it.

    Returns
    -------
    pydicom.Dataset
        The dataset, with its file meta information.

    Raises
    ------
    InvalidDicomError
        Not a DICOM Part 10 file (no preamble and ``DICM`` prefix), unparseable, truncated, or with bytes
        left over after the last data element.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        with io.BytesIO(bytes(data)) as fp:
            return _read_from(fp, len(data), "<bytes>")
    path = os.fspath(data)
    with open(path, "rb") as fp:
        return _read_from(fp, os.fstat(fp.fileno()).st_size, path)


def _read_from(fp: BinaryIO, size: int, name: str) -> pydicom.Dataset:
    """Parse `fp` (`size` bytes long) and run the completeness checks."""
    try:
        ds = pydicom.dcmread(fp, force=False)
    except pydicom.errors.InvalidDicomError as exc:
        raise InvalidDicomError(
            f"{name} is not a DICOM Part 10 file (no 128-byte preamble and 'DICM' prefix): {exc}"
        ) from exc
    except Exception as exc:  # pydicom raises many types (struct.error, OSError, ValueError...) on corrupt data
        raise InvalidDicomError(f"{name} could not be parsed as DICOM; it is corrupt or truncated: {exc}") from exc
    _check_complete(ds, size, name)
    return ds


def _check_complete(ds: pydicom.Dataset, size: int, name: str) -> None:
    """Raise InvalidDicomError unless the top-level data set ends, complete, at the end of the file."""
    if len(ds) == 0:
        raise InvalidDicomError(f"{name} has file meta information but no data set; it is probably truncated")
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID")
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return  # element offsets refer to the inflated stream; zlib itself rejects a truncated stream
    last_tag = max(ds.keys())
    elem = ds.get_item(last_tag)
    if not isinstance(elem, RawDataElement) or elem.value_tell is None:
        return  # an undefined-length sequence, fully parsed up to its delimiter by pydicom
    value_length = len(elem.value) if elem.value is not None else 0
    if elem.length == 0xFFFFFFFF:
        # The value is followed by the 8-byte Sequence Delimitation Item; when pydicom found none, it kept
        # everything up to the end of the file as the value, and `end` overshoots the file's size.
        end = elem.value_tell + value_length + 8
    else:
        if value_length < elem.length:
            raise InvalidDicomError(
                f"{name} is truncated: element {elem.tag} declares {elem.length} bytes but only "
                f"{value_length} remain in the file"
            )
        end = elem.value_tell + elem.length
    if end != size:
        raise InvalidDicomError(
            f"{name} is truncated or corrupt: parsing stopped at byte {end} of {size} "
            "(the file ends inside a data element header)"
        )


# -------------------------------------------------------------------------------------------------- decoding


def _int_attr(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    """Return an Image Pixel attribute as int, or raise InconsistentAttributesError if absent or not a number."""
    value = ds.get(keyword, None)
    if value is None or value == "":
        if default is not None:
            return default
        raise InconsistentAttributesError(f"Pixel Data is present but {keyword} is missing or empty")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InconsistentAttributesError(f"{keyword} has the invalid value {value!r}") from None


def _image_geometry(ds: pydicom.Dataset) -> tuple[int, int, int, int]:
    """Return ``(frames, rows, columns, samples)`` after checking they are usable."""
    rows = _int_attr(ds, "Rows")
    columns = _int_attr(ds, "Columns")
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    frames = _int_attr(ds, "NumberOfFrames", 1)
    if rows <= 0 or columns <= 0:
        raise InconsistentAttributesError(f"Rows x Columns is {rows} x {columns}; an image needs both > 0")
    if samples not in (1, 3):
        raise InconsistentAttributesError(f"Samples per Pixel is {samples}; only 1 and 3 are valid")
    if frames <= 0:
        raise InconsistentAttributesError(f"Number of Frames is {frames}; it must be at least 1")
    bits_allocated = _int_attr(ds, "BitsAllocated")
    if bits_allocated not in (1, 8, 16, 32):
        raise InconsistentAttributesError(f"Bits Allocated is {bits_allocated}; Lookalike reads 1, 8, 16 or 32")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if not photometric:
        raise InconsistentAttributesError("Pixel Data is present but Photometric Interpretation is missing")
    if (samples == 1) != (photometric in (*_MONOCHROME, "PALETTE COLOR")):
        raise InconsistentAttributesError(
            f"Photometric Interpretation {photometric} does not fit Samples per Pixel = {samples}"
        )
    return frames, rows, columns, samples


def _frames_to_use(frames: int) -> tuple[int, ...]:
    """Choose the frames to decode: for now the middle one, usually the most representative of a sweep."""
    return (frames // 2,)


def _decode_frame(ds: pydicom.Dataset, index: int) -> tuple[np.ndarray, str]:
    """Decode one frame with pydicom; return it and its Photometric Interpretation after decoding."""
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if transfer_syntax is None:
        raise InvalidDicomError("the file meta information has no Transfer Syntax UID")
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        raise UnsupportedTransferSyntaxError(
            f"no decoder exists for Transfer Syntax {transfer_syntax.name} ({transfer_syntax}); ask the modality "
            "or Orthanc to send it uncompressed or as JPEG / JPEG-LS / JPEG 2000 / RLE"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise UnsupportedTransferSyntaxError(
            f"Transfer Syntax {transfer_syntax.name} ({transfer_syntax}) needs a decoder plugin that is not "
            f"installed: {missing}"
        )

    if decoder.is_native:
        expected = get_expected_length(ds, unit="bytes")
        available = len(ds.PixelData)
        if available < expected:
            frames, rows, columns, samples = _image_geometry(ds)
            raise InconsistentAttributesError(
                f"Pixel Data holds {available} bytes but Rows x Columns x Number of Frames x Samples per Pixel "
                f"({rows} x {columns} x {frames} x {samples}) at {ds.BitsAllocated} bits needs {expected}"
            )

    try:
        arr, properties = decoder.as_array(ds, index=index)
    except (RuntimeError, NotImplementedError) as exc:
        raise UnsupportedTransferSyntaxError(
            f"unable to decode {transfer_syntax.name} ({transfer_syntax}) pixel data with the installed "
            f"decoders; it uses an unsupported feature or is corrupt: {exc}"
        ) from exc
    except (ValueError, KeyError, IndexError, EOFError) as exc:
        text = str(exc)
        if any(word in text for word in ("encapsulated", "fragment", "Offset Table")):
            raise InvalidDicomError(f"the encapsulated Pixel Data is corrupt: {text}") from exc
        raise InconsistentAttributesError(f"the pixel data does not match the Image Pixel attributes: {text}") from exc
    photometric = str(properties.get("photometric_interpretation", ds.PhotometricInterpretation))
    return arr, photometric


def _to_gray_float32(arr: np.ndarray, photometric: str, ds: pydicom.Dataset) -> np.ndarray:
    """Reduce a decoded colour frame to float32 luma, one plane at a time (no float64 copy)."""
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        photometric = "RGB"
    if photometric == "RGB":
        gray = arr[..., 0] * _LUMA[0]
        gray += arr[..., 1] * _LUMA[1]
        gray += arr[..., 2] * _LUMA[2]
        return gray
    # YBR_* that the decoder left as is (YBR_FULL/422 are turned into RGB by pydicom, YBR_ICT/RCT by the
    # JPEG 2000 decoder): the first component is the luminance.
    return arr[..., 0].astype(np.float32)


def _rescaled(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Apply the Modality LUT or Rescale Slope/Intercept in float32 (pydicom's rescale would go to float64)."""
    if ds.get("ModalityLUTSequence"):
        return apply_modality_lut(arr, ds)  # integer output of the LUT's depth
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope == 1 and intercept == 0:
        return arr
    out = arr.astype(np.float32)
    out *= np.float32(slope)
    out += np.float32(intercept)
    return out


def _window(ds: pydicom.Dataset) -> tuple[float, float, str] | None:
    """Return the first Window Center/Width and VOI LUT Function, or None when there is no usable window."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return None
    try:
        center = float(center[0] if isinstance(center, (MultiValue, list, tuple)) else center)
        width = float(width[0] if isinstance(width, (MultiValue, list, tuple)) else width)
    except (TypeError, ValueError, IndexError):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if width <= 0 or function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        return None
    return center, width, function


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Map `values` (float32, modified in place) through a VOI window straight to [0, 1] (PS3.3 C.11.2.1.2)."""
    if function == "SIGMOID":
        values -= np.float32(center)
        values *= np.float32(-4.0 / width)
        with np.errstate(over="ignore"):  # exp overflows to inf far below the window, giving 0 as it should
            np.exp(values, out=values)
        values += np.float32(1.0)
        np.reciprocal(values, out=values)
        return values
    if function == "LINEAR":
        center, width = center - 0.5, max(width - 1.0, 1e-6)
    values -= np.float32(center)
    values *= np.float32(1.0 / width)
    values += np.float32(0.5)
    np.clip(values, 0.0, 1.0, out=values)
    return values


def _min_max(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Scale float32 `values` in place to [0, 1] by their own range (or the given one)."""
    lo = float(values.min()) if lo is None else lo
    hi = float(values.max()) if hi is None else hi
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise InconsistentAttributesError("the decoded pixel values are not finite")
    if hi <= lo:
        values[...] = 0.0
        return values
    values -= np.float32(lo)
    values *= np.float32(1.0 / (hi - lo))
    np.clip(values, 0.0, 1.0, out=values)
    return values


def _monochrome_to_unit(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Modality transform, then VOI transform (LUT, else window, else min-max), giving float32 in [0, 1]."""
    values = _rescaled(arr, ds)
    voi_lut = ds.get("VOILUTSequence")
    if voi_lut and "LUTDescriptor" in voi_lut[0] and "LUTData" in voi_lut[0]:
        if not np.issubdtype(values.dtype, np.integer):
            values = np.rint(values).astype(np.int32)
        entries, first_mapped = int(voi_lut[0].LUTDescriptor[0]) or 2**16, int(voi_lut[0].LUTDescriptor[1])
        table = apply_voi(np.arange(first_mapped, first_mapped + entries, dtype=np.int32), ds, 0)
        mapped = apply_voi(values, ds, 0).astype(np.float32)
        return _min_max(mapped, float(table.min()), float(table.max()))  # the LUT's own range, not the image's
    values = values.astype(np.float32, copy=False)  # a copy unless the rescale already made float32
    window = _window(ds)
    if window is not None:
        return _apply_window(values, *window)
    return _min_max(values)


def decode_image(ds: pydicom.Dataset, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode the pixel data of `ds` into one grayscale float32 image in [0, 1].

    The order of work protects the worker: the size limit and the pixel data length are checked from the
    header before pydicom decodes anything, and only the frames used are decoded.

    Parameters
    ----------
    ds
        A dataset from :func:`read_dataset` (it needs its file meta information).
    max_pixels
        Refuse images whose decoded samples (Rows x Columns x Samples per Pixel x frames decoded) exceed
        this; :attr:`lookalike.config.Settings.max_pixels` sets it in deployment.

    Returns
    -------
    DecodedImage

    Raises
    ------
    MissingPixelDataError, ImageTooLargeError, InconsistentAttributesError, UnsupportedTransferSyntaxError,
    InvalidDicomError
    """
    if "PixelData" not in ds:
        others = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        detail = f" (it has {others[0]}, which Lookalike does not read)" if others else ""
        raise MissingPixelDataError(
            f"the instance has no Pixel Data (7FE0,0010){detail}; if it should be an image, the file may have "
            "been truncated before its pixel data"
        )
    frames, rows, columns, samples = _image_geometry(ds)
    frames_used = _frames_to_use(frames)
    claimed = rows * columns * samples * len(frames_used)
    if claimed > max_pixels:
        raise ImageTooLargeError(
            f"the image claims {rows} x {columns} x {samples} samples per frame ({claimed:,} to decode), over "
            f"the limit of {max_pixels:,} (setting max_pixels); refused without decoding",
            claimed_pixels=claimed,
            max_pixels=max_pixels,
        )

    stored_photometric = str(ds.PhotometricInterpretation).strip()
    arr, photometric = _decode_frame(ds, frames_used[0])
    expected_shape = (rows, columns) if samples == 1 else (rows, columns, samples)
    if arr.shape != expected_shape:
        raise InconsistentAttributesError(
            f"decoded frame has shape {arr.shape} but Rows, Columns and Samples per Pixel declare {expected_shape}"
        )

    if photometric in _MONOCHROME:
        pixels = _monochrome_to_unit(arr, ds)
        if photometric == "MONOCHROME1":
            np.subtract(np.float32(1.0), pixels, out=pixels)
    else:
        pixels = _min_max(_to_gray_float32(arr, photometric, ds))
    del arr

    return DecodedImage(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        source_shape=(frames, rows, columns, samples),
        frames_used=frames_used,
        photometric_interpretation=stored_photometric,
    )
