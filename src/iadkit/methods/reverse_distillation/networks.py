"""Reverse-distillation networks and losses of RD, AAND and ReContrast (METHODS.md §1.2, §1.3).

A frozen teacher encoder gives K feature maps (fine to coarse, each stride twice the previous).
The one-class bottleneck (OCBE) fuses them into one compact embedding, and a student decoder
mirroring the encoder reconstructs the teacher's maps from it. Where the student fails to
reconstruct (low cosine similarity), the input is anomalous.

Everything is generic over the teacher's channel widths: with WideResNet-50-2's (256, 512, 1024)
and the default ratios, :class:`OneClassBottleneck` and :class:`ReverseDecoder` are exactly
RD4AD's ``BN_layer`` and ``de_wide_resnet50_2``; with EfficientNet-Lite0's (24, 40, 112) they are
the same architecture at that width.

Example:
    >>> bottleneck = OneClassBottleneck((24, 40, 112))
    >>> decoder = ReverseDecoder((24, 40, 112), bottleneck.out_channels)
    >>> student = decoder(bottleneck(teacher_features))  # same shapes as teacher_features
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...nn.precision import Network

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}
#: The distillation losses (:func:`flattened_cosine_loss`, :func:`pixel_cosine_loss`).
LOSSES = ("flattened", "pixel")


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels))


def _up_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    """A 2x2 stride-2 transposed convolution (doubles the resolution) with BatchNorm."""
    return nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 2, 2, bias=False),
                         nn.BatchNorm2d(out_channels))


class ResidualBottleneck(Network):
    """ResNet's 1x1 - 3x3 - 1x1 bottleneck block, optionally halving or doubling the resolution.

    Args:
        in_channels, width, out_channels: input, inner and output widths.
        resample: "none", "down" (3x3 conv of stride 2) or "up" (RD's decoder block: the 3x3
            conv becomes a 2x2 stride-2 transposed conv, and so does the shortcut).
        activation: "relu" or "gelu".
        final_activation: apply the activation after the residual sum (ResNet does); without it
            the block can output negative values.
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, resample: str = "none",
                 activation: str = "relu", final_activation: bool = True) -> None:
        super().__init__()
        if resample not in ("none", "down", "up"):
            raise ValueError(f"resample must be none, down or up, got {resample!r}")
        self.reduce = nn.Sequential(*_conv_bn(in_channels, width, 1), _activation(activation))
        middle = _up_bn(width, width) if resample == "up" else _conv_bn(
            width, width, 3, 2 if resample == "down" else 1)
        self.middle = nn.Sequential(*middle, _activation(activation))
        self.expand = _conv_bn(width, out_channels, 1)
        if resample == "up":
            self.shortcut: nn.Module = _up_bn(in_channels, out_channels)
        elif resample == "down" or in_channels != out_channels:
            self.shortcut = _conv_bn(in_channels, out_channels, 1, 2 if resample == "down" else 1)
        else:
            self.shortcut = nn.Identity()
        self.activation = _activation(activation) if final_activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.expand(self.middle(self.reduce(x))) + self.shortcut(x))


def check_pyramid(channels: Sequence[int], strides: Sequence[int] | None) -> None:
    """Raise :class:`ConfigError` unless the teacher levels can be distilled: at least one,
    each of twice the previous one's stride."""
    if len(channels) < 1:
        raise ConfigError("reverse distillation needs at least one feature level")
    if strides is not None and any(b != 2 * a for a, b in itertools.pairwise(strides)):
        raise ConfigError(f"each feature level must have twice the stride of the previous one, "
                          f"got strides {list(strides)}; pick consecutive backbone stages")


