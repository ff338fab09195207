"""Anomaly-map overlays as RGB arrays, PNG bytes and PNG files, with NumPy, Pillow and a
matplotlib colour map only (no torch), so that the report, batch prediction and a torch-free
service draw them the same way.

Example:
    >>> png = overlay_png(original_rgb_uint8, anomaly_map, detector.preprocess, calibration=None)
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image

from .calibration import Calibration
from .data.image_io import read_image
from .data.preprocess import Preprocess


def heatmap_overlay(image: np.ndarray, anomaly_map: np.ndarray, scale: tuple[float, float],
                    mask: np.ndarray | None = None) -> np.ndarray:
    """Blend a jet-coloured anomaly map over an RGB uint8 image of the same size; draw mask
    contours in white. Where the map is NaN (an area the model did not see, such as a centre
    crop's border) the image is shown dimmed and hatched, without colour."""
    low, high = scale
    unseen = np.isnan(anomaly_map)
    normalised = np.clip((np.nan_to_num(anomaly_map, nan=low) - low) / max(high - low, 1e-12),
                         0.0, 1.0)
    colours = (colormaps["jet"](normalised)[:, :, :3] * 255).astype(np.float32)
    blended = (0.55 * image.astype(np.float32) + 0.45 * colours).astype(np.uint8)
    if unseen.any():
        rows, cols = np.nonzero(unseen)
        stripe = ((rows + cols) // 6) % 2 == 0
        dimmed = image[rows, cols].astype(np.float32) * 0.35
        dimmed[stripe] += 60.0
        blended[rows, cols] = dimmed.astype(np.uint8)
    if mask is not None and mask.any():
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1)
                        & np.roll(mask, -1, 1))
        blended[edge] = 255
    return blended


def map_scale(calibration: Calibration | None, maps: np.ndarray | Sequence[np.ndarray]
              ) -> tuple[float, float]:
    """The (low, high) map values drawn as the colour map's ends: up to twice the calibrated
    pixel threshold when there is one (so colours mean the same in every image), else the
    maps' own range. ``maps``: one array, or a list of maps of different shapes."""
    values = np.concatenate([np.ravel(m) for m in maps]) if len(maps) else np.zeros(0)
    seen = values[~np.isnan(values)]
    low = float(seen.min()) if seen.size else 0.0
    if calibration is not None:
        return low, 2.0 * calibration.pixel_threshold
    return low, float(seen.max()) if seen.size else 1.0


def original_overlay(image: np.ndarray, anomaly_map: np.ndarray, preprocess: Preprocess,
                     calibration: Calibration | None) -> np.ndarray:
    """The anomaly map (in ``preprocess``'s geometry) mapped back onto the original RGB uint8
    image, at the image's own width and height."""
    height, width = image.shape[:2]
    full = preprocess.map_to_original(anomaly_map, height, width)
    return heatmap_overlay(image, full, map_scale(calibration, anomaly_map))


def overlay_png(image: np.ndarray, anomaly_map: np.ndarray, preprocess: Preprocess,
                calibration: Calibration | None) -> bytes:
    """PNG bytes of :func:`original_overlay`."""
    buffer = io.BytesIO()
    Image.fromarray(original_overlay(image, anomaly_map, preprocess, calibration)).save(
        buffer, format="PNG")
    return buffer.getvalue()


def save_overlay(path: Path, anomaly_map: np.ndarray, preprocess: Preprocess,
                 calibration: Calibration | None, destination: Path) -> None:
    """Write the image file ``path`` with its anomaly map over it, at the original size, as a
    PNG."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(overlay_png(read_image(path), anomaly_map, preprocess, calibration))
