"""One preprocessing pipeline for training and serving, so that the encoders see the same pixels in both.

The worker hands ``embed()`` a 2-D float32 grayscale image in [0, 1] of any size; training reads PNG/JPEG
files into the very same form with :func:`load_image` and then runs the very same :func:`build_preprocess`.
Augmentation (:func:`build_augment`) is applied only during training, after preprocessing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lookalike.imaging_region import find_imaging_region

#: Square input side per encoder, chosen for CPU cost (see ``shared/notes/ml.md`` beside the checkout).
IMAGE_SIZE: dict[str, int] = {"us": 64, "xr": 96}


def load_image(path: str | Path, modality: str | None = None) -> np.ndarray:
    """Read a PNG/JPEG as 2-D float32 grayscale in [0, 1], as the worker produces after DICOM decoding.

    Parameters
    ----------
    path : str or Path
        Image file readable by PIL.
    modality : {"us", "xr"}, optional
        For ``"us"`` the image is cropped to its imaging region exactly as ``decode_image`` crops an ultrasound
        instance without a declared region (:func:`lookalike.imaging_region.find_imaging_region`: burned-in
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
    from PIL import Image

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
    import csv

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


def check_image(image: Any) -> np.ndarray:
    """Validate one input image and return it as finite 2-D float32 clipped to [0, 1].

    Raises
    ------
    ValueError
        If the array is not 2-D (a trailing singleton channel is accepted) or is empty.
    """
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"expected a non-empty 2-D grayscale image, got shape {arr.shape}")
    return np.clip(np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def build_preprocess(size: int) -> Any:
    """MONAI pipeline: (H, W) in [0, 1] -> (1, size, size) torch float32, per-image min-max scaled.

    The image is squashed to a square (area interpolation, deterministic) and rescaled to [0, 1] per image,
    which removes gain differences between scanners.

    Parameters
    ----------
    size : int
        Output side in pixels.

    Returns
    -------
    monai.transforms.Compose
        Callable taking a 2-D numpy array.
    """
    from monai.transforms import Compose, EnsureChannelFirst, EnsureType, Resize, ScaleIntensity

    return Compose(
        [
            EnsureChannelFirst(channel_dim="no_channel"),
            EnsureType(data_type="tensor", dtype=np.float32, track_meta=False),
            Resize((size, size), mode="area"),
            ScaleIntensity(minv=0.0, maxv=1.0),
            EnsureType(data_type="tensor", track_meta=False),
        ]
    )


def build_augment(size: int, flip: bool = True, field_of_view: bool = False, scanner: bool = False) -> Any:
    """Training-only MONAI augmentation applied to a preprocessed (1, size, size) tensor.

    Flips, a small affine (rotation, scale, shift), gamma contrast and mild noise; output clipped to [0, 1].

    Parameters
    ----------
    size : int
        Side of the preprocessed image, to scale the shift range.
    flip : bool
        Whether to include horizontal flips.
    field_of_view : bool
        Scanner-to-scanner variation instead of the small affine: zoom independently per axis (0.8x to 1.5x
        of the sampling grid, mostly zooming out: other scanners frame a lesion smaller or larger, and
        squashing images of other aspect ratios to a square stretches them), blur (other probes and
        resolutions) and a random monotone intensity curve (other gain and dynamic-range settings). BUSI's
        images are framed tightly on the lesion; breast ultrasound from elsewhere is not.
    scanner : bool
        Add :func:`lookalike.encoders.augment.scanner_intensity_steps` (gain, depth-dependent gain, lateral gain field, speckle, blur,
        gamma) in place of the plain gamma and noise; works on multi-channel views too (one draw for all).
    """
    from monai.transforms import (
        Compose,
        EnsureType,
        RandAdjustContrast,
        RandAffine,
        RandFlip,
        RandGaussianNoise,
        RandGaussianSmooth,
        RandHistogramShift,
        ScaleIntensityRange,
    )

    steps: list[Any] = []
    if flip:
        steps.append(RandFlip(prob=0.5, spatial_axis=1))
    if field_of_view:
        steps += [
            RandAffine(
                prob=0.9,
                rotate_range=(0.26,),
                scale_range=((-0.2, 0.5), (-0.2, 0.5)),
                translate_range=(0.1 * size, 0.1 * size),
                padding_mode="zeros",
            ),
            RandGaussianSmooth(prob=0.3, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
            RandHistogramShift(prob=0.3, num_control_points=(5, 10)),
        ]
    else:
        steps.append(
            RandAffine(
                prob=0.8,
                rotate_range=(0.26,),
                scale_range=(0.15, 0.15),
                translate_range=(0.08 * size, 0.08 * size),
                padding_mode="zeros",
            )
        )
    from lookalike.encoders.augment import scanner_intensity_steps

    steps += (
        scanner_intensity_steps() if scanner
        else [RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5)), RandGaussianNoise(prob=0.3, std=0.03)]
    )
    steps += [
        ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        EnsureType(data_type="tensor", track_meta=False),
    ]
    return Compose(steps)
