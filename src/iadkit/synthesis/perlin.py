"""Perlin noise and DRAEM-style Perlin anomaly masks, vectorised in torch and seeded.

METHODS.md §1.7: lattice resolutions ``2**a`` by ``2**b`` with ``a, b`` uniform in {0..5}, fade
``6t^5 - 15t^4 + 10t^3``, random unit gradients on the (res + 1) x (res + 1) lattice, output
scaled by sqrt(2), the noise rotated by a uniform angle in [-90, 90] degrees, then thresholded
(> 0.5) into a binary mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import uniform


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(height: int, width: int, resolution: tuple[int, int],
                 generator: torch.Generator) -> torch.Tensor:
    """2-D gradient noise of shape (height, width) with a ``resolution`` lattice (rows, cols).

    Values lie in about [-1, 1]; any image size works (the lattice need not divide it).
    """
    rows, cols = resolution
    angles = 2.0 * math.pi * torch.rand(rows + 1, cols + 1, generator=generator)
    gradients = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (r+1, c+1, 2)
    y = torch.arange(height, dtype=torch.float32) * (rows / height)
    x = torch.arange(width, dtype=torch.float32) * (cols / width)
    y0, x0 = y.floor().long(), x.floor().long()
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = gradients[(y0 + dy)[:, None], (x0 + dx)[None, :]]  # (H, W, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    ty, tx = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), tx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tx)
    return math.sqrt(2.0) * torch.lerp(top, bottom, ty)


def _rotate(noise: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate a (H, W) map about its centre; uncovered corners become 0 (never in the mask)."""
    radians = math.radians(degrees)
    height, width = noise.shape
    cos, sin = math.cos(radians), math.sin(radians)
    aspect = height / width
    theta = torch.tensor([[cos, -sin * aspect, 0.0], [sin / aspect, cos, 0.0]]).unsqueeze(0)
    grid = F.affine_grid(theta, [1, 1, height, width], align_corners=False)
    return F.grid_sample(noise[None, None], grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[0, 0]


def perlin_mask(height: int, width: int, generator: torch.Generator, threshold: float = 0.5,
                max_scale_exponent: int = 5, rotate: bool = True) -> torch.Tensor:
    """One DRAEM-style anomaly mask: (height, width) float32 of exact 0/1 (may be empty).

    Example:
        >>> mask = perlin_mask(256, 256, torch.Generator().manual_seed(0))
    """
    exponents = torch.randint(0, max_scale_exponent + 1, (2,), generator=generator)
    resolution = (2 ** int(exponents[0]), 2 ** int(exponents[1]))
    noise = perlin_noise(height, width, resolution, generator)
    if rotate:
        noise = _rotate(noise, uniform(generator, -90.0, 90.0))
    return (noise > threshold).float()
