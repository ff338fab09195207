"""Greedy coreset selection (k-center greedy), as in PatchCore, made fast by lazy evaluation.

PatchCore's approximate greedy coreset projects the features to a low dimension with a random
linear map, starts from a few random points (each point's initial "minimum distance" is its mean
distance to them), then repeatedly selects the point farthest from everything selected so far and
lowers every point's minimum distance to the new centre.

A plain implementation updates all N points after every selection: K passes over an N x D
matrix, memory-bound matrix-vector products (hundreds of seconds for 700 images on a small CPU).
We make the *same* selections lazily. Points are grouped in fixed blocks; each block keeps an
upper bound on its points' minimum distances (minimum distances only ever decrease) and the number
of centres it has been compared with. To select, we take the block with the largest bound; if it
has not seen every centre yet, we compare it with the missing ones at once (a small matrix
multiply) and re-insert it with its exact maximum; when the top block is up to date, its maximum
is the global maximum, because every other bound is an upper bound. Blocks far from the new
centres are rarely touched, and the work that remains is compute-bound matrix multiplication.
"""

from __future__ import annotations

import torch

from ..progress import progress


def greedy_coreset(
    features: torch.Tensor,
    sampling_ratio: float = 0.01,
    projection_dim: int | None = 128,
    n_starts: int = 10,
    seed: int = 0,
    block_size: int = 256,
    show_progress: bool = False,
) -> torch.Tensor:
    """Indices of a greedy coreset of ``features``.

    Args:
        features: (N, D) features.
        sampling_ratio: fraction of points to keep (at least one).
        projection_dim: dimension of the random projection in which distances are measured;
            None or >= D keeps the original features.
        n_starts: random starting points (their mean distance initialises the minimum distances).
        seed: seeds the projection and the starting points.
        block_size: points per block of the lazy search (speed only, not the result).

    Returns:
        (K,) int64 indices, K = max(1, floor(sampling_ratio * N)), in selection order. Fewer are
        returned only if every point coincides with a selected one.

    Example:
        >>> idx = greedy_coreset(torch.randn(1000, 64), sampling_ratio=0.1)
        >>> idx.shape
        torch.Size([100])
    """
    if not 0.0 < sampling_ratio <= 1.0:
        raise ValueError(f"sampling_ratio must be in (0, 1], got {sampling_ratio}")
    n_points, dim = features.shape
    n_select = max(1, int(sampling_ratio * n_points))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    points = features.float()
    if projection_dim is not None and projection_dim < dim:
        projection = torch.randn(dim, projection_dim, generator=generator) / projection_dim**0.5
        points = points @ projection.to(points.device)
    device, width = points.device, points.shape[1]

    n_starts = min(n_starts, n_points)
    starts = torch.randperm(n_points, generator=generator)[:n_starts].to(device)
    mean_distance = torch.zeros(n_points, device=device)
    for start in starts:
        mean_distance += torch.linalg.vector_norm(points - points[start], dim=1)
    # Squared distances from here on: the same order, and no square roots in the loop.
    min_distance = (mean_distance / n_starts).pow_(2)
    del mean_distance

    n_blocks = -(-n_points // block_size)
    padding = n_blocks * block_size - n_points
    blocks = torch.cat([points, points.new_zeros(padding, width)]).view(n_blocks, block_size, width)
    del points  # the padded blocks hold every point; keep one copy only
    flat_points = blocks.view(-1, width)
    block_sq_norms = blocks.pow(2).sum(2)
    block_min = torch.cat([min_distance, min_distance.new_full((padding,), -1.0)])
    block_min = block_min.view(n_blocks, block_size)  # padding never wins (-1)
    bound = block_min.amax(1)
    centres_seen = torch.zeros(n_blocks, dtype=torch.long)
    centres = blocks.new_empty(n_select, width)
    centre_sq_norms = blocks.new_empty(n_select)
    selected = torch.empty(n_select, dtype=torch.long)

    count = 0
    for step in progress(range(n_select), "coreset", enabled=show_progress):
        while True:
            block = int(torch.argmax(bound))
            seen = int(centres_seen[block])
            if seen == step:
                break
            norms = block_sq_norms[block].unsqueeze(1) + centre_sq_norms[seen:step].unsqueeze(0)
            distances = torch.addmm(norms, blocks[block], centres[seen:step].T, alpha=-2.0)
            # |a|^2 + |b|^2 - 2ab cancels badly for equal points: below its float resolution a
            # distance is zero, so duplicates of a centre are never selected again.
            distances.masked_fill_(distances <= 1e-6 * norms, 0.0)
            distances = distances.amin(1)
            torch.minimum(block_min[block], distances, out=block_min[block])
            centres_seen[block] = step
            bound[block] = block_min[block].max()
        offset = int(torch.argmax(block_min[block]))
        if block_min[block, offset] <= 0.0:
            break  # every point coincides with a selected centre
        index = block * block_size + offset
        selected[step] = index
        centres[step] = flat_points[index]
        centre_sq_norms[step] = block_sq_norms[block, offset]
        block_min[block, offset] = 0.0
        bound[block] = block_min[block].max()
        count += 1
    return selected[:count].to(features.device)
