"""Anomalous regions: the connected components of an anomaly map above the calibrated pixel
threshold, with bounding boxes in the map's own pixel coordinates (the original image's, once
the map is mapped back with :meth:`~iadkit.data.preprocess.Preprocess.map_to_original`).

NumPy and SciPy only, so that the service decides regions the same way for a saved detector
and for an ONNX export.

Example:
    >>> import numpy as np
    >>> anomaly_map = np.zeros((40, 60)); anomaly_map[10:14, 20:30] = 5.0
    >>> [region.box for region in find_regions(anomaly_map, threshold=1.0)]
    [(20, 10, 10, 4)]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: At most this many regions are reported per image, the highest peaks first.
MAX_REGIONS = 50


@dataclass(frozen=True)
class Region:
    """One connected anomalous area.

    Attributes:
        x, y: the bounding box's top-left pixel (column, row).
        width, height: the bounding box's size in pixels.
        area: how many pixels of the component are above the threshold.
        peak: the largest map value inside it.
    """

    x: int
    y: int
    width: int
    height: int
    area: int
    peak: float

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.width, self.height

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_regions(anomaly_map: np.ndarray, threshold: float, max_regions: int = MAX_REGIONS
                 ) -> list[Region]:
    """The 8-connected components of ``anomaly_map > threshold`` (NaN, an area the model did
    not see, is never anomalous), highest peak first."""
    from scipy import ndimage

    values = np.nan_to_num(np.asarray(anomaly_map, dtype=np.float32), nan=-np.inf)
    labels, count = ndimage.label(values > threshold, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return []
    indices = np.arange(1, count + 1)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    peaks = np.asarray(ndimage.maximum(values, labels, indices), dtype=np.float64)
    regions = []
    for index, found in enumerate(ndimage.find_objects(labels)):
        rows, cols = found
        regions.append(Region(int(cols.start), int(rows.start), int(cols.stop - cols.start),
                              int(rows.stop - rows.start), int(areas[index]),
                              float(peaks[index])))
    regions.sort(key=lambda region: -region.peak)
    return regions[:max_regions]
