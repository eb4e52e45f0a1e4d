"""Chest X-ray encoder: a small MONAI ViT (patch 16) with mean-pooled tokens and a projection head.

With ``arch["tta_flip"]`` the network, in eval mode, averages the L2-normalised embeddings of the image and its
left-right mirror (test-time flip averaging): the checkpoint carries the choice, so serving, ``lookalike embed``
and ``lookalike evaluate`` apply it without any change to :class:`lookalike.encoders.base.Encoder`.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import ViT
from torch import nn
from torch.nn import functional as F

TAG = "vit-1"


def default_arch(dim: int = 128, image_size: int = 128, tta_flip: bool = False) -> dict[str, Any]:
    """Configuration stored in the checkpoint; enough to rebuild :class:`XrayNet`."""
    return {
        "name": "xr",
        "tag": TAG,
        "image_size": image_size,
        "dim": dim,
        "patch_size": 16,
        "hidden_size": 192,
        "mlp_dim": 768,
        "num_layers": 4,
        "num_heads": 3,
        "head_hidden": 256,
        "tta_flip": tta_flip,
    }


class XrayNet(nn.Module):
    """ViT trunk (classification=False), token mean-pool, MLP head to ``dim``; optional flip averaging."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.arch = dict(arch)
        self.vit = ViT(
            in_channels=1,
            img_size=(arch["image_size"], arch["image_size"]),
            patch_size=(arch["patch_size"], arch["patch_size"]),
            hidden_size=arch["hidden_size"],
            mlp_dim=arch["mlp_dim"],
            num_layers=arch["num_layers"],
            num_heads=arch["num_heads"],
            classification=False,
            spatial_dims=2,
        )
        self.head = nn.Sequential(
            nn.Linear(arch["hidden_size"], arch["head_hidden"]),
            nn.GELU(),
            nn.Linear(arch["head_hidden"], arch["dim"]),
        )

    def embed_once(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> (B, dim) unnormalised embedding of exactly these pixels."""
        tokens, _ = self.vit(x)
        return self.head(tokens.mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> (B, dim) embedding, to be L2-normalised by the caller.

        Training always sees single images (flips are part of its augmentation); in eval mode with
        ``arch["tta_flip"]`` the result is the mean of the unit embeddings of ``x`` and of ``x`` mirrored.
        """
        if self.training or not self.arch.get("tta_flip"):
            return self.embed_once(x)
        both = F.normalize(self.embed_once(torch.cat([x, x.flip(-1)])), dim=1)
        return (both[: len(x)] + both[len(x) :]) / 2
