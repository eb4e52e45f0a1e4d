"""Training-only augmentation for what differs between ultrasound scanners (MONAI transforms, one of our own).

Shared by the ultrasound encoder's training (through :func:`lookalike.lab.training.build_augment`)
and the lesion finder's, so that both see the same scanner variation.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.transforms import (
    RandAdjustContrast,
    RandBiasField,
    RandGaussianSmooth,
    RandomizableTransform,
    RandRicianNoise,
    RandScaleIntensity,
    ScaleIntensityRange,
)


class RandDepthGain(RandomizableTransform):
    """Multiply each image row by a gain that changes linearly with depth (the row), at random.

    Scanners and sonographers set time-gain compensation differently, so the same tissue is brighter near
    the probe on one machine and deeper down on another. MONAI has no depth-wise gain transform; this one
    follows its ``RandomizableTransform`` conventions, so that a ``Compose`` seeds it with the rest.

    Parameters
    ----------
    prob : float
        Probability of applying it.
    slope : tuple of float
        Range of the relative gain change from top to bottom row (0.6: bottom row 60 % brighter than top).
    """

    def __init__(self, prob: float = 0.5, slope: tuple[float, float] = (-0.6, 0.6)) -> None:
        RandomizableTransform.__init__(self, prob)
        self.slope = slope
        self._slope = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._slope = float(self.R.uniform(*self.slope))

    def __call__(self, img: Any, randomize: bool = True) -> torch.Tensor:
        """(C, H, W) image -> the same with row ``y`` multiplied by ``1 + slope * (y / H - 1/2)``."""
        if randomize:
            self.randomize()
        t = torch.as_tensor(img)
        if not self._do_transform:
            return t
        ramp = 1.0 + self._slope * torch.linspace(-0.5, 0.5, t.shape[-2], dtype=t.dtype)
        return t * ramp[:, None]


def scanner_intensity_steps() -> list[Any]:
    """Intensity transforms for a (C, S, S) image in [0, 1]; values are not clipped after the last one.

    Overall gain (``RandScaleIntensity``), depth-dependent gain (:class:`RandDepthGain`), a smooth lateral
    gain field (``RandBiasField``), speckle-like Rician noise (``RandRicianNoise``), the blur of other probes
    and resolutions (``RandGaussianSmooth``) and gamma (``RandAdjustContrast``).
    """
    return [
        RandScaleIntensity(prob=0.5, factors=0.3),
        RandDepthGain(prob=0.5, slope=(-0.6, 0.6)),
        RandBiasField(prob=0.3, coeff_range=(0.0, 0.15), degree=2),
        ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        RandRicianNoise(prob=0.3, std=0.04, relative=False, channel_wise=False),
        RandGaussianSmooth(prob=0.3, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
        RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5)),
    ]


def noisy_copy(image: Any, rng: Any, levels: int = 6) -> Any:
    """``image`` (float in [0, 1]) with every 8-bit grey level moved by a uniform integer in [-levels, levels].

    What lossy re-encoding or a second export does to an image: the near-copy test (``bench/near_copy.py``) and
    the fused encoder's noise-augmented heads (``lab.training_fused``, round 6) draw their copies here.
    """
    import numpy as np

    return np.clip(image + rng.integers(-levels, levels + 1, image.shape) / 255.0, 0.0, 1.0).astype(np.float32)
