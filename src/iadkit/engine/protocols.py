"""Benchmark protocols: the numbers of a benchmark's own results table, computed from the
predictions of ``iadkit test`` (``--protocol NAME``), per category and their mean, with the
columns in the table's order. Nothing here is fitted on test images: thresholds come from the
detector's calibration (validation normals where the layout has them). Pixel metrics are taken
at the evaluation shape of the maps and masks, as every pixel metric of iadkit is.

- ``mvtec-ad2`` (Heckler-Kram et al. 2025): SegF1 (pixel F1 at the calibrated pixel threshold,
  all test_public pixels pooled), AU-PRO up to a false-positive rate of 0.05, image AUROC.
- ``loco`` (Bergmann et al. 2022): image AUROC and AU-sPRO up to 0.05, each for logical and for
  structural anomalies (each against the good test images) and their mean.
- ``real-iad`` (Wang et al. 2024): image AUROC, pixel AUROC, AUPRO (0.3), and sample AUROC: a
  multi-view object scored by the maximum (or mean) of its views' scores, anomalous when any
  view is.
- ``visa`` (Zou et al. 2022, as the unified-model tables report it): image AUROC, AP and
  F1-max, pixel AUROC, AP and F1-max, AUPRO (0.3).

Example:
    >>> results, evaluations = test_run("runs/ad2", protocol="mvtec-ad2")
    >>> results["protocol"]["metrics"]["seg_f1"]
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics
from ..calibration import Calibration
from ..data.image_io import read_mask_regions
from ..data.samples import SampleSet
from ..errors import ConfigError, DatasetError, MetricError
from .evaluation import ScoredSamples, TaskEvaluation

#: AUPIMO's band of normal-image false-positive rates (Bertoldo et al. 2024).
AUPIMO_BAND = (1e-5, 1e-4)


#: How a multi-view object's score comes from its views' scores (Real-IAD's sample AUROC).
VIEW_AGGREGATIONS = {"max": np.max, "mean": np.mean}

#: A protocol's scorer: a category's predictions, the metrics ``iadkit test`` already computed
#: for them (image and pixel AUROC, AP, F1-max, AUPRO), the model's calibration and ``views``.
ScoreCategory = Callable[[ScoredSamples, dict[str, Any], Calibration | None, str],
                         dict[str, float | None]]


@dataclass(frozen=True)
class Protocol:
    """A benchmark's evaluation: the layouts it applies to, its table's columns (the scorer may
    return more: they are reported beside the table), and a check of the test data made
    before anything is predicted."""

    name: str
    layouts: tuple[str, ...]
    columns: tuple[str, ...]
    needs_calibration: bool
    score_category: ScoreCategory
    check_data: Callable[[SampleSet], None] = lambda samples: None

    def check_model(self, name: str, calibration: Calibration | None) -> None:
        """Refuse a model this protocol cannot score (SegF1 needs a calibrated threshold)."""
        if self.needs_calibration and calibration is None:
            raise ConfigError(f"protocol {self.name} thresholds the maps at the model's "
                              f"calibrated pixel threshold; the model for {name!r} is not "
                              "calibrated (fit with --calibration auto or holdout)")


def _mvtec_ad2(predicted: ScoredSamples, scored: dict[str, Any],
               calibration: Calibration | None, views: str) -> dict[str, float | None]:
    assert calibration is not None  # needs_calibration: checked before any prediction
    # The table's limit and, beside it, the lower one in one pass; the classic 0.3 is the
    # AUPRO ``iadkit test`` already computed.
    aupro = metrics.aupro_at_limits(predicted.masks, predicted.maps, (0.05, 0.01))
    return {"seg_f1": metrics.segmentation_f1(predicted.masks, predicted.maps,
                                              calibration.pixel_threshold),
            "pixel_aupro_0.05": aupro[0.05],
            "image_auroc": scored["image_auroc"],
            "pixel_aupro_0.01": aupro[0.01],
            "pixel_aupro_0.3": scored["pixel_aupro"]}


def _loco_regions(predicted: ScoredSamples, index: int, config: dict[int, tuple[float, bool]]
                  ) -> list[tuple[np.ndarray, float]]:
    """An image's defects at the evaluation shape, each with its saturation in pixels there."""
    sample = predicted.samples[index]
    assert sample.mask_path is not None
    regions = []
    for region, value in read_mask_regions(sample.mask_path):
        if value not in config:
            raise DatasetError(f"{sample.mask_path}: pixel value {value} is not in "
                               "defects_config.json")
        saturation, relative = config[value]
        resized = predicted.preprocess.mask_array(region) > 0.5
        if not resized.any():  # a defect too small to survive the resize: keep its centre
            resized = _nearest_pixel(region, resized.shape)
        # Absolute saturations count the original image's pixels: scaled to the evaluation
        # shape by the ratio of the areas.
        scale = resized.size / region.size
        pixels = saturation * resized.sum() if relative else saturation * scale
        regions.append((resized, max(float(pixels), 1.0)))
    return regions


