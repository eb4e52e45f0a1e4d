"""The worker's three steps on one instance, in one place: read, route to an encoder, decode.

The worker and ``lookalike check`` both call :func:`prepare_instance`, so the administrator's check gives
exactly the worker's answer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pydicom

from lookalike.dicom.decode import DEFAULT_MAX_PIXELS, DecodedImage, decode_image, read_dataset
from lookalike.dicom.routing import encoder_for


@dataclass(frozen=True)
class PreparedInstance:
    """An instance ready for its encoder."""

    dataset: pydicom.Dataset
    #: "us" or "xr".
    encoder: str
    image: DecodedImage


def prepare_instance(
    data: bytes | bytearray | memoryview | str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS
) -> PreparedInstance:
    """Read, route and decode one DICOM instance (bytes or a path).

    Raises
    ------
    LookalikeDicomError
        A named subclass: ``NotIndexableError`` for an instance Lookalike skips on purpose, the others for
        input it cannot use.
    """
    ds = read_dataset(data)
    encoder = encoder_for(ds)
    return PreparedInstance(ds, encoder, decode_image(ds, max_pixels=max_pixels))
