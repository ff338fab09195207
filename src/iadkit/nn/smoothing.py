"""Gaussian smoothing of anomaly maps in torch (batched, on any device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, radius: int, device: torch.device | None = None) -> torch.Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def _symmetric_pad(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Half-sample symmetric padding (scipy.ndimage's 'reflect': d c b a | a b c d | d c b a)."""
    size = x.shape[dim]
    if radius <= size:
        head = x.narrow(dim, 0, radius).flip(dim)
        tail = x.narrow(dim, size - radius, radius).flip(dim)
        return torch.cat([head, x, tail], dim=dim)
    # Tiny maps: mirror repeatedly by indexing a reflected index pattern.
    index = torch.arange(-radius, size + radius, device=x.device)
    period = 2 * size
    index = index % period
    index = torch.where(index >= size, period - 1 - index, index)
    return x.index_select(dim, index)


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """Blur (B, H, W) maps like ``scipy.ndimage.gaussian_filter(sigma, truncate)`` per map.

    Separable convolution with the kernel radius ``int(truncate * sigma + 0.5)`` and scipy's
    default 'reflect' border, so results match scipy to float precision.
    """
    if sigma <= 0:
        return maps
    radius = int(truncate * sigma + 0.5)
    kernel = gaussian_kernel1d(sigma, radius, maps.device).to(maps.dtype)
    x = maps.unsqueeze(1)
    x = F.conv2d(_symmetric_pad(x, radius, 3), kernel.view(1, 1, 1, -1))
    x = F.conv2d(_symmetric_pad(x, radius, 2), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def upsample_blur_operator(grid: tuple[int, int], size: tuple[int, int], sigma: float,
                           device: torch.device | None = None) -> torch.Tensor:
    """The linear map "bilinear upsampling from ``grid`` to ``size``, then :func:`gaussian_blur`"
    as a (h*w, H*W) matrix.

    Both steps are linear, so a coarse score grid p (B, h*w) becomes its smoothed full-size map
    by one matrix product ``p @ operator``: for small grids (CSE's 7x7) that costs a fraction of
    blurring every full-size map. Build it once per (grid, size, sigma); it has h*w*H*W values.
    """
    height, width = grid
    basis = torch.eye(height * width, device=device).reshape(height * width, 1, height, width)
    upsampled = F.interpolate(basis, size=size, mode="bilinear", align_corners=False)
    return gaussian_blur(upsampled.squeeze(1), sigma).flatten(1)
