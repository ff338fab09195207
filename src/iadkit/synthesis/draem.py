"""DRAEM-style texture anomalies: a texture blended into a Perlin-shaped region.

METHODS.md §1.7: with probability ``anomaly_probability`` (DRAEM 0.5, AAND 0.8) a Perlin mask
``M`` is drawn, intersected with an optional foreground mask (redrawn up to ``max_attempts``
times while it has no more than ``min_pixels`` pixels), and the image becomes

    I_a = (1 - M) * I + (1 - beta) * M * T + beta * M * I,   beta ~ U[beta_low, beta_high)

where ``T`` is an augmented texture (or, with ``texture_source=None`` and
``self_blend=True``, an augmented copy of the image itself). A sample whose final mask is empty
is returned unchanged, with an all-zero mask: a normal sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import chance, uniform
from .perlin import perlin_mask
from .textures import TextureSource, augment_texture


@dataclass
class SyntheticSample:
    """An image with its anomaly mask. ``image``: (3, H, W) in [0, 1]; ``mask``: (H, W) 0/1."""

    image: torch.Tensor
    mask: torch.Tensor

    @property
    def label(self) -> int:
        return int(bool(self.mask.any()))


class DraemSynthesizer:
    """Texture anomalies in Perlin regions (DRAEM; AAND uses it with foreground masks).

    Args:
        texture_source: where textures come from; None with ``self_blend`` uses the image.
        anomaly_probability: chance that a call produces an anomaly at all.
        beta_range: opacity range of the original image inside the region.
        self_blend: blend an augmented copy of the image itself instead of a texture.
        min_pixels, max_attempts: redraw masks with at most ``min_pixels`` pixels inside the
            foreground, up to ``max_attempts`` times (AAND's rule).

    Example:
        >>> synth = DraemSynthesizer(TextureSource("dtd/images"), anomaly_probability=0.8)
        >>> sample = synth(image, torch.Generator().manual_seed(0))
        >>> sample.image.shape, sample.mask.shape
    """

    def __init__(self, texture_source: TextureSource | None = None,
                 anomaly_probability: float = 0.5, beta_range: tuple[float, float] = (0.0, 0.8),
                 self_blend: bool = False, min_pixels: int = 4, max_attempts: int = 10) -> None:
        if not 0.0 <= anomaly_probability <= 1.0:
            raise ValueError(f"anomaly_probability must be in [0, 1], got {anomaly_probability}")
        self.texture_source = texture_source if texture_source or self_blend else TextureSource()
        self.anomaly_probability = anomaly_probability
        self.beta_range = beta_range
        self.self_blend = self_blend
        self.min_pixels = min_pixels
        self.max_attempts = max_attempts

    def _mask(self, height: int, width: int, generator: torch.Generator,
              foreground: torch.Tensor | None) -> torch.Tensor:
        mask = torch.zeros(height, width)
        for _ in range(self.max_attempts):
            mask = perlin_mask(height, width, generator)
            if foreground is not None:
                mask = mask * (foreground > 0.5).float()
            if mask.sum() > self.min_pixels:
                break
        return mask

    def __call__(self, image: torch.Tensor, generator: torch.Generator,
                 foreground: torch.Tensor | None = None) -> SyntheticSample:
        """Maybe add an anomaly to ``image`` (3, H, W) in [0, 1]; ``foreground`` (H, W) 0/1."""
        height, width = image.shape[-2:]
        if not chance(generator, self.anomaly_probability):
            return SyntheticSample(image, torch.zeros(height, width))
        mask = self._mask(height, width, generator, foreground)
        if not mask.any():
            return SyntheticSample(image, mask)
        if self.self_blend:
            source = image
        else:
            source = self.texture_source.sample(max(height, width), generator)[:, :height, :width]
        texture = augment_texture(source, generator)
        beta = uniform(generator, *self.beta_range)
        region = mask.unsqueeze(0)
        blended = (1.0 - region) * image + (1.0 - beta) * region * texture + beta * region * image
        return SyntheticSample(blended, mask)
