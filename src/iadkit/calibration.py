"""Decision thresholds and normalised scores, fitted on normal validation predictions.

NumPy only (no torch), so that an exported model's inferencer and service decide exactly as a
saved detector does: every place that turns a score into a decision (the service, the ONNX
inferencer, batch prediction) calls :func:`decide`.

Example:
    >>> import numpy as np
    >>> calibration = Calibration.fit(np.array([1.0, 2.0, 3.0]), np.zeros((3, 4, 4)), 0.5,
    ...                               "three held-out normals")
    >>> decide(2.5, calibration).anomalous
    True
    >>> decide(2.5, None).anomalous is None   # an uncalibrated model gives scores only
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Calibration:
    """A decision threshold and the normal-score statistics behind it.

    Attributes:
        image_threshold: an image is anomalous when its score reaches this.
        pixel_threshold: the same quantile of the normal maps' pixels (colours the overlays).
        normal_median, normal_mean, normal_std: of the normal images' scores.
        n_images: how many normal images the statistics come from.
        quantile: the quantile of their scores that is the threshold.
        source: what those images were, in words (shown by the service and the report).
    """

    image_threshold: float
    pixel_threshold: float
    normal_median: float
    normal_mean: float
    normal_std: float
    n_images: int
    quantile: float
    source: str

    @classmethod
    def fit(cls, scores: np.ndarray, maps: np.ndarray, quantile: float, source: str
            ) -> Calibration:
        """From the scores (N,) and maps (N, H, W) of normal images no model was fitted on."""
        return cls(image_threshold=float(np.quantile(scores, quantile)),
                   pixel_threshold=float(np.quantile(maps, quantile)),
                   normal_median=float(np.median(scores)), normal_mean=float(scores.mean()),
                   normal_std=float(scores.std()), n_images=int(scores.size),
                   quantile=float(quantile), source=source)

    def normalised(self, scores: np.ndarray | float) -> np.ndarray | float:
        """``(score - normal median) / (threshold - normal median)``: 0 for a typical normal
        image, 1 at the threshold."""
        span = self.image_threshold - self.normal_median
        return (scores - self.normal_median) / (span if span > 0 else 1.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Calibration | None:
        """The calibration saved by :meth:`to_dict` (None stays None)."""
        if not values:
            return None
        return cls(**{f.name: values[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Decision:
    """What a calibrated model says of one image; the calibrated fields are None without a
    calibration."""

    score: float
    normalised_score: float | None
    anomalous: bool | None
    threshold: float | None
    threshold_source: str | None


def decide(score: float, calibration: Calibration | None) -> Decision:
    """The decision on an image score: anomalous when it reaches the calibrated threshold."""
    if calibration is None:
        return Decision(float(score), None, None, None, None)
    return Decision(float(score), float(calibration.normalised(float(score))),
                    bool(score >= calibration.image_threshold), calibration.image_threshold,
                    calibration.source)
