"""Texture sources for texture-blending anomalies, and DRAEM's texture augmentations.

A :class:`TextureSource` draws images from a folder (the DTD layout ``images/<class>/*.jpg``, or
any folder tree of images) or, without a folder, procedural textures. :func:`augment_texture`
applies three distinct random operations from DRAEM's list (METHODS.md §1.7); each is
implemented with torchvision's tensor functions, imgaug's parameter ranges mapped to them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.image_io import is_image_file
from ..data.preprocess import Preprocess
from ..errors import DatasetError
from .common import chance, tv_functional, uniform
from .perlin import perlin_noise


def procedural_texture(size: int, generator: torch.Generator) -> torch.Tensor:
    """A random coloured texture (3, size, size) in [0, 1]: oriented waves plus Perlin noise."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                          torch.arange(size, dtype=torch.float32), indexing="ij")
    angle = uniform(generator, 0.0, math.pi)
    frequency = uniform(generator, 0.05, 0.6)
    waves = torch.sin(frequency * (x * math.cos(angle) + y * math.sin(angle)))
    noise = perlin_noise(size, size, (8, 8), generator)
    base = 0.5 + 0.25 * waves + 0.25 * noise
    colour = torch.rand(3, 1, 1, generator=generator)
    return (base.unsqueeze(0) * (0.5 + colour)).clamp(0.0, 1.0)


class TextureSource:
    """Random textures at a given size: from image files, or procedural when ``folder`` is None.

    Decoded, resized textures are kept in a bounded cache (uint8), because decoding a JPEG per
    synthetic sample would make synthesis slower than the backbone.

    Args:
        folder: a folder searched recursively for images (e.g. DTD's ``images/``).
        cache_size: decoded textures kept in memory (256 at 256 px: about 50 MB).

    Raises:
        DatasetError: the folder does not exist or holds no image.
    """

    def __init__(self, folder: str | Path | None = None, cache_size: int = 256) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self.files: list[Path] = []
        if self.folder is not None:
            if not self.folder.is_dir():
                raise DatasetError(f"{self.folder}: texture folder not found")
            self.files = sorted(p for p in self.folder.rglob("*") if is_image_file(p))
            if not self.files:
                raise DatasetError(f"{self.folder}: texture folder holds no images "
                                   "(expected e.g. DTD's images/<class>/*.jpg)")

    def __repr__(self) -> str:
        return f"TextureSource({self.folder or 'procedural'}, {len(self.files)} files)"

    def sample(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """A (3, size, size) float texture in [0, 1]."""
        if not self.files:
            return procedural_texture(size, generator)
        index = int(torch.randint(len(self.files), (), generator=generator))
        key = (index, size)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            image = Preprocess(size).load(self.files[index])
            self._cache[key] = (image * 255).round().to(torch.uint8)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return self._cache[key].float() / 255.0


def _per_channel_gamma(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    gammas = 0.5 + 1.5 * torch.rand(3, 1, 1, generator=generator)
    return image.clamp(min=0.0).pow(gammas)


def _brightness(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return image * uniform(generator, 0.8, 1.2) + uniform(generator, -30.0, 30.0) / 255.0


def _hue_saturation(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    functional = tv_functional()
    shifted = functional.adjust_hue(image.clamp(0, 1), uniform(generator, -50.0, 50.0) / 255.0)
    return functional.adjust_saturation(shifted, uniform(generator, 0.6, 1.4))


def _solarize(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if not chance(generator, 0.5):
        return image
    threshold = uniform(generator, 32.0, 128.0) / 255.0
    return torch.where(image >= threshold, 1.0 - image, image)


def _on_uint8(name: str) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """A torchvision function that needs uint8 input, with its random argument."""

    def apply(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        functional = tv_functional()
        as_uint8 = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        if name == "posterize":
            result = functional.posterize(as_uint8, int(torch.randint(1, 9, (), generator=generator)))
        elif name == "sharpness":
            result = functional.adjust_sharpness(as_uint8, uniform(generator, 0.0, 2.0))
        else:
            result = getattr(functional, name)(as_uint8)
        return result.float() / 255.0

    return apply


def _rotate(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    functional = tv_functional()
    return functional.rotate(image, uniform(generator, -45.0, 45.0))


#: DRAEM's ten texture operations (imgaug names -> our implementations).
TEXTURE_OPERATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "gamma_contrast": _per_channel_gamma,
    "multiply_and_add_to_brightness": _brightness,
    "enhance_sharpness": _on_uint8("sharpness"),
    "add_to_hue_and_saturation": _hue_saturation,
    "solarize": _solarize,
    "posterize": _on_uint8("posterize"),
    "invert": lambda image, _: 1.0 - image,
    "autocontrast": _on_uint8("autocontrast"),
    "equalize": _on_uint8("equalize"),
    "affine_rotate": _rotate,
}


def augment_texture(texture: torch.Tensor, generator: torch.Generator,
                    n_operations: int = 3) -> torch.Tensor:
    """Apply ``n_operations`` distinct random operations of :data:`TEXTURE_OPERATIONS`."""
    names = list(TEXTURE_OPERATIONS)
    order = torch.randperm(len(names), generator=generator)[:n_operations].tolist()
    for index in order:
        texture = TEXTURE_OPERATIONS[names[index]](texture, generator)
    return texture.clamp(0.0, 1.0)
