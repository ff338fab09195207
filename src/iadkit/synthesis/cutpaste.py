"""Cut-and-paste anomalies: CutPaste, CutPaste-Scar, 3-way, and LafitE's fragments.

All of them cut a region out of a source image (the image itself, or another normal image),
optionally jitter its colours and rotate it, and paste it at another place; the pasted pixels
are the anomaly mask. :func:`paste_fragment` is the one operation behind all of them.

Parameters (METHODS.md §1.8, §6.7):

- CutPaste: area U(0.02, 0.15) of the image, aspect ratio U(0.3, 1) or U(1, 3.3), colour jitter
  0.1 (brightness, contrast, saturation, hue), pasted elsewhere in the same image.
- Scar: width U{2..16}, length U{10..25} px, rotated U(-45, 45) degrees, same jitter.
- 3-way: no anomaly, CutPaste or Scar with equal probability.
- Fragments (LafitE pseudo-validation): 1-3 shapes from {rectangle, ellipse, polygon}, each
  0.5-10% of the image, rotated U(-180, 180), cut from another normal image.
"""

from __future__ import annotations

import math

import torch

from .common import chance, tv_functional, uniform
from .draem import SyntheticSample

SHAPES = ("rectangle", "ellipse", "polygon")


def colour_jitter(image: torch.Tensor, generator: torch.Generator,
                  strength: float = 0.1) -> torch.Tensor:
    """Brightness, contrast and saturation factors in 1 +- strength, hue shift +- strength."""
    functional = tv_functional()
    image = functional.adjust_brightness(image, uniform(generator, 1 - strength, 1 + strength))
    image = functional.adjust_contrast(image, uniform(generator, 1 - strength, 1 + strength))
    image = functional.adjust_saturation(image, uniform(generator, 1 - strength, 1 + strength))
    return functional.adjust_hue(image.clamp(0, 1), uniform(generator, -strength, strength))


