"""Ultrasound encoder: MONAI AutoencoderKL latent, refined by a few DDIM steps of a latent DiffusionModelUNet.

Forward pass for one (1, 64, 64) image:

1. The VAE encoder gives a 64-channel 16x16 feature map ``h`` and the latent mean ``z`` (4x16x16), scaled
   to unit variance by ``latent_scale``.
2. Refinement: ``z`` is noised to timestep ``t_start`` of a 1000-step linear schedule with a FIXED noise
   tensor (a buffer drawn once from ``noise_seed``, so embedding is deterministic), then denoised with
   ``refine_steps`` DDIM steps (eta = 0) by the UNet trained to predict noise on VAE latents. This pulls the
   latent toward the learnt manifold of breast-ultrasound latents (speckle-like detail that the model finds
   unlikely is removed). The UNet's middle-block output (64 channels, 4x4) at each step is kept.
3. Fusion: [mean-pool h, max-pool h, 4x4-pooled z, mean-pool of the UNet middle features (averaged over
   steps), 4x4-pooled refined latent] -> LayerNorm -> MLP -> ``dim``; the caller L2-normalises.

``arch["views"]`` (default ``["whole"]``) names the input channels (:data:`lookalike.encoders.lesion.VIEWS`):
with ``["whole", "lesion"]`` the image and the lesion crop the finder made (with context) each go through the
same VAE and refinement, and their fused features are concatenated before the head.

``arch["features"]`` may name a subset of the feature blocks (:data:`FEATURE_BLOCKS`); when neither ``m`` nor
``zr`` is named, the refinement is not run at all (it is 45-66 % of the network time, and the ablation in
``bench/us_ablation.py`` found the VAE blocks alone as good). Checkpoints without the key use all blocks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler
from torch import nn

TAG = "vaediff-1"

#: Feature blocks in fusion order: VAE map ``h`` (mean- and max-pooled), latent ``z``, UNet middle ``m``,
#: refined latent ``zr``.
FEATURE_BLOCKS: tuple[str, ...] = ("h", "z", "m", "zr")


def default_arch(dim: int = 128, image_size: int = 64) -> dict[str, Any]:
    """Configuration stored in the checkpoint; enough to rebuild :class:`UltrasoundNet`."""
    return {
        "name": "us",
        "tag": TAG,
        "image_size": image_size,
        "dim": dim,
        "vae": {
            "channels": [16, 32, 64],
            "latent_channels": 4,
            "num_res_blocks": 1,
            "norm_num_groups": 16,
        },
        "unet": {"channels": [32, 64, 64], "num_res_blocks": 1, "norm_num_groups": 32, "num_head_channels": 32},
        "num_train_timesteps": 1000,
        "t_start": 100,
        "refine_steps": 2,
        "noise_seed": 1234,
        "latent_scale": 1.0,
        "head_hidden": 256,
    }


def build_vae(arch: dict[str, Any]) -> AutoencoderKL:
    """The MONAI VAE described by ``arch['vae']`` (no attention: CPU cost)."""
    v = arch["vae"]
    n = len(v["channels"])
    return AutoencoderKL(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=tuple(v["channels"]),
        latent_channels=v["latent_channels"],
        num_res_blocks=v["num_res_blocks"],
        attention_levels=(False,) * n,
        norm_num_groups=v["norm_num_groups"],
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


def build_unet(arch: dict[str, Any]) -> DiffusionModelUNet:
    """The MONAI noise-prediction UNet working on VAE latents."""
    u = arch["unet"]
    c = arch["vae"]["latent_channels"]
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=c,
        out_channels=c,
        channels=tuple(u["channels"]),
        attention_levels=(False,) * len(u["channels"]),
        num_res_blocks=u["num_res_blocks"],
        norm_num_groups=u["norm_num_groups"],
        num_head_channels=u["num_head_channels"],
    )


def projection_head(in_dim: int, hidden: int, dim: int) -> nn.Sequential:
    """The head on the fused features: LayerNorm -> Linear -> GELU -> Linear (also refit alone in stage D)."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def build_scheduler(arch: dict[str, Any]) -> DDIMScheduler:
    """DDIM scheduler whose step stride makes ``refine_steps`` steps go from ``t_start`` to 0."""
    sched = DDIMScheduler(num_train_timesteps=arch["num_train_timesteps"], clip_sample=False)
    stride = arch["t_start"] // arch["refine_steps"]
    sched.set_timesteps(arch["num_train_timesteps"] // stride)
    return sched


class UltrasoundNet(nn.Module):
    """VAE + latent-diffusion refinement + projection head (see module docstring)."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.arch = dict(arch)
        self.vae = build_vae(arch)
        self.unet = build_unet(arch)
        self.scheduler = build_scheduler(arch)
        lat = arch["vae"]["latent_channels"]
        side = arch["image_size"] // 2 ** (len(arch["vae"]["channels"]) - 1)
        g = torch.Generator().manual_seed(int(arch["noise_seed"]))
        self.register_buffer("refine_noise", torch.randn(1, lat, side, side, generator=g))
        self.register_buffer("latent_scale", torch.tensor(float(arch["latent_scale"])))
        ch = arch["vae"]["channels"][-1]
        mid = arch["unet"]["channels"][-1]
        self.blocks = tuple(arch.get("features", FEATURE_BLOCKS))
        unknown = set(self.blocks) - set(FEATURE_BLOCKS)
        if unknown or not self.blocks:
            raise ValueError(f"features must be a non-empty subset of {FEATURE_BLOCKS}, got {self.blocks}")
        width = {"h": 2 * ch, "z": lat * 16, "m": mid, "zr": lat * 16}
        self.views = tuple(arch.get("views", ("whole",)))
        self.feat_dim = len(self.views) * sum(width[b] for b in self.blocks)
        self.head = projection_head(self.feat_dim, arch["head_hidden"], arch["dim"])
        self._mid: list[torch.Tensor] = []
        self.unet.middle_block.register_forward_hook(lambda _m, _i, out: self._mid.append(out))
        # channels-last: the VAE encoder and the refinement UNet run about 1.4x faster on the CPU (oneDNN), the
        # same values to float rounding; loading weights copies into these tensors and keeps their layout
        self.to(memory_format=torch.channels_last)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the VAE encoder's last feature map and the scaled latent mean."""
        blocks = self.vae.encoder.blocks
        h = x
        for blk in blocks[:-2]:
            h = blk(h)
        z = blocks[-1](blocks[-2](h))
        z = self.vae.quant_conv_mu(z) * self.latent_scale
        return h, z

    def refine(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise ``z`` to ``t_start`` with the fixed noise, denoise with DDIM; return (refined z, UNet mid features)."""
        b = z.shape[0]
        t0 = int(self.arch["t_start"])
        stride = t0 // int(self.arch["refine_steps"])
        noise = self.refine_noise.expand_as(z)
        x = self.scheduler.add_noise(z, noise, torch.full((b,), t0, dtype=torch.long, device=z.device))
        self._mid = []
        for t in range(t0, 0, -stride):
            eps = self.unet(x, timesteps=torch.full((b,), t, dtype=torch.long, device=z.device))
            x, _ = self.scheduler.step(eps, t, x)
        mid = torch.stack([m.mean(dim=(2, 3)) for m in self._mid]).mean(dim=0)
        self._mid = []
        return x, mid

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Fused feature vector before the projection head: (B, V, S, S) -> (B, V * per-view features)."""
        b, v = x.shape[:2]
        if v != len(self.views):
            raise ValueError(f"expected {len(self.views)} view channel(s) {self.views}, got {v}")
        return self.view_features(x.reshape(b * v, 1, *x.shape[2:])).reshape(b, -1)

    def view_features(self, x: torch.Tensor) -> torch.Tensor:
        """Fused features of single-channel images (B, 1, S, S): VAE blocks, then refinement blocks if named."""
        h, z = self.encode(x.contiguous(memory_format=torch.channels_last))
        parts = {"h": torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1), "z": F.adaptive_avg_pool2d(z, 4).flatten(1)}
        if "m" in self.blocks or "zr" in self.blocks:
            zr, parts["m"] = self.refine(z)
            parts["zr"] = F.adaptive_avg_pool2d(zr, 4).flatten(1)
        return torch.cat([parts[b] for b in FEATURE_BLOCKS if b in self.blocks], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, V, S, S) in [0, 1], one channel per view -> (B, dim) unnormalised embedding."""
        return self.head(self.features(x))
