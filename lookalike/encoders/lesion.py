"""Lesion finder for breast ultrasound: a small MONAI UNet that segments the lesion, reduced to one box.

It runs on what the ultrasound encoder receives (the decoded frame cropped to its imaging region), inside the
encoder's own embedding path (:meth:`lookalike.encoders.base.Encoder.embed_with_boxes`), so the worker,
``lookalike embed``, ``lookalike evaluate`` and ``lookalike lesions`` all find the same box for the same image.

One image:

1. the serving preprocessing (:func:`~lookalike.encoders.preprocessing.build_preprocess`: resize to
   ``image_size`` squared, per-image min-max) and the UNet give a lesion probability per pixel;
2. pixels above ``threshold`` are split into connected components (``scipy.ndimage.label``); the component
   with the largest summed probability is the lesion, if its area is at least ``min_area`` of the image;
3. its box is scaled back to the input image's own pixels; the confidence is the component's mean
   probability. No component: no box (:func:`find` gives None; the encoder then uses the whole image).

``lookalike lesions --data manifest.csv --out boxes.csv [--model FILE] [--score]`` writes one row per image in
manifest order (``path,x0,y0,x1,y1,confidence``; box in the file's pixels, x1/y1 exclusive, empty when none);
``--score`` also prints Dice and box IoU against the manifest's ``mask`` column.
"""

from __future__ import annotations

import argparse
import csv
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TAG = "unet-1"


@dataclass(frozen=True)
class LesionBox:
    """A lesion's box in an image's own pixels (``x1``, ``y1`` exclusive) and the finder's confidence in [0, 1]."""

    x0: int
    y0: int
    x1: int
    y1: int
    confidence: float

    def shifted(self, dx: int, dy: int) -> "LesionBox":
        """The same box in the pixels of an image this one was cropped from at (dx, dy)."""
        return LesionBox(self.x0 + dx, self.y0 + dy, self.x1 + dx, self.y1 + dy, self.confidence)


def default_arch(image_size: int = 96) -> dict[str, Any]:
    """Configuration stored in the checkpoint; enough to rebuild the network and the box rule."""
    return {
        "name": "lesion",
        "tag": TAG,
        "image_size": image_size,
        "channels": [16, 32, 64, 128, 128],
        "strides": [2, 2, 2, 2],
        "num_res_units": 1,
        "threshold": 0.5,
        "min_area": 0.002,
    }


def build_net(arch: dict[str, Any]) -> Any:
    """MONAI ``UNet`` (2-D, one input channel, one logit channel) described by ``arch``."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=tuple(arch["channels"]),
        strides=tuple(arch["strides"]),
        num_res_units=arch["num_res_units"],
    )


def component_box(prob: np.ndarray, threshold: float, min_area: float) -> tuple[tuple[int, int, int, int], float, np.ndarray] | None:
    """The lesion in a probability map: ((x0, y0, x1, y1) in map pixels, mean probability, its mask) or None.

    The component above ``threshold`` with the largest summed probability wins: one confident lesion beats
    several faint specks. Components under ``min_area`` (a fraction of the map) do not count.
    """
    from scipy import ndimage

    labels, n = ndimage.label(prob > threshold)
    if n == 0:
        return None
    mass = ndimage.sum_labels(prob, labels, index=np.arange(1, n + 1))
    best = int(np.argmax(mass)) + 1
    mask = labels == best
    if mask.sum() < min_area * prob.size:
        return None
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), float(prob[mask].mean()), mask


def scale_box(box: tuple[int, int, int, int], size: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box on the ``size`` x ``size`` map -> the same region in an image of ``shape`` (H, W), outward-rounded."""
    h, w = shape
    x0, y0, x1, y1 = box
    return (
        int(np.floor(x0 * w / size)),
        int(np.floor(y0 * h / size)),
        min(w, int(np.ceil(x1 * w / size))),
        min(h, int(np.ceil(y1 * h / size))),
    )


def crop_with_margin(image: np.ndarray, box: LesionBox | None, margin: float) -> np.ndarray:
    """The lesion with context: the box grown by ``margin`` times its size on each side, clipped to the image.

    ``None`` (nothing found) gives the whole image, as the worker must embed a normal image too.
    """
    if box is None:
        return image
    h, w = image.shape
    bw, bh = box.x1 - box.x0, box.y1 - box.y0
    x0 = max(0, int(round(box.x0 - margin * bw)))
    y0 = max(0, int(round(box.y0 - margin * bh)))
    x1 = min(w, int(round(box.x1 + margin * bw)))
    y1 = min(h, int(round(box.y1 + margin * bh)))
    return image[y0:y1, x0:x1]


#: Views an ultrasound encoder may take, in channel order: the whole image and the lesion with its context.
VIEWS: tuple[str, ...] = ("whole", "lesion")


