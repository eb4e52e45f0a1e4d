"""Read a DICOM instance and turn its pixel data into one grayscale image in [0, 1].

Every image that reaches an encoder goes through :func:`decode_image`, so that an ultrasound clip stored as
YBR JPEG, an RGB screenshot and a MONOCHROME1 radiograph all arrive the same way: a 2-D ``float32`` array in
which bright means "more signal" (echo, attenuation) whatever the stored Photometric Interpretation.

Three reductions happen here, on the integer array and before the float conversion where possible, so that
what reaches an encoder is what matters for similarity and memory stays bounded:

* a cine clip gives up to :data:`MAX_FRAMES` frames spread over the clip (not one arbitrary frame);
* an image whose long side exceeds :data:`DOWNSAMPLE_ABOVE` (a 3000 x 3000 radiograph) is block-averaged by
  an integer factor to about :data:`TARGET_SIDE` pixels, so no full-size float copy is ever made;
* an ultrasound image is cropped to its imaging region (the Sequence of Ultrasound Regions, else the largest
  bright connected area), so that burned-in text, calipers and rulers do not drive similarity.

Failures raise the errors of :mod:`lookalike.dicom.errors`, each with a stable ``code`` the worker
records. Checks that protect the worker (size limit, pixel data length) run before any pixel is decoded.
"""

from __future__ import annotations

import io
import os
import struct
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

from lookalike.dicom.errors import (
    ImageTooLargeError,
    InconsistentAttributesError,
    InvalidDicomError,
    MissingPixelDataError,
    UnsupportedTransferSyntaxError,
)
from lookalike.dicom.imaging_region import find_imaging_region

__all__ = [
    "DecodedImage",
    "read_dataset",
    "decode_image",
    "DEFAULT_MAX_PIXELS",
    "MAX_FRAMES",
    "DOWNSAMPLE_ABOVE",
    "TARGET_SIDE",
]

#: Default limit on decoded samples (Rows x Columns x Samples per Pixel x frames decoded); see
#: :attr:`lookalike.config.Settings.max_pixels`.
DEFAULT_MAX_PIXELS = 50_000_000

#: Frames decoded from a multi-frame (cine) instance at most: enough to see the whole sweep, few enough to keep
#: decoding and embedding cheap.
MAX_FRAMES = 5

#: Frames whose long side is above this are reduced by an integer factor to at most :data:`TARGET_SIDE`. Below
#: it a float32 frame is at most 16 MiB, and the encoders resize to far less anyway.
DOWNSAMPLE_ABOVE = 2048