def shape_mask(shape: str, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A (height, width) 0/1 mask filling its box with a rectangle, ellipse or random polygon."""
    if shape == "rectangle":
        return torch.ones(height, width)
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width),
                          indexing="ij")
    if shape == "ellipse":
        return (x * x + y * y <= 1.0).float()
    if shape != "polygon":
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    # A star-shaped polygon: random radius per angular sector, inside the unit box.
    n_vertices = int(torch.randint(5, 10, (), generator=generator))
    radii = 0.5 + 0.5 * torch.rand(n_vertices, generator=generator)
    angle = torch.atan2(y, x) % (2 * math.pi)
    sector = angle / (2 * math.pi) * n_vertices
    low = sector.floor().long() % n_vertices
    high = (low + 1) % n_vertices
    radius = torch.lerp(radii[low], radii[high], sector - sector.floor())
    return (torch.sqrt(x * x + y * y) <= radius).float()


def paste_fragment(target: torch.Tensor, source: torch.Tensor, fragment_mask: torch.Tensor,
                   source_corner: tuple[int, int], target_centre: tuple[int, int],
                   angle: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste the ``fragment_mask``-shaped region of ``source`` into ``target``.

    Args:
        target, source: (3, H, W) images of the same size.
        fragment_mask: (h, w) 0/1 shape of the fragment.
        source_corner: top-left corner (y, x) of the fragment's box in ``source``.
        target_centre: where the centre of the (rotated) fragment lands in ``target``.
        angle: rotation in degrees.

    Returns:
        The new image and the (H, W) 0/1 mask of the pasted pixels (clipped at the borders).
    """
    height, width = target.shape[-2:]
    box_h, box_w = fragment_mask.shape
    top, left = source_corner
    patch = source[:, top:top + box_h, left:left + box_w]
    mask = fragment_mask.unsqueeze(0)
    if angle:
        functional = tv_functional()
        patch = functional.rotate(patch, angle, expand=True)
        mask = (functional.rotate(mask, angle, expand=True) > 0.5).float()
    patch_h, patch_w = mask.shape[-2:]
    y0, x0 = target_centre[0] - patch_h // 2, target_centre[1] - patch_w // 2
    # Clip the patch to the image.
    ty0, tx0 = max(y0, 0), max(x0, 0)
    ty1, tx1 = min(y0 + patch_h, height), min(x0 + patch_w, width)
    full_mask = torch.zeros(height, width)
    if ty1 <= ty0 or tx1 <= tx0:
        return target, full_mask
    region = mask[0, ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0]
    pasted = patch[:, ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0]
    result = target.clone()
    window = result[:, ty0:ty1, tx0:tx1]
    result[:, ty0:ty1, tx0:tx1] = torch.where(region.bool(), pasted, window)
    full_mask[ty0:ty1, tx0:tx1] = region
    return result, full_mask


def _random_box(height: int, width: int, area_fraction: float, aspect: float) -> tuple[int, int]:
    area = area_fraction * height * width
    box_h = max(1, min(height, round(math.sqrt(area * aspect))))
    box_w = max(1, min(width, round(math.sqrt(area / aspect))))
    return box_h, box_w


def _position(generator: torch.Generator, high: int) -> int:
    return int(torch.randint(0, max(1, high), (), generator=generator))


class CutPasteSynthesizer:
    """CutPaste anomalies in one of the modes ``"normal"``, ``"scar"`` or ``"3way"``.

    Args:
        mode: "normal" (rectangular patch), "scar" (thin rotated strip) or "3way"
            (no anomaly, normal or scar with equal probability).
        anomaly_probability: chance of an anomaly in the "normal" and "scar" modes.

    Example:
        >>> sample = CutPasteSynthesizer("scar")(image, torch.Generator().manual_seed(0))
    """

    MODES = ("normal", "scar", "3way")

    def __init__(self, mode: str = "normal", anomaly_probability: float = 0.5) -> None:
        if mode not in self.MODES:
            raise ValueError(f"unknown CutPaste mode {mode!r}; choose from {self.MODES}")
        self.mode = mode
        self.anomaly_probability = anomaly_probability

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> SyntheticSample:
        height, width = image.shape[-2:]
        mode = self.mode
        if mode == "3way":
            mode = ("none", "normal", "scar")[int(torch.randint(3, (), generator=generator))]
        elif not chance(generator, self.anomaly_probability):
            mode = "none"
        if mode == "none":
            return SyntheticSample(image, torch.zeros(height, width))
        if mode == "normal":
            aspect = (uniform(generator, 0.3, 1.0) if chance(generator, 0.5)
                      else uniform(generator, 1.0, 3.3))
            box_h, box_w = _random_box(height, width, uniform(generator, 0.02, 0.15), aspect)
            angle = 0.0
        else:
            box_w = min(width, int(torch.randint(2, 17, (), generator=generator)))
            box_h = min(height, int(torch.randint(10, 26, (), generator=generator)))
            angle = uniform(generator, -45.0, 45.0)
        source = colour_jitter(image, generator)
        corner = (_position(generator, height - box_h + 1), _position(generator, width - box_w + 1))
        centre = (_position(generator, height), _position(generator, width))
        pasted, mask = paste_fragment(image, source, torch.ones(box_h, box_w), corner, centre,
                                      angle)
        return SyntheticSample(pasted, mask)


class FragmentSynthesizer:
    """LafitE's pseudo-anomalies: shaped fragments of another normal image pasted in.

    Args:
        n_fragments: inclusive range of fragments per image.
        area_range: each fragment's area as a fraction of the image.
        shapes: fragment shapes to draw from.
        anomaly_probability: chance that a call pastes anything (1.0 for pseudo-validation).
    """

    def __init__(self, n_fragments: tuple[int, int] = (1, 3),
                 area_range: tuple[float, float] = (0.005, 0.10),
                 shapes: tuple[str, ...] = SHAPES, anomaly_probability: float = 1.0) -> None:
        self.n_fragments = n_fragments
        self.area_range = area_range
        self.shapes = shapes
        self.anomaly_probability = anomaly_probability

    def __call__(self, image: torch.Tensor, donor: torch.Tensor,
                 generator: torch.Generator) -> SyntheticSample:
        """Paste fragments of ``donor`` (another normal image, same size) into ``image``."""
        height, width = image.shape[-2:]
        result, mask = image, torch.zeros(height, width)
        if not chance(generator, self.anomaly_probability):
            return SyntheticSample(result, mask)
        count = int(torch.randint(self.n_fragments[0], self.n_fragments[1] + 1, (),
                                  generator=generator))
        for _ in range(count):
            shape = self.shapes[int(torch.randint(len(self.shapes), (), generator=generator))]
            aspect = math.exp(uniform(generator, math.log(0.4), math.log(2.5)))
            box_h, box_w = _random_box(height, width, uniform(generator, *self.area_range), aspect)
            fragment = shape_mask(shape, box_h, box_w, generator)
            corner = (_position(generator, height - box_h + 1),
                      _position(generator, width - box_w + 1))
            centre = (_position(generator, height), _position(generator, width))
            result, pasted = paste_fragment(result, donor, fragment, corner, centre,
                                            uniform(generator, -180.0, 180.0))
            mask = torch.maximum(mask, pasted)
        return SyntheticSample(result, mask)
