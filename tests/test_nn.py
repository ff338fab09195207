"""Shared blocks: coreset, nearest neighbours, smoothing, patch features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from iadkit.methods.patchcore.patch_features import LocalPatchFeatures
from iadkit.nn import coreset
from iadkit.nn.anomaly_maps import UpsampleBlur, gaussian_blur
from iadkit.nn.coreset import OVERSAMPLING, StreamingCoreset, greedy_coreset
from iadkit.nn.knn import FlatIndex, held_out_nearest_distances, nearest_neighbours


def plain_greedy_coreset(features: torch.Tensor, ratio: float, projection_dim: int = 128,
                         n_starts: int = 10, seed: int = 0) -> torch.Tensor:
    """The textbook loop: update every point's minimum distance after every selection."""
    n, dim = features.shape
    generator = torch.Generator().manual_seed(seed)
    points = features
    if projection_dim < dim:
        points = features @ (torch.randn(dim, projection_dim, generator=generator)
                             / projection_dim**0.5)
    starts = torch.randperm(n, generator=generator)[:n_starts]
    min_distance = torch.stack([(points - points[s]).norm(dim=1) for s in starts], 1).mean(1)
    chosen = []
    for _ in range(max(1, int(ratio * n))):
        index = int(torch.argmax(min_distance))
        chosen.append(index)
        min_distance = torch.minimum(min_distance, (points - points[index]).norm(dim=1))
    return torch.tensor(chosen)


