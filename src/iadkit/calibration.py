"""Decision thresholds and normalised scores from normal validation predictions.

NumPy only (no torch), so that an exported model's inferencer and service apply a calibration
exactly as :mod:`iadkit.engine` does.

Example:
    >>> calibration = calibrate(normal_scores, normal_maps, 0.99, "held-out normals")
    >>> is_anomalous(score, calibration), normalised_scores(score, calibration)
"""

from __future__ import annotations

from typing import Any

import numpy as np


def calibrate(scores: np.ndarray, maps: np.ndarray, quantile: float, source: str) -> dict[str, Any]:
    """Decision threshold and normalisation statistics from normal validation predictions.

    The normalised score is ``(score - median) / (threshold - median)``: 0 for a typical normal
    image, 1 at the threshold.
    """
    threshold = float(np.quantile(scores, quantile))
    return {
        "image_threshold": threshold,
        "pixel_threshold": float(np.quantile(maps, quantile)),
        "normal_median": float(np.median(scores)),
        "normal_mean": float(scores.mean()),
        "normal_std": float(scores.std()),
        "n_images": int(scores.size),
        "quantile": quantile,
        "source": source,
    }


def normalised_scores(scores: np.ndarray, calibration: dict[str, Any]) -> np.ndarray:
    span = calibration["image_threshold"] - calibration["normal_median"]
    return (scores - calibration["normal_median"]) / (span if span > 0 else 1.0)


def is_anomalous(score: float, calibration: dict[str, Any]) -> bool:
    """The decision: the image score reaches the calibrated threshold."""
    return bool(score >= calibration["image_threshold"])
