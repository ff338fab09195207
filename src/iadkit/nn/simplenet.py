"""SimpleNet's blocks (Liu et al., CVPR 2023), shared by SimpleNet and Adapted-MoE's experts.

- :class:`UnfoldPatchFeatures`: the official code's locally aware patch features. Each level's
  k x k neighbourhood is unfolded into one ``C * k * k`` vector, resized onto the finest grid,
  and shrunk to ``level_dim`` values by adaptive average pooling; the levels' vectors are then
  pooled together to ``feature_dim``.
- :class:`SimpleNetHead`: feature adaptor (one linear layer) + discriminator MLP, with the
  truncated-L1 loss on real features versus copies perturbed by Gaussian noise.

METHODS.md §1.5 lists the official hyperparameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class UnfoldPatchFeatures(nn.Module):
    """Neighbourhood vectors of several levels, pooled to one fixed-size feature per position.

    Args:
        level_dim: values kept per level after pooling its ``C * k * k`` vector.
        feature_dim: values per position after pooling the levels' concatenation.
        kernel_size: neighbourhood size k (3 in SimpleNet and PatchCore).

    Example:
        >>> block = UnfoldPatchFeatures(level_dim=256, feature_dim=128)
        >>> block([torch.rand(2, 40, 28, 28), torch.rand(2, 112, 14, 14)]).shape
        torch.Size([2, 128, 28, 28])
    """

    def __init__(self, level_dim: int, feature_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.level_dim = level_dim
        self.feature_dim = feature_dim
        self.kernel_size = kernel_size

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        batch = features[0].shape[0]
        grid = tuple(features[0].shape[-2:])
        pooled = []
        for level in features:
            channels, height, width = level.shape[1:]
            patches = F.unfold(level, self.kernel_size, padding=self.kernel_size // 2)
            patches = patches.view(batch, channels * self.kernel_size**2, height, width)
            if (height, width) != grid:
                patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
            vectors = patches.permute(0, 2, 3, 1).reshape(-1, 1, patches.shape[1])
            pooled.append(F.adaptive_avg_pool1d(vectors, self.level_dim))
        stacked = torch.cat(pooled, dim=1).reshape(-1, 1, self.level_dim * len(pooled))
        merged = F.adaptive_avg_pool1d(stacked, self.feature_dim)
        return merged.view(batch, grid[0], grid[1], self.feature_dim).permute(0, 3, 1, 2)


def _xavier_normal(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)


class SimpleNetHead(nn.Module):
    """Feature adaptor and discriminator; ``forward`` gives patch anomaly scores.

    Args:
        feature_dim: input feature size (1536 in the paper).
        hidden_dim: discriminator hidden width (1024).
        noise_std: standard deviation of the Gaussian noise that makes anomalous features.
        margin: truncation threshold of the loss (0.5).

    Example:
        >>> head = SimpleNetHead(64, 32)
        >>> head(torch.rand(10, 64)).shape
        torch.Size([10])
    """

    def __init__(self, feature_dim: int, hidden_dim: int, noise_std: float = 0.015,
                 margin: float = 0.5) -> None:
        super().__init__()
        self.noise_std = noise_std
        self.margin = margin
        self.adaptor = nn.Linear(feature_dim, feature_dim)
        self.discriminator = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden_dim, 1, bias=False),
        )
        self.apply(_xavier_normal)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) patch features -> (N,) anomaly scores, -D(G(features))."""
        return -self.discriminator(self.adaptor(features)).squeeze(1)

    def loss(self, features: torch.Tensor) -> torch.Tensor:
        """Truncated L1 loss on (N, D) normal patch features and their noisy copies.

        The noise is added to the *adapted* features, as in the official code, and both halves
        go through the discriminator's BatchNorm together.
        """
        adapted = self.adaptor(features)
        noisy = adapted + torch.randn_like(adapted) * self.noise_std
        scores = self.discriminator(torch.cat([adapted, noisy])).squeeze(1)
        normal_scores, anomalous_scores = scores.split(adapted.shape[0])
        return (F.relu(self.margin - normal_scores).mean()
                + F.relu(self.margin + anomalous_scores).mean())
