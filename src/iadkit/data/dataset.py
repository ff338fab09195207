"""From samples on disk to batches of tensors: resizing, cropping and mask alignment."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import ImageReadError
from .image_io import read_image, read_mask
from .samples import SampleSet


@dataclass(frozen=True)
class Preprocess:
    """Geometry every detector declares: resize to a square, then an optional centre crop.

    Images become float tensors in [0, 1]; the backbone applies its own normalisation.
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

    def _crop(self, image: Image.Image) -> Image.Image:
        if not self.crop_size or self.crop_size == self.image_size:
            return image
        offset = (self.image_size - self.crop_size) // 2
        return image.crop((offset, offset, offset + self.crop_size, offset + self.crop_size))

    def load(self, path: str | Path) -> torch.Tensor:
        """Read an image file and preprocess it (errors name the file, see ``read_image``)."""
        return self.image(read_image(path))

    def image(self, array: np.ndarray) -> torch.Tensor:
        """``(H, W, 3)`` uint8 -> ``(3, S, S)`` float32 in [0, 1]."""
        size = (self.image_size, self.image_size)
        resized = self._crop(Image.fromarray(array).resize(size, Image.BILINEAR))
        tensor = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1)
        return tensor.float().div_(255.0)

    def mask(self, mask: np.ndarray) -> torch.Tensor:
        """``(H, W)`` bool -> ``(S, S)`` float32 of exact 0/1, nearest-neighbour resized."""
        size = (self.image_size, self.image_size)
        resized = self._crop(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST))
        return torch.from_numpy(np.array(resized) > 127).float()


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] -> ``(H, W, 3)`` uint8 (rounded), for saving and display."""
    return (image.detach().cpu().permute(1, 2, 0).clamp(0, 1) * 255).round().to(
        torch.uint8).numpy()


class Batch(TypedDict):
    image: torch.Tensor  # (B, 3, S, S) float in [0, 1]
    mask: torch.Tensor  # (B, S, S) float 0/1 (all zero where no mask)
    label: torch.Tensor  # (B,) int64
    index: torch.Tensor  # (B,) position in the SampleSet
    category: list[str]  # for methods that learn per class (e.g. class-aware references)
    subclass: list[str]  # "" where unknown (e.g. routing to experts per subclass)


class ImageDataset(Dataset):
    """A torch dataset over a :class:`SampleSet`; items are dicts (see :class:`Batch`)."""

    def __init__(self, samples: SampleSet, preprocess: Preprocess) -> None:
        self.samples = samples
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int | str]:
        sample = self.samples[index]
        array = read_image(sample.image_path)
        size = self.preprocess.output_size
        if sample.mask_path is not None:
            mask = read_mask(sample.mask_path)
            if mask.shape != array.shape[:2]:
                raise ImageReadError(
                    f"{sample.mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from "
                    f"image {sample.image_path} size {array.shape[1]}x{array.shape[0]}"
                )
            mask_tensor = self.preprocess.mask(mask)
        else:
            mask_tensor = torch.zeros(size, size)
        return {
            "image": self.preprocess.image(array),
            "mask": mask_tensor,
            "label": sample.label,
            "index": index,
            "category": sample.category,
            "subclass": sample.subclass or "",
        }


def make_loader(
    samples: SampleSet,
    preprocess: Preprocess,
    batch_size: int = 16,
    workers: int = 0,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader of :class:`Batch` dicts over ``samples``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        ImageDataset(samples, preprocess),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        persistent_workers=False,
    )