def correlated_features(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(n, dim) seeded Gaussian features with correlated channels. Seeded because the greedy
    searches compare squared distances expanded through matrix products while the reference
    loops take norms of differences: on unseeded draws a near tie between two farthest points
    was ordered differently by the rounding about once in 25 runs."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator) @ torch.randn(dim, dim, generator=generator)


@pytest.mark.parametrize("n,dim,ratio", [(3000, 200, 0.02), (2000, 16, 0.05), (700, 64, 0.3)])
def test_lazy_coreset_selects_exactly_what_the_plain_loop_selects(n: int, dim: int,
                                                                  ratio: float) -> None:
    features = correlated_features(n, dim)
    lazy = greedy_coreset(features, ratio, block_size=64)
    assert torch.equal(lazy, plain_greedy_coreset(features, ratio))
    assert lazy.unique().numel() == int(ratio * n)


def test_coreset_is_deterministic_and_stops_on_duplicates() -> None:
    features = torch.randn(500, 8)
    assert torch.equal(greedy_coreset(features, 0.1, seed=3), greedy_coreset(features, 0.1, seed=3))
    duplicates = torch.randn(5, 8).repeat(40, 1)  # 200 points, 5 distinct
    chosen = greedy_coreset(duplicates, 0.5)
    assert chosen.numel() == 5 and duplicates[chosen].unique(dim=0).shape[0] == 5
    with pytest.raises(ValueError, match="sampling_ratio"):
        greedy_coreset(features, 0.0)


@pytest.mark.parametrize("n,dim,ratio", [(3000, 200, 0.02), (700, 64, 0.3)])
def test_the_gpus_dense_coreset_search_selects_what_the_plain_loop_selects(
        n: int, dim: int, ratio: float, monkeypatch: pytest.MonkeyPatch) -> None:
    # The search a GPU runs, run here on the CPU in the lazy search's place.
    monkeypatch.setattr(coreset, "_lazy_greedy", coreset._dense_greedy)
    features = correlated_features(n, dim)
    assert torch.equal(greedy_coreset(features, ratio), plain_greedy_coreset(features, ratio))
    duplicates = torch.randn(5, 8).repeat(40, 1)
    chosen = greedy_coreset(duplicates, 0.5)
    assert chosen.numel() == 5 and duplicates[chosen].unique(dim=0).shape[0] == 5


def plain_greedy(points: torch.Tensor, n_select: int, generator: torch.Generator,
                 n_starts: int = 10) -> torch.Tensor:
    """The textbook loop over already projected points, drawing its starts from ``generator``."""
    starts = torch.randperm(len(points), generator=generator)[:n_starts]
    min_distance = torch.stack([(points - points[s]).norm(dim=1) for s in starts], 1).mean(1)
    chosen = []
    for _ in range(n_select):
        index = int(torch.argmax(min_distance))
        chosen.append(index)
        min_distance = torch.minimum(min_distance, (points - points[index]).norm(dim=1))
    return torch.tensor(chosen)


def test_streamed_batches_select_the_one_shot_coreset_by_the_exact_rule() -> None:
    features = correlated_features(3000, 150)
    coreset = StreamingCoreset(150, 0.02, block_size=64, memory_points=3000)
    for batch in features.split(431):  # uneven batches, the last one short
        coreset.add(batch, len(batch))
    indices, bank = coreset.finish()
    assert coreset.rule == "exact" and coreset.n_chunks == 1
    assert torch.equal(indices, plain_greedy_coreset(features, 0.02))
    assert torch.equal(bank, features[indices])


@pytest.mark.parametrize("projection_dim", [32, None])
def test_chunked_rule_selects_among_each_chunks_own_greedy_selections(
        projection_dim: int | None) -> None:
    features = correlated_features(2500, 48)
    # More than the budget of 1,000: chunks of 800 points (cutting batches), the last of 100.
    ratio, batch = 0.04, 150
    coreset = StreamingCoreset(48, ratio, projection_dim, seed=5, memory_points=1000,
                               chunk_points=800, block_size=32)
    for part in features.split(batch):
        coreset.add(part, len(part))
    indices, bank = coreset.finish()
    assert coreset.rule == "chunked" and coreset.n_chunks == 4
    # The rule written out: per chunk the greedy keeps OVERSAMPLING x the ratio, and the greedy
    # over the kept points (in ascending order) picks the coreset; one generator throughout.
    generator = torch.Generator().manual_seed(5)
    points = features
    if projection_dim is not None:
        points = features @ (torch.randn(48, projection_dim, generator=generator)
                             / projection_dim**0.5)
    kept = []
    for start in range(0, 2500, 800):
        chunk = points[start:start + 800]
        n_keep = max(1, int(OVERSAMPLING * ratio * len(chunk)))
        kept.append(start + plain_greedy(chunk, n_keep, generator))
    kept = torch.cat(kept).sort().values
    expected = kept[plain_greedy(points[kept], int(ratio * 2500), generator)]
    assert torch.equal(indices, expected)
    assert torch.equal(bank, features[expected])


def test_a_chunk_budget_above_the_data_changes_nothing_and_bad_arguments_are_refused() -> None:
    features = torch.randn(600, 20)
    unbounded = StreamingCoreset(20, 0.1)
    bounded = StreamingCoreset(20, 0.1, memory_points=600, chunk_points=100)
    for part in features.split(70):
        unbounded.add(part, len(part))
        bounded.add(part, len(part))
    assert torch.equal(unbounded.finish()[0], bounded.finish()[0])
    with pytest.raises(ValueError, match="memory_points"):
        StreamingCoreset(20, 0.1, memory_points=0)
    with pytest.raises(ValueError, match="chunk_points"):
        StreamingCoreset(20, 0.1, chunk_points=0)
    with pytest.raises(ValueError, match=r"expected \(5, 20\) features"):
        StreamingCoreset(20, 0.1).add(torch.randn(5, 21), 5)
    with pytest.raises(ValueError, match="no points"):
        StreamingCoreset(20, 0.1).finish()


def test_nearest_neighbours_equal_brute_force_with_tiny_chunks() -> None:
    queries, bank = torch.randn(50, 12), torch.randn(300, 12)
    distances, indices = nearest_neighbours(queries, bank, k=3, max_elements=500)
    brute = torch.cdist(queries, bank).topk(3, largest=False)
    assert torch.equal(indices, brute.indices)
    assert torch.allclose(distances, brute.values, atol=1e-4)


def test_nearest_neighbours_stay_exact_far_from_the_origin() -> None:
    # Features at 1,000 on each of 16 axes, spread 0.1: expanded uncentred, each squared
    # distance (about 0.3) would be the difference of terms of about 1.6 * 10**7, whose float32
    # rounding (about 1) is larger than the distance itself.
    generator = torch.Generator().manual_seed(0)
    queries, bank = (1000 + 0.1 * torch.randn(shape, generator=generator)
                     for shape in ((60, 16), (400, 16)))
    brute = torch.cdist(queries.double(), bank.double()).topk(2, largest=False)
    # once, and through an index that centres its bank once for every search
    for distances, indices in (nearest_neighbours(queries, bank, k=2),
                               FlatIndex(bank, "torch").search(queries, k=2)):
        assert torch.equal(indices, brute.indices)
        assert torch.allclose(distances.double(), brute.values, rtol=1e-3)


def test_held_out_patches_are_measured_against_the_other_images_only() -> None:
    # Image i's 12 patches all sit at i along the first axis: a held-out image's nearest
    # patch of another image is exactly 1 away (0 if its own patches were in the bank).
    grid = torch.zeros(10, 12, 4)
    grid[:, :, 0] = torch.arange(10.0)[:, None]
    seen: list[torch.Tensor] = []

    def patches_of(indices: torch.Tensor) -> torch.Tensor:
        seen.append(indices)
        return grid[indices].flatten(0, 1)

    distances = held_out_nearest_distances(patches_of, 10, torch.Generator().manual_seed(3),
                                           bank_size=30, batch_size=4)
    torch.testing.assert_close(distances, torch.ones(12))  # one image held out: its 12
    assert sorted(torch.cat(seen).tolist()) == list(range(10))  # every image read once
    with pytest.raises(ValueError, match="two images"):
        held_out_nearest_distances(patches_of, 1, torch.Generator())


@pytest.mark.parametrize("size", [(64, 48), (10, 9)])
def test_gaussian_blur_equals_scipy(size: tuple[int, int]) -> None:
    maps = np.random.default_rng(0).random((2, *size)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(maps), sigma=4.0).numpy()
    expected = np.stack([ndimage.gaussian_filter(m, sigma=4.0, truncate=4.0) for m in maps])
    assert np.allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("grid_shape,size,sigma", [((7, 5), (40, 30), 4.0),
                                                   ((32, 32), (256, 256), 4.0),
                                                   ((3, 9), (20, 70), 1.5)])
def test_upsample_blur_equals_upsampling_then_blurring(grid_shape: tuple, size: tuple,
                                                       sigma: float) -> None:
    grid = torch.rand(4, *grid_shape)
    upsampled = torch.nn.functional.interpolate(grid.unsqueeze(1), size=size,
                                                mode="bilinear", align_corners=False)
    expected = gaussian_blur(upsampled.squeeze(1), sigma)
    assert torch.allclose(UpsampleBlur()(grid, size, sigma), expected, atol=1e-5)


def test_local_patch_features_grid_and_width() -> None:
    levels = [torch.rand(2, 24, 16, 16), torch.rand(2, 40, 8, 8), torch.rand(2, 112, 4, 4)]
    assert LocalPatchFeatures(3)(levels).shape == (2, 176, 16, 16)
    assert LocalPatchFeatures(3, grid_level=1)(levels).shape == (2, 176, 8, 8)


def test_local_patch_features_count_the_outside_of_the_map_as_zeros() -> None:
    # As the official code's zero-padded unfold and anomalib: a constant map is damped at the
    # border (6 of 9 neighbours inside at an edge, 4 of 9 at a corner), unchanged inside.
    features = LocalPatchFeatures(3)([torch.ones(1, 2, 6, 6)])
    assert torch.allclose(features[0, :, 2:4, 2:4], torch.ones(2, 2, 2))
    assert torch.allclose(features[0, :, 0, 2], torch.full((2,), 6 / 9))
    assert torch.allclose(features[0, :, 0, 0], torch.full((2,), 4 / 9))


def test_flat_index_backends_agree_with_brute_force() -> None:
    from iadkit.nn.knn import faiss_available

    queries, bank = torch.randn(200, 24), torch.randn(900, 24)
    brute = torch.cdist(queries, bank).topk(4, largest=False)
    backends = ["torch"] + (["faiss"] if faiss_available() else [])
    for backend in backends:
        distances, indices = FlatIndex(bank, backend).search(queries, k=4)
        assert torch.equal(indices, brute.indices), backend
        assert torch.allclose(distances, brute.values, atol=1e-4), backend
    with pytest.raises(ValueError, match="unknown nearest-neighbour backend"):
        FlatIndex(bank, "annoy")


def test_screened_search_finds_the_exact_nearest_rows() -> None:
    from iadkit.nn.knn import ScreenedSearch

    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(3000, 8, generator=generator) @ torch.randn(8, 64, generator=generator)
    low_rank += 0.05 * torch.randn(3000, 64, generator=generator)
    isotropic = torch.randn(3000, 64, generator=generator) + 3.0
    # each row next to its near twin: a query's two nearest rows share a group, and its
    # candidates are one row per group
    twins = (low_rank.repeat_interleave(2, dim=0)[:3000]
             + 0.1 * torch.randn(3000, 64, generator=generator))
    for data in (low_rank, isotropic, twins):
        # ties: duplicated bank rows, and queries equal to bank rows
        bank = torch.cat([data[:1000], data[:100]])
        queries = torch.cat([data[1000:1500], data[:50]])
        exact = torch.cdist(queries.double(), bank.double(),
                            compute_mode="donot_use_mm_for_euclid_dist")
        for k in (1, 3):
            search = ScreenedSearch(bank, max_elements=1 << 16)
            distances, indices = search.search(queries, k)
            nearest = exact.topk(k, dim=1, largest=False).values
            # the rows found are k nearest ones (tied rows in any order), distances exact
            torch.testing.assert_close(exact.gather(1, indices).sort(dim=1).values, nearest,
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(distances.double(), nearest, rtol=1e-5, atol=1e-6)
        # (distances, not indices: tied rows may come in either order)
        torch.testing.assert_close(FlatIndex(bank, "screened").search(queries)[0],
                                   search.search(queries)[0])
        if data is not twins:
            # Most single nearest rows of spread-out data are proven by the first pass alone.
            assert search.unproven < 0.1 * len(queries)
    # A bank smaller than one group, searched exhaustively
    distances, indices = ScreenedSearch(bank[:4]).search(queries, 3)
    torch.testing.assert_close(distances.double(), torch.cdist(
        queries.double(), bank[:4].double()).topk(3, dim=1, largest=False).values, rtol=1e-5,
        atol=1e-6)
    # Queries within the first pass's rounding of many bank rows (a tight cluster far from
    # the centre): first-pass values around zero, negative ones among them, whose integer
    # order is reversed: no proof holds, and the exhaustive search answers.
    centre = 30 * torch.ones(64)
    cluster = centre + 0.05 * torch.randn(40, 64, generator=generator)
    bank = torch.cat([torch.randn(1000, 64, generator=generator), cluster])
    queries = centre + 0.05 * torch.randn(20, 64, generator=generator)
    search = ScreenedSearch(bank)
    centred = queries - search.centre
    assert search._first_pass(centred.bfloat16(), centred.pow(2).sum(1)).lt(0).any()
    distances, indices = search.search(queries, 2)
    assert search.unproven == len(queries)
    assert torch.equal(indices, nearest_neighbours(queries, bank, 2)[1])
    torch.testing.assert_close(distances, (queries[:, None] - bank[indices]).norm(dim=2))
    # Rows all at one distance from the query: nothing can be proven, the exhaustive search
    # answers.
    sphere = 10 * F.normalize(torch.randn(1000, 32, generator=generator), dim=1)
    search = ScreenedSearch(sphere)
    distances, _ = search.search(torch.zeros(3, 32))
    assert search.unproven == 3
    torch.testing.assert_close(distances, torch.full((3, 1), 10.0))
