"""From samples on disk to batches of tensors: resizing, cropping and mask alignment."""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ImageReadError
from .image_io import read_image, read_mask
from .preprocess import Preprocess, display_image
from .samples import SampleSet


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] -> ``(H, W, 3)`` uint8 (rounded), for saving and display."""
    return display_image(image.detach().cpu().numpy())


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