def _nearest_pixel(region: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows, cols = np.nonzero(region)
    mark = np.zeros(shape, bool)
    mark[int(rows.mean() * shape[0] / region.shape[0]),
         int(cols.mean() * shape[1] / region.shape[1])] = True
    return mark


def _defects_config(samples: SampleSet) -> dict[int, tuple[float, bool]]:
    """``pixel value -> (saturation threshold, relative)`` of the category's
    ``defects_config.json`` (beside ``ground_truth/``)."""
    masks = [s.mask_path for s in samples if s.mask_path is not None]
    if not masks:
        raise DatasetError(f"{samples}: no ground truth for the loco protocol")
    path = Path(masks[0]).parents[2] / "defects_config.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        return {int(e["pixel_value"]): (float(e["saturation_threshold"]),
                                        bool(e["relative_saturation"])) for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"{path}: MVTec LOCO's defect list is missing or damaged ({error}); "
                           "the loco protocol needs each defect's saturation") from None


def _check_loco(samples: SampleSet) -> None:
    """The category's defect list is there and readable (sPRO needs its saturations)."""
    _defects_config(samples)


def _loco(predicted: ScoredSamples, scored: dict[str, Any], calibration: Calibration | None,
          views: str) -> dict[str, float | None]:
    config = _defects_config(predicted.samples)
    kinds = np.array([s.defect_type for s in predicted.samples])
    result: dict[str, float | None] = {}
    for kind, short in (("logical_anomalies", "logical"), ("structural_anomalies",
                                                           "structural")):
        chosen = np.nonzero((kinds == "good") | (kinds == kind))[0]
        if not (kinds == kind).any():
            result[f"image_auroc_{short}"] = result[f"spro_0.05_{short}"] = None
            continue
        result[f"image_auroc_{short}"] = metrics.auroc(predicted.labels[chosen],
                                                       predicted.scores[chosen])
        maps = np.stack([predicted.maps[i] for i in chosen])
        regions = [(position, mask, saturation)
                   for position, index in enumerate(chosen) if kinds[index] == kind
                   for mask, saturation in _loco_regions(predicted, index, config)]
        result[f"spro_0.05_{short}"] = metrics.auspro(maps, regions, fpr_limit=0.05)
    for key in ("image_auroc", "spro_0.05"):
        values = [result[f"{key}_{short}"] for short in ("logical", "structural")]
        result[key] = float(np.mean(values)) if None not in values else None
    return result


