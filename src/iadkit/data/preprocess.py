"""The one image preprocessing of iadkit, in NumPy and Pillow only: a detector's loader and the
torch-free ONNX inferencer both use :class:`Preprocess`, so an exported model sees exactly the
input its detector saw.

An image becomes one or more *units*, the square inputs of the network, and the units' maps
become one anomaly map of the image at its *evaluation shape*; three geometries:

- ``resize`` (the default): the image squashed to ``image_size`` squared, then an optional
  centre crop; one unit, whose map is the evaluation map (masks are resized to it).
- ``letterbox``: the image scaled to fit ``image_size`` with its aspect ratio kept, centred
  and padded with :data:`LETTERBOX_FILL`; one unit. The map is cut back to the image's area
  (the padding is never scored in a map), so its evaluation shape is the image's own aspect.
- ``tile``: the image at its native resolution cut into overlapping square tiles of
  ``tile_size`` pixels (default ``image_size``: native scale; smaller tiles magnify, larger
  ones shrink), each resized to ``image_size``; the tiles' maps are stitched with a smooth
  window (:mod:`.tiling`) into one map at native resolution, scaled down to ``max_map_side``
  on the longer side when the image is larger. The image score is the highest of its tiles'
  scores: the image is as anomalous as its most anomalous tile (for one tile, the method's own
  score).

Example:
    >>> import numpy as np
    >>> Preprocess(image_size=40, crop_size=32).image_array(np.zeros((50, 70, 3), np.uint8)).shape
    (3, 32, 32)
    >>> tiled = Preprocess(image_size=64, geometry="tile", tile_overlap=0.25)
    >>> tiled.units_array(np.zeros((100, 300, 3), np.uint8)).shape   # 2 rows x 6 columns
    (12, 3, 64, 64)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from PIL import Image

from .image_io import read_image
from .tiling import Stitcher, TileGrid

if TYPE_CHECKING:
    import torch

GEOMETRIES = ("resize", "letterbox", "tile")
#: The value of a letterboxed image's padding (black). Every training image carries it too, so
#: a detector learns it as normal; the maps never score it.
LETTERBOX_FILL = 0


def _resize_map(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """A float map resized bilinearly (Pillow, area-averaging when shrinking)."""
    if values.shape == (height, width):
        return values.astype(np.float32, copy=False)
    resized = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
    return np.asarray(resized.resize((width, height), Image.Resampling.BILINEAR),
                      dtype=np.float32)


def _to_channels_first(array: np.ndarray) -> np.ndarray:
    """``(..., H, W)`` gray or ``(..., H, W, 3)`` uint8 -> ``(..., 3, H, W)`` float32 in [0, 1]."""
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] != 3):
        array = np.repeat(array[..., None, :, :], 3, axis=-3)
    else:
        array = np.moveaxis(array, -1, -3)
    return array.astype(np.float32) / np.float32(255.0)


@dataclass(frozen=True)
class Preprocess:
    """Geometry every detector declares (see the module docstring).

    Images become float32 arrays (or tensors) in [0, 1]; the backbone applies its own
    normalisation. Only the methods that return tensors import torch.

    Args:
        image_size: the network's input side (before ``crop_size``).
        crop_size: centre crop after resizing (``resize`` only).
        geometry: ``resize``, ``letterbox`` or ``tile``.
        tile_size: a tile's side in the image's own pixels (``tile``; None: ``image_size``).
        tile_overlap: the fraction of a tile shared with its neighbour, in [0, 1).
        max_map_side: the longer side of a tiled image's map is at most this many pixels.
    """

    image_size: int
    crop_size: int | None = None
    geometry: str = "resize"
    tile_size: int | None = None
    tile_overlap: float = 0.25
    max_map_side: int = 1024

    def __post_init__(self) -> None:
        if self.image_size < 1 or (self.crop_size is not None and
                                   not 0 < self.crop_size <= self.image_size):
            raise ValueError(f"crop_size {self.crop_size} must be between 1 and image_size "
                             f"{self.image_size}")
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry {self.geometry!r} is not one of {list(GEOMETRIES)}")
        if self.geometry != "resize" and self.crop_size not in (None, self.image_size):
            raise ValueError(f"crop_size {self.crop_size} would cut the image off: the "
                             f"{self.geometry} geometry takes no centre crop (leave it null)")
        if self.tile_size is not None and self.tile_size < 8:
            raise ValueError(f"tile_size {self.tile_size} is too small: a tile has at least "
                             "8 pixels a side")
        if not 0 <= self.tile_overlap < 1:
            raise ValueError(f"tile_overlap {self.tile_overlap} must be a fraction of the tile "
                             "in [0, 1)")
        if self.max_map_side < 8:
            raise ValueError(f"max_map_side {self.max_map_side} must be at least 8")

    @property
    def output_size(self) -> int:
        """The side of a unit, the network's square input."""
        return self.crop_size or self.image_size

    @property
    def tile_side(self) -> int:
        return self.tile_size or self.image_size

    # -- geometry of one image ----------------------------------------------------------------
    def grid(self, height: int, width: int) -> TileGrid:
        """The tiles of an image of this size (``tile`` geometry)."""
        return TileGrid(height, width, self.tile_side, self.tile_overlap)

    def _letterbox_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the image inside its letterboxed square."""
        scale = self.image_size / max(height, width)
        inner_h = min(self.image_size, max(1, round(height * scale)))
        inner_w = min(self.image_size, max(1, round(width * scale)))
        return ((self.image_size - inner_h) // 2, (self.image_size - inner_w) // 2,
                inner_h, inner_w)

    def n_units(self, height: int, width: int) -> int:
        """How many network inputs an image of this size gives."""
        return len(self.grid(height, width)) if self.geometry == "tile" else 1

    def evaluation_shape(self, height: int, width: int) -> tuple[int, int]:
        """The shape of an ``height`` x ``width`` image's anomaly map and of its mask in
        evaluation."""
        if self.geometry == "resize":
            return self.output_size, self.output_size
        if self.geometry == "letterbox":
            return self._letterbox_box(height, width)[2:]
        scale = min(1.0, self.max_map_side / max(height, width))
        return max(1, round(height * scale)), max(1, round(width * scale))

    def _square(self, image: Image.Image, resample: Image.Resampling) -> Image.Image:
        """One unit of a resize or letterbox geometry."""
        if self.geometry == "letterbox":
            top, left, inner_h, inner_w = self._letterbox_box(image.height, image.width)
            canvas = Image.new(image.mode, (self.image_size, self.image_size),
                               LETTERBOX_FILL if image.mode == "L" else (LETTERBOX_FILL,) * 3)
            canvas.paste(image.resize((inner_w, inner_h), resample), (left, top))
            return canvas
        resized = image.resize((self.image_size, self.image_size), resample)
        if not self.crop_size or self.crop_size == self.image_size:
            return resized
        offset = (self.image_size - self.crop_size) // 2
        return resized.crop((offset, offset, offset + self.crop_size, offset + self.crop_size))

    def _tiles(self, image: np.ndarray, start: int, stop: int | None,
               resample: Image.Resampling) -> np.ndarray:
        """Tiles ``start:stop`` of a uint8 image (or mask), each resized to the unit size."""
        tiles = self.grid(*image.shape[:2]).cut(image, start, stop)
        if self.tile_side == self.image_size:
            return tiles
        size = (self.image_size, self.image_size)
        return np.stack([np.asarray(Image.fromarray(t).resize(size, resample)) for t in tiles])

    # -- images and masks ---------------------------------------------------------------------
    def units_array(self, image: np.ndarray, start: int = 0, stop: int | None = None
                    ) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB (or ``(H, W)`` gray) -> its units ``start:stop`` as
        ``(n, 3, S, S)`` float32 in [0, 1]: bilinear resizing; a gray image gives exactly what
        its three-channel copy would, from a third of the memory."""
        if self.geometry == "tile":
            return _to_channels_first(self._tiles(image, start, stop,
                                                  Image.Resampling.BILINEAR))
        unit = _to_channels_first(np.asarray(
            self._square(Image.fromarray(image), Image.Resampling.BILINEAR), np.uint8))
        return unit[None][start:stop]

    def image_array(self, image: np.ndarray) -> np.ndarray:
        """One ``(3, S, S)`` unit of an image: the only one for ``resize`` and ``letterbox``;
        the centre tile for ``tile`` (e.g. to synthesise anomalies on)."""
        if self.geometry != "tile":
            return self.units_array(image)[0]
        grid = self.grid(*image.shape[:2])
        centre = min(range(len(grid)), key=lambda i: (
            (grid.origins[i][0] + grid.tile_size / 2 - image.shape[0] / 2) ** 2
            + (grid.origins[i][1] + grid.tile_size / 2 - image.shape[1] / 2) ** 2))
        return self.units_array(image, centre, centre + 1)[0]

    def mask_array(self, mask: np.ndarray) -> np.ndarray:
        """``(H, W)`` bool -> float32 of exact 0/1 at the evaluation shape (nearest)."""
        height, width = mask.shape
        picture = Image.fromarray(mask.astype(np.uint8) * 255)
        if self.geometry == "resize":
            picture = self._square(picture, Image.Resampling.NEAREST)
        else:
            shape = self.evaluation_shape(height, width)
            if shape != (height, width):
                picture = picture.resize(shape[::-1], Image.Resampling.NEAREST)
        return (np.asarray(picture) > 127).astype(np.float32)

    def mask_units_array(self, mask: np.ndarray, start: int = 0, stop: int | None = None
                         ) -> np.ndarray:
        """A mask cut like :meth:`units_array` cuts its image: units ``start:stop`` as
        ``(n, S, S)`` float32 of exact 0/1 (nearest)."""
        binary = mask.astype(np.uint8) * 255
        if self.geometry == "tile":
            units = self._tiles(binary, start, stop, Image.Resampling.NEAREST)
        else:
            units = np.asarray(self._square(Image.fromarray(binary),
                                            Image.Resampling.NEAREST))[None][start:stop]
        return (units > 127).astype(np.float32)

    # -- maps -----------------------------------------------------------------------------------
    def combiner(self, height: int, width: int) -> MapCombiner:
        """What gathers the unit maps of one ``height`` x ``width`` image into its map."""
        return MapCombiner(self, height, width)

    def combine(self, maps: np.ndarray, scores: np.ndarray, height: int, width: int
                ) -> tuple[np.ndarray, float]:
        """All the units' ``(n, S, S)`` maps and ``(n,)`` scores of one ``height`` x ``width``
        image -> its anomaly map at :meth:`evaluation_shape` and its score."""
        combiner = self.combiner(height, width)
        combiner.add(maps, scores)
        return combiner.result()

    def units(self, image: np.ndarray, eager: bool = True) -> Units:
        """An image's units as a sequence (``len``, slices): computed now (``eager``), or cut
        slice by slice when asked for, so that a very large image's tiles are never all held
        at once."""
        return Units(self, image, self.units_array(image) if eager else None)

    def map_to_original(self, anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
        """An anomaly map at the evaluation shape -> ``(height, width)`` float32 on the
        original image (bilinear, pixel centres aligned as in the forward resize); pixels the
        model never saw (outside a centre crop) are NaN, never a made-up score.

        Example:
            >>> full = Preprocess(256, 224).map_to_original(np.ones((224, 224)), 500, 1250)
            >>> full.shape, bool(np.isnan(full[0, 0])), float(full[250, 625])
            ((500, 1250), True, 1.0)
        """
        if self.geometry != "resize":
            return _resize_map(np.asarray(anomaly_map, np.float32), height, width)
        size = self.output_size
        offset = (self.image_size - size) / 2 if self.crop_size else 0.0
        offset = float(int(offset))  # the crop's integer offset (see _square)

        def axis(length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            # original pixel centre -> resized coordinate -> map coordinate (centres at k)
            position = (np.arange(length) + 0.5) * self.image_size / length - offset - 0.5
            seen = (position >= -0.5) & (position <= size - 0.5)
            position = np.clip(position, 0, size - 1)
            low = np.floor(position).astype(int)
            high = np.minimum(low + 1, size - 1)
            return low, high, (position - low).astype(np.float32), seen

        rows_low, rows_high, row_weight, rows_seen = axis(height)
        cols_low, cols_high, col_weight, cols_seen = axis(width)
        values = np.asarray(anomaly_map, dtype=np.float32)
        rows = (values[rows_low] * (1 - row_weight)[:, None]
                + values[rows_high] * row_weight[:, None])
        full = rows[:, cols_low] * (1 - col_weight) + rows[:, cols_high] * col_weight
        full[~rows_seen] = np.nan
        full[:, ~cols_seen] = np.nan
        return full

    # -- tensors ----------------------------------------------------------------------------------
    def image(self, image: np.ndarray) -> torch.Tensor:
        """:meth:`image_array` as a tensor."""
        import torch

        return torch.from_numpy(self.image_array(image))

    def mask(self, mask: np.ndarray) -> torch.Tensor:
        """:meth:`mask_array` as a tensor."""
        import torch

        return torch.from_numpy(self.mask_array(mask))

    def load(self, path: str | Path) -> torch.Tensor:
        """Read an image file and make it one unit (errors name the file, see ``read_image``)."""
        return self.image(read_image(path))


@dataclass
class Units:
    """The units of one image (see :meth:`Preprocess.units`): ``len(units)``, and
    ``units[start:stop]`` as ``(n, 3, S, S)`` float32."""

    preprocess: Preprocess
    image: np.ndarray
    computed: np.ndarray | None = None

    def __len__(self) -> int:
        return self.preprocess.n_units(*self.image.shape[:2])

    def __getitem__(self, part: slice) -> np.ndarray:
        if self.computed is not None:
            return self.computed[part]
        start, stop, _ = part.indices(len(self))
        return self.preprocess.units_array(self.image, start, stop)

    @property
    def shape(self) -> tuple[int, int]:
        """The image's (height, width)."""
        return self.image.shape[0], self.image.shape[1]


class MapCombiner:
    """Takes one image's unit maps and scores, in unit order and a few at a time, and gives
    its map at the evaluation shape and its score (a tiled image's tiles are stitched as they
    come: nothing but the full-size sum and weight is held)."""

    def __init__(self, preprocess: Preprocess, height: int, width: int) -> None:
        self.preprocess, self.height, self.width = preprocess, height, width
        self.expected = preprocess.n_units(height, width)
        self.received = 0
        self.score = -np.inf
        self._stitcher = (Stitcher(preprocess.grid(height, width))
                          if preprocess.geometry == "tile" else None)
        self._map: np.ndarray | None = None

    @property
    def complete(self) -> bool:
        return self.received == self.expected

    def add(self, maps: np.ndarray, scores: np.ndarray) -> None:
        maps = np.asarray(maps, dtype=np.float32)
        if len(maps) != len(scores) or self.received + len(maps) > self.expected:
            raise ValueError(f"a {self.height} x {self.width} image has {self.expected} units; "
                             f"got {self.received + len(maps)} maps and {len(scores)} scores")
        if len(maps):
            self.score = max(self.score, float(np.max(scores)))
        if self._stitcher is not None:
            grid = self._stitcher.grid
            origins = grid.origins[self.received:self.received + len(maps)]
            self._stitcher.add(origins, np.stack([_resize_map(m, grid.tile_size, grid.tile_size)
                                                  for m in maps]))
        elif len(maps):
            self._map = maps[0]
        self.received += len(maps)

    def result(self) -> tuple[np.ndarray, float]:
        """The image's map and score, once every unit was added."""
        if not self.complete:
            raise ValueError(f"a {self.height} x {self.width} image has {self.expected} units; "
                             f"only {self.received} were added")
        if self._stitcher is not None:
            stitched = self._stitcher.result()
            return _resize_map(stitched, *self.preprocess.evaluation_shape(
                self.height, self.width)), self.score
        assert self._map is not None
        if self.preprocess.geometry == "letterbox":
            top, left, inner_h, inner_w = self.preprocess._letterbox_box(self.height, self.width)
            return self._map[top:top + inner_h, left:left + inner_w].copy(), self.score
        return self._map, self.score


Key = TypeVar("Key")
#: Maps ``(n, S, S)`` and scores ``(n,)`` of a batch of units ``(n, 3, S, S)``, given the key
#: of each unit's image.
UnitPredictor = Callable[[np.ndarray, list[Any]], tuple[np.ndarray, np.ndarray]]


def predict_by_units(preprocess: Preprocess, images: Iterable[tuple[Key, Units]],
                     predict: UnitPredictor, batch_size: int
                     ) -> Iterator[tuple[Key, np.ndarray, float]]:
    """Anomaly maps (at the evaluation shape) and scores of images given as their units.

    Args:
        preprocess: the geometry the units were made with.
        images: ``(key, units)`` per image (:meth:`Preprocess.units`).
        predict: scores a batch of units (see :data:`UnitPredictor`); units of several images
            share a batch, and an image's units may span several.
        batch_size: units per call of ``predict``.

    Yields:
        ``(key, anomaly map, score)`` per image, in the order given, as soon as its last unit
        is scored.
    """
    started: deque[tuple[Key, MapCombiner]] = deque()  # images not yet yielded, in order
    parts: list[np.ndarray] = []  # the batch being filled: slices of images' units
    owners: list[tuple[Key, MapCombiner, int]] = []  # whose units, and how many

    def run() -> Iterator[tuple[Key, np.ndarray, float]]:
        maps, scores = predict(np.concatenate(parts),
                               [key for key, _, count in owners for _ in range(count)])
        maps, scores = np.asarray(maps), np.asarray(scores)
        first = 0
        for _, combiner, count in owners:
            combiner.add(maps[first:first + count], scores[first:first + count])
            first += count
        parts.clear()
        owners.clear()
        while started and started[0][1].complete:
            key, combiner = started.popleft()
            yield (key, *combiner.result())

    filled = 0
    for key, units in images:
        height, width = units.shape
        combiner = preprocess.combiner(height, width)
        started.append((key, combiner))
        start, total = 0, len(units)
        while start < total:
            take = min(batch_size - filled, total - start)
            parts.append(units[start:start + take])
            owners.append((key, combiner, take))
            filled, start = filled + take, start + take
            if filled == batch_size:
                yield from run()
                filled = 0
    if parts:
        yield from run()


def display_image(image: np.ndarray) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] -> ``(H, W, 3)`` uint8 (rounded), for saving and display."""
    return np.round(np.clip(image, 0.0, 1.0).transpose(1, 2, 0) * 255).astype(np.uint8)
