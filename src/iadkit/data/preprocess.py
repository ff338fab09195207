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
        """``(H, W, 3)`` uint8 RGB -> ``(3, S, S)`` float32 in [0, 1] (bilinear resize)."""
        resized = self._geometry(Image.fromarray(image), Image.Resampling.BILINEAR)
        array = np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)
        return array.astype(np.float32) / np.float32(255.0)

    def mask_array(self, mask: np.ndarray) -> np.ndarray:
        """``(H, W)`` bool -> ``(S, S)`` float32 of exact 0/1 (nearest-neighbour resize)."""
        resized = self._geometry(Image.fromarray(mask.astype(np.uint8) * 255),
                                 Image.Resampling.NEAREST)
        return (np.asarray(resized) > 127).astype(np.float32)

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
