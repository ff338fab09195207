"""Greedy coreset selection (k-center greedy), as in PatchCore, made fast by lazy evaluation and
bounded in memory by chunks.

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

Features arrive batch by batch (:class:`StreamingCoreset`); each batch is projected as it comes,
so the full features and their projections are held once, never copied into a second array.
Which rule runs depends on how many candidate points there are against ``chunk_points``:

- **exact**: all points fit in one chunk: the greedy rule over all of them, as above.
- **chunked** (two stages, when they do not fit): each chunk of ``chunk_points`` consecutive
  points keeps its own greedy coreset of ``OVERSAMPLING`` times the ratio, and the others are
  dropped; the greedy rule then selects the final coreset among the chunks' selections. Memory is
  one chunk plus the selections, and time is linear in the number of points for the first stage.
  This is the composable-coreset construction for k-center: each stage's greedy is within a
  factor 2 of the best covering radius of its input, so the result is within a factor 4 of the
  best coreset of the same size (and measured much closer, docs/patchcore.md).

Under ``torchrun`` each rank holds the points of its own batches, numbered in the order of all
ranks' batches, and every rank runs the same search over them; every step, the ranks exchange
their best candidate (distance, global index, projected feature) and all take the farthest, the
lowest index on a tie, as one process would. Chunks are cut by the global count, so the coreset
is the single-process one, by either rule, and the features never leave their rank.
"""

from __future__ import annotations

import torch

from .. import distributed
from ..progress import progress

#: The chunked rule's first stage keeps this many times the final ratio of each chunk.
OVERSAMPLING = 2
_SLICE_ROWS = 1 << 16


