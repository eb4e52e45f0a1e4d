"""``lookalike check FILE|DIR...``: what the worker would make of each DICOM file, one line per file.

This is the administrator's answer to "why is this study not found": it reads, routes and decodes every file
with the very functions the worker's indexing step calls (:func:`~lookalike.dicom.decode.read_dataset`,
:func:`~lookalike.dicom.routing.encoder_for`, :func:`~lookalike.dicom.decode.decode_image`), so a file
it reports as ``OK`` is one the worker embeds, and a ``FAILED`` line carries the same error code and message
that ``/lookalike/status`` would list. Nothing is sent anywhere and torch is never loaded.

In a directory, files that are not DICOM Part 10 at all (no ``DICM`` prefix after the 128-byte preamble:
notes, CSV, thumbnails) are listed as ``IGNORED``: Orthanc refuses them, so they can never be why a study is not
found. A file named on the command line is always checked, and fails like any other if it is not DICOM.

Exit status: 0 when every file is ``OK``, ``SKIPPED`` (not for Lookalike, which is no fault) or ``IGNORED``,
1 when any file ``FAILED``, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from lookalike.dicom.decode import DEFAULT_MAX_PIXELS, DecodedImage
from lookalike.dicom.errors import LookalikeDicomError, NotIndexableError
from lookalike.dicom.instance import prepare_instance

__all__ = ["CheckResult", "check_file", "iter_files", "is_part10", "format_result", "main"]


@dataclass(frozen=True)
class CheckResult:
    """What became of one file: ``status`` is ``OK``, ``SKIPPED``, ``FAILED`` or ``IGNORED``."""

    path: str
    status: str
    code: str = ""
    message: str = ""
    encoder: str = ""
    image: DecodedImage | None = None

    @property
    def failed(self) -> bool:
        return self.status == "FAILED"


def check_file(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> CheckResult:
    """Read, route and decode one file in the worker's order, and say what happened.

    Parameters
    ----------
    path
        The DICOM Part 10 file.
    max_pixels
        The worker's size limit (:attr:`lookalike.config.Settings.max_pixels`).

    Returns
    -------
    CheckResult
        ``FAILED`` with the error's ``code`` for a named :class:`LookalikeDicomError` (as the worker records
        it), ``internal-error`` for any other exception (a bug in Lookalike that the worker would not survive
        gracefully: worth reporting), ``unreadable`` when the file cannot be opened at all.
    """
    name = os.fspath(path)
    try:
        prepared = prepare_instance(name, max_pixels)
    except NotIndexableError as exc:
        return CheckResult(name, "SKIPPED", exc.code, exc.reason)
    except LookalikeDicomError as exc:
        return CheckResult(name, "FAILED", exc.code, str(exc))
    except OSError as exc:
        return CheckResult(name, "FAILED", "unreadable", f"{type(exc).__name__}: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - the tool must report every file, and a bug by its type
        return CheckResult(name, "FAILED", "internal-error", f"{type(exc).__name__}: {exc}")
    return CheckResult(name, "OK", encoder=prepared.encoder, image=prepared.image)


def iter_files(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[str, bool]]:
    """Yield ``(file, named)``: the given files (``named``), and every file under the given directories.

    Directories are walked recursively, in sorted order. A path that does not exist is yielded as is, so
    that :func:`check_file` reports it instead of the command silently checking nothing.
    """
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for file in sorted(files):
                    yield os.path.join(root, file), False
        else:
            yield str(path), True


def is_part10(path: str | os.PathLike) -> bool:
    """Whether the file has the ``DICM`` prefix after a 128-byte preamble (the DICOM Part 10 signature)."""
    try:
        with open(path, "rb") as fp:
            fp.seek(128)
            return fp.read(4) == b"DICM"
    except OSError:
        return True  # let check_file report why it cannot be read


def format_result(result: CheckResult) -> str:
    """One line: the file, then what the encoder gets (or why nothing), in a fixed ``key=value`` form.

    ``shape`` is that of each frame given to the encoder (after the crop to ``region``, given in stored pixel
    coordinates ``x0,y0,x1,y1``, and the block-mean ``downsampling``); ``frames`` are the 0-based frames used.
    """
    if result.status != "OK":
        message = " ".join(result.message.split())  # one line per file, whatever the exception's text
        return f"{result.path}: {result.status} {result.code}: {message}"
    image = result.image
    assert image is not None
    frames_total = image.source_shape[0]
    frames = ",".join(str(i) for i in image.frames_used)
    region_text = "none" if image.region is None else ",".join(str(v) for v in image.region)
    height, width = image.pixels.shape
    return (
        f"{result.path}: OK encoder={result.encoder} shape={height}x{width} "
        f"frames={frames} of {frames_total} region={region_text} downsampling={image.downsampling} "
        f"photometric={image.photometric_interpretation}"
    )


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of ``lookalike check``; returns the exit status (1 when any file failed)."""
    parser = argparse.ArgumentParser(
        prog="lookalike check",
        description="Decode DICOM files exactly as the Lookalike worker would and print, for each, the encoder "
        "it goes to and the image it gets (shape, frames used, region cropped), why it is skipped, or the "
        "error that stops it (its code as /lookalike/status lists it). Exit status 1 if any file failed.",
    )
    parser.add_argument("paths", nargs="+", metavar="FILE|DIR", help="files, or directories walked recursively")
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
        help=f"the worker's size limit, setting max_pixels (default {DEFAULT_MAX_PIXELS:,})",
    )
    args = parser.parse_args(argv)
    out = sys.stdout if out is None else out
    counts = {"OK": 0, "SKIPPED": 0, "FAILED": 0, "IGNORED": 0}
    try:
        for file, named in iter_files(args.paths):
            if named or is_part10(file):
                result = check_file(file, max_pixels=args.max_pixels)
            else:
                result = CheckResult(file, "IGNORED", "not-dicom", "no DICM prefix: not a DICOM Part 10 file")
            counts[result.status] += 1
            print(format_result(result), file=out, flush=True)
        total = sum(counts.values())
        summary = f"{total} file(s): {counts['OK']} ok, {counts['SKIPPED']} skipped, {counts['FAILED']} failed"
        if counts["IGNORED"]:
            summary += f", {counts['IGNORED']} ignored (not DICOM)"
        print(summary, file=out)
    except BrokenPipeError:  # `lookalike check DIR | head`: stop quietly, as other commands do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 1 if counts["FAILED"] else 0


if __name__ == "__main__":
    sys.exit(main())