def _real_iad(predicted: ScoredSamples, scored: dict[str, Any],
              calibration: Calibration | None, views: str) -> dict[str, float | None]:
    objects: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(predicted.samples):
        objects[sample.object_id or f"image {index}"].append(index)
    members = list(objects.values())
    combine = VIEW_AGGREGATIONS[views]
    return {**{k: scored[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")},
            "sample_auroc": metrics.auroc([predicted.labels[m].max() for m in members],
                                          [float(combine(predicted.scores[m]))
                                           for m in members])}


#: VisA's table: the metrics ``iadkit test`` reports for every group.
VISA_COLUMNS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap",
                "pixel_f1_max", "pixel_aupro")


def _visa(predicted: ScoredSamples, scored: dict[str, Any], calibration: Calibration | None,
          views: str) -> dict[str, float | None]:
    return {k: scored[k] for k in VISA_COLUMNS}


PROTOCOLS = {p.name: p for p in (
    Protocol("mvtec-ad2", ("mvtec-ad2",), ("seg_f1", "pixel_aupro_0.05", "image_auroc"),
             True, _mvtec_ad2),
    Protocol("loco", ("loco",), ("image_auroc_logical", "image_auroc_structural",
                                 "image_auroc", "spro_0.05_logical", "spro_0.05_structural",
                                 "spro_0.05"), False, _loco, check_data=_check_loco),
    Protocol("real-iad", ("real-iad", "real-iad-sv"),
             ("image_auroc", "pixel_auroc", "pixel_aupro", "sample_auroc"), False, _real_iad),
    Protocol("visa", ("visa",), VISA_COLUMNS, False, _visa),
)}


def check_protocol(name: str, layout: str, setting: str, views: str = "max") -> Protocol:
    """The protocol ``name``, refused (before any prediction) for a layout or setting it does
    not apply to, or an unknown way of combining views."""
    if views not in VIEW_AGGREGATIONS:
        raise ConfigError(f"views must be one of {sorted(VIEW_AGGREGATIONS)}, got {views!r}")
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; choose from {sorted(PROTOCOLS)}")
    protocol = PROTOCOLS[name]
    if layout not in protocol.layouts:
        raise ConfigError(f"protocol {name} needs data in the {' or '.join(protocol.layouts)} "
                          f"layout; this run's data is {layout}")
    if setting != "one-class" and name in ("mvtec-ad2", "loco"):
        raise ConfigError(f"protocol {name} scores one model per category (setting one-class);"
                          f" this run's setting is {setting}")
    return protocol


def _aupimo(predicted: ScoredSamples) -> dict[str, Any]:
    """AUPIMO of every anomalous image (``images``, ``values``) and their mean, or why it
    cannot be computed."""
    with_masks = [i for i, s in enumerate(predicted.samples) if s.label == 0 or s.mask_path]
    masks = [predicted.masks[i] for i in with_masks]
    maps = [predicted.maps[i] for i in with_masks]
    if len({m.shape for m in maps}) > 1:
        return {"mean": None, "reason": "images of different evaluation shapes"}
    try:
        values = metrics.aupimo(np.stack(masks), np.stack(maps), AUPIMO_BAND)
    except MetricError as error:
        return {"mean": None, "reason": str(error)}
    anomalous = [str(predicted.samples[i].image_path) for i in with_masks
                 if predicted.samples[i].label == 1]
    return {"mean": float(values.mean()), "fpr_band": list(AUPIMO_BAND), "images": anomalous,
            "values": values.tolist()}


def protocol_results(protocol: Protocol, evaluations: Sequence[TaskEvaluation],
                     views: str = "max") -> dict[str, Any]:
    """The ``protocol`` object of the test JSON: ``name``, ``columns``, ``metrics`` (the
    table's columns, the mean over categories), and ``per_category``: its ``metrics`` row and,
    ``beside`` the table, AUPIMO and what else the protocol reports. ``views``: how a
    multi-view object's score comes from its views' (a key of :data:`VIEW_AGGREGATIONS`)."""
    per_category: dict[str, dict[str, Any]] = {}
    for evaluation in evaluations:
        for group, predicted in evaluation.predictions.items():
            protocol.check_model(evaluation.task, evaluation.calibration)
            calibration = evaluation.calibration.for_category(group) \
                if evaluation.calibration is not None else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", metrics.UndefinedMetricWarning)
                row = protocol.score_category(predicted, evaluation.per_group[group],
                                              calibration, views)
            beside = {k: v for k, v in row.items() if k not in protocol.columns}
            per_category[group] = {"metrics": {c: row[c] for c in protocol.columns},
                                   "beside": {**beside, "aupimo": _aupimo(predicted)}}
    mean = {}
    for column in protocol.columns:
        values = [row["metrics"][column] for row in per_category.values()]
        usable = [v for v in values if v is not None and not np.isnan(v)]
        mean[column] = float(np.mean(usable)) if usable and len(usable) == len(values) else None
    return {"name": protocol.name, "columns": list(protocol.columns), "metrics": mean,
            "per_category": per_category}