def greedy_coreset(
    features: torch.Tensor,
    sampling_ratio: float = 0.01,
    projection_dim: int | None = 128,
    n_starts: int = 10,
    seed: int = 0,
    block_size: int = 256,
    show_progress: bool = False,
) -> torch.Tensor:
    """Indices of a greedy coreset of ``features`` (the exact rule, all points at once).

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
    coreset = StreamingCoreset(features.shape[1], sampling_ratio, projection_dim, n_starts, seed,
                               block_size=block_size, show_progress=show_progress)
    coreset.add(features, features.shape[0])
    return coreset.finish()[0].to(features.device)


class StreamingCoreset:
    """A greedy coreset of features that arrive batch by batch, in bounded memory.

    Args:
        dim: feature dimension D.
        sampling_ratio: fraction of all points to keep (at least one).
        projection_dim: random-projection dimension of the distances (None or >= D: none).
        n_starts: random starting points of each greedy search.
        seed: seeds the projection and the starting points.
        chunk_points: most candidate points (all ranks together) held at once; None: no bound,
            the exact rule always.
        block_size: points per block of the lazy search (speed only, not the result).
        device: where a rank that computed no points keeps its (empty) share.

    Example:
        >>> coreset = StreamingCoreset(64, sampling_ratio=0.1, chunk_points=600)
        >>> for batch in torch.randn(1000, 64).split(100):
        ...     coreset.add(batch, len(batch))
        >>> indices, bank = coreset.finish()
        >>> coreset.rule, bank.shape
        ('chunked', torch.Size([100, 64]))
    """

    def __init__(self, dim: int, sampling_ratio: float = 0.01, projection_dim: int | None = 128,
                 n_starts: int = 10, seed: int = 0, chunk_points: int | None = None,
                 block_size: int = 256, device: torch.device | str = "cpu",
                 show_progress: bool = False) -> None:
        if not 0.0 < sampling_ratio <= 1.0:
            raise ValueError(f"sampling_ratio must be in (0, 1], got {sampling_ratio}")
        if chunk_points is not None and chunk_points < 1:
            raise ValueError(f"chunk_points must be at least 1, got {chunk_points}")
        self.dim, self.sampling_ratio, self.n_starts = dim, sampling_ratio, n_starts
        self.chunk_points, self.block_size, self.show_progress = chunk_points, block_size, \
            show_progress
        self.device = torch.device(device)
        self._generator = torch.Generator(device="cpu").manual_seed(seed)
        self._projection: torch.Tensor | None = None
        if projection_dim is not None and projection_dim < dim:
            self._projection = torch.randn(dim, projection_dim,
                                           generator=self._generator) / projection_dim**0.5
        self.width = dim if self._projection is None else projection_dim
        self._chunk = _Chunk(block_size)
        self._n_points = 0  # points added so far, every rank's
        self._n_chunks = 0  # chunks closed (each reduced to its first-stage selection)
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # this rank's
        self._kept_ids: list[torch.Tensor] = []  # every rank's first-stage selections

    @property
    def rule(self) -> str:
        """'exact' while all points fit in one chunk, 'chunked' once one has been closed."""
        return "chunked" if self._n_chunks else "exact"

    @property
    def n_chunks(self) -> int:
        return max(1, self._n_chunks + (self._chunk.n_points > 0))

    def add(self, features: torch.Tensor | None, n_points: int) -> None:
        """Add the next ``n_points`` points: ``features`` (n_points, D) on the rank that
        computed them, None on the others (every rank calls ``add`` for every batch, in the
        same order)."""
        if features is not None and features.shape != (n_points, self.dim):
            raise ValueError(f"expected ({n_points}, {self.dim}) features, got "
                             f"{tuple(features.shape)}")
        if (self.chunk_points is not None and self._chunk.n_points
                and self._chunk.n_points + n_points > self.chunk_points):
            self._close_chunk()
        if features is not None:
            points = features.float()
            if self._projection is not None:
                points = points @ self._projection.to(points.device)
            capacity = None if self.chunk_points is None else max(self.chunk_points, n_points)
            self._chunk.append(features, points, self._n_points, capacity)
        self._chunk.n_points += n_points
        self._n_points += n_points

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) global indices of the coreset in selection order, and (K, D) their features
        (on every rank)."""
        if self._n_points == 0:
            raise ValueError("no points to select a coreset from")
        n_select = max(1, int(self.sampling_ratio * self._n_points))
        if self._n_chunks == 0:  # the exact rule
            chunk = self._chunk
            chosen = chunk.start + self._select(chunk.blocks(), chunk.positions(),
                                                chunk.n_points, n_select)
            bank = distributed.gather_rows(self._local(chunk.features, chunk.filled),
                                           chunk.ids(), chosen)
            self._chunk = _Chunk(self.block_size)
            return chosen, bank
        if self._chunk.n_points:
            self._close_chunk()
        # The second stage numbers the first stage's selections (every rank's) in ascending order.
        union = torch.sort(torch.cat(self._kept_ids)).values
        if self._kept:
            ids, points, features = (torch.cat(parts) for parts in zip(*self._kept))
            order = torch.argsort(ids)
            ids, points, features = ids[order], points[order], features[order]
        else:
            ids = torch.zeros(0, dtype=torch.long)
            points, features = self._local(None, 0, self.width), self._local(None, 0)
        self._kept, self._kept_ids = [], []
        positions = torch.searchsorted(union, ids)
        chosen = self._select(_padded_blocks(points, self.block_size), positions, len(union),
                              min(n_select, len(union)))
        del points
        return union[chosen], distributed.gather_rows(features, positions, chosen)

    def _close_chunk(self) -> None:
        """Reduce the current chunk to its first-stage selection (a collective under torchrun)."""
        chunk = self._chunk
        n_select = max(1, int(min(1.0, OVERSAMPLING * self.sampling_ratio) * chunk.n_points))
        chosen = chunk.start + self._select(chunk.blocks(), chunk.positions(), chunk.n_points,
                                            n_select)
        self._kept_ids.append(chosen)
        ids = chunk.ids()
        position = torch.searchsorted(ids, chosen).clamp_max(max(len(ids) - 1, 0))
        mine = position[ids[position] == chosen] if len(ids) else position[:0]
        if chunk.filled:
            device = chunk.features.device
            self._kept.append((ids[mine], chunk.points[mine.to(device)].clone(),
                               chunk.features[mine.to(device)].clone()))
        self._n_chunks += 1
        self._chunk = _Chunk(self.block_size, start=self._n_points)
        self._chunk.reuse(chunk)

    def _local(self, buffer: torch.Tensor | None, filled: int, width: int | None = None
               ) -> torch.Tensor:
        """This rank's first ``filled`` rows of ``buffer`` (an empty array when it has none)."""
        if buffer is None:
            return torch.zeros(0, width or self.dim, device=self.device)
        return buffer[:filled]

    def _select(self, blocks: torch.Tensor | None, rows: torch.Tensor, n_points: int,
                n_select: int) -> torch.Tensor:
        if blocks is None:  # no points on this rank: one block of padding
            blocks = torch.zeros(1, self.block_size, self.width, device=self.device)
        return _lazy_greedy(blocks, rows, n_points, n_select, self.n_starts, self._generator,
                            self.show_progress)


