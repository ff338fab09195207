"""LafitE's feature editing (paper Eq. 10): pull every feature vector towards its K nearest
neighbours in a memory bank of normal features, before the diffusion model reconstructs it.

The paper weights neighbour k by ``1 - softmax(d)_k`` over the K distances, which favours close
neighbours but sums to K - 1, not 1 (and to 0 for K = 1). ``weight_norm="sum_to_one"`` (our
default) divides by K - 1 so the edited vector is a convex combination; ``"paper"`` keeps the
literal formula. For K = 1 both return the nearest neighbour.
"""

from __future__ import annotations

import torch

from .coreset import greedy_coreset
from .knn import FlatIndex

WEIGHT_NORMS = ("sum_to_one", "paper")


def neighbour_weights(distances: torch.Tensor, weight_norm: str = "sum_to_one") -> torch.Tensor:
    """(M, K) ascending distances -> (M, K) weights of the K neighbours."""
    if weight_norm not in WEIGHT_NORMS:
        raise ValueError(f"unknown weight_norm {weight_norm!r}; choose from {WEIGHT_NORMS}")
    k = distances.shape[1]
    if k == 1:
        return torch.ones_like(distances)
    weights = 1 - torch.softmax(distances, dim=1)
    return weights / (k - 1) if weight_norm == "sum_to_one" else weights


def edit_features(features: torch.Tensor, index: FlatIndex, k: int,
                  weight_norm: str = "sum_to_one") -> torch.Tensor:
    """(B, C, H, W) features -> the same shape, each position replaced by the weighted
    combination of its ``k`` nearest bank vectors (Euclidean)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    batch, channels, height, width = features.shape
    queries = features.permute(0, 2, 3, 1).reshape(-1, channels)
    distances, indices = index.search(queries, k)
    indices = indices.to(features.device)
    weights = neighbour_weights(distances.to(features.device), weight_norm)
    neighbours = index.bank[indices.reshape(-1)].view(indices.shape[0], indices.shape[1], channels)
    edited = torch.einsum("mk,mkc->mc", weights, neighbours)
    return edited.view(batch, height, width, channels).permute(0, 3, 1, 2)


class EditingBank:
    """A coreset of normal feature vectors and its search index, for :func:`edit_features`.

    Example:
        >>> bank = EditingBank.build(train_features, coreset_ratio=0.1)
        >>> edited = bank.edit(test_features, k=3)
    """

    def __init__(self, vectors: torch.Tensor, knn_backend: str = "auto") -> None:
        self.vectors = vectors
        self.index = FlatIndex(vectors, knn_backend)

    @classmethod
    def build(cls, features: torch.Tensor, coreset_ratio: float = 0.1,
              projection_dim: int | None = 128, seed: int = 0, knn_backend: str = "auto",
              show_progress: bool = False) -> EditingBank:
        """Keep a greedy coreset of every position of (N, C, H, W) training features."""
        vectors = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        chosen = greedy_coreset(vectors, coreset_ratio, projection_dim, seed=seed,
                                show_progress=show_progress)
        return cls(vectors[chosen].contiguous(), knn_backend)

    def edit(self, features: torch.Tensor, k: int, weight_norm: str = "sum_to_one"
             ) -> torch.Tensor:
        return edit_features(features, self.index, k, weight_norm)
