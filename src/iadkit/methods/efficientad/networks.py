"""EfficientAD's networks: the patch description network (PDN) that is its teacher and student,
and its autoencoder (Batzner et al., WACV 2024, Tables 6-8)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...nn.precision import Network

#: The two PDN sizes of the paper.
MODEL_SIZES = ("small", "medium")


def channels_last_forward(network: Callable[[torch.Tensor], torch.Tensor],
                          images: torch.Tensor) -> torch.Tensor:
    """``network`` (its weights channels-last) on ``images`` in channels-last memory; the
    output back in the default layout. Channels-last is where oneDNN's fast convolutions are:
    a PDN's forward pass about 2x faster in bfloat16 on the CPU, 1.5x in float32."""
    return network(images.contiguous(memory_format=torch.channels_last)).contiguous()


class PatchDescriptionNetwork(Network):
    """A few convolutions whose every output position sees a 33 x 33 input patch.

    With the paper's padding the output grid is the input's over 4 (64 x 64 for 256 px), each
    position centred on its patch.

    Example:
        >>> PatchDescriptionNetwork(384)(torch.rand(1, 3, 256, 256)).shape
        torch.Size([1, 384, 64, 64])
    """

    def __init__(self, out_channels: int, size: str = "small") -> None:
        super().__init__()
        if size not in MODEL_SIZES:
            raise ValueError(f"size must be one of {MODEL_SIZES}, got {size!r}")
        width = 128 if size == "small" else 256
        layers: list[nn.Module] = [
            nn.Conv2d(3, width, 4, padding=3), nn.ReLU(inplace=True),
            nn.AvgPool2d(2, stride=2, padding=1),
            nn.Conv2d(width, 2 * width, 4, padding=3), nn.ReLU(inplace=True),
            nn.AvgPool2d(2, stride=2, padding=1),
        ]
        if size == "small":
            layers += [nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
                       nn.Conv2d(256, out_channels, 4)]
        else:
            layers += [nn.Conv2d(512, 512, 1), nn.ReLU(inplace=True),
                       nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(inplace=True),
                       nn.Conv2d(512, out_channels, 4), nn.ReLU(inplace=True),
                       nn.Conv2d(out_channels, out_channels, 1)]
        self.layers = nn.Sequential(*layers).to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return channels_last_forward(self.layers, images)


def _decoder_sizes(image_size: int) -> list[int]:
    """The paper's intermediate decoder sizes for 256 px (3, 8, 15, 32, 63, 127), scaled."""
    return [max(1, round(size * image_size / 256)) for size in (3, 8, 15, 32, 63, 127)]


class AutoEncoder(Network):
    """Encodes a whole image into a 64-value code and decodes the teacher's feature map from it:
    it learns the logical layout of normal images, so it misses what breaks that layout.

    Args:
        out_channels: the teacher's channels.
        image_size: the input's side (a multiple of 32).
        output_size: the side of the teacher's feature map.
        dropout: dropout after each upsampling convolution (the paper: 0.2).

    Example:
        >>> AutoEncoder(384, 256, 64)(torch.rand(1, 3, 256, 256)).shape
        torch.Size([1, 384, 64, 64])
    """

    def __init__(self, out_channels: int, image_size: int, output_size: int,
                 dropout: float = 0.2) -> None:
        super().__init__()
        encoder: list[nn.Module] = []
        for in_width, width in ((3, 32), (32, 32), (32, 64), (64, 64), (64, 64)):
            encoder += [nn.Conv2d(in_width, width, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        # The last encoder convolution covers what is left of the image (8 x 8 at 256 px).
        encoder.append(nn.Conv2d(64, 64, max(1, image_size // 32)))
        self.encoder = nn.Sequential(*encoder)
        self.sizes = _decoder_sizes(image_size)
        self.output_size = output_size
        self.upsampling = nn.ModuleList(
            nn.Sequential(nn.Conv2d(64, 64, 4, padding=2), nn.ReLU(inplace=True),
                          nn.Dropout(dropout)) for _ in self.sizes)
        self.head = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(64, out_channels, 3, padding=1))
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return channels_last_forward(self._layers, images)

    def _layers(self, images: torch.Tensor) -> torch.Tensor:
        code = self.encoder(images)
        for size, block in zip(self.sizes, self.upsampling):
            code = block(F.interpolate(code, size=size, mode="bilinear"))
        code = F.interpolate(code, size=self.output_size, mode="bilinear")
        return self.head(code)
