"""Foreground masks by grayscale thresholding, so synthetic defects land on the object (AAND).

METHODS.md §1.9: grayscale, Gaussian blur (sigma 8), then a per-category rule. Rules:

- ``("all",)``: the whole image (textures; the way to switch restriction off);
- ``("above", t)``: gray > t;  ``("at_most", t)``: gray <= t (dark objects on light ground);
- ``("disc", r)``: a central disc of radius r * height;
- ``("rectangle", f)``: a central rectangle of f * width by f * height.

Thresholds are on the 0..255 scale.
"""

from __future__ import annotations

import torch

from ..nn.anomaly_maps import gaussian_blur

ForegroundRule = tuple  # ("above", 50), ("disc", 0.45), ("all",) ...

#: Per-category rules from the AAND official code (METHODS.md §1.9).
FOREGROUND_RULES: dict[str, ForegroundRule] = {
    **{c: ("all",) for c in ("carpet", "grid", "leather", "tile", "wood", "transistor")},
    **{c: ("at_most", 150) for c in ("capsule", "screw", "zipper")},
    **{c: ("above", 50) for c in ("hazelnut", "metal_nut", "pill", "toothbrush")},
    **{c: ("disc", 0.45) for c in ("bottle", "cable")},
    **{c: ("above", 150) for c in ("candle", "cashew", "chewinggum", "fryum", "macaroni1",
                                   "macaroni2", "pcb1")},
    **{c: ("above", 100) for c in ("pcb2", "pcb3", "pipe_fryum")},
    "pcb4": ("above", 50),
    "capsules": ("at_most", 100),
    **{c: ("above", 50) for c in ("bagel", "cable_gland", "carrot", "cookie", "dowel", "peach",
                                  "potato", "rope")},
    **{c: ("rectangle", 0.7) for c in ("foam", "tire")},
}


def rule_for(category: str) -> ForegroundRule:
    """The category's rule; unknown categories (and textures) use the whole image."""
    return FOREGROUND_RULES.get(category, ("all",))


def foreground_mask(image: torch.Tensor, rule: ForegroundRule = ("all",),
                    blur_sigma: float = 8.0) -> torch.Tensor:
    """(H, W) 0/1 foreground of a (3, H, W) image in [0, 1] under ``rule``."""
    height, width = image.shape[-2:]
    kind = rule[0]
    if kind == "all":
        return torch.ones(height, width)
    if kind in ("disc", "rectangle"):
        y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32) - (height - 1) / 2,
                              torch.arange(width, dtype=torch.float32) - (width - 1) / 2,
                              indexing="ij")
        if kind == "disc":
            return (x * x + y * y <= (rule[1] * height) ** 2).float()
        return ((y.abs() <= rule[1] * height / 2) & (x.abs() <= rule[1] * width / 2)).float()
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    gray = gaussian_blur(((image * weights).sum(0) * 255.0).unsqueeze(0), blur_sigma)[0]
    if kind == "above":
        return (gray > rule[1]).float()
    if kind == "at_most":
        return (gray <= rule[1]).float()
    raise ValueError(f"unknown foreground rule {rule!r}")
