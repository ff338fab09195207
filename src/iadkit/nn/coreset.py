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
Which rule runs depends on how many candidate points there are against the memory budget
(``memory_points``):

- **exact**: all points fit the budget: the greedy rule over all of them, as above.
- **chunked** (two stages, when they do not fit): the points are cut into chunks of
  ``chunk_points`` consecutive points (:data:`CHUNK_POINTS`); each chunk keeps its own greedy
  coreset of ``OVERSAMPLING`` times the ratio and the rest of it is dropped; the greedy rule then
  selects the final coreset among the chunks' selections. Memory is one chunk plus the
  selections. A chunk's greedy costs about the square of its size, so the first stage's time is
  linear in the number of points; the second stage's grows with the square of the selections
  (about 2 % of the exact rule's cost at a 1 % ratio). This is the composable-coreset
  construction for k-center: each stage's greedy is within a factor 2 of the best covering
  radius of its input, so the result is within a factor 4 of the best coreset of its size (and
  measured close to the exact rule's, docs/patchcore.md).

Under ``torchrun`` each rank holds the points of its own batches, numbered in the order of all
ranks' batches, and every rank runs the same search over them; every step, the ranks exchange
their best candidate (distance, global index, projected feature) and all take the farthest, the
lowest index on a tie, as one process would. Chunks are ranges of the global numbering, so the
coreset is the single-process one, by either rule, and the features never leave their rank.
"""

from __future__ import annotations

import time

import torch

from .. import distributed
from ..progress import progress

#: The chunked rule's first stage keeps this many times the final ratio of each chunk.
OVERSAMPLING = 2
#: Points per chunk of the chunked rule: a chunk's greedy costs about the square of its size, so
#: smaller chunks are faster per point; at 2**18 a point costs less than under the exact rule on
#: 700 images of 1,024 patches each.
CHUNK_POINTS = 1 << 18
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
        memory_points: most candidate points (all ranks together) held at once: while all
            points fit, the exact rule; beyond, the chunked rule. None: no bound, always exact.
        chunk_points: points per chunk of the chunked rule (at most ``memory_points``).
        block_size: points per block of the lazy search (speed only, not the result).
        device: where a rank that computed no points keeps its (empty) share.

    Example:
        >>> coreset = StreamingCoreset(64, sampling_ratio=0.1, memory_points=600,
        ...                            chunk_points=300)
        >>> for batch in torch.randn(1000, 64).split(100):
        ...     coreset.add(batch, len(batch))
        >>> indices, bank = coreset.finish()
        >>> coreset.rule, coreset.n_chunks, bank.shape
        ('chunked', 4, torch.Size([100, 64]))
    """

    def __init__(self, dim: int, sampling_ratio: float = 0.01, projection_dim: int | None = 128,
                 n_starts: int = 10, seed: int = 0, memory_points: int | None = None,
                 chunk_points: int = CHUNK_POINTS, block_size: int = 256,
                 device: torch.device | str = "cpu", show_progress: bool = False) -> None:
        if not 0.0 < sampling_ratio <= 1.0:
            raise ValueError(f"sampling_ratio must be in (0, 1], got {sampling_ratio}")
        if memory_points is not None and memory_points < 1:
            raise ValueError(f"memory_points must be at least 1, got {memory_points}")
        if chunk_points < 1:
            raise ValueError(f"chunk_points must be at least 1, got {chunk_points}")
        self.dim, self.sampling_ratio, self.n_starts = dim, sampling_ratio, n_starts
        self.memory_points, self.block_size = memory_points, block_size
        self.chunk_points = min(chunk_points, memory_points or chunk_points)
        self.device, self.show_progress = torch.device(device), show_progress
        self._generator = torch.Generator(device="cpu").manual_seed(seed)
        self._projection: torch.Tensor | None = None
        if projection_dim is not None and projection_dim < dim:
            self._projection = torch.randn(dim, projection_dim,
                                           generator=self._generator) / projection_dim**0.5
        self.width = dim if self._projection is None else projection_dim
        self._held = _Held(block_size)  # this rank's points not yet reduced
        self._n_points = 0  # points added so far, every rank's
        self._held_from = 0  # global index of the first point not yet reduced
        self._n_chunks = 0  # chunks reduced to their first-stage selections
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # this rank's
        self._kept_ids: list[torch.Tensor] = []  # every rank's first-stage selections
        self.selection_seconds = 0.0  # time spent in greedy searches, both stages

    @property
    def rule(self) -> str:
        """'exact' while all points fit the memory budget, 'chunked' once they did not."""
        return "chunked" if self._n_chunks else "exact"

    @property
    def n_chunks(self) -> int:
        return max(1, self._n_chunks)

    def add(self, features: torch.Tensor | None, n_points: int) -> None:
        """Add the next ``n_points`` points: ``features`` (n_points, D) on the rank that
        computed them, None on the others (every rank calls ``add`` for every batch, in the
        same order)."""
        if features is not None and features.shape != (n_points, self.dim):
            raise ValueError(f"expected ({n_points}, {self.dim}) features, got "
                             f"{tuple(features.shape)}")
        chunked = self._n_chunks > 0 or (self.memory_points is not None
                                         and self._n_points + n_points > self.memory_points)
        if chunked:  # make room first: every whole chunk held so far is reduced
            self._reduce_chunks(final=False)
        if features is not None:
            points = features.float()
            if self._projection is not None:
                points = points @ self._projection.to(points.device)
            capacity = self.memory_points if not chunked else self.chunk_points
            self._held.append(features, points, self._n_points, capacity)
        self._n_points += n_points
        if chunked:
            self._reduce_chunks(final=False)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) global indices of the coreset in selection order, and (K, D) their features
        (on every rank)."""
        if self._n_points == 0:
            raise ValueError("no points to select a coreset from")
        n_select = max(1, int(self.sampling_ratio * self._n_points))
        held = self._held
        if self._n_chunks == 0:  # the exact rule, over the held buffers themselves
            ids = held.ids()
            chosen = self._select(held.blocks(), ids, self._n_points, n_select)
            bank = distributed.gather_rows(self._local(held.features, held.filled), ids, chosen)
            self._held = _Held(self.block_size)
            return chosen, bank
        self._reduce_chunks(final=True)
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

    def _reduce_chunks(self, final: bool) -> None:
        """Reduce every whole chunk held (at the end also the last, partial one) to its
        first-stage selection, and drop its points (a collective under torchrun)."""
        while self._held_from < self._n_points:
            end = self._held_from + self.chunk_points
            if end > self._n_points:
                if not final:
                    break
                end = self._n_points
            ids, points, features = self._held.rows(self._held_from, end)
            n_chunk = end - self._held_from
            n_keep = max(1, int(min(1.0, OVERSAMPLING * self.sampling_ratio) * n_chunk))
            chosen = self._held_from + self._select(_padded_blocks(points, self.block_size),
                                                    ids - self._held_from, n_chunk, n_keep)
            self._kept_ids.append(chosen)
            position, owned = distributed.find_rows(ids, chosen)
            mine = position[owned]
            if len(mine):
                mine_on_device = mine.to(points.device)
                self._kept.append((ids[mine], points[mine_on_device].clone(),
                                   features[mine_on_device].clone()))
            self._n_chunks += 1
            self._held_from = end
            self._held.drop_before(end)

    def _local(self, buffer: torch.Tensor | None, filled: int, width: int | None = None
               ) -> torch.Tensor:
        """This rank's first ``filled`` rows of ``buffer`` (an empty array when it has none)."""
        if buffer is None:
            return torch.zeros(0, width or self.dim, device=self.device)
        return buffer[:filled]

    def _select(self, blocks: torch.Tensor | None, rows: torch.Tensor, n_points: int,
                n_select: int) -> torch.Tensor:
        started = time.perf_counter()
        if blocks is None:  # no points on this rank: one block of padding
            blocks = torch.zeros(1, self.block_size, self.width, device=self.device)
        # On a GPU in one process the dense search runs without waiting on the host; the lazy
        # one saves work where the host's waits are cheap (a CPU) and exchanges under torchrun.
        search = (_dense_greedy if blocks.device.type == "cuda"
                  and not distributed.is_distributed() else _lazy_greedy)
        chosen = search(blocks, rows, n_points, n_select, self.n_starts, self._generator,
                        self.show_progress)
        self.selection_seconds += time.perf_counter() - started
        return chosen


class _Held:
    """This rank's points not yet reduced: full features and projections in buffers filled batch
    by batch (never concatenated), and the global index ranges of their rows (ascending)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.filled = 0
        self.features: torch.Tensor | None = None
        self.points: torch.Tensor | None = None
        self._ranges: list[tuple[int, int]] = []  # (first global index, count) per batch

    def append(self, features: torch.Tensor, points: torch.Tensor, first_id: int,
               capacity: int | None) -> None:
        needed = self.filled + len(features)
        if self.features is None or needed + self.block_size > len(self.features):
            # Room for the padding of the last block too (the exact rule searches in place).
            size = needed if capacity is None else max(capacity, needed)
            if capacity is None and self.features is not None:
                size = max(size, 2 * len(self.features))  # grow geometrically
            size = (-(-size // self.block_size) + 1) * self.block_size
            features_buffer = features.new_empty(size, features.shape[1], dtype=torch.float32)
            points_buffer = (features_buffer if points is features
                             else points.new_empty(size, points.shape[1]))
            if self.filled:
                features_buffer[:self.filled] = self.features[:self.filled]
                if points_buffer is not features_buffer:
                    points_buffer[:self.filled] = self.points[:self.filled]
            self.features, self.points = features_buffer, points_buffer
        self.features[self.filled:needed] = features
        if self.points is not self.features:
            self.points[self.filled:needed] = points
        self._ranges.append((first_id, len(features)))
        self.filled = needed

    def ids(self) -> torch.Tensor:
        """Global indices of the held rows, ascending."""
        if not self._ranges:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([torch.arange(first, first + count) for first, count in self._ranges])

    def rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global indices, projected points and features of the held rows in [start, end)."""
        ids = self.ids()
        first, last = int(torch.searchsorted(ids, start)), int(torch.searchsorted(ids, end))
        if self.features is None:
            return ids[first:last], torch.zeros(0, 0), torch.zeros(0, 0)
        return ids[first:last], self.points[first:last], self.features[first:last]

    def drop_before(self, end: int) -> None:
        """Forget the rows of global index below ``end``, moving the others to the front."""
        ranges, gone = [], 0
        for first, count in self._ranges:
            dropped = min(count, max(0, end - first))
            gone += dropped
            if dropped < count:
                ranges.append((first + dropped, count - dropped))
        self._ranges = ranges
        if gone == 0:
            return
        remaining = self.filled - gone
        if remaining:
            self.features[:remaining] = self.features[gone:self.filled].clone()
            if self.points is not self.features:
                self.points[:remaining] = self.points[gone:self.filled].clone()
        self.filled = remaining

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
    block_min = torch.full((n_blocks * block_size,), -1.0, device=device)  # padding never wins
    block_min[:n_local] = _start_distances(points, start_points)
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



def _start_distances(points: torch.Tensor, start_points: torch.Tensor) -> torch.Tensor:
    """Each point's first minimum distance: its mean distance to the random starting points,
    squared (the same order, and no square roots in the search's loop). Row slices keep the
    temporaries small next to the points themselves."""
    squared = torch.empty(len(points), device=points.device)
    for first in range(0, len(points), _SLICE_ROWS):
        part = points[first:first + _SLICE_ROWS]
        mean_distance = torch.zeros(len(part), device=points.device)
        for start_point in start_points:
            mean_distance += torch.linalg.vector_norm(part - start_point, dim=1)
        squared[first:first + len(part)] = (mean_distance / len(start_points)).pow_(2)
    return squared


def _dense_greedy(blocks: torch.Tensor, rows: torch.Tensor, n_points: int, n_select: int,
                  n_starts: int, generator: torch.Generator, show_progress: bool
                  ) -> torch.Tensor:
    """The selections of :func:`_lazy_greedy` in one process (``rows`` are 0..N-1), for a GPU:
    each step lowers every point's minimum distance with one matrix-vector product and takes
    the farthest point, all on the device. The host only queues the steps: the lazy search's
    few hundred small products per step would each wait for the GPU.
    """
    width = blocks.shape[2]
    points = blocks.view(-1, width)[:len(rows)]
    device = points.device
    n_starts = min(n_starts, n_points)
    starts = torch.randperm(n_points, generator=generator)[:n_starts]
    min_distance = _start_distances(points, points[starts.to(device)])
    sq_norms = points.pow(2).sum(1)
    selected = torch.empty(n_select, dtype=torch.long, device=device)
    selected_distance = torch.empty(n_select, device=device)
    index = torch.argmax(min_distance).view(1)
    for step in progress(range(n_select), "coreset", enabled=show_progress):
        selected[step:step + 1] = index
        selected_distance[step:step + 1] = min_distance.index_select(0, index)
        centre = points.index_select(0, index).squeeze(0)
        norms = sq_norms + sq_norms.index_select(0, index)
        distances = torch.addmv(norms, points, centre, alpha=-2.0)
        distances.masked_fill_(distances <= 1e-6 * norms, 0.0)  # as in the lazy search
        torch.minimum(min_distance, distances, out=min_distance)
        index = torch.argmax(min_distance).view(1)
    # A step whose farthest point was at distance 0 found every point already covered.
    covered = (selected_distance <= 0.0).nonzero()
    count = int(covered[0]) if len(covered) else n_select
    return selected[:count].cpu()


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
