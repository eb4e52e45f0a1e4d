"""EfficientNet-Lite0 as a MONAI ``FlexibleUNet`` backbone, so the lesion finder starts from ImageNet features.

MONAI's own EfficientNet backbones fetch their ImageNet weights from a URL, which a hospital's machine must never
do. EfficientNet-Lite0's weights come with the project's dependencies instead (:mod:`lookalike.encoders.pretrained`),
so this module wraps that network in MONAI's backbone interface (:class:`monai.networks.blocks.BaseEncoder`) and
registers it in ``FLEXUNET_BACKBONE`` under :data:`BACKBONE`; ``FlexibleUNet(backbone=BACKBONE, ...)`` then builds
the finder with MONAI's decoder and segmentation head.

The backbone takes one grayscale channel in [0, 1], repeats it to three and applies ImageNet normalisation (the
statistics the weights were trained with), and returns the feature maps at strides 2, 4, 8, 16 and 32: the output
of the last block before each stride-2 block, and of the last block. The 1280-wide head convolution and the
classifier are not used, so they are not built into the state.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.blocks import BaseEncoder
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from torch import nn

from lookalike.encoders.pretrained import IMAGENET_MEAN, IMAGENET_STD, TRUNK, imagenet_input, imagenet_network

#: The name ``FlexibleUNet`` knows this backbone by.
BACKBONE = TRUNK

#: Channels of the five feature maps (strides 2, 4, 8, 16, 32).
CHANNELS = (16, 24, 40, 112, 320)


class LiteEncoder(nn.Module, BaseEncoder):
    """EfficientNet-Lite0's stem and blocks; (B, 1, S, S) -> five feature maps, S a multiple of 32.

    Parameters
    ----------
    spatial_dims, in_channels : int
        Must be 2 and 1: the network is 2-D and ultrasound is grayscale.
    pretrained : bool
        Load the ImageNet weights from the installed package (training); a checkpoint's own weights are loaded
        over an unpretrained one when serving.

    Notes
    -----
    The package computes static "same" padding for one input side; for every side that is a multiple of 32 it
    is the same padding, so the network is built for the weights' own 224 px and serves any such side.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, pretrained: bool = False) -> None:
        super().__init__()
        if spatial_dims != 2 or in_channels != 1:
            raise ValueError(f"{BACKBONE} backbone takes 2-D one-channel images, got {spatial_dims}-D {in_channels}")
        net = imagenet_network(224, pretrained)
        self.stem = nn.Sequential(net._conv_stem, net._bn0)
        self.blocks = net._blocks
        self.act = net._swish
        self.drop_connect_rate = net._global_params.drop_connect_rate or 0.0
        # the package gives a block's stride as 1 or [s]
        strides = [b._block_args.stride[0] if isinstance(b._block_args.stride, list) else b._block_args.stride
                   for b in self.blocks]
        #: indices of the blocks whose output is a feature map: before each stride-2 block, and the last
        self.taps = [i - 1 for i, s in enumerate(strides) if s == 2 and i > 0] + [len(self.blocks) - 1]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act(self.stem(imagenet_input(x, self.mean, self.std)))
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / len(self.blocks))
            if i in self.taps:
                out.append(x)
        return out

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [{"spatial_dims": 2, "in_channels": 1, "pretrained": False}]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [CHANNELS]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [len(CHANNELS)]

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return [BACKBONE]


FLEXUNET_BACKBONE.register_class(LiteEncoder)


def build_flexible_unet(arch: dict[str, Any], pretrained: bool = False) -> Any:
    """MONAI ``FlexibleUNet`` over :class:`LiteEncoder`, one logit channel, described by ``arch``.

    ``arch["image_size"]`` must be a multiple of 32 (five stride-2 stages, no padding between them).
    """
    from monai.networks.nets import FlexibleUNet

    if arch["image_size"] % 32:
        raise ValueError(f"{BACKBONE} finder needs a side that is a multiple of 32, got {arch['image_size']}")
    net = FlexibleUNet(in_channels=1, out_channels=1, backbone=BACKBONE, pretrained=pretrained,
                       decoder_channels=tuple(arch["decoder_channels"]), is_pad=False)
    return net.to(memory_format=torch.channels_last)
