"""``lookalike embed``: embed the images of a manifest with an encoder and save the vectors as ``.npy``.

Images are read with :func:`lookalike.lab.images.load_image`, which gives the same 2-D float32
grayscale in [0, 1] as the worker hands the encoder after DICOM decoding; training and ``lookalike evaluate``
read them the same way, so vectors written here match those of the index for the same pixels.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.encoders import load_encoder
from lookalike.lab.images import load_image, read_manifest

#: Images read into memory at a time: full-resolution radiographs are large, vectors are not.
CHUNK = 256


class ImageReadError(RuntimeError):
    """An image of the manifest could not be read (named in the message)."""


def embed_paths(
    encoder: Any,
    paths: Sequence[str],
    chunk: int = CHUNK,
) -> np.ndarray:
    """Embed image files in order, ``chunk`` images in memory at a time.

    Parameters
    ----------
    encoder : lookalike.encoders.Encoder
        Loaded encoder.
    paths : sequence of str
        Image files (PNG, JPEG, anything PIL reads), any size and aspect.
    chunk : int
        Images per chunk.

    Returns
    -------
    numpy.ndarray
        float32 (len(paths), encoder.dim), row i for ``paths[i]``, rows L2-normalised.

    Raises
    ------
    ImageReadError
        A file is missing or not an image.
    """
    out = [np.zeros((0, encoder.dim), dtype=np.float32)]
    for start in range(0, len(paths), chunk):
        images = []
        for p in paths[start : start + chunk]:
            try:
                images.append(load_image(p, encoder.name))
            except Exception as exc:  # PIL raises several types; name the file whatever it was
                raise ImageReadError(f"cannot read image {p}: {exc}") from exc
        out.append(encoder.embed(images))
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def set_torch_threads(threads: int | None) -> None:
    """Cap torch's CPU threads when a command line asks (``--threads``); nothing when it does not.

    torch is imported here, where a run starts, so that ``--help`` and importers of these modules stay light.
    """
    if threads:
        import torch

        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    """``lookalike embed --modality us|xr [--model FILE] --data DIR|manifest.csv --out FILE.npy``.

    Exit status 0 on success, 1 when the manifest, the model or an image cannot be read, 2 on bad arguments.
    """
    p = argparse.ArgumentParser(
        prog="lookalike embed",
        description="Embed the images of a manifest (rows in manifest order) and save a float32 (n, dim) .npy.",
    )
    p.add_argument("--modality", choices=["us", "xr"], required=True)
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped encoder)")
    p.add_argument("--data", type=Path, required=True, help="folder with manifest.csv, or a CSV with a path column")
    p.add_argument("--out", type=Path, required=True, help="output .npy")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)

    try:
        rows = read_manifest(a.data)
        set_torch_threads(a.threads)
        enc = load_encoder(a.modality, a.model)
        vectors = embed_paths(enc, [r["path"] for r in rows])
    except (OSError, ValueError, ImageReadError) as exc:
        print(f"lookalike embed: {exc}", file=sys.stderr)
        return 1
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "wb") as fh:  # exactly the path given (np.save would append .npy)
        np.save(fh, vectors)
    print(f"lookalike embed: {len(rows)} images -> {a.out} {vectors.shape} ({enc.model_version})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
