"""One preprocessing pipeline for training and serving, so that the encoders see the same pixels in both.

The worker hands ``embed()`` a 2-D float32 grayscale image in [0, 1] of any size; training reads PNG/JPEG
files into the very same form with :func:`lookalike.lab.images.load_image` and then runs the very same
:func:`build_preprocess`. Augmentation (:func:`lookalike.lab.training.build_augment`) is applied only during
training, after preprocessing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
    # here, not above: monai brings torch, and the plugin and the query service import this module (through base)
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
