"""CSE's networks and losses (METHODS.md §5): a pointwise embedder of deep features, the frozen
random decoder that keeps the embedding from collapsing, the contrastive cosine loss and the
cosine distance to the bank's clusters.

Shapes use the paper's EfficientNet-b3 at 224 px as the example: levels of 136 x 14 x 14 and
384 x 7 x 7 become an embedding z of 64 x 14 x 14, average-pooled to 64 x 7 x 7.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...nn.precision import Network

COSINE_AXES = ("width", "channel", "flatten")


def _pointwise(in_channels: int, out_channels: int) -> list[nn.Module]:
    """1x1 convolution (no bias), ReLU, then batch norm: the order of the official code."""
    return [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.ReLU(inplace=True),
            nn.BatchNorm2d(out_channels)]


def fuse_levels(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Upsample every level to the first (largest) one's size and concatenate the channels."""
    size = features[0].shape[-2:]
    return torch.cat([features[0]] + [
        F.interpolate(f, size=size, mode="bilinear", align_corners=True) for f in features[1:]
    ], dim=1)


class FusionEmbedder(Network):
    """Fused deep features -> embedding z (B, E, h, w) and its smoothed form (B, E, h/p, w/p).

    Args:
        in_channels: channels of every backbone level (fused by :func:`fuse_levels`).
        embed_dim: E, the embedding's channels (64).
        hidden_widths: widths of the pointwise layers before the last; None halves the fused
            width twice (520 -> 260 -> 130 in the paper).
        pool: side and stride of the smoothing average pooling (2).

    Example:
        >>> embedder = FusionEmbedder([136, 384])
        >>> z, pooled = embedder([torch.rand(2, 136, 14, 14), torch.rand(2, 384, 7, 7)])
        >>> tuple(pooled.shape)
        (2, 64, 7, 7)
    """

    def __init__(self, in_channels: Sequence[int], embed_dim: int = 64,
                 hidden_widths: Sequence[int] | None = None, pool: int = 2) -> None:
        super().__init__()
        fused = sum(in_channels)
        widths = list(hidden_widths) if hidden_widths is not None else [fused // 2, fused // 4]
        layers: list[nn.Module] = []
        for width_in, width_out in zip([fused, *widths], [*widths, embed_dim]):
            layers += _pointwise(width_in, width_out)
        self.layers = nn.Sequential(*layers)
        self.smooth = nn.AvgPool2d(pool, stride=pool) if pool > 1 else nn.Identity()

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.layers(fuse_levels(features))
        return embedding, self.smooth(embedding)


class FeatureDecoder(Network):
    """Embedding z -> one reconstruction per backbone level (never used at inference).

    Each branch is two pointwise blocks (to half the level's width, then to its width), with a
    max pooling in between down to the level's size when it is smaller than z (14 -> 7 in the
    paper; adaptive, so odd sizes such as 7 -> 4 work too).

    Args:
        embed_dim: channels of z.
        level_channels: channels of every backbone level.
    """

    def __init__(self, embed_dim: int, level_channels: Sequence[int]) -> None:
        super().__init__()
        self.widen = nn.ModuleList(nn.Sequential(*_pointwise(embed_dim, max(c // 2, 1)))
                                   for c in level_channels)
        self.project = nn.ModuleList(nn.Sequential(*_pointwise(max(c // 2, 1), c))
                                     for c in level_channels)

    def forward(self, embedding: torch.Tensor, sizes: Sequence[tuple[int, int]]
                ) -> list[torch.Tensor]:
        """Reconstructions of the levels, each at its size in ``sizes``."""
        outputs = []
        for widen, project, size in zip(self.widen, self.project, sizes):
            hidden = widen(embedding)
            if tuple(hidden.shape[-2:]) != tuple(size):
                hidden = F.adaptive_max_pool2d(hidden, size)
            outputs.append(project(hidden))
        return outputs


class PositionClassifier(Network):
    """The classifier baseline's head (paper Table 4): a linear logit per embedding position;
    the image logit is their mean (global average pooling followed by a linear layer)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.logits = nn.Conv2d(embed_dim, 1, 1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, E, h, w) -> (B, h, w) logits."""
        return self.logits(pooled).squeeze(1)


def contrastive_cosine_loss(first: torch.Tensor, second: torch.Tensor, defective: torch.Tensor,
                            axis: str = "width") -> torch.Tensor:
    """The contrastive cosine loss of pairs, summed over the batch (METHODS.md §5.4).

    A normal pair costs 1 - cos (pulled together), a pair whose second view is defective
    (1 + cos) / 2 (pushed apart), both averaged over the cosine "slices" of ``axis``: "width"
    (the official code: cosines along each channel row), "channel" (per position, over the
    channels) or "flatten" (one cosine of the whole embedding).

    Args:
        first, second: (B, E, h, w) smoothed embeddings of the two views.
        defective: (B,) bool or 0/1, whether the second view carries a defect.
    """
    if axis == "width":
        cosines = F.cosine_similarity(first, second, dim=-1).flatten(1)
    elif axis == "channel":
        cosines = F.cosine_similarity(first, second, dim=1).flatten(1)
    elif axis == "flatten":
        cosines = F.cosine_similarity(first.flatten(1), second.flatten(1), dim=1).unsqueeze(1)
    else:
        raise ValueError(f"cosine axis must be one of {COSINE_AXES}, got {axis!r}")
    defective = defective.to(cosines.dtype).unsqueeze(1)
    per_slice = (1 - defective) * (1 - cosines) + defective * (1 + cosines) / 2
    return per_slice.mean(dim=1).sum()


def feature_reconstruction_loss(rebuilt: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
                                ) -> torch.Tensor:
    """Half the squared distance of channel-normalised features, summed over the batch and the
    channels, averaged over positions and levels (STPM's loss; METHODS.md §5.4)."""
    total = rebuilt[0].new_zeros(())
    for output, target in zip(rebuilt, targets):
        height, width = output.shape[-2:]
        difference = F.normalize(output, dim=1) - F.normalize(target, dim=1)
        total = total + 0.5 * difference.pow(2).sum() / (height * width)
    return total / len(rebuilt)


def cluster_distances(pooled: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Per-position cosine distance (over the channels) of every embedding to every centre.

    Args:
        pooled: (B, E, h, w) smoothed test embeddings.
        centres: (K, E, h, w) cluster representatives.

    Returns:
        (B, K, h, w) distances 1 - cos.
    """
    query = F.normalize(pooled, dim=1).unsqueeze(1)
    bank = F.normalize(centres, dim=1).unsqueeze(0)
    return 1 - (query * bank).sum(dim=2)