def prepare_views(
    images: Sequence[np.ndarray],
    preprocess: Any,
    views: Sequence[str] = ("whole",),
    finder: "LesionFinder | None" = None,
    margin: float = 0.5,
) -> tuple[Any, list[LesionBox | None]]:
    """The encoder's input: one channel per view of each image, and the lesion boxes found.

    The one place where the ultrasound encoder's input is made, for serving (:class:`~lookalike.encoders.base.Encoder`)
    and training alike. ``"whole"`` is the image; ``"lesion"`` is :func:`crop_with_margin` around the box
    the finder found (the whole image when it found none). Each view goes through ``preprocess`` on its own
    (resize to a square, per-image min-max).

    Returns
    -------
    tuple
        (n, len(views), S, S) float32 tensor, and per image its :class:`LesionBox` or None (all None
        without a finder).
    """
    import torch

    from lookalike.encoders.preprocessing import check_image

    unknown = set(views) - set(VIEWS)
    if unknown or not views:
        raise ValueError(f"views must be a non-empty subset of {VIEWS}, got {tuple(views)}")
    if "lesion" in views and finder is None:
        raise ValueError("the lesion view needs a lesion finder")
    images = [check_image(im) for im in images]
    boxes: list[LesionBox | None] = finder.find(images) if finder is not None else [None] * len(images)
    chans = []
    for im, box in zip(images, boxes):
        made = {"whole": lambda: preprocess(im), "lesion": lambda: preprocess(crop_with_margin(im, box, margin))}
        chans.append(torch.cat([made[v]() for v in views]))
    return torch.stack(chans), boxes


class LesionFinder:
    """A trained lesion finder: grayscale ultrasound images of any size -> one :class:`LesionBox` or None each.

    Parameters
    ----------
    net : torch.nn.Module
        UNet mapping (B, 1, S, S) in [0, 1] to lesion logits (B, 1, S, S).
    arch : dict
        :func:`default_arch`'s keys: ``image_size`` S, ``threshold``, ``min_area``.
    batch_size : int
        Images per forward pass.
    """

    def __init__(self, net: Any, arch: dict[str, Any], batch_size: int = 64) -> None:
        from lookalike.encoders.preprocessing import build_preprocess

        self.net = net.eval()
        self.arch = dict(arch)
        self.image_size = int(arch["image_size"])
        self.batch_size = batch_size
        self._preprocess = build_preprocess(self.image_size)
        self._lock = threading.Lock()

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Lesion probability maps, float32 (n, S, S), of 2-D images in [0, 1] (any size)."""
        import torch

        from lookalike.encoders.preprocessing import check_image

        out = [np.zeros((0, self.image_size, self.image_size), np.float32)]
        with self._lock, torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                x = torch.stack([self._preprocess(check_image(im)) for im in images[i : i + self.batch_size]])
                out.append(torch.sigmoid(self.net(x).float())[:, 0].numpy())
        return np.concatenate(out)

    def find(self, images: Sequence[np.ndarray]) -> list[LesionBox | None]:
        """One box per image in the image's own pixels, or None where no lesion is found."""
        return [self._box(p, np.shape(im)) for p, im in zip(self.probabilities(images), images)]

    def _box(self, prob: np.ndarray, shape: tuple[int, ...]) -> LesionBox | None:
        found = component_box(prob, self.arch["threshold"], self.arch["min_area"])
        if found is None:
            return None
        box, conf, _ = found
        return LesionBox(*scale_box(box, self.image_size, shape[:2]), confidence=round(conf, 4))

    def masks(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The chosen component as a boolean mask at each image's own size (empty when none): for scoring."""
        from PIL import Image

        out = []
        for prob, im in zip(self.probabilities(images), images):
            h, w = np.shape(im)[:2]
            found = component_box(prob, self.arch["threshold"], self.arch["min_area"])
            if found is None:
                out.append(np.zeros((h, w), bool))
                continue
            keep = np.where(found[2], prob, 0.0).astype(np.float32)
            up = np.asarray(Image.fromarray(keep).resize((w, h), Image.BILINEAR))
            out.append(up > self.arch["threshold"])
        return out


def finder_from_checkpoint(ckpt: dict[str, Any]) -> LesionFinder:
    """The finder a checkpoint holds: a lesion checkpoint itself, or the ``lesion`` entry of an ultrasound one."""
    part = ckpt if ckpt.get("arch", {}).get("name") == "lesion" else ckpt.get("lesion")
    if part is None:
        raise ValueError("checkpoint holds no lesion finder")
    net = build_net(part["arch"])
    net.load_state_dict(part["state_dict"])
    return LesionFinder(net, part["arch"])


def load_finder(path: str | Path | None = None) -> LesionFinder:
    """The shipped finder (inside the shipped ``us.pt``), or the one in ``path``."""
    import torch

    from lookalike.encoders.base import WEIGHTS_DIR

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
    from PIL import Image

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
    from lookalike.encoders.preprocessing import load_image_with_region

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
    from lookalike.encoders.preprocessing import load_image_with_region

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
    import json

    from lookalike.encoders.preprocessing import read_manifest

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
        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
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
