"""Image files of a data set read as the worker reads decoded DICOM pixels, and the manifest that lists them.

Training, ``lookalike evaluate``, ``embed``, ``lesions`` and ``calibrate`` read PNG/JPEG files with
:func:`load_image`: 2-D float32 grayscale in [0, 1], ultrasound cropped to its imaging region by the function
the decoder uses (:func:`lookalike.dicom.imaging_region.find_imaging_region`), so that training, evaluation and
serving see the same input.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike.dicom.imaging_region import find_imaging_region


def load_image(path: str | Path, modality: str | None = None) -> np.ndarray:
    """Read a PNG/JPEG as 2-D float32 grayscale in [0, 1], as the worker produces after DICOM decoding.

    Parameters
    ----------
    path : str or Path
        Image file readable by PIL.
    modality : {"us", "xr"}, optional
        For ``"us"`` the image is cropped to its imaging region exactly as ``decode_image`` crops an ultrasound
        instance without a declared region (:func:`lookalike.dicom.imaging_region.find_imaging_region`: burned-in
        text and rulers outside the scan area are cut off).

    Returns
    -------
    numpy.ndarray
        float32 array of shape (H, W) with values in [0, 1].
    """
    return load_image_with_region(path, modality)[0]


def load_image_with_region(
    path: str | Path, modality: str | None = None
) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """:func:`load_image` and the imaging region it cut out, (x0, y0, x1, y1) in the file's pixels or None.

    The region is what turns a lesion box found on the cropped image back into the file's own pixels
    (``lookalike lesions``) and crops a mask the same way as its image (lesion finder training).
    """
    with Image.open(path) as im:
        if im.mode in ("I", "I;16", "I;16B", "F"):
            arr = np.asarray(im, dtype=np.float32)
            top = float(arr.max())
            gray = (arr / top if top > 0 else arr).astype(np.float32)
        else:
            gray = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    box = find_imaging_region(gray) if modality == "us" else None
    if box is not None:
        x0, y0, x1, y1 = box
        gray = gray[y0:y1, x0:x1]
    return gray, box


def read_manifest(data: str | Path) -> list[dict[str, str]]:
    """Rows of a data set's ``manifest.csv``, in file order, with ``path`` made absolute.

    One reader for training, ``lookalike evaluate`` and ``lookalike embed``, so that every command sees the
    same rows in the same order.

    Parameters
    ----------
    data : str or Path
        A folder holding ``manifest.csv``, or a CSV file; ``path`` entries are relative to the CSV's folder
        (absolute ones are kept), and so are non-empty ``mask`` entries. Only the ``path`` column is required.

    Raises
    ------
    FileNotFoundError
        No manifest there.
    ValueError
        The CSV has no ``path`` column.
    """
    data = Path(data)
    csv_path = data / "manifest.csv" if data.is_dir() else data
    if not csv_path.is_file():
        raise FileNotFoundError(f"no manifest at {csv_path}")
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if "path" not in (reader.fieldnames or []):
            raise ValueError(f"{csv_path}: no 'path' column (columns: {reader.fieldnames})")
        rows = list(reader)
    for r in rows:
        r["path"] = str(csv_path.parent / r["path"])
        if r.get("mask"):
            r["mask"] = str(csv_path.parent / r["mask"])
    return rows
