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

from ...nn.precision import Network, network_method


class UnfoldPatchFeatures(nn.Module):
    """Neighbourhood vectors of several levels, pooled to one fixed-size feature per position.

    Defined as in the official code: unfold each level's k x k neighbourhoods into ``C * k * k``
    vectors, resize them onto the first level's grid, adaptive-average-pool each to
    ``level_dim``, concatenate the levels and adaptive-average-pool to ``feature_dim``.

    Every step is linear, so the whole chain is computed as one k x k convolution per level
    (the composed pooling matrices as weights) followed by the resize, and a sum: the same
    features without materialising the ``C * k * k``-channel tensors, several times faster.

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
        self._weights: dict[tuple[tuple[int, ...], torch.device, torch.dtype],
                            list[torch.Tensor]] = {}

    def level_weights(self, channels: Sequence[int], device: torch.device,
                      dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Per level, the (feature_dim, C, k, k) convolution weight of the composed poolings."""
        key = (tuple(channels), device, dtype)
        if key not in self._weights:
            merge = adaptive_pooling_matrix(self.level_dim * len(channels), self.feature_dim)
            weights = []
            for index, count in enumerate(channels):
                length = count * self.kernel_size**2
                level = adaptive_pooling_matrix(length, self.level_dim)
                block = merge[:, index * self.level_dim:(index + 1) * self.level_dim] @ level
                weights.append(block.view(self.feature_dim, count, self.kernel_size,
                                          self.kernel_size).to(device, dtype))
            self._weights[key] = weights
        return self._weights[key]

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        grid = tuple(features[0].shape[-2:])
        # int(): while tracing for ONNX export a shape is a traced value, which would miss the
        # cache and put the pooling matrices' construction into the graph
        weights = self.level_weights([int(f.shape[1]) for f in features], features[0].device,
                                     features[0].dtype)
        merged = None
        for level, weight in zip(features, weights):
            pooled = F.conv2d(level, weight, padding=self.kernel_size // 2)
            if tuple(pooled.shape[-2:]) != grid:
                pooled = F.interpolate(pooled, size=grid, mode="bilinear", align_corners=False)
            merged = pooled if merged is None else merged + pooled
        return merged


def adaptive_pooling_matrix(length: int, size: int) -> torch.Tensor:
    """(size, length) matrix of 1-D adaptive average pooling (``F.adaptive_avg_pool1d``):
    output i averages inputs floor(i * length / size) to ceil((i + 1) * length / size)."""
    matrix = torch.zeros(size, length, dtype=torch.float64)
    for index in range(size):
        start, end = (index * length) // size, -((-(index + 1) * length) // size)
        matrix[index, start:end] = 1.0 / (end - start)
    return matrix


def _xavier_normal(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)


class SimpleNetHead(Network):
    """Feature adaptor and discriminator; ``forward`` gives patch anomaly scores.

    Args:
        feature_dim: input feature size (1536 in the paper).
        hidden_dim: discriminator hidden width (1024).
        margin: truncation threshold of the loss (0.5).

    Example:
        >>> head = SimpleNetHead(64, 32)
        >>> head(torch.rand(10, 64)).shape
        torch.Size([10])
    """

    def __init__(self, feature_dim: int, hidden_dim: int, margin: float = 0.5) -> None:
        super().__init__()
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
        return -self.discriminator(self.adaptor(features))[:, 0]

    @network_method
    def loss(self, features: torch.Tensor, noise_std: float) -> torch.Tensor:
        """Truncated L1 loss on (N, D) normal patch features and their copies moved by Gaussian
        noise of std ``noise_std`` (the paper: 0.015).

        The noise is added to the *adapted* features, as in the official code, and both halves
        go through the discriminator's BatchNorm together.
        """
        adapted = self.adaptor(features)
        noisy = adapted + torch.randn_like(adapted) * noise_std
        scores = self.discriminator(torch.cat([adapted, noisy]))[:, 0]
        normal_scores, anomalous_scores = scores.split(adapted.shape[0])
        return (F.relu(self.margin - normal_scores).mean()
                + F.relu(self.margin + anomalous_scores).mean())
