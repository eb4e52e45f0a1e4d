"""``lookalike lesions`` and the lesion finder's figures: boxes of a manifest's images, Dice and box IoU.

``lookalike lesions --data manifest.csv --out boxes.csv [--model FILE] [--score]`` writes one row per image in
manifest order (``path,x0,y0,x1,y1,confidence``; box in the file's pixels, x1/y1 exclusive, empty when none);
``--score`` also prints Dice and box IoU against the manifest's ``mask`` column. The finder itself, as the worker
runs it, is :mod:`lookalike.encoders.lesion`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lookalike.encoders.base import WEIGHTS_DIR
from lookalike.encoders.lesion import LesionFinder, finder_from_checkpoint
from lookalike.lab.embed import set_torch_threads
from lookalike.lab.images import load_image_with_region, read_manifest


def load_finder(path: str | Path | None = None) -> LesionFinder:
    """The shipped finder (inside the shipped ``us.pt``), or the one in ``path``."""
    import torch  # torch only where a finder loads: lesions --help and importers of dice/load_mask stay light

    path = Path(path) if path is not None else WEIGHTS_DIR / "us.pt"
    return finder_from_checkpoint(torch.load(path, map_location="cpu", weights_only=True))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    s = int(pred.sum()) + int(truth.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / s


def box_of(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1), exclusive ends, of a boolean mask; None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def box_iou(a: tuple[int, int, int, int] | None, b: tuple[int, int, int, int] | None) -> float:
    """Intersection over union of two boxes (0.0 when one is missing)."""
    if a is None or b is None:
        return 0.0
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def load_mask(path: str | Path, region: tuple[int, int, int, int] | None) -> np.ndarray:
    """A lesion mask PNG (255 = lesion) as booleans, cropped to the image's imaging region like its image."""
    with Image.open(path) as im:
        m = np.asarray(im.convert("L")) > 127
    if region is not None:
        x0, y0, x1, y1 = region
        m = m[y0:y1, x0:x1]
    return m


def score(finder: LesionFinder, rows: Sequence[dict[str, str]], chunk: int = 128) -> dict[str, Any]:
    """Dice and box IoU of the finder against the rows' masks, on the images as the worker crops them.

    Rows with a ``mask`` give Dice (of the chosen component, at the image's size) and IoU of its box with the
    mask's box (0 when nothing is found); rows without one (normal images) give the share with no box found.
    """
    dices, ious, found, normal_clear = [], [], [], []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        loaded = [load_image_with_region(r["path"], "us") for r in part]
        images = [im for im, _ in loaded]
        for r, (im, region), pred in zip(part, loaded, finder.masks(images)):
            if r.get("mask"):
                truth = load_mask(r["mask"], region)
                dices.append(dice(pred, truth))
                ious.append(box_iou(box_of(pred), box_of(truth)))
                found.append(bool(pred.any()))
            else:
                normal_clear.append(not pred.any())
    return {
        "n_masks": len(dices),
        "dice": float(np.mean(dices)) if dices else float("nan"),
        "dice_median": float(np.median(dices)) if dices else float("nan"),
        "box_iou": float(np.mean(ious)) if ious else float("nan"),
        "box_iou>=0.5": float(np.mean(np.asarray(ious) >= 0.5)) if ious else float("nan"),
        "found": float(np.mean(found)) if found else float("nan"),
        "n_without_mask": len(normal_clear),
        "none_found_without_mask": float(np.mean(normal_clear)) if normal_clear else float("nan"),
    }


def write_boxes(finder: LesionFinder, paths: Sequence[str], out: Path, chunk: int = 128) -> int:
    """Write ``path,x0,y0,x1,y1,confidence`` per image in order (box in the file's pixels); return rows written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "x0", "y0", "x1", "y1", "confidence"])
        for start in range(0, len(paths), chunk):
            part = paths[start : start + chunk]
            loaded = [load_image_with_region(p, "us") for p in part]
            for p, (_, region), box in zip(part, loaded, finder.find([im for im, _ in loaded])):
                if box is None:
                    w.writerow([p, "", "", "", "", ""])
                    continue
                if region is not None:
                    box = box.shifted(region[0], region[1])
                w.writerow([p, box.x0, box.y0, box.x1, box.y1, f"{box.confidence:.4f}"])
    tmp.replace(out)
    return len(paths)


def main(argv: list[str] | None = None) -> int:
    """``lookalike lesions --data DIR|manifest.csv --out boxes.csv [--model FILE] [--score]``.

    Exit status 0 on success, 1 when the manifest, the model or an image cannot be read, 2 on bad arguments.
    """
    p = argparse.ArgumentParser(
        prog="lookalike lesions",
        description="Lesion box per ultrasound image of a manifest (rows in manifest order), as the worker finds it.",
    )
    p.add_argument("--data", type=Path, required=True, help="folder with manifest.csv, or a CSV with a path column")
    p.add_argument("--out", type=Path, required=True, help="output CSV: path,x0,y0,x1,y1,confidence")
    p.add_argument("--model", type=Path, default=None, help="us or lesion checkpoint (default: the shipped us.pt)")
    p.add_argument("--score", action="store_true", help="also print Dice and box IoU against the mask column")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    try:
        set_torch_threads(a.threads)
        rows = read_manifest(a.data)
        finder = load_finder(a.model)
        n = write_boxes(finder, [r["path"] for r in rows], a.out)
        if a.score:
            if not any(r.get("mask") for r in rows):
                raise ValueError("--score needs a mask column with at least one mask")
            print(json.dumps(score(finder, rows), indent=1))
    except (OSError, ValueError) as exc:
        print(f"lookalike lesions: {exc}", file=sys.stderr)
        return 1
    print(f"lookalike lesions: {n} images -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
