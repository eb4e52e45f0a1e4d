"""Decoding throughput (instances/s) of ``lookalike.dicom`` against pydicom's plain ``pixel_array``.

Both sides start from the file's bytes in memory and end with pixels in memory: Lookalike with
``read_dataset`` + ``decode_image`` (what the worker runs: completeness checks, up to 5 frames of a clip,
region crop, block-mean reduction of large X-rays, float32 in [0, 1]); pydicom with ``dcmread`` +
``pixel_array`` (every frame, stored values, no VOI or crop). The ratio is Lookalike over pydicom: above 1,
Lookalike is faster. Peak memory traced during one decode is printed for both as well.

The files are real ones from pydicom-data and deid-data (no 16-bit DX or J2K radiograph larger than these
ships with them):

* ``color3d_jpeg_baseline.dcm``: US, 120 frames 480 x 640 YBR_FULL_422, JPEG baseline;
* ``RG1_J2KR.dcm``: CR, 1955 x 1841, 16 bits allocated (15 stored), JPEG 2000 lossless;
* ``deid-data cat.dcm``: DX, 2614 x 3072, 16-bit, uncompressed (reduced by 3 on its integers by Lookalike).

    .venv/bin/python bench/decode_throughput.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import io
import os
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Callable

import pydicom
from pydicom.data import get_testdata_file

from lookalike.dicom import decode_image, read_dataset


def _deid(name: str) -> str | None:
    try:
        import deid_data
    except ImportError:
        return None
    found = sorted(Path(os.path.dirname(deid_data.__file__)).rglob(name))
    return str(found[0]) if found else None


FILES: dict[str, Callable[[], str | None]] = {
    "US JPEG baseline, 120 frames": lambda: get_testdata_file("color3d_jpeg_baseline.dcm"),
    "CR 16-bit JPEG 2000 lossless": lambda: get_testdata_file("RG1_J2KR.dcm"),
    "DX 16-bit uncompressed 2614x3072": lambda: _deid("cat.dcm"),
}


def lookalike_decode(data: bytes) -> object:
    return decode_image(read_dataset(data))


def pydicom_decode(data: bytes) -> object:
    return pydicom.dcmread(io.BytesIO(data)).pixel_array


def rate(fn: Callable[[bytes], object], data: bytes, seconds: float) -> float:
    """Instances per second over at least `seconds` (and at least 3 runs), after one warm-up run."""
    fn(data)
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        fn(data)
        runs += 1
    return runs / (time.perf_counter() - start)


def peak_mb(fn: Callable[[bytes], object], data: bytes) -> float:
    tracemalloc.start()
    try:
        fn(data)
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per file and decoder")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    print(f"{'file':34s} {'lookalike/s':>11s} {'pydicom/s':>10s} {'ratio':>6s} {'peak MB L/P':>12s}  lookalike output")
    for label, locate in FILES.items():
        path = locate()
        if path is None:
            print(f"{label:34s} (file not available: install pydicom-data and deid-data)")
            continue
        data = Path(path).read_bytes()
        ours, theirs = rate(lookalike_decode, data, args.seconds), rate(pydicom_decode, data, args.seconds)
        image = lookalike_decode(data)
        peaks = f"{peak_mb(lookalike_decode, data):.0f}/{peak_mb(pydicom_decode, data):.0f}"
        out = f"{len(image.frames)} x {image.pixels.shape[0]}x{image.pixels.shape[1]}, reduced {image.downsampling}x"
        print(f"{label:34s} {ours:11.1f} {theirs:10.1f} {ours / theirs:6.2f} {peaks:>12s}  {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
