"""Exact nearest-neighbour search in Euclidean distance, in bounded memory.

Two interchangeable backends compute the same (exact) result up to float rounding:

- ``"torch"``: chunked matrix products on any device;
- ``"faiss"``: faiss-cpu's exhaustive ``IndexFlatL2`` (``pip install 'iadkit[faiss]'``).

Which is faster on a CPU depends on the CPU: PatchCore's search (12,544 queries, 5,488 x 152
bank) took 24 ms per image with faiss and 9.4 with torch on an Intel Xeon (AVX-512), while on an
AMD EPYC (AVX2) faiss was about twice as fast as torch, whose BLAS (MKL) favours Intel CPUs.
``"auto"`` therefore uses faiss for CPU tensors when it is installed and the CPU is not an
Intel one, and torch otherwise. The choice depends only on the machine, never on timing.
"""

from __future__ import annotations

import functools
import importlib.util
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from ..validation import Check

BACKENDS = ("auto", "torch", "faiss")


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def usable_backend(backend: object) -> bool:
    """Whether ``backend`` is one of :data:`BACKENDS` that can run here."""
    return backend in BACKENDS and (backend != "faiss" or faiss_available())


#: The rule of every ``knn_backend`` hyperparameter.
BACKEND_RULE = Check(usable_backend, "one of 'auto', 'torch', 'faiss' ('faiss' needs faiss-cpu: "
                     "pip install 'iadkit[faiss]')", ["annoy"])


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown nearest-neighbour backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        prefer_faiss = device.type == "cpu" and not _intel_cpu() and faiss_available()
        return "faiss" if prefer_faiss else "torch"
    if backend == "faiss" and not faiss_available():
        raise ImportError("knn backend 'faiss' needs faiss-cpu: pip install 'iadkit[faiss]'")
    return backend


@functools.cache
def _intel_cpu() -> bool:
    """Whether this machine's CPU is an Intel one (torch's MKL matrix products are fastest
    there)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        return "GenuineIntel" in cpuinfo.read_text(errors="replace")
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
        self._bank_sq_norms: torch.Tensor | None = None
        if self.backend == "torch":
            self._bank_sq_norms = bank.pow(2).sum(1)
        else:
            import faiss

            faiss.omp_set_num_threads(torch.get_num_threads())
            self._faiss_index = faiss.IndexFlatL2(bank.shape[1])
            self._faiss_index.add(bank.detach().float().contiguous().numpy())

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, k) Euclidean distances (ascending) and (M, k) int64 bank indices."""
        k = min(k, self.bank.shape[0])
        if self._faiss_index is not None and not torch.onnx.is_in_onnx_export():
            squared, indices = self._faiss_index.search(
                queries.detach().float().contiguous().numpy(), k)
            distances = torch.from_numpy(squared).clamp_(min=0.0).sqrt_()
            return distances, torch.from_numpy(indices).long()
        return nearest_neighbours(queries, self.bank, k, bank_sq_norms=self._bank_sq_norms)


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
    if torch.onnx.is_in_onnx_export():  # an exported graph has no loop: one distance matrix
        chunk = queries.shape[0]
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
