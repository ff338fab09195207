"""From per-position scores to anomaly maps and image scores, shared by every method:
Gaussian smoothing (batched, on any device, matching scipy), fusion of multi-level maps, and
the image-score reductions.

The allowed values of the reductions are named here once (:data:`MAP_REDUCTIONS`,
:data:`SCORE_REDUCTIONS`); the methods' hyperparameter declarations use the same tuples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: How :func:`fuse_maps` combines the levels' maps.
MAP_REDUCTIONS = ("sum", "mean")
#: How :func:`image_scores` turns a map into an image score.
SCORE_REDUCTIONS = ("max", "top_mean")


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
    return x[:, 0]


def upsampled(maps: torch.Tensor, size: Sequence[int], align_corners: bool = False
              ) -> torch.Tensor:
    """(B, h, w) maps resized bilinearly to (B, *size).

    Example:
        >>> upsampled(torch.rand(2, 8, 8), (32, 32)).shape
        torch.Size([2, 32, 32])
    """
    # [:, 0] rather than squeeze(1), here and in gaussian_blur: an ONNX export turns a squeeze
    # of a dimension it cannot prove to be 1 into a branch (an If node), and NNCF's bias
    # correction refuses a graph with one.
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode="bilinear",
                         align_corners=align_corners)[:, 0]


class UpsampleBlur:
    """Coarse score grids to smoothed full-size maps: bilinear upsampling
    (``align_corners=False``), then :func:`gaussian_blur`, in one step.

    Both steps are linear and separable, so for each axis they are one matrix, (h, H) and
    (w, W), and a (B, h, w) grid becomes its (B, H, W) map by two matrix products
    ``rows.T @ grid @ columns``: the same maps as ``gaussian_blur(F.interpolate(...))`` (to
    float rounding) at a fraction of the cost of blurring every full-size map. The matrices are
    built once per (grid, size, sigma, device) and kept.

    Example:
        >>> to_maps = UpsampleBlur()
        >>> to_maps(torch.rand(2, 32, 32), (256, 256), sigma=4.0).shape
        torch.Size([2, 256, 256])
    """

    def __init__(self) -> None:
        self._axes: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, grid: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
        # Plain ints: while an export traces, sizes are tensors, and the matrices built here
        # must be the graph's constants, not rebuilt inside it.
        key = (tuple(int(n) for n in grid.shape[-2:]), tuple(int(n) for n in size),
               float(sigma), grid.device)
        if key not in self._axes:
            (height, width), (full_height, full_width) = key[0], key[1]
            self._axes[key] = (_upsample_blur_axis(height, full_height, sigma, grid.device),
                               _upsample_blur_axis(width, full_width, sigma, grid.device))
        rows, columns = self._axes[key]
        return rows.T @ grid @ columns


def _upsample_blur_axis(coarse: int, full: int, sigma: float, device: torch.device
                        ) -> torch.Tensor:
    """(coarse, full): each coarse position's unit impulse, upsampled and blurred along one axis
    (as a one-pixel-wide map, across which the blur is the identity)."""
    basis = torch.eye(coarse, device=device).view(coarse, 1, coarse, 1)
    upsampled = F.interpolate(basis, size=(full, 1), mode="bilinear", align_corners=False)
    return gaussian_blur(upsampled.squeeze(1), sigma).squeeze(-1)


def smooth_maps(maps: torch.Tensor, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """Gaussian smoothing: scipy's default support (``kernel_size=None``, RD4AD, AAND) or a
    fixed odd kernel (ReContrast's 5x5)."""
    if kernel_size is None or sigma <= 0:
        return gaussian_blur(maps, sigma)
    return gaussian_blur(maps, sigma, truncate=(kernel_size // 2) / sigma)


def fuse_maps(maps: Sequence[torch.Tensor], size: tuple[int, int], reduction: str = "sum"
              ) -> torch.Tensor:
    """Upsample (B, h, w) maps bilinearly (``align_corners=True``, as the official codes do) to
    ``size`` and sum or average them (``reduction``, one of :data:`MAP_REDUCTIONS`)."""
    if reduction not in MAP_REDUCTIONS:
        raise ValueError(f"reduction must be one of {MAP_REDUCTIONS}, got {reduction!r}")
    fused = None
    for m in maps:
        up = upsampled(m, size, align_corners=True)
        fused = up if fused is None else fused + up
    assert fused is not None
    return fused / len(maps) if reduction == "mean" else fused


def image_scores(maps: torch.Tensor, reduction: str = "max", top_fraction: float = 0.01
                 ) -> torch.Tensor:
    """Image scores from (B, H, W) maps: the maximum, or the mean of the top ``top_fraction``
    (``reduction``, one of :data:`SCORE_REDUCTIONS`)."""
    flat = maps.flatten(1)
    if reduction == "max":
        return flat.amax(dim=1)
    if reduction == "top_mean":
        k = max(1, int(flat.shape[1] * top_fraction))
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"reduction must be one of {SCORE_REDUCTIONS}, got {reduction!r}")


def pooled_max_scores(maps: torch.Tensor, pool: int) -> torch.Tensor:
    """UniAD's and LafitE's image score: the maximum of the (B, H, W) maps after a ``pool``
    x ``pool`` average pooling (capped at the map's size)."""
    pool = min(pool, maps.shape[-1])
    return F.avg_pool2d(maps.unsqueeze(1), pool, stride=1).flatten(1).amax(dim=1)
