"""Exact nearest-neighbour search in Euclidean distance, in bounded memory.

Three interchangeable backends compute the same (exact) result up to float rounding:

- ``"torch"``: chunked matrix products on any device;
- ``"faiss"``: faiss-cpu's exhaustive ``IndexFlatL2`` (``pip install 'iadkit[faiss]'``);
- ``"screened"``: a bfloat16 first pass over the whole bank, then exact distances of a few
  candidates, and a proof per query that no other row can be nearer (the queries without one,
  a few, are searched exhaustively; :class:`ScreenedSearch`).

Which is faster on a CPU depends on the CPU: PatchCore's search (12,544 queries, 5,488 x 152
bank) took 24 ms per image with faiss and 9.4 with torch on an Intel Xeon (AVX-512), while on an
AMD EPYC (AVX2) faiss was about twice as fast as torch, whose BLAS (MKL) favours Intel CPUs. On
an AMD EPYC with AVX512-BF16 (7,168 x 152 bank) the screened search took 16.3 ms per image,
faiss 20.7 and torch 27.3 (docs/patchcore.md). ``"auto"`` therefore uses the screened search
for CPU tensors where the CPU has bfloat16 instructions, else faiss when it is installed and
the CPU is not an Intel one, else torch. The choice depends only on the machine, never on
timing.
"""

from __future__ import annotations

import functools
import importlib.util
import platform
from collections.abc import Callable

import torch

from ..validation import Check
from .precision import cpu_has_bfloat16, cpuinfo

BACKENDS = ("auto", "torch", "faiss", "screened")


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def usable_backend(backend: object) -> bool:
    """Whether ``backend`` is one of :data:`BACKENDS` that can run here."""
    return backend in BACKENDS and (backend != "faiss" or faiss_available())


#: The rule of every ``knn_backend`` hyperparameter.
BACKEND_RULE = Check(usable_backend, "one of 'auto', 'torch', 'faiss', 'screened' ('faiss' needs "
                     "faiss-cpu: pip install 'iadkit[faiss]')", ["annoy"])


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown nearest-neighbour backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        if device.type == "cpu" and cpu_has_bfloat16():
            return "screened"
        prefer_faiss = device.type == "cpu" and not _intel_cpu() and faiss_available()
        return "faiss" if prefer_faiss else "torch"
    if backend == "faiss" and not faiss_available():
        raise ImportError("knn backend 'faiss' needs faiss-cpu: pip install 'iadkit[faiss]'")
    return backend


@functools.cache
def _intel_cpu() -> bool:
    """Whether this machine's CPU is an Intel one (torch's MKL matrix products are fastest
    there)."""
    info = cpuinfo()
    if info is not None:
        return "GenuineIntel" in info
    return "intel" in platform.processor().lower()


