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

Under ``torchrun`` each rank holds the features of its own images (``rows`` gives their global
indices) and runs the same search over them; every step, the ranks exchange their best
candidate (distance, global index, projected feature) and all take the farthest, the lowest
index on a tie, as one process would. The coreset is the single-process one and the features
never leave their rank.
"""

from __future__ import annotations

import torch

from .. import distributed
from ..progress import progress


def greedy_coreset(
    features: torch.Tensor,
    sampling_ratio: float = 0.01,
    projection_dim: int | None = 128,
    n_starts: int = 10,
    seed: int = 0,
    block_size: int = 256,
    show_progress: bool = False,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of a greedy coreset of ``features``.

    Args:
        features: (N, D) features (under torchrun: this rank's).
        sampling_ratio: fraction of points to keep (at least one).
        projection_dim: dimension of the random projection in which distances are measured;
            None or >= D keeps the original features.
        n_starts: random starting points (their mean distance initialises the minimum distances).
        seed: seeds the projection and the starting points.
        block_size: points per block of the lazy search (speed only, not the result).
        rows: (N,) ascending global indices of ``features`` among all ranks' features (under
            torchrun; None: 0..N-1, one process).

    Returns:
        (K,) int64 indices, K = max(1, floor(sampling_ratio * N)), in selection order (global
        indices, the same on every rank, N counting every rank's features). Fewer are
        returned only if every point coincides with a selected one.

    Example:
        >>> idx = greedy_coreset(torch.randn(1000, 64), sampling_ratio=0.1)
        >>> idx.shape
        torch.Size([100])
    """
    if not 0.0 < sampling_ratio <= 1.0:
        raise ValueError(f"sampling_ratio must be in (0, 1], got {sampling_ratio}")
    n_local, dim = features.shape
    rows = torch.arange(n_local) if rows is None else rows.cpu()
    n_points = int(distributed.all_reduce_sum(torch.tensor(n_local)))
    n_select = max(1, int(sampling_ratio * n_points))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    points = features.float()
    if projection_dim is not None and projection_dim < dim:
        projection = torch.randn(dim, projection_dim, generator=generator) / projection_dim**0.5
        points = points @ projection.to(points.device)
    device, width = points.device, points.shape[1]

    n_starts = min(n_starts, n_points)
    starts = torch.randperm(n_points, generator=generator)[:n_starts]
    start_points = distributed.gather_rows(points, rows, starts)
    mean_distance = torch.zeros(n_local, device=device)
    for start_point in start_points:
        mean_distance += torch.linalg.vector_norm(points - start_point, dim=1)
    # Squared distances from here on: the same order, and no square roots in the loop.
    min_distance = (mean_distance / n_starts).pow_(2)
    del mean_distance

    n_blocks = max(1, -(-n_local // block_size))
    padding = n_blocks * block_size - n_local
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
        local = block * block_size + offset
        distance = block_min[block, offset]
        if distributed.is_distributed():
            owner, index, distance, centre, centre_sq_norm = _farthest_over_ranks(
                distance, rows[local] if local < n_local else -1, flat_points[local],
                block_sq_norms[block, offset])
        else:
            owner, index, centre, centre_sq_norm = (0, local, flat_points[local],
                                                     block_sq_norms[block, offset])
        if distance <= 0.0:
            break  # every point coincides with a selected centre
        selected[step] = index
        centres[step] = centre
        centre_sq_norms[step] = centre_sq_norm
        if owner == distributed.rank():
            block_min[block, offset] = 0.0
            bound[block] = block_min[block].max()
        count += 1
    return selected[:count].to(features.device)


def _farthest_over_ranks(distance: torch.Tensor, index: int | torch.Tensor,
                         centre: torch.Tensor, centre_sq_norm: torch.Tensor
                         ) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's best candidate -> (its rank, global index, distance, point, squared norm)
    of the farthest, the lowest index on a tie (as one process would choose)."""
    import torch.distributed as dist

    # float64 holds the float32 values and any index below 2**53 exactly.
    head = torch.tensor([float(distance), float(index), float(centre_sq_norm)],
                        dtype=torch.float64, device=centre.device)
    candidate = torch.cat([head, centre.double()])
    candidates = [torch.empty_like(candidate) for _ in range(distributed.world_size())]
    dist.all_gather(candidates, candidate)
    table = torch.stack(candidates).cpu()
    best = max(range(len(candidates)), key=lambda r: (float(table[r, 0]), -float(table[r, 1])))
    chosen = candidates[best].float()
    return best, int(table[best, 1]), chosen[0], chosen[3:], chosen[2]
