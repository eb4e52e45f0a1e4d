"""Where the image is on an ultrasound screen: the one region finder decoding and training share.

A module of its own below both :mod:`lookalike.dicom` (which crops an instance without a declared region)
and :mod:`lookalike.encoders` (which crops training and evaluation PNGs the same way), so that neither
package imports the other and the encoders see the same pixels in training as in serving.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["find_imaging_region"]

#: Blocks of a frame darker than this (on the [0, 1] scale) count as background when looking for the image.
DARK = 0.02
#: Erosion steps (one block each) that remove text, calipers and rulers before the largest area is chosen.
ERODE = 2
#: Blocks on the long side of the frame at most: the search runs on this coarse grid.
GRID = 128

_SQUARE = np.ones((3, 3), bool)


def find_imaging_region(gray: np.ndarray) -> tuple[int, int, int, int] | None:
    """Find the imaging area of an ultrasound frame without a declared region: (x0, y0, x1, y1) or None.

    The frame is averaged in blocks (at most :data:`GRID` of them on the long side), non-dark blocks are
    eroded twice by a 3 x 3 square (removing structures under five blocks thick: text lines, calipers,
    rulers, thin annotations; outside the frame counts as background), and the bounding box of the largest
    4-connected remainder (the first in raster order on a tie), grown back by the erosion, is the region.
    None when nothing is found or the box is most of the frame anyway (a full-frame image, or noise).

    Parameters
    ----------
    gray : numpy.ndarray
        2-D frame, float in [0, 1], bright meaning signal.

    Returns
    -------
    tuple of int or None
        Half-open box in the frame's pixels.
    """
    h, w = gray.shape
    block = max(2, -(-max(h, w) // GRID))
    bh, bw = h // block, w // block
    if bh < 4 * ERODE or bw < 4 * ERODE:
        return None
    means = gray[: bh * block, : bw * block].reshape(bh, block, bw, block).mean(axis=(1, 3))
    mask = ndimage.binary_erosion(means > DARK, structure=_SQUARE, iterations=ERODE)
    labels, count = ndimage.label(mask)  # 4-connected, numbered in raster order of first pixel
    if count == 0:
        return None
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    rows, cols = ndimage.find_objects(labels, max_label=largest)[largest - 1]
    x0 = max(0, (cols.start - ERODE) * block)
    y0 = max(0, (rows.start - ERODE) * block)
    x1 = min(w, (cols.stop + ERODE) * block)
    y1 = min(h, (rows.stop + ERODE) * block)
    if (x1 - x0) * (y1 - y0) >= 0.9 * h * w:
        return None
    return x0, y0, x1, y1
