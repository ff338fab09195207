"""Anomaly-map overlays as RGB arrays, PNG bytes and PNG files, with NumPy, Pillow and a
matplotlib colour map only (no torch), so that the report, batch prediction and a torch-free
service draw them the same way.

Example:
    >>> png = overlay_png(image_uint8_rgb, anomaly_map, calibration=None)
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image

from .calibration import Calibration
from .data.image_io import read_image
from .data.preprocess import Preprocess, display_image


def heatmap_overlay(image: np.ndarray, anomaly_map: np.ndarray, scale: tuple[float, float],
                    mask: np.ndarray | None = None) -> np.ndarray:
    """Blend a jet-coloured anomaly map over an RGB uint8 image; draw mask contours in white."""
    low, high = scale
    normalised = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0)
    colours = (colormaps["jet"](normalised)[:, :, :3] * 255).astype(np.float32)
    blended = (0.55 * image.astype(np.float32) + 0.45 * colours).astype(np.uint8)
    if mask is not None and mask.any():
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1)
                        & np.roll(mask, -1, 1))
        blended[edge] = 255
    return blended


def map_scale(calibration: Calibration | None, maps: np.ndarray) -> tuple[float, float]:
    """The (low, high) map values drawn as the colour map's ends: up to twice the calibrated
    pixel threshold when there is one (so colours mean the same in every image), else the
    maps' own range."""
    if calibration is not None:
        return float(np.min(maps)) if maps.size else 0.0, 2.0 * calibration.pixel_threshold
    return float(np.min(maps)), float(np.max(maps))


def overlay_png(image: np.ndarray, anomaly_map: np.ndarray,
                calibration: Calibration | None) -> bytes:
    """PNG bytes of the anomaly map over the (preprocessed, uint8 RGB) image."""
    buffer = io.BytesIO()
    Image.fromarray(heatmap_overlay(image, anomaly_map, map_scale(calibration, anomaly_map))
                    ).save(buffer, format="PNG")
    return buffer.getvalue()


def save_overlay(path: Path, anomaly_map: np.ndarray, preprocess: Preprocess,
                 calibration: Calibration | None, destination: Path) -> None:
    """Write the image file ``path``, preprocessed, with its anomaly map over it as a PNG."""
    image = display_image(preprocess.image_array(read_image(path)))
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(overlay_png(image, anomaly_map, calibration))
