"""From samples on disk to batches of tensors: the units of each image (its one resized or
letterboxed square, or its tiles) with their masks.

Two views of a sample set:

- :class:`ImageDataset` / :func:`make_loader`: one item per unit, batched (training, and
  predicting when every image is one unit): what a detector's ``fit`` takes;
- :class:`ImageUnitsDataset` / :func:`image_units_loader`: one item per image, with all its
  units and its mask at the evaluation shape (see
  :class:`~iadkit.data.preprocess.Preprocess`): what evaluation and prediction take.
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ImageReadError
from .image_io import image_shape, read_image, read_mask
from .preprocess import Preprocess, display_image
from .samples import Sample, SampleSet


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] -> ``(H, W, 3)`` uint8 (rounded), for saving and display."""
    return display_image(image.detach().cpu().numpy())


class Batch(TypedDict):
    image: torch.Tensor  # (B, 3, S, S) float in [0, 1]: units (whole images unless tiled)
    mask: torch.Tensor  # (B, S, S) float 0/1 (all zero where no mask)
    label: torch.Tensor  # (B,) int64
    index: torch.Tensor  # (B,) position in the SampleSet of the unit's image
    category: list[str]  # for methods that learn per class (e.g. class-aware references)
    subclass: list[str]  # "" where unknown (e.g. routing to experts per subclass)


def _read(sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
    """A sample's image and its mask (None where it has none), their sizes checked."""
    array = read_image(sample.image_path)
    if sample.mask_path is None:
        return array, None
    mask = read_mask(sample.mask_path)
    if mask.shape != array.shape[:2]:
        raise ImageReadError(
            f"{sample.mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from "
            f"image {sample.image_path} size {array.shape[1]}x{array.shape[0]}")
    return array, mask


class ImageDataset(Dataset):
    """One item per unit of every image of a :class:`SampleSet` (see :class:`Batch`): with the
    ``tile`` geometry, every tile of every image (read from the files' headers at
    construction), else one per image."""

    def __init__(self, samples: SampleSet, preprocess: Preprocess) -> None:
        self.samples = samples
        self.preprocess = preprocess
        counts = [preprocess.n_units(*image_shape(s.image_path)) if preprocess.geometry == "tile"
                  else 1 for s in samples]
        self._image_of = np.repeat(np.arange(len(samples)), counts)
        self._first_unit = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)

    def __len__(self) -> int:
        return len(self._image_of)

    def __getitem__(self, unit: int) -> dict[str, torch.Tensor | int | str]:
        index = int(self._image_of[unit])
        part = unit - int(self._first_unit[index])
        sample = self.samples[index]
        array, mask = _read(sample)
        size = self.preprocess.output_size
        mask_unit = (torch.from_numpy(self.preprocess.mask_units_array(mask, part, part + 1)[0])
                     if mask is not None else torch.zeros(size, size))
        return {
            "image": torch.from_numpy(self.preprocess.units_array(array, part, part + 1)[0]),
            "mask": mask_unit,
            "label": sample.label,
            "index": index,
            "category": sample.category,
            "subclass": sample.subclass or "",
        }


#: Up to this many units, a loader's worker computes an image's units; a larger tiled image
#: travels decoded and is cut a batch at a time where it is scored.
EAGER_UNITS = 64


class ImageUnitsDataset(Dataset):
    """One item per image: ``units`` (:class:`~iadkit.data.preprocess.Units`), ``mask`` at the
    evaluation shape (zeros where the image has none), ``index``, ``label``, ``category``."""

    def __init__(self, samples: SampleSet, preprocess: Preprocess) -> None:
        self.samples = samples
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        array, mask = _read(sample)
        height, width = array.shape[:2]
        return {
            "units": self.preprocess.units(
                array, eager=self.preprocess.n_units(height, width) <= EAGER_UNITS),
            "mask": (self.preprocess.mask_array(mask) > 0.5 if mask is not None else
                     np.zeros(self.preprocess.evaluation_shape(height, width), bool)),
            "index": index,
            "label": sample.label,
            "category": sample.category,
        }


def make_loader(
    samples: SampleSet,
    preprocess: Preprocess,
    batch_size: int = 16,
    workers: int = 0,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader of :class:`Batch` dicts over the units of ``samples``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        ImageDataset(samples, preprocess),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        persistent_workers=False,
    )


def image_units_loader(samples: SampleSet, preprocess: Preprocess, workers: int = 0
                       ) -> DataLoader:
    """A DataLoader of :class:`ImageUnitsDataset` items, one image at a time, in order (the
    caller batches units across images)."""
    return DataLoader(ImageUnitsDataset(samples, preprocess), batch_size=None,
                      num_workers=workers, persistent_workers=False)
