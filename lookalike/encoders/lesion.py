"""Lesion finder for breast ultrasound: a MONAI segmentation network that outlines the lesion, reduced to one box.

Two networks: ``FlexibleUNet`` over EfficientNet-Lite0 started from its packaged ImageNet weights
(:mod:`lookalike.encoders.lesion_backbone`, tag :data:`FLEX_TAG`), and the earlier small ``UNet`` trained from
nothing (:data:`TAG`), which checkpoints written before keep using. The checkpoint's ``arch`` says which.

It runs on what the ultrasound encoder receives (the decoded frame cropped to its imaging region), inside the
encoder's own embedding path (:meth:`lookalike.encoders.base.Encoder.embed_with_boxes`), so the worker,
``lookalike embed``, ``lookalike evaluate`` and ``lookalike lesions`` (:mod:`lookalike.lab.lesions`) all find the
same box for the same image.

One image:

1. the serving preprocessing (:func:`~lookalike.encoders.preprocessing.build_preprocess`: resize to
   ``image_size`` squared, per-image min-max) and the UNet give a lesion probability per pixel;
2. pixels above ``threshold`` are split into connected components (``scipy.ndimage.label``); the component
   with the largest summed probability is the lesion, if its area is at least ``min_area`` of the image;
3. its box is scaled back to the input image's own pixels; the confidence is the component's mean
   probability. No component: no box (:func:`find` gives None; the encoder then uses the whole image).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from lookalike.encoders.preprocessing import build_preprocess, check_image

TAG = "unet-1"
FLEX_TAG = "flexunet-lite0-1"


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


def default_arch(image_size: int = 96, backbone: str | None = None) -> dict[str, Any]:
    """Configuration stored in the checkpoint; enough to rebuild the network and the box rule.

    ``backbone="efficientnet-lite0"`` gives the pretrained ``FlexibleUNet``; None the small ``UNet``.
    """
    rule = {"threshold": 0.5, "min_area": 0.002}
    if backbone is not None:
        from lookalike.encoders.lesion_backbone import BACKBONE

        if backbone != BACKBONE:
            raise ValueError(f"unknown lesion backbone {backbone!r}; known: {BACKBONE}")
        return {"name": "lesion", "tag": FLEX_TAG, "image_size": image_size, "backbone": backbone,
                "decoder_channels": [64, 32, 24, 16, 8], **rule}
    return {
        "name": "lesion",
        "tag": TAG,
        "image_size": image_size,
        "channels": [16, 32, 64, 128, 128],
        "strides": [2, 2, 2, 2],
        "num_res_units": 1,
        **rule,
    }


def build_net(arch: dict[str, Any], pretrained: bool = False) -> Any:
    """The network ``arch`` describes: (B, 1, S, S) in [0, 1] -> lesion logits (B, 1, S, S).

    ``pretrained`` starts a backbone from its packaged ImageNet weights (training); serving loads a checkpoint's
    own weights over the network and never needs them.
    """
    if arch.get("backbone"):
        from lookalike.encoders.lesion_backbone import build_flexible_unet

        return build_flexible_unet(arch, pretrained)
    from monai.networks.nets import UNet  # here, not above: monai brings torch; base imports this module

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
    import torch  # here, not above: the plugin and the query service import this module (through base)

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
        self.net = net.eval()
        self.arch = dict(arch)
        self.image_size = int(arch["image_size"])
        self.batch_size = batch_size
        self._preprocess = build_preprocess(self.image_size)
        self._lock = threading.Lock()

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Lesion probability maps, float32 (n, S, S), of 2-D images in [0, 1] (any size)."""
        import torch  # here, not above: see prepare_views

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
