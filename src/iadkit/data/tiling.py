"""Tiles of a large image and the stitching of their anomaly maps, in NumPy only (the ONNX
inferencer uses it too).

A :class:`TileGrid` lays square tiles of ``tile_size`` pixels over an image with a fractional
``overlap`` between neighbours; the last row and column of tiles sit flush with the image's
bottom and right edges, so every pixel is covered and no tile hangs over the border. An image
smaller than one tile is padded at the bottom and right (edge pixels repeated) to one tile; the
padding is cut off again when the map is stitched.

A :class:`Stitcher` takes the tiles' maps batch by batch (nothing but one full-size sum and
weight is held) and blends overlapping tiles with a smooth window: each tile's weight ramps
from near zero at its edges to one over the overlap, so where two tiles disagree the stitched
map passes smoothly from one to the other instead of showing a seam.

Example:
    >>> grid = TileGrid(height=300, width=500, tile_size=256, overlap=0.25)
    >>> grid.origins
    [(0, 0), (0, 192), (0, 244), (44, 0), (44, 192), (44, 244)]
    >>> stitcher = Stitcher(grid)
    >>> stitcher.add(grid.origins, np.ones((6, 256, 256), np.float32))
    >>> stitcher.result().shape
    (300, 500)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

#: The smallest weight of a tile's edge pixels: every covered pixel keeps a positive weight.
EDGE_WEIGHT = 1e-3


def tile_starts(length: int, tile_size: int, stride: int) -> list[int]:
    """Start positions of tiles along one axis: every ``stride`` pixels, the last flush with
    the end (one start, 0, when the axis is no longer than a tile)."""
    if length <= tile_size:
        return [0]
    starts = list(range(0, length - tile_size, stride))
    return [*starts, length - tile_size]


@dataclass(frozen=True)
class TileGrid:
    """Square tiles over an ``height`` x ``width`` image.

    Args:
        height, width: the image's size in pixels.
        tile_size: a tile's side in pixels.
        overlap: the fraction of a tile shared with its neighbour, in [0, 1): the stride is
            ``round(tile_size * (1 - overlap))`` (at least one pixel). The last tiles overlap
            more when the image is not a whole number of strides.
    """

    height: int
    width: int
    tile_size: int
    overlap: float = 0.25

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"an image of {self.height} x {self.width} pixels has no tiles")
        if self.tile_size < 1:
            raise ValueError(f"tile_size must be at least 1, got {self.tile_size}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap is a fraction of the tile in [0, 1), got {self.overlap}")

    @property
    def stride(self) -> int:
        return max(1, round(self.tile_size * (1 - self.overlap)))

    @property
    def padded_shape(self) -> tuple[int, int]:
        """The image's size after padding to at least one tile."""
        return max(self.height, self.tile_size), max(self.width, self.tile_size)

    @cached_property
    def origins(self) -> list[tuple[int, int]]:
        """(top, left) of every tile, row by row."""
        height, width = self.padded_shape
        return [(top, left) for top in tile_starts(height, self.tile_size, self.stride)
                for left in tile_starts(width, self.tile_size, self.stride)]

    def __len__(self) -> int:
        return len(self.origins)

    def pad(self, image: np.ndarray) -> np.ndarray:
        """An ``(H, W, ...)`` image padded at the bottom and right, by repeating its edge
        pixels, to at least one tile."""
        if image.shape[:2] != (self.height, self.width):
            raise ValueError(f"the grid is for {self.height} x {self.width} images, got "
                             f"{image.shape[0]} x {image.shape[1]}")
        height, width = self.padded_shape
        if (height, width) == (self.height, self.width):
            return image
        extra = [(0, height - self.height), (0, width - self.width)]
        return np.pad(image, extra + [(0, 0)] * (image.ndim - 2), mode="edge")

    def cut(self, image: np.ndarray, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tiles ``start:stop`` of an ``(H, W, ...)`` image: ``(n, tile, tile, ...)``. Cut a
        few at a time to bound memory on a very large image."""
        padded = self.pad(image)
        size = self.tile_size
        return np.stack([padded[top:top + size, left:left + size]
                         for top, left in self.origins[start:stop]])

    def window(self) -> np.ndarray:
        """The ``(tile, tile)`` float64 blending weight of a tile: a raised-cosine ramp from
        :data:`EDGE_WEIGHT` at the border to 1 over the overlap's width, 1 inside."""
        ramp_width = max(1, self.tile_size - self.stride)
        position = np.arange(self.tile_size, dtype=np.float64) + 0.5
        distance = np.minimum(position, self.tile_size - position)  # to the nearer edge
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.clip(distance / ramp_width, 0, 1))
        ramp = np.maximum(ramp, EDGE_WEIGHT)
        return np.outer(ramp, ramp)


class Stitcher:
    """Blends tiles' ``(n, tile, tile)`` maps into one ``(height, width)`` map.

    Example:
        >>> grid = TileGrid(100, 100, tile_size=64, overlap=0.5)
        >>> stitcher = Stitcher(grid)
        >>> for start in range(0, len(grid), 2):          # batch by batch
        ...     origins = grid.origins[start:start + 2]
        ...     stitcher.add(origins, np.full((len(origins), 64, 64), 3.0, np.float32))
        >>> round(float(stitcher.result().max()), 6)
        3.0
    """

    def __init__(self, grid: TileGrid) -> None:
        self.grid = grid
        self._window = grid.window()
        self._sum = np.zeros(grid.padded_shape, np.float64)
        self._weight = np.zeros(grid.padded_shape, np.float64)

    def add(self, origins: Sequence[tuple[int, int]], maps: np.ndarray) -> None:
        size = self.grid.tile_size
        if maps.shape[1:] != (size, size) or len(maps) != len(origins):
            raise ValueError(f"expected {len(origins)} maps of {size} x {size}, got "
                             f"{maps.shape}")
        for (top, left), tile_map in zip(origins, maps, strict=True):
            self._sum[top:top + size, left:left + size] += tile_map * self._window
            self._weight[top:top + size, left:left + size] += self._window

    def result(self) -> np.ndarray:
        """The stitched float32 map of the image's own size (the padding cut off)."""
        if not self._weight.all():
            missing = int((self._weight == 0).sum())
            raise ValueError(f"{missing} pixels are covered by no tile added yet")
        stitched = self._sum / self._weight
        return stitched[:self.grid.height, :self.grid.width].astype(np.float32)