def _init_weights(module: nn.Module) -> None:
    """RD4AD's initialisation: Kaiming-normal (fan_out) convolutions, BN weight 1 / bias 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


class OneClassBottleneck(Network):
    """OCBE: multi-scale feature fusion, then a one-class embedding stage (RD4AD ``BN_layer``).

    Each finer level goes down to the coarsest resolution through a chain of 3x3 stride-2
    conv-BN-ReLU layers (through the channel widths of the levels in between), is concatenated
    with the coarsest level, and a ResNet stage of ``num_blocks`` bottlenecks (the first one
    strided) compresses the result to ``out_channels`` at half the coarsest resolution.

    Args:
        channels: teacher channel widths, fine to coarse (e.g. (256, 512, 1024)).
        out_channels: embedding width; default twice the coarsest width (2048 for WRN50-2).
        num_blocks: bottleneck blocks in the embedding stage (3 in RD4AD).
        width_ratio: inner width of those blocks relative to their output (0.5 = "wide").
        strides: the levels' strides, only checked (each must double the previous).
    """

    def __init__(self, channels: Sequence[int], out_channels: int | None = None,
                 num_blocks: int = 3, width_ratio: float = 0.5,
                 strides: Sequence[int] | None = None) -> None:
        super().__init__()
        check_pyramid(channels, strides)
        self.in_channels = list(channels)
        coarsest = channels[-1]
        self.out_channels = out_channels or 2 * coarsest
        self.fusers = nn.ModuleList()
        for level in range(len(channels) - 1):
            steps = []
            for source, target in zip(channels[level:-1], channels[level + 1:]):
                steps += [*_conv_bn(source, target, 3, 2), nn.ReLU()]
            self.fusers.append(nn.Sequential(*steps))
        width = max(1, round(self.out_channels * width_ratio))
        fused = coarsest * len(channels)
        blocks = [ResidualBottleneck(fused, width, self.out_channels, "down")]
        blocks += [ResidualBottleneck(self.out_channels, width, self.out_channels)
                   for _ in range(num_blocks - 1)]
        self.embed = nn.Sequential(*blocks)
        _init_weights(self)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        fused = [fuse(f) for fuse, f in zip(self.fusers, features)] + [features[-1]]
        return self.embed(torch.cat(fused, dim=1))


class ReverseDecoder(Network):
    """The student: up-sampling ResNet stages mirroring the teacher (RD4AD ``de_resnet``).

    Stage j doubles the resolution (first block: transposed convolutions) and outputs the width
    of teacher level K-j. ``forward`` returns the outputs ordered like the teacher's features.

    Args:
        channels: teacher channel widths, fine to coarse.
        in_channels: width of the bottleneck embedding.
        num_blocks: blocks per stage, coarse to fine ((3, 4, 6) in ``de_wide_resnet50_2``).
        width_ratio: inner width relative to each stage's output (0.5 = "wide").
        activation: "relu" (RD4AD) or "gelu" (ReContrast, CADA).
        num_heads: 0 for plain outputs; n > 0 adds n sets of per-level 1x1 convolution heads
            (ReContrast uses 2), and ``forward`` then returns one list per head set.
        linear_outputs: end each stage without the final activation. ResNet features are
            post-ReLU (non-negative) and RD4AD's decoder ends in a ReLU; EfficientNet's stage
            outputs are linear bottlenecks with negative values that a ReLU output could never
            reproduce.
    """

    def __init__(self, channels: Sequence[int], in_channels: int,
                 num_blocks: Sequence[int] = (3, 4, 6), width_ratio: float = 0.5,
                 activation: str = "relu", num_heads: int = 0,
                 linear_outputs: bool = False) -> None:
        super().__init__()
        if len(num_blocks) < len(channels):
            raise ValueError(f"num_blocks needs one entry per level ({len(channels)}), "
                             f"got {list(num_blocks)}")
        self.stages = nn.ModuleList()
        previous = in_channels
        for out, blocks in zip(reversed(channels), num_blocks):
            width = max(1, round(out * width_ratio))
            stage = [ResidualBottleneck(previous, width, out, "up", activation,
                                        final_activation=blocks > 1 or not linear_outputs)]
            stage += [ResidualBottleneck(out, width, out, "none", activation,
                                         final_activation=i < blocks - 2 or not linear_outputs)
                      for i in range(blocks - 1)]
            self.stages.append(nn.Sequential(*stage))
            previous = out
        self.heads = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(c, c, 1) for c in channels) for _ in range(num_heads))
        _init_weights(self)

    def forward(self, embedding: torch.Tensor, head_rows: Sequence[slice] | None = None
                ) -> list[torch.Tensor] | list[list[torch.Tensor]]:
        """The outputs, fine to coarse; with heads, one list per head set. ``head_rows``
        gives each head set the rows of the batch it is needed for (ReContrast: each half of
        its stacked batch), so no head runs on rows whose output is thrown away."""
        outputs = []
        x = embedding
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        outputs.reverse()  # fine to coarse, like the teacher
        if not self.heads:
            return outputs
        rows = head_rows or [slice(None)] * len(self.heads)
        return [[head(o[part]) for head, o in zip(head_set, outputs)]
                for head_set, part in zip(self.heads, rows, strict=True)]


# -- losses --------------------------------------------------------------------------------------
def flattened_cosine_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]
                          ) -> torch.Tensor:
    """RD4AD's official loss: per level, 1 - cos of the whole flattened maps; mean over the
    batch, summed over levels."""
    loss = teacher[0].new_zeros(())
    for t, s in zip(teacher, student):
        loss = loss + (1 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean()
    return loss


def pixel_cosine_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]
                      ) -> torch.Tensor:
    """The RD4AD paper's loss: per-position 1 - cos, averaged over positions, summed over levels."""
    loss = teacher[0].new_zeros(())
    for t, s in zip(teacher, student):
        loss = loss + (1 - F.cosine_similarity(t, s, dim=1)).mean()
    return loss


def hard_patch_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                    num_hard: int = 10) -> torch.Tensor:
    """AAND's hard knowledge distillation (Eq. 11): the mean 1 - cos of the ``num_hard`` worst
    reconstructed positions of each image, averaged over images, summed over levels."""
    loss = teacher[0].new_zeros(())
    if num_hard <= 0:
        return loss
    for t, s in zip(teacher, student):
        distance = (1 - F.cosine_similarity(t, s, dim=1)).flatten(1)  # (B, h*w)
        hardest = distance.topk(min(num_hard, distance.shape[1]), dim=1).values
        loss = loss + hardest.mean()
    return loss


def hard_mined_cosine_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                           alpha: float, factor: float = 0.0) -> torch.Tensor:
    """ReContrast's global cosine loss with hard mining.

    The loss is :func:`flattened_cosine_loss` with the teacher side detached; in the backward pass
    the gradient reaching each student position whose 1 - cos distance is below
    ``mean + alpha * std`` (over that level's batch) is multiplied by ``factor``: only the
    hardest positions keep teaching the student.
    """
    loss = teacher[0].new_zeros(())
    for t, s in zip(teacher, student):
        t = t.detach()
        loss = loss + (1 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean()
        if s.requires_grad:
            with torch.no_grad():
                distance = 1 - F.cosine_similarity(t, s, dim=1).unsqueeze(1)
                easy = distance < distance.mean() + alpha * distance.flatten().std()
            s.register_hook(lambda grad, easy=easy: torch.where(easy, grad * factor, grad))
    return loss


# -- anomaly maps --------------------------------------------------------------------------------
def cosine_distance_maps(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]
                         ) -> list[torch.Tensor]:
    """Per level, the (B, h, w) map of 1 - cos between teacher and student features."""
    return [1 - F.cosine_similarity(t, s, dim=1) for t, s in zip(teacher, student)]
