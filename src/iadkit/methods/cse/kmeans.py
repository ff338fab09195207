"""k-means in torch (Lloyd iterations from a seeded k-means++ start), for small feature banks."""

from __future__ import annotations

import torch


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iterations: int = 100,
           tolerance: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster (N, D) points into ``k`` groups by Euclidean distance.

    Args:
        points: (N, D) float tensor.
        k: number of clusters, 1 <= k <= N. With k = 1 the centre is the points' mean.
        seed: seeds the k-means++ initialisation.
        iterations: maximum Lloyd iterations.
        tolerance: stop when no centre moves by more than this (squared distance).

    Returns:
        (centres (k, D), assignment (N,) of each point to its nearest centre).

    Example:
        >>> centres, assignment = kmeans(torch.randn(100, 8), k=3)
    """
    count = points.shape[0]
    if not 1 <= k <= count:
        raise ValueError(f"k-means needs 1 <= k <= {count} (the number of points), got k={k}")
    points = points.float()
    if k == 1:
        return points.mean(dim=0, keepdim=True), torch.zeros(count, dtype=torch.long,
                                                             device=points.device)
    generator = torch.Generator().manual_seed(seed)
    centres = _kmeans_plus_plus(points, k, generator)
    for _ in range(iterations):
        assignment = torch.cdist(points, centres).argmin(dim=1)
        updated = centres.clone()
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        sizes = torch.bincount(assignment, minlength=k)
        filled = sizes > 0  # an emptied cluster keeps its previous centre
        updated[filled] = sums[filled] / sizes[filled].unsqueeze(1).float()
        moved = (updated - centres).pow(2).sum(dim=1).max()
        centres = updated
        if moved <= tolerance:
            break
    return centres, torch.cdist(points, centres).argmin(dim=1)


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Arthur & Vassilvitskii's seeding: each next centre drawn with probability proportional
    to the squared distance to the nearest centre chosen so far."""
    first = int(torch.randint(points.shape[0], (), generator=generator))
    chosen = [first]
    nearest = (points - points[first]).pow(2).sum(dim=1)
    for _ in range(1, k):
        if float(nearest.sum()) <= 0:  # fewer distinct points than k: any point will do
            index = int(torch.randint(points.shape[0], (), generator=generator))
        else:
            index = int(torch.multinomial(nearest.cpu(), 1, generator=generator))
        chosen.append(index)
        nearest = torch.minimum(nearest, (points - points[index]).pow(2).sum(dim=1))
    return points[chosen].clone()
