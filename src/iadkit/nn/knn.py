"""Chunked exact nearest-neighbour search in Euclidean distance."""

from __future__ import annotations

import torch


def squared_distances(queries: torch.Tensor, bank: torch.Tensor,
                      bank_sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """(M, D) x (K, D) -> (M, K) squared Euclidean distances, clamped at 0."""
    if bank_sq_norms is None:
        bank_sq_norms = bank.pow(2).sum(1)
    query_sq_norms = queries.pow(2).sum(1, keepdim=True)
    distances = torch.addmm(bank_sq_norms.unsqueeze(0), queries, bank.T, alpha=-2.0)
    return distances.add_(query_sq_norms).clamp_(min=0.0)


def nearest_neighbours(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    max_elements: int = 1 << 21,
    bank_sq_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and indices of the ``k`` nearest bank rows of each query, in bounded memory.

    Queries are processed in chunks so that the distance matrix never exceeds
    ``max_elements`` entries (8 MB in float32 by default: small enough to stay in cache,
    which matters because the distance matrix, not the arithmetic, bounds the speed).

    Returns:
        (M, k) Euclidean distances (ascending) and (M, k) int64 indices into ``bank``.
    """
    if bank_sq_norms is None:
        bank_sq_norms = bank.pow(2).sum(1)
    chunk = max(1, max_elements // max(1, bank.shape[0]))
    all_distances, all_indices = [], []
    for start in range(0, queries.shape[0], chunk):
        distances = squared_distances(queries[start:start + chunk], bank, bank_sq_norms)
        if k == 1:
            values, indices = distances.min(dim=1, keepdim=True)
        else:
            values, indices = distances.topk(k, dim=1, largest=False)
        all_distances.append(values.sqrt_())
        all_indices.append(indices)
    return torch.cat(all_distances), torch.cat(all_indices)