class FlatIndex:
    """An exact search index over a fixed bank (built once, queried many times).

    Example:
        >>> index = FlatIndex(torch.randn(1000, 64))
        >>> distances, indices = index.search(torch.randn(10, 64), k=3)
    """

    def __init__(self, bank: torch.Tensor, backend: str = "auto") -> None:
        self.bank = bank
        self.backend = resolve_backend(backend, bank.device)
        self._faiss_index = None
        self._screen: ScreenedSearch | None = None
        self._centred: CentredBank | None = None
        if self.backend == "torch":
            self._centred = CentredBank(bank)
        elif self.backend == "screened":
            self._screen = ScreenedSearch(bank)
        elif self.backend == "faiss":
            import faiss

            faiss.omp_set_num_threads(torch.get_num_threads())
            self._faiss_index = faiss.IndexFlatL2(bank.shape[1])
            self._faiss_index.add(bank.detach().float().contiguous().numpy())

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, k) Euclidean distances (ascending) and (M, k) int64 bank indices."""
        k = min(k, self.bank.shape[0])
        if torch.onnx.is_in_onnx_export():
            # The graph centres on the bank itself: one bank in the exported file, not two.
            return nearest_neighbours(queries, self.bank, k)
        if self._faiss_index is not None:
            squared, indices = self._faiss_index.search(
                queries.detach().float().contiguous().numpy(), k)
            distances = torch.from_numpy(squared).clamp_(min=0.0).sqrt_()
            return distances, torch.from_numpy(indices).long()
        if self._screen is not None:
            return self._screen.search(queries, k)
        assert self._centred is not None
        return self._centred.search(queries, k)


class ScreenedSearch:
    """Exact nearest bank rows through a bfloat16 first pass and a proof per query.

    With every vector centred on the bank's mean ``c`` (distances do not change, norms and the
    error bound shrink), ``||q - y||^2 = ||q||^2 + ||y||^2 - 2 q.y`` is one bfloat16 matrix
    product (about three times faster than float32 on a CPU with bfloat16 instructions):
    ``[q, 1, 1, hi(q), lo(q)] . [-2 y, hi(y), lo(y), 1, 1]``, where ``hi + lo`` is a squared
    norm to 16 bits, accumulated in float32, rounded once to bfloat16. The result is a squared
    distance, so not negative unless a query lies within the rounding error of a bank row, and
    non-negative bfloat16 numbers order as their bit patterns read as int16 integers do: every
    reduction over the product runs on those integers (vectorised, where bfloat16 reductions
    are not: six times faster on an AMX Xeon). The bank is cut into groups of ``group`` rows;
    a query's ``k + extra`` candidates are the smallest rows of its ``k + extra`` groups with
    the smallest minima, and their exact distances are computed from the differences in
    float32. Each answer is then proven: the first pass errs on any pair by at most twice
    ``|q - q~| |y| + |q~| |y - y~|`` (Cauchy-Schwarz on the bfloat16 rounding residues), plus
    the float32 accumulation, plus the final rounding, which is monotonic, so every row left
    out is bounded below through the smallest first-pass value left out (the second smallest
    of each group taken, the minimum of the next group). When that bound is not below the
    k-th exact distance found, no other row can be nearer. The queries without the proof, and
    every query of a bank with fewer than ``k + extra`` groups, are searched exhaustively in
    float32. The neighbours are the exhaustive search's (ties aside), their
    distances computed directly from the differences (no cancellation), whatever the data;
    only the share of queries proven, hence the time saved, depends on it.

    Example:
        >>> search = ScreenedSearch(torch.randn(2000, 96))
        >>> distances, indices = search.search(torch.randn(50, 96), k=1)
    """

    #: Candidates kept beyond the k asked (measured on PatchCore's bank: docs/patchcore.md).
    extra = 3
    #: Bank rows per group: a query's candidates are the smallest rows of the groups with the
    #: smallest first-pass minima (a minimum per group is cheap, a top-k over the bank is not).
    group = 128

    def __init__(self, bank: torch.Tensor, max_elements: int = 1 << 23) -> None:
        self.bank = bank
        # Queries per product: the bfloat16 product re-packs the bank for every call, so 2**23
        # values (16 MB; 1,170 queries against 7,168 rows) took half the time of 2**21 per
        # query on an AMX Xeon, and 2**25 was slower again (the result leaves the cache).
        self.max_elements = max_elements
        # Also the exhaustive search of the queries without a proof.
        self._centred = CentredBank(bank)
        self.centre = self._centred.centre
        centred, sq_norms = self._centred.rows, self._centred.sq_norms
        rounded = centred.to(torch.bfloat16)
        ones = rounded.new_ones(len(bank), 2)
        keys = torch.cat([-2 * rounded, _split(sq_norms), ones], dim=1)
        # Padded to whole groups with rows whose first-pass value is +inf (0 on the vector's
        # columns, inf on the norm's), never a candidate.
        padding = keys.new_zeros(-len(keys) % self.group, keys.shape[1])
        padding[:, -4] = float("inf")
        self.keys = torch.cat([keys, padding])
        self._largest_norm = float(sq_norms.max().sqrt())
        self._largest_sq_norm = float(sq_norms.max())
        self._largest_residue = float(torch.linalg.vector_norm(centred - rounded.float(),
                                                               dim=1).max())
        #: Queries of the last :meth:`search` without a proof (searched exhaustively).
        self.unproven = 0

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, k) Euclidean distances (ascending) and (M, k) int64 bank indices."""
        k = min(k, self.bank.shape[0])
        if len(queries) == 0:
            return queries.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long,
                                                        device=queries.device)
        if len(self.keys) < (k + self.extra) * self.group:
            # Fewer groups than candidates: a bank this small is searched exhaustively.
            distances, indices = queries.new_empty(len(queries), k), torch.empty(
                len(queries), k, dtype=torch.long, device=queries.device)
            unproven = torch.arange(len(queries), device=queries.device)
        else:
            # keys: the bank padded to whole groups, the product's width
            chunk = max(1, self.max_elements // max(1, len(self.keys)))
            found = [self._search_chunk(part, k) for part in queries.split(chunk)]
            distances, indices = torch.cat([d for d, _, _ in found]), torch.cat(
                [i for _, i, _ in found])
            unproven = torch.cat([u for *_, u in found]).nonzero()[:, 0]
        self.unproven = len(unproven)
        if len(unproven):
            # One exhaustive search for all chunks' queries without a proof: each call reads
            # the whole bank.
            _, exhaustive = self._centred.search(queries[unproven], k)
            indices[unproven] = exhaustive
            distances[unproven] = self._distances(queries[unproven], exhaustive)
        return distances, indices

    def _search_chunk(self, queries: torch.Tensor, k: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M, k) distances and indices of the candidates, and (M,) whether each query's
        answer lacks a proof."""
        centred = queries - self.centre
        rounded = centred.to(torch.bfloat16)
        sq_norms = centred.pow(2).sum(dim=1)
        # Kept in bfloat16 (as the product rounded it) and read as int16 (see the class).
        first_pass = self._first_pass(rounded, sq_norms).view(torch.int16)
        count = k + self.extra
        # The candidates: the row of the smallest value in each of the ``count`` groups with
        # the smallest minima. Every other row is at least the second smallest value of its
        # group, if its group was taken, or the next group's minimum: a bound over all rows
        # but the candidates, so never below the smallest value that a top-k of as many
        # candidates leaves out (a top-k over the taken groups cost three times as much).
        # Negative values (a query within rounding of a bank row) read as integers below
        # every other, in reverse order among themselves: either each is alone in its group
        # and a candidate, or the bound is negative and no proof holds.
        grouped = first_pass.view(len(queries), -1, self.group)
        minima = grouped.amin(dim=2)
        taken = min(count + 1, minima.shape[1])
        group_minima, groups = minima.topk(taken, dim=1, largest=False, sorted=True)
        # (M, count, group): whole groups picked from the flattened rows (index_select copies
        # each group in one piece: four times faster than indexing with [rows, groups]).
        first_groups = torch.arange(len(queries), device=queries.device)[:, None] * grouped.shape[1]
        values = grouped.reshape(-1, self.group).index_select(
            0, (first_groups + groups[:, :count]).flatten()).view(len(queries), count, self.group)
        positions = values.argmin(dim=2)
        candidates = groups[:, :count] * self.group + positions
        # Each candidate's own value masked: a row tied with it reads as its equal.
        outside = values.scatter(2, positions[..., None], torch.iinfo(torch.int16).max
                                 ).amin(dim=2).amin(dim=1)
        if taken > count:
            outside = torch.minimum(outside, group_minima[:, count])
        outside = outside.view(torch.bfloat16).float()
        distances, order = self._distances(queries, candidates).sort(dim=1)
        distances, indices = distances[:, :k], candidates.gather(1, order[:, :k])
        unproven = self._unproven(centred, rounded.float(), sq_norms, outside,
                                  distances[:, -1].square())
        return distances, indices, unproven

    def _first_pass(self, rounded: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
        """(M, D) queries centred and rounded to bfloat16, (M,) their squared norms -> the
        (M, padded bank) bfloat16 product: squared distances to its rounding."""
        ones = rounded.new_ones(len(rounded), 2)
        return torch.cat([rounded, ones, _split(sq_norms)], dim=1) @ self.keys.T

    def _distances(self, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(M, D) queries, (M, c) bank indices -> (M, c) distances, from the differences."""
        neighbours = self.bank.index_select(0, rows.flatten()).view(*rows.shape, -1)
        return torch.linalg.vector_norm(queries[:, None] - neighbours, dim=2)

    def _unproven(self, centred: torch.Tensor, rounded: torch.Tensor, sq_norms: torch.Tensor,
                  outside: torch.Tensor, kth: torch.Tensor) -> torch.Tensor:
        """Whether each query's k-th exact squared distance ``kth`` might exceed the distance
        of a row left out, the smallest first-pass value of those rows being ``outside`` and
        the query's squared norm ``sq_norms``."""
        float_unit, bfloat_unit = torch.finfo(torch.float32).eps / 2, 2.0 ** -8
        offsets = _split(sq_norms).float().sum(dim=1)  # ||q||^2 as the product held it
        rounded_norms = torch.linalg.vector_norm(rounded, dim=1)
        residues = torch.linalg.vector_norm(centred - rounded, dim=1)
        size = centred.shape[1] + 4
        # The final rounding: a sum s rounded to p has s >= p - u|p| / (1 - u), increasing in
        # p, so every row left out has s >= that of ``outside``.
        lowest = outside - bfloat_unit / (1 - bfloat_unit) * outside.abs()
        # Cauchy-Schwarz on the rounding residues (2 q.y is the product), the float32
        # accumulation of D + 4 terms, ||y||^2 split in two bfloat16 parts (u^2 of it), and
        # the float32 norms, centring and exact distances (a few D u32 of each).
        error = 2 * (residues * self._largest_norm + rounded_norms * self._largest_residue)
        error += size * float_unit * (2 * rounded_norms * (self._largest_norm
                                                           + self._largest_residue)
                                      + self._largest_sq_norm + offsets.abs())
        error += bfloat_unit ** 2 * self._largest_sq_norm
        error += 4 * size * float_unit * (sq_norms + self._largest_sq_norm + kth)
        # The product holds ||q||^2 as ``offsets`` (hi + lo, summed here in float32: its
        # rounding, u |offsets|, is within the accumulation term above).
        return lowest - error - offsets + sq_norms < kth


def _split(values: torch.Tensor) -> torch.Tensor:
    """(N,) float32 -> (N, 2) bfloat16 ``hi, lo`` with ``hi + lo`` the value to 16 bits."""
    high = values.to(torch.bfloat16)
    low = (values - high.float()).to(torch.bfloat16)
    return torch.stack([high, low], dim=1)


class CentredBank:
    """A bank centred on its mean, with its rows' squared norms: what the exhaustive search
    multiplies, computed once for a bank searched many times.

    Squared distances are expanded as ``||q||^2 + ||y||^2 - 2 q.y`` (one matrix product), with
    queries and bank centred on the bank's mean first: the expansion's rounding grows with the
    norms, and features far from the origin (all positive after a ReLU, say) would otherwise
    lose the small distances to it. Queries are processed in chunks so that the distance
    matrix never exceeds ``max_elements`` entries: by default 2**21 on a CPU (8 MB in float32:
    small enough to stay in cache, which matters because the distance matrix, not the
    arithmetic, bounds the speed) and 2**27 on a GPU (512 MB: thousands of queries per
    product, where small products would leave it idle). The centred copy costs the memory of
    one more bank, which a search of the uncentred bank would allocate anyway.

    Example:
        >>> bank = CentredBank(torch.randn(1000, 64) + 1000)
        >>> distances, indices = bank.search(torch.randn(10, 64) + 1000, k=3)
    """

    def __init__(self, bank: torch.Tensor, max_elements: int | None = None) -> None:
        self.centre = bank.mean(dim=0)
        self.rows = bank - self.centre
        self.sq_norms = self.rows.pow(2).sum(dim=1)
        if max_elements is None:
            max_elements = 1 << 21 if bank.device.type == "cpu" else 1 << 27
        self.max_elements = max_elements

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, k) Euclidean distances (ascending) and (M, k) int64 bank indices."""
        return self.search_centred(queries - self.centre, k)

    def search_centred(self, queries: torch.Tensor, k: int = 1
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`search` for queries already centred on :attr:`centre`."""
        chunk = max(1, self.max_elements // max(1, self.rows.shape[0]))
        if torch.onnx.is_in_onnx_export():  # an exported graph has no loop: one distance matrix
            chunk = queries.shape[0]
        all_distances, all_indices = [], []
        for start in range(0, queries.shape[0], chunk):
            part = queries[start:start + chunk]
            # ||y||^2 - 2 q.y: the query's own squared norm, the same along a row, is added to
            # the k smallest only (adding and clamping are monotonic, so they are the same
            # entries, and the matrix is read once less, written once less).
            partial = torch.addmm(self.sq_norms.unsqueeze(0), part, self.rows.T, alpha=-2.0)
            if k == 1:
                values, indices = partial.min(dim=1, keepdim=True)
            else:
                values, indices = partial.topk(k, dim=1, largest=False)
            values = values.add_(part.pow(2).sum(1, keepdim=True)).clamp_(min=0.0)
            all_distances.append(values.sqrt_())
            all_indices.append(indices)
        return torch.cat(all_distances), torch.cat(all_indices)


def nearest_neighbours(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    max_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and indices of the ``k`` nearest bank rows of each query, in bounded memory
    (a :class:`CentredBank` made for this one call: keep one for a bank searched many times).

    Returns:
        (M, k) Euclidean distances (ascending) and (M, k) int64 indices into ``bank``.
    """
    return CentredBank(bank, max_elements).search(queries, k)


def held_out_nearest_distances(
    patches_of: Callable[[torch.Tensor], torch.Tensor],
    n_images: int,
    generator: torch.Generator,
    held_out_share: float = 0.1,
    max_queries: int = 4096,
    bank_size: int = 65536,
    batch_size: int = 16,
) -> torch.Tensor:
    """How far normal patches lie from each other: the distance of patches of held-out images
    to their nearest patch of the other images.

    A seeded ``held_out_share`` of the images (at least one) gives the queries, about
    ``max_queries`` patches drawn evenly from them; the bank is about ``bank_size`` patches
    drawn evenly from the remaining images. Every image's patches are read once and only the
    drawn ones are kept, so memory does not grow with the number of images.

    Args:
        patches_of: image indices (B,) -> their patch features (B * P, D), P per image.
        n_images: how many images there are (at least two).
        generator: the source of every random draw (seed it for a reproducible result).

    Returns:
        (Q,) distances, Q <= max_queries.

    Example:
        >>> grid = torch.randn(10, 49, 8)
        >>> d = held_out_nearest_distances(lambda i: grid[i].flatten(0, 1), 10,
        ...                                torch.Generator().manual_seed(0))
        >>> d.shape
        torch.Size([49])
    """
    if n_images < 2:
        raise ValueError(f"held_out_nearest_distances needs two images or more, got {n_images}")
    order = torch.randperm(n_images, generator=generator)
    n_held = min(n_images - 1, max(1, round(held_out_share * n_images)))
    held, rest = order[:n_held].sort().values, order[n_held:].sort().values

    def drawn(images: torch.Tensor, total: int) -> torch.Tensor:
        """About ``total`` patches drawn evenly (at random within each image) from ``images``."""
        per_image = -(-total // len(images))
        parts = []
        for indices in images.split(batch_size):
            patches = patches_of(indices)
            patches = patches.reshape(len(indices), -1, patches.shape[-1])
            keep = min(per_image, patches.shape[1])
            chosen = torch.rand(patches.shape[:2], generator=generator).argsort(dim=1)[:, :keep]
            rows = torch.arange(len(indices), device=patches.device)[:, None]
            parts.append(patches[rows, chosen.to(patches.device)].flatten(0, 1))
        return torch.cat(parts)

    bank = drawn(rest, bank_size)
    queries = drawn(held, max_queries)[:max_queries]
    return nearest_neighbours(queries, bank)[0][:, 0]