#: The long side, in pixels, that large frames are reduced to (or just under).
TARGET_SIDE = 1024

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
        (MONOCHROME1 has been inverted). For a cine clip, the middle frame (``frames[frames_used.index(n // 2)]``
        for ``n`` frames), the one image callers that want a single picture should use.
    source_shape
        ``(frames, rows, columns, samples_per_pixel)`` as the instance declares it.
    frames_used
        0-based indices, ascending, of the frames decoded into ``frames``.
    photometric_interpretation
        The Photometric Interpretation as stored in the instance (before any conversion).
    frames
        One 2-D ``float32`` array in [0, 1] per entry of ``frames_used``, all cropped and reduced alike.
    region
        ``(x0, y0, x1, y1)``: the crop, in stored pixel coordinates of the full frame (columns x0 to x1 - 1,
        rows y0 to y1 - 1), or None when the whole frame is used.
    downsampling
        The integer factor the frames were reduced by (block mean), 1 when they were not.
    """

    pixels: np.ndarray
    source_shape: tuple[int, int, int, int]
    frames_used: tuple[int, ...]
    photometric_interpretation: str
    frames: tuple[np.ndarray, ...] = ()
    region: tuple[int, int, int, int] | None = None
    downsampling: int = 1


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
            ds = _read_from(fp, len(data), "<bytes>")
        # Every element is read by now (nothing deferred): drop the closed buffer, which would only keep the bytes
        # alive and stop the dataset from pickling (the worker's fetch-ahead process sends it through a pipe).
        ds.buffer = None
        return ds
    path = os.fspath(data)
    with open(path, "rb") as fp:
        return _read_from(fp, os.fstat(fp.fileno()).st_size, path)


#: What pydicom raises when it converts a corrupt raw data element: an unknown VR (NotImplementedError), a
#: value that is not a whole number of values (BytesLengthException), undecodable text (ValueError), ...
_CONVERSION_ERRORS = (
    NotImplementedError,
    ValueError,
    LookupError,
    TypeError,
    OverflowError,
    struct.error,
    pydicom.errors.BytesLengthException,
)


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
    try:
        _check_complete(ds, size, name)
        # pydicom converts raw elements lazily, on first access: convert every one now, nested ones included,
        # so that a corrupt Value Representation or value fails here, by name, and not as an arbitrary
        # exception wherever the decoder first reads the attribute.
        for _ in ds.iterall():
            pass
    except _CONVERSION_ERRORS as exc:
        raise InvalidDicomError(f"{name} has a corrupt data element: {type(exc).__name__}: {exc}") from exc
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
    bits_stored = _int_attr(ds, "BitsStored")
    if not 1 <= bits_stored <= bits_allocated:
        raise InconsistentAttributesError(
            f"Bits Stored is {bits_stored}; it must be between 1 and Bits Allocated ({bits_allocated})"
        )
    if _int_attr(ds, "PixelRepresentation") not in (0, 1):
        raise InconsistentAttributesError(f"Pixel Representation is {ds.PixelRepresentation}; it must be 0 or 1")
    if samples > 1 and _int_attr(ds, "PlanarConfiguration") not in (0, 1):
        raise InconsistentAttributesError(f"Planar Configuration is {ds.PlanarConfiguration}; it must be 0 or 1")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if not photometric:
        raise InconsistentAttributesError("Pixel Data is present but Photometric Interpretation is missing")
    if (samples == 1) != (photometric in (*_MONOCHROME, "PALETTE COLOR")):
        raise InconsistentAttributesError(
            f"Photometric Interpretation {photometric} does not fit Samples per Pixel = {samples}"
        )
    return frames, rows, columns, samples


def _frames_to_use(frames: int, budget: int = MAX_FRAMES) -> tuple[int, ...]:
    """Choose the frames to decode: up to ``min(MAX_FRAMES, budget)`` spread evenly over the clip.

    The middle frame (``frames // 2``, the single most representative frame of a sweep, which
    :attr:`DecodedImage.pixels` holds) is always among them, and the first and last frames too when three or
    more are used, so that the embedding sees the whole sweep rather than one instant of it.
    """
    count = max(1, min(MAX_FRAMES, frames, budget))
    middle = frames // 2
    if count >= frames:
        return tuple(range(frames))
    if count == 1:
        return (middle,)
    picks = [round(k * (frames - 1) / (count - 1)) for k in range(count)]
    if middle not in picks:
        closest = min(range(1, count - 1), key=lambda k: abs(picks[k] - middle)) if count > 2 else 1
        picks[closest] = middle
    return tuple(sorted(set(picks)))


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
    except struct.error as exc:  # an item or offset table length that points past the end of the data
        raise InvalidDicomError(f"the encapsulated Pixel Data is corrupt: {exc}") from exc
    except (ValueError, KeyError, IndexError, EOFError, AttributeError, TypeError) as exc:
        # AttributeError: pydicom's "Missing required element"; TypeError: an attribute with several values
        text = str(exc)
        if any(word in text for word in ("encapsulated", "fragment", "Offset Table")):
            raise InvalidDicomError(f"the encapsulated Pixel Data is corrupt: {text}") from exc
        raise InconsistentAttributesError(f"the pixel data does not match the Image Pixel attributes: {text}") from exc
    photometric = str(properties.get("photometric_interpretation", ds.PhotometricInterpretation))
    return arr, photometric


def _to_gray_float32(arr: np.ndarray, photometric: str, ds: pydicom.Dataset) -> np.ndarray:
    """Reduce a decoded colour frame to float32 luma, one plane at a time (no float64 copy)."""
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise InconsistentAttributesError(
                f"Photometric Interpretation is PALETTE COLOR but the Palette Color Lookup Table is missing or "
                f"does not fit the pixel data: {exc}"
            ) from exc
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


# ------------------------------------------------------------------------------------- size and region


def _downsample_factor(rows: int, columns: int) -> int:
    """The integer reduction factor for a frame: 1 up to :data:`DOWNSAMPLE_ABOVE`, else to <= TARGET_SIDE."""
    long_side = max(rows, columns)
    if long_side <= DOWNSAMPLE_ABOVE:
        return 1
    return -(-long_side // TARGET_SIDE)


def _reduce(arr: np.ndarray, factor: int, photometric: str) -> np.ndarray:
    """Shrink a decoded frame by `factor` on its integer array, before any float conversion.

    Grayscale and colour samples are block-averaged (an anti-aliased reduction, rounded back to the stored
    integer type so the Modality and VOI LUTs still apply); PALETTE COLOR indices are subsampled, as the mean
    of two indices means nothing. The sums run over strided views, so the only new arrays are of the reduced
    size. Rows and columns beyond the last whole block are dropped (fewer than `factor` of them).
    """
    if factor == 1:
        return arr
    if photometric == "PALETTE COLOR" or not np.issubdtype(arr.dtype, np.integer):
        return np.ascontiguousarray(arr[::factor, ::factor])
    rows, columns = arr.shape[0] // factor, arr.shape[1] // factor
    whole = arr[: rows * factor, : columns * factor]
    signed = np.issubdtype(arr.dtype, np.signedinteger)
    if arr.dtype.itemsize <= 2 and factor <= 256:  # 65535 x 256**2 still fits in 32 bits
        wide = np.int32 if signed else np.uint32
    else:
        wide = np.int64 if signed else np.uint64
    # One strided add per position in the block: ~10x faster than a reduction over split axes, and the
    # only arrays made are of the reduced size.
    total = np.zeros((rows, columns, *arr.shape[2:]), dtype=wide)
    for dy in range(factor):
        for dx in range(factor):
            np.add(total, whole[dy::factor, dx::factor], out=total, casting="unsafe")
    area = factor * factor
    total += area // 2
    total //= area
    return total.astype(arr.dtype)


def _declared_region(ds: pydicom.Dataset, rows: int, columns: int) -> tuple[int, int, int, int] | None:
    """The imaging region from the Sequence of Ultrasound Regions (PS3.3 C.8.5.5), or None.

    Regions with Region Spatial Format 2D (1: a B-mode or similar tissue image) are used; several (a dual
    display) give the bounding box of all of them. Waveforms, spectral and M-mode strips, and colour bars are
    left out. Coordinates are clipped to the frame (Region Location Max is inclusive), and a region left
    empty by clipping counts as absent.
    """
    boxes = []
    for item in ds.get("SequenceOfUltrasoundRegions", None) or []:
        try:
            if int(item.get("RegionSpatialFormat", -1)) != 1:
                continue
            x0, y0 = int(item.RegionLocationMinX0), int(item.RegionLocationMinY0)
            x1, y1 = int(item.RegionLocationMaxX1) + 1, int(item.RegionLocationMaxY1) + 1
        except (AttributeError, TypeError, ValueError):
            continue  # an incomplete item; the others may still name the region
        boxes.append((max(0, x0), max(0, y0), min(columns, x1), min(rows, y1)))
    if not boxes:
        return None
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return x0, y0, x1, y1


def _to_unit(arr: np.ndarray, photometric: str, ds: pydicom.Dataset) -> np.ndarray:
    """A decoded (cropped, reduced) frame to grayscale float32 in [0, 1], bright meaning more signal."""
    if photometric in _MONOCHROME:
        pixels = _monochrome_to_unit(arr, ds)
        if photometric == "MONOCHROME1":
            np.subtract(np.float32(1.0), pixels, out=pixels)
    else:
        pixels = _min_max(_to_gray_float32(arr, photometric, ds))
    return np.ascontiguousarray(pixels, dtype=np.float32)


def decode_image(ds: pydicom.Dataset, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode the pixel data of `ds` into grayscale float32 frames in [0, 1], cropped and reduced.

    The order of work protects the worker: the size limit and the pixel data length are checked from the
    header before pydicom decodes anything, only the frames used are decoded, and large frames are reduced on
    their integer array before any float copy exists.

    Parameters
    ----------
    ds
        A dataset from :func:`read_dataset` (it needs its file meta information).
    max_pixels
        Limit on decoded samples (Rows x Columns x Samples per Pixel x frames decoded);
        :attr:`lookalike.config.Settings.max_pixels` sets it in deployment. A clip uses as many frames (up to
        :data:`MAX_FRAMES`) as fit; an instance refused when not even one frame fits.

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
    if not ds.PixelData:  # None or b"": a zero-length element
        raise MissingPixelDataError("Pixel Data (7FE0,0010) is present but empty (zero length)")
    frames, rows, columns, samples = _image_geometry(ds)
    per_frame = rows * columns * samples
    if per_frame > max_pixels:
        raise ImageTooLargeError(
            f"the image claims {rows} x {columns} x {samples} samples per frame ({per_frame:,} to decode), over "
            f"the limit of {max_pixels:,} (setting max_pixels); refused without decoding",
            claimed_pixels=per_frame,
            max_pixels=max_pixels,
        )
    frames_used = _frames_to_use(frames, max_pixels // per_frame)

    stored_photometric = str(ds.PhotometricInterpretation).strip()
    factor = _downsample_factor(rows, columns)
    expected_shape = (rows, columns) if samples == 1 else (rows, columns, samples)
    reduced: list[np.ndarray] = []
    photometric = stored_photometric
    for index in frames_used:
        arr, photometric = _decode_frame(ds, index)
        if arr.shape != expected_shape:
            raise InconsistentAttributesError(
                f"decoded frame {index} has shape {arr.shape} but Rows, Columns and Samples per Pixel declare "
                f"{expected_shape}"
            )
        reduced.append(_reduce(arr, factor, photometric))
        del arr

    middle = frames_used.index(frames // 2) if frames // 2 in frames_used else len(frames_used) // 2
    region = _declared_region(ds, rows, columns)
    box = None  # the region in reduced coordinates
    if region is not None:
        x0, y0, x1, y1 = region
        box = (x0 // factor, y0 // factor, -(-x1 // factor), -(-y1 // factor))
    elif str(ds.get("Modality", "") or "").strip().upper() == "US":
        box = find_imaging_region(_to_unit(reduced[middle], photometric, ds))
        if box is not None:
            x0, y0, x1, y1 = box
            region = (x0 * factor, y0 * factor, min(columns, x1 * factor), min(rows, y1 * factor))

    planes = []
    for arr in reduced:
        if box is not None:
            arr = arr[box[1] : box[3], box[0] : box[2]]
        planes.append(_to_unit(arr, photometric, ds))
    del reduced

    return DecodedImage(
        pixels=planes[middle],
        source_shape=(frames, rows, columns, samples),
        frames_used=frames_used,
        photometric_interpretation=stored_photometric,
        frames=tuple(planes),
        region=region,
        downsampling=factor,
    )
