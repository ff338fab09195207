"""Tiles over large images and the stitching of their maps (iadkit.data.tiling)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from iadkit.data.tiling import Stitcher, TileGrid


def stitched(grid: TileGrid, tile_maps: np.ndarray, batch: int = 3) -> np.ndarray:
    stitcher = Stitcher(grid)
    for start in range(0, len(grid), batch):
        stitcher.add(grid.origins[start:start + batch], tile_maps[start:start + batch])
    return stitcher.result()


@pytest.mark.parametrize(("height", "width", "overlap"),
                         [(300, 500, 0.25), (64, 1000, 0.5), (257, 256, 0.0), (40, 70, 0.25)])
def test_tiles_cover_every_pixel_and_stay_inside(height: int, width: int, overlap: float) -> None:
    grid = TileGrid(height, width, tile_size=64 if height < 64 else 128, overlap=overlap)
    covered = np.zeros(grid.padded_shape, bool)
    for top, left in grid.origins:
        assert top + grid.tile_size <= grid.padded_shape[0]
        assert left + grid.tile_size <= grid.padded_shape[1]
        covered[top:top + grid.tile_size, left:left + grid.tile_size] = True
    assert covered.all()
    # Neighbours never overlap less than asked (only the last ones more).
    lefts = sorted({left for _, left in grid.origins})
    assert all(b - a <= grid.stride for a, b in itertools.pairwise(lefts))


def test_cut_tiles_hold_the_image_and_small_images_are_padded() -> None:
    image = np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    grid = TileGrid(300, 500, tile_size=128, overlap=0.25)
    tiles = grid.cut(image)
    assert tiles.shape == (len(grid), 128, 128, 3)
    for (top, left), tile in zip(grid.origins, tiles):
        assert np.array_equal(tile, image[top:top + 128, left:left + 128])
    assert np.array_equal(grid.cut(image, 2, 4), tiles[2:4])
    small = TileGrid(40, 50, tile_size=64)
    (tile,) = small.cut(image[:40, :50])
    assert tile.shape == (64, 64, 3)
    assert np.array_equal(tile[:40, :50], image[:40, :50])
    assert np.array_equal(tile[50], tile[39])  # edge rows and columns repeated
    assert np.array_equal(tile[:, 60], tile[:, 49])
    with pytest.raises(ValueError, match="40 x 50"):
        small.cut(image)


def test_constant_tiles_stitch_to_a_constant_and_position_maps_come_back() -> None:
    grid = TileGrid(300, 500, tile_size=128, overlap=0.25)
    assert np.allclose(stitched(grid, np.full((len(grid), 128, 128), 2.5, np.float32)), 2.5)
    rows, cols = np.mgrid[:300, :500].astype(np.float32)
    smooth = np.sin(rows / 40) + cols / 100
    tile_maps = grid.cut(smooth)
    assert np.allclose(stitched(grid, tile_maps), smooth, atol=1e-5)
    # Small images: the padding is cut off again.
    small = TileGrid(40, 70, tile_size=64)
    assert np.allclose(stitched(small, small.cut(smooth[:40, :70])), smooth[:40, :70],
                       atol=1e-5)


def test_disagreeing_tiles_blend_without_a_seam() -> None:
    """Each tile's map is offset by its own constant: a box average would jump by the offsets'
    difference where a tile ends; the window passes from one to the next smoothly."""
    grid = TileGrid(128, 448, tile_size=128, overlap=0.5)
    offsets = np.arange(len(grid), dtype=np.float32)  # neighbours differ by 1
    result = stitched(grid, np.ones((len(grid), 128, 128), np.float32) * offsets[:, None, None])
    step = np.abs(np.diff(result, axis=1)).max()
    assert step < 0.05
    assert result[:, 0].max() == pytest.approx(0, abs=1e-3)
    assert result[:, -1].min() == pytest.approx(offsets[-1], abs=1e-3)


def test_bad_grids_and_incomplete_stitching_are_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        TileGrid(100, 100, tile_size=64, overlap=1.0)
    with pytest.raises(ValueError, match="tile_size"):
        TileGrid(100, 100, tile_size=0)
    grid = TileGrid(100, 200, tile_size=64, overlap=0.25)
    stitcher = Stitcher(grid)
    stitcher.add(grid.origins[:1], np.zeros((1, 64, 64), np.float32))
    with pytest.raises(ValueError, match="covered by no tile"):
        stitcher.result()
    with pytest.raises(ValueError, match="maps of 64 x 64"):
        stitcher.add(grid.origins[:2], np.zeros((2, 32, 32), np.float32))
