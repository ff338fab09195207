"""The one image preprocessing of iadkit, in NumPy and Pillow only: a detector's loader and the
torch-free ONNX inferencer both use :class:`Preprocess`, so an exported model sees exactly the
input its detector saw.

Example:
    >>> import numpy as np
    >>> Preprocess(image_size=40, crop_size=32).image_array(np.zeros((50, 70, 3), np.uint8)).shape
    (3, 32, 32)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .image_io import read_image

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Preprocess:
    """Geometry every detector declares: resize to a square, then an optional centre crop.

    Images become float32 arrays (or tensors) in [0, 1]; the backbone applies its own
    normalisation. Only the methods that return tensors import torch.
    """

    image_size: int
    crop_size: int | None = None

    def __post_init__(self) -> None:
        if self.image_size < 1 or (self.crop_size is not None and
                                   not 0 < self.crop_size <= self.image_size):
            raise ValueError(f"crop_size {self.crop_size} must be between 1 and image_size "
                             f"{self.image_size}")

    @property
    def output_size(self) -> int:
        return self.crop_size or self.image_size

    def _geometry(self, image: Image.Image, resample: Image.Resampling) -> Image.Image:
        resized = image.resize((self.image_size, self.image_size), resample)
        if not self.crop_size or self.crop_size == self.image_size:
            return resized
        offset = (self.image_size - self.crop_size) // 2
        return resized.crop((offset, offset, offset + self.crop_size, offset + self.crop_size))

    def image_array(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB -> ``(3, S, S)`` float32 in [0, 1] (bilinear resize).

        A gray ``(H, W)`` uint8 image gives exactly what its three-channel copy would (Pillow
        resizes every 8-bit band alike), from a third of the memory.
        """
        resized = self._geometry(Image.fromarray(image), Image.Resampling.BILINEAR)
        array = np.asarray(resized, dtype=np.uint8)
        array = (np.repeat(array[None], 3, axis=0) if array.ndim == 2
                 else array.transpose(2, 0, 1))
        return array.astype(np.float32) / np.float32(255.0)

    def mask_array(self, mask: np.ndarray) -> np.ndarray:
        """``(H, W)`` bool -> ``(S, S)`` float32 of exact 0/1 (nearest-neighbour resize)."""
        resized = self._geometry(Image.fromarray(mask.astype(np.uint8) * 255),
                                 Image.Resampling.NEAREST)
        return (np.asarray(resized) > 127).astype(np.float32)

    def map_to_original(self, anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
        """An ``(S, S)`` anomaly map in this geometry -> ``(height, width)`` float32 on the
        original image (bilinear, pixel centres aligned as in the forward resize); pixels the
        model never saw (outside a centre crop) are NaN, never a made-up score.

        Example:
            >>> full = Preprocess(256, 224).map_to_original(np.ones((224, 224)), 500, 1250)
            >>> full.shape, bool(np.isnan(full[0, 0])), float(full[250, 625])
            ((500, 1250), True, 1.0)
        """
        size = self.output_size
        offset = (self.image_size - size) / 2 if self.crop_size else 0.0
        offset = float(int(offset))  # the crop's integer offset (see _geometry)

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

    def image(self, image: np.ndarray) -> torch.Tensor:
        """:meth:`image_array` as a tensor."""
        import torch

        return torch.from_numpy(self.image_array(image))

    def mask(self, mask: np.ndarray) -> torch.Tensor:
        """:meth:`mask_array` as a tensor."""
        import torch

        return torch.from_numpy(self.mask_array(mask))

    def load(self, path: str | Path) -> torch.Tensor:
        """Read an image file and preprocess it (errors name the file, see ``read_image``)."""
        return self.image(read_image(path))


def display_image(image: np.ndarray) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] -> ``(H, W, 3)`` uint8 (rounded), for saving and display."""
    return np.round(np.clip(image, 0.0, 1.0).transpose(1, 2, 0) * 255).astype(np.uint8)
