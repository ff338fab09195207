"""Adapted-MoE's blocks (METHODS.md §2): a routing network with subclass centres, test-time
adaption of features toward an expert's training statistics, and top-k fusion weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...nn.precision import Network, network_method

TTA_STATISTICS = ("channel", "scalar", "batch", "reference")
ROUTING_SCORES = ("centre", "classifier")


class RoutingNetwork(Network):
    """Image embedding (paper Eq. 1), subclass classifier and subclass centres.

    The embedding is a 3x3 convolution with ReLU over the patch features, global-average pooled
    and (``normalize``) L2-normalised. The centres are a buffer moved toward each subclass's
    embeddings after every step (Wen et al.'s centre-loss update), not learned by SGD.

    Args:
        channels: patch feature size C.
        num_subclasses: number of training subclasses n (= number of experts).
        normalize: L2-normalise the embedding ("+Norm").

    Example:
        >>> router = RoutingNetwork(16, num_subclasses=3)
        >>> router(torch.rand(2, 16, 8, 8)).shape
        torch.Size([2, 16])
    """

    def __init__(self, channels: int, num_subclasses: int, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize
        self.projection = nn.Conv2d(channels, channels, 3, padding=1)
        self.classifier = nn.Linear(channels, num_subclasses, bias=False)
        self.register_buffer("centres", torch.zeros(num_subclasses, channels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) patch features -> (B, C) embeddings."""
        embedding = F.relu(self.projection(features)).mean(dim=(2, 3))
        return F.normalize(embedding, dim=1) if self.normalize else embedding

    @network_method
    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor, centre_weight: float
             ) -> torch.Tensor:
        """alpha * ||x - c_y||^2 + (1 - alpha) * cross-entropy (paper Eq. 2, batch mean)."""
        cross_entropy = F.cross_entropy(self.classifier(embeddings), labels)
        if centre_weight == 0:
            return cross_entropy
        centre = (embeddings - self.centres[labels]).pow(2).sum(dim=1).mean()
        return centre_weight * centre + (1 - centre_weight) * cross_entropy

    @torch.no_grad()
    def update_centres(self, embeddings: torch.Tensor, labels: torch.Tensor, rate: float) -> None:
        """c_j <- c_j - rate * sum_{y_i=j} (c_j - x_i) / (1 + n_j)."""
        counts = torch.bincount(labels, minlength=self.centres.shape[0]).to(embeddings.dtype)
        sums = torch.zeros_like(self.centres).index_add_(0, labels, embeddings.detach())
        delta = (counts[:, None] * self.centres - sums) / (1 + counts[:, None])
        self.centres -= rate * delta

    def routing_scores(self, embeddings: torch.Tensor, source: str = "centre") -> torch.Tensor:
        """(B, n) similarity of each embedding to each subclass: cosine to the centres, or the
        classifier's logits."""
        if source == "classifier":
            return self.classifier(embeddings)
        return F.normalize(embeddings, dim=1) @ F.normalize(self.centres, dim=1).T


def rescale_to_expert_norm(features: torch.Tensor, target_mean: torch.Tensor,
                           target_std: torch.Tensor) -> torch.Tensor:
    """L2-normalise each position's feature of (B, C, H, W) ``features`` (paper Eq. 6) and
    scale it to the root-mean-square norm of an expert's training features,
    ``sqrt(sum(target_mean**2 + target_std**2))``.

    Not to unit norm (sqrt(C) smaller): unit features would shrink Lite0's features
    (root-mean-square 0.5) and make SimpleNet's noise twice as large relative to them, which
    halved the pixel AUROC.
    """
    target_norm = (target_mean.pow(2) + target_std.pow(2)).sum().sqrt()
    return F.normalize(features, dim=1) * target_norm


def adapt_statistics(features: torch.Tensor, target_mean: torch.Tensor, target_std: torch.Tensor,
                     statistics: str = "channel", normalize: bool = True, eps: float = 1e-5,
                     reference: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """Test-time adaption (paper Eq. 5-6): re-style features to a target mean and std.

    Args:
        features: (B, C, H, W) patch features.
        target_mean, target_std: (C,) per-channel statistics of an expert's training features.
        statistics: what the source and target statistics are taken over: "channel" (per
            channel, over each image's positions; AdaIN-style), "scalar" (one mean and std per
            image over all values), "batch" (per channel over the whole batch) or "reference"
            (per channel, the given ``reference``).
        normalize: then L2-normalise each position's feature to the norm of the expert's
            training features (:func:`rescale_to_expert_norm`), so SimpleNet's noise stays as
            large relative to them as without adaption.
        reference: for "reference": the (C,) per-channel mean and std of the features of a
            few normal images of the subclass under test.

    Example:
        >>> x = torch.rand(2, 8, 5, 5)
        >>> y = adapt_statistics(x, torch.full((8,), 3.0), torch.full((8,), 2.0), normalize=False)
        >>> round(float(y[0, 0].mean()), 4), round(float(y[0, 0].std()), 3)
        (3.0, 2.0)
    """
    if statistics not in TTA_STATISTICS:
        raise ValueError(f"statistics must be one of {TTA_STATISTICS}, got {statistics!r}")
    expert_mean, expert_std = target_mean, target_std
    if statistics == "channel":
        mean = features.mean(dim=(2, 3), keepdim=True)
        std = features.std(dim=(2, 3), keepdim=True)
        target_mean, target_std = target_mean.view(1, -1, 1, 1), target_std.view(1, -1, 1, 1)
    elif statistics == "batch":
        mean = features.mean(dim=(0, 2, 3), keepdim=True)
        std = features.std(dim=(0, 2, 3), keepdim=True)
        target_mean, target_std = target_mean.view(1, -1, 1, 1), target_std.view(1, -1, 1, 1)
    elif statistics == "reference":
        if reference is None:
            raise ValueError("statistics='reference' needs the reference mean and std")
        mean, std = (value.view(1, -1, 1, 1) for value in reference)
        target_mean, target_std = target_mean.view(1, -1, 1, 1), target_std.view(1, -1, 1, 1)
    else:
        mean = features.mean(dim=(1, 2, 3), keepdim=True)
        std = features.std(dim=(1, 2, 3), keepdim=True)
        # The scalar statistics of all channels together, from the per-channel ones.
        overall_mean = target_mean.mean()
        overall_var = (target_std.pow(2) + target_mean.pow(2)).mean() - overall_mean.pow(2)
        target_mean, target_std = overall_mean, overall_var.clamp_min(0).sqrt()
    adapted = (features - mean) / (std + eps) * target_std + target_mean
    if normalize:
        return rescale_to_expert_norm(adapted, expert_mean, expert_std)
    return adapted


def top_k_weights(scores: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """(B, n) routing scores -> (B, n) fusion weights: softmax, kept on the top k, renormalised.

    Each row sums to 1; the experts outside the top k get weight 0 (paper Eq. 4).

    Example:
        >>> top_k_weights(torch.tensor([[0.9, 0.1, 0.5]]), k=2).count_nonzero().item()
        2
    """
    probabilities = torch.softmax(scores / temperature, dim=1)
    k = min(k, scores.shape[1])
    kept = torch.zeros_like(probabilities).scatter_(
        1, probabilities.topk(k, dim=1).indices, 1.0)
    weights = probabilities * kept
    return weights / weights.sum(dim=1, keepdim=True)
