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

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .data.preprocess import Preprocess

#: At most this many regions are reported per image, the highest peaks first.
MAX_REGIONS = 50
#: Regions of larger images are found on the map at this many pixels on the long side and
#: their boxes scaled to the original (bounded memory on 36-megapixel images).
WORKING_SIDE = 1024


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


def regions_in_original(anomaly_map: np.ndarray, preprocess: Preprocess, height: int,
                        width: int, threshold: float, max_regions: int = MAX_REGIONS
                        ) -> list[Region]:
    """The regions of a model-geometry map, in the original ``height`` x ``width`` image's
    pixel coordinates. Up to :data:`WORKING_SIDE` pixels on the long side this is
    :func:`find_regions` on the map mapped back exactly; larger images are searched at that
    side and their boxes scaled up with one working pixel of margin (so a box holds its
    region), the areas scaled by the same factor."""
    scale = min(1.0, WORKING_SIDE / max(height, width))
    if scale == 1.0:
        return find_regions(preprocess.map_to_original(anomaly_map, height, width), threshold,
                            max_regions)
    small_h, small_w = max(1, round(height * scale)), max(1, round(width * scale))
    factor_y, factor_x = height / small_h, width / small_w
    found = find_regions(preprocess.map_to_original(anomaly_map, small_h, small_w), threshold,
                         max_regions)
    scaled = []
    for region in found:
        # One working pixel of margin: the exact boundary lies within it.
        x0 = max(0, math.floor((region.x - 1) * factor_x))
        y0 = max(0, math.floor((region.y - 1) * factor_y))
        x1 = min(width, math.ceil((region.x + region.width + 1) * factor_x))
        y1 = min(height, math.ceil((region.y + region.height + 1) * factor_y))
        scaled.append(Region(x0, y0, x1 - x0, y1 - y0,
                             round(region.area * factor_x * factor_y), region.peak))
    return scaled
