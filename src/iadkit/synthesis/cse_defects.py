"""CSE's synthetic defects (METHODS.md §5.3): structural, textural or blur, in a Perlin region.

With probability ``anomaly_probability`` (0.5) one of three kinds is drawn with equal chance:

1. structural (MemSeg-like): the image, augmented by 3 of {horizontal flip, rotation +-45,
   brightness x0.8-1.2, saturation x0.5-1.5, hue shift}, cut into an 8x8 grid whose cells are
   shuffled, pasted inside the mask;
2. textural: a texture augmented by 3 of DRAEM's operations, pasted without blending (beta = 0);
3. blur: the image blurred with a Gaussian (odd kernel 5..15, sigma 6), pasted inside the mask.

The Perlin mask is redrawn until it has at least ``min_pixels`` (100) pixels.
"""

from __future__ import annotations

import torch

from .common import chance, tv_functional, uniform
from .draem import SyntheticSample
from .perlin import perlin_mask
from .textures import TextureSource, augment_texture

KINDS = ("structural", "textural", "blur")


def _structural_augment(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    functional = tv_functional()
    operations = [
        lambda x: functional.horizontal_flip(x) if chance(generator, 0.5) else x,
        lambda x: functional.rotate(x, uniform(generator, -45.0, 45.0)),
        lambda x: x * uniform(generator, 0.8, 1.2),
        lambda x: functional.adjust_saturation(x.clamp(0, 1), uniform(generator, 0.5, 1.5)),
        lambda x: functional.adjust_hue(x.clamp(0, 1), uniform(generator, -0.25, 0.25)),
    ]
    for index in torch.randperm(len(operations), generator=generator)[:3].tolist():
        image = operations[index](image)
    return image.clamp(0.0, 1.0)


def shuffle_grid(image: torch.Tensor, generator: torch.Generator, cells: int = 8) -> torch.Tensor:
    """Cut (3, H, W) into cells x cells tiles and shuffle them (sizes need not divide)."""
    height, width = image.shape[-2:]
    tile_h, tile_w = height // cells, width // cells
    cropped = image[:, :tile_h * cells, :tile_w * cells]
    tiles = cropped.reshape(3, cells, tile_h, cells, tile_w).permute(1, 3, 0, 2, 4)
    tiles = tiles.reshape(cells * cells, 3, tile_h, tile_w)
    tiles = tiles[torch.randperm(cells * cells, generator=generator)]
    shuffled = tiles.reshape(cells, cells, 3, tile_h, tile_w).permute(2, 0, 3, 1, 4)
    result = image.clone()
    result[:, :tile_h * cells, :tile_w * cells] = shuffled.reshape(3, tile_h * cells,
                                                                   tile_w * cells)
    return result


class CseDefectSynthesizer:
    """Structural, textural or blur defects inside a Perlin region (CSE, METHODS.md §5.3).

    Args:
        texture_source: textures for the textural kind (procedural when None).
        anomaly_probability: chance that a call produces a defect.
        min_pixels: the Perlin mask is redrawn until it has at least this many pixels.
        kinds: which defect kinds to draw from.
    """

    def __init__(self, texture_source: TextureSource | None = None,
                 anomaly_probability: float = 0.5, min_pixels: int = 100,
                 kinds: tuple[str, ...] = KINDS, max_attempts: int = 50) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown defect kinds {sorted(unknown)}; choose from {KINDS}")
        self.texture_source = texture_source or TextureSource()
        self.anomaly_probability = anomaly_probability
        self.min_pixels = min_pixels
        self.kinds = kinds
        self.max_attempts = max_attempts

    def _mask(self, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        needed = min(self.min_pixels, height * width // 4)
        for _ in range(self.max_attempts):
            mask = perlin_mask(height, width, generator)
            if mask.sum() >= needed:
                return mask
        return mask

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> SyntheticSample:
        height, width = image.shape[-2:]
        if not chance(generator, self.anomaly_probability):
            return SyntheticSample(image, torch.zeros(height, width))
        kind = self.kinds[int(torch.randint(len(self.kinds), (), generator=generator))]
        mask = self._mask(height, width, generator)
        if kind == "structural":
            source = shuffle_grid(_structural_augment(image, generator), generator)
        elif kind == "textural":
            texture = self.texture_source.sample(max(height, width), generator)
            source = augment_texture(texture[:, :height, :width], generator)
        else:
            size = 5 + 2 * int(torch.randint(0, 6, (), generator=generator))
            source = tv_functional().gaussian_blur(image, [size, size], [6.0, 6.0])
        region = mask.unsqueeze(0)
        return SyntheticSample(region * source + (1.0 - region) * image, mask)