class _Chunk:
    """The points of one chunk that this rank computed: full features and projections, in
    buffers that are filled batch by batch (never concatenated) and reused by the next chunk."""

    def __init__(self, block_size: int, start: int = 0) -> None:
        self.block_size = block_size
        self.start = start  # global index of the chunk's first point
        self.n_points = 0  # every rank's points in the chunk
        self.filled = 0  # this rank's
        self.features = self.points = None
        self._ids: list[torch.Tensor] = []

    def reuse(self, other: _Chunk) -> None:
        self.features, self.points = other.features, other.points

    def append(self, features: torch.Tensor, points: torch.Tensor, first_id: int,
               capacity: int | None) -> None:
        needed = self.filled + len(features)
        if self.features is None or needed > len(self.features):
            size = needed if capacity is None else max(capacity, needed)
            if capacity is None and self.features is not None:
                size = max(size, 2 * len(self.features))  # grow geometrically
            size = -(-size // self.block_size) * self.block_size
            features_buffer = features.new_empty(size, features.shape[1], dtype=torch.float32)
            points_buffer = (features_buffer if points is features
                             else points.new_empty(size, points.shape[1]))
            if self.filled:
                features_buffer[:self.filled] = self.features[:self.filled]
                points_buffer[:self.filled] = self.points[:self.filled]
            self.features, self.points = features_buffer, points_buffer
        self.features[self.filled:needed] = features
        if self.points is not self.features:
            self.points[self.filled:needed] = points
        self._ids.append(torch.arange(first_id, first_id + len(features)))
        self.filled = needed

    def ids(self) -> torch.Tensor:
        """Global indices of this rank's points, ascending."""
        return torch.cat(self._ids) if self._ids else torch.zeros(0, dtype=torch.long)

    def positions(self) -> torch.Tensor:
        return self.ids() - self.start

    def blocks(self) -> torch.Tensor | None:
        if not self.filled:
            return None
        n_blocks = -(-self.filled // self.block_size)
        end = n_blocks * self.block_size
        self.points[self.filled:end] = 0.0  # padding: finite, and never selected (see below)
        return self.points[:end].view(n_blocks, self.block_size, -1)


def _lazy_greedy(blocks: torch.Tensor, rows: torch.Tensor, n_points: int, n_select: int,
                 n_starts: int, generator: torch.Generator, show_progress: bool) -> torch.Tensor:
    """The lazy greedy search over this rank's points.

    Args:
        blocks: (n_blocks, block_size, width) points; rows past this rank's last point are
            padding (finite values).
        rows: (n_local,) the points' indices among all ranks' ``n_points`` points, ascending.
        n_select: how many to select.

    Returns:
        (K,) indices among the ``n_points`` in selection order, the same on every rank.
    """
    n_blocks, block_size, width = blocks.shape
    n_local = len(rows)
    flat_points = blocks.view(-1, width)
    points = flat_points[:n_local]
    device = blocks.device
    n_starts = min(n_starts, n_points)
    starts = torch.randperm(n_points, generator=generator)[:n_starts]
    start_points = distributed.gather_rows(points, rows, starts)
    # Row slices keep the temporaries small next to the points themselves.
    slices = [slice(first, min(first + _SLICE_ROWS, n_local))
              for first in range(0, n_local, _SLICE_ROWS)]
    block_min = torch.full((n_blocks * block_size,), -1.0, device=device)  # padding never wins
    for rows_slice in slices:
        mean_distance = torch.zeros(len(points[rows_slice]), device=device)
        for start_point in start_points:
            mean_distance += torch.linalg.vector_norm(points[rows_slice] - start_point, dim=1)
        # Squared distances from here on: the same order, and no square roots in the loop.
        block_min[rows_slice] = (mean_distance / n_starts).pow_(2)
    del points
    block_min = block_min.view(n_blocks, block_size)
    block_sq_norms = torch.empty(n_blocks * block_size, device=device)
    for first in range(0, n_blocks * block_size, _SLICE_ROWS):
        block_sq_norms[first:first + _SLICE_ROWS] = (
            flat_points[first:first + _SLICE_ROWS].pow(2).sum(1))
    block_sq_norms = block_sq_norms.view(n_blocks, block_size)
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
    return selected[:count]



def _padded_blocks(points: torch.Tensor, block_size: int) -> torch.Tensor | None:
    if not len(points):
        return None
    n_blocks = -(-len(points) // block_size)
    padded = points.new_zeros(n_blocks * block_size, points.shape[1])
    padded[:len(points)] = points
    return padded.view(n_blocks, block_size, -1)


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
