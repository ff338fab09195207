"""Predictions of a detector over samples, and their metrics per test group and pooled.

Example:
    >>> scored = predict_samples(detector, task.test_groups["bottle"])
    >>> score_predictions(scored, pixel=True)["image_auroc"]
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import distributed, metrics
from ..calibration import Calibration, rate_interval
from ..data.dataset import image_units_loader, make_loader
from ..data.preprocess import Preprocess, predict_by_units
from ..data.samples import SampleSet
from ..data.settings import Task
from ..errors import DatasetError, IadkitError
from ..methods import Detector
from ..progress import progress

METRIC_KEYS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")


@dataclass
class ScoredSamples:
    """A detector's predictions for a sample set, in sample order, with the ground truth.

    ``maps`` and ``masks`` are at each image's evaluation shape
    (:meth:`~iadkit.data.preprocess.Preprocess.evaluation_shape`): one ``(N, S, S)`` array
    when every image has the same (the ``resize`` geometry), else a list of 2-D arrays.
    """

    samples: SampleSet
    scores: np.ndarray  # (N,)
    maps: np.ndarray | list[np.ndarray]  # float32
    masks: np.ndarray | list[np.ndarray]  # bool
    seconds: float
    preprocess: Preprocess

    @property
    def labels(self) -> np.ndarray:
        return np.array(self.samples.labels, dtype=int)

    @property
    def map_maxima(self) -> np.ndarray:
        """(N,) the highest value of each image's map."""
        return np.array([float(m.max()) for m in self.maps])

    @classmethod
    def concatenate(cls, parts: Sequence[ScoredSamples]) -> ScoredSamples:
        """One set of predictions from several (pooled evaluation)."""
        return cls(SampleSet([s for p in parts for s in p.samples]),
                   np.concatenate([p.scores for p in parts]),
                   stack_if_alike([m for p in parts for m in p.maps]),
                   stack_if_alike([m for p in parts for m in p.masks]),
                   sum(p.seconds for p in parts), parts[0].preprocess)


def stack_if_alike(arrays: Sequence[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """One array of ``arrays`` when they all have one shape, else the list."""
    if len({a.shape for a in arrays}) <= 1 and len(arrays):
        return np.stack(arrays)
    return list(arrays)


def predict_images(detector: Detector, samples: SampleSet, batch_size: int = 16,
                   workers: int = 0, left_out: bool = False, show_progress: bool = False,
                   description: str = "predict"
                   ) -> Iterator[tuple[int, np.ndarray, float, np.ndarray]]:
    """``(position, anomaly map, score, mask)`` of every image of ``samples``, in order, at
    its evaluation shape: each image's units (one square, or its tiles) go through the
    detector in batches of ``batch_size`` units, across images, and are combined by the
    detector's :class:`~iadkit.data.preprocess.Preprocess`.

    With ``left_out``, training images (``position`` = training index) are scored with
    :meth:`~iadkit.methods.Detector.predict_left_out`.
    """
    def predict(units: np.ndarray, items: list[dict[str, Any]]
                ) -> tuple[np.ndarray, np.ndarray]:
        if left_out:
            prediction = detector.predict_left_out(units, [item["index"] for item in items])
        else:
            prediction = detector.predict(units, categories=[item["category"] for item in items])
        return prediction.anomaly_maps.numpy(), prediction.scores.numpy()

    loader = image_units_loader(samples, detector.preprocess, workers)
    images = ((item, item["units"])
              for item in progress(loader, description, show_progress, total=len(samples)))
    for item, anomaly_map, score in predict_by_units(detector.preprocess, images, predict,
                                                     batch_size):
        yield int(item["index"]), anomaly_map, score, np.asarray(item["mask"], dtype=bool)


def predict_samples(detector: Detector, samples: SampleSet, batch_size: int = 16,
                    workers: int = 0, show_progress: bool = False,
                    description: str = "predict") -> ScoredSamples:
    """Run a fitted detector over samples, keeping maps, scores and ground-truth masks.

    Under torchrun each rank predicts its contiguous share of the samples and every rank gets
    all the predictions back, in sample order (``seconds``: the slowest rank's).
    """
    positions = distributed.shard(torch.arange(len(samples)))
    mine = SampleSet(samples[i] for i in positions.tolist())
    scores = torch.empty(len(mine), dtype=torch.float32)
    maps: list[np.ndarray] = [np.empty(0)] * len(mine)
    masks: list[np.ndarray] = [np.empty(0)] * len(mine)
    started = time.perf_counter()
    for index, anomaly_map, score, mask in predict_images(
            detector, mine, batch_size, workers, show_progress=show_progress,
            description=description):
        scores[index], maps[index], masks[index] = score, anomaly_map, mask.astype(np.uint8)
    seconds = distributed.all_reduce_max(torch.tensor(time.perf_counter() - started))
    return ScoredSamples(samples, distributed.all_gather_shards(scores, len(samples)).numpy(),
                         stack_if_alike(distributed.all_gather_arrays(maps)),
                         stack_if_alike([m > 0 for m in distributed.all_gather_arrays(masks)]),
                         float(seconds), detector.preprocess)


def score_predictions(predictions: ScoredSamples, pixel: bool) -> dict[str, Any]:
    """The metric set of one test group (pixel metrics None where masks are missing)."""
    result: dict[str, Any] = {"n_images": len(predictions.samples),
                              "n_anomalous": int(predictions.labels.sum())}
    result.update(metrics.image_metrics(predictions.labels, predictions.scores))
    if pixel:
        result.update(metrics.pixel_metrics(predictions.masks, predictions.maps))
    else:
        result.update(pixel_auroc=None, pixel_ap=None, pixel_f1_max=None, pixel_aupro=None)
    return result


def decision_statistics(labels: np.ndarray, scores: np.ndarray, calibration: Calibration
                        ) -> dict[str, Any]:
    """The decision at the calibrated threshold against the ground truth: the confusion
    matrix, the image-level F1 at that fixed threshold, the realised false-positive rate and
    recall with their exact (Clopper-Pearson) intervals, and the false-positive rate the
    calibration predicted for this many normal images. ``shift_warning`` says when the
    realised rate falls outside the predicted interval: these test normals do not score like
    the calibration normals."""
    flagged = scores > calibration.image_threshold
    normal, anomalous = labels == 0, labels == 1
    counts = {"true_positives": int((flagged & anomalous).sum()),
              "false_positives": int((flagged & normal).sum()),
              "true_negatives": int((~flagged & normal).sum()),
              "false_negatives": int((~flagged & anomalous).sum())}
    n_normal, n_anomalous = int(normal.sum()), int(anomalous.sum())
    confidence = calibration.confidence
    decided = 2 * counts["true_positives"] + counts["false_positives"] + \
        counts["false_negatives"]
    result: dict[str, Any] = {
        "threshold": calibration.image_threshold, "calibration": calibration.method,
        **counts, "f1": 2 * counts["true_positives"] / decided if decided else None,
        "fpr": None, "fpr_interval": None, "recall": None, "recall_interval": None,
        "predicted_fpr": calibration.fpr_expected, "predicted_fpr_interval": None,
        "confidence": confidence, "shift_warning": None}
    if n_normal:
        fpr = counts["false_positives"] / n_normal
        predicted = calibration.predicted_false_positives(n_normal)
        result.update(fpr=fpr, predicted_fpr_interval=list(predicted),
                      fpr_interval=list(rate_interval(counts["false_positives"], n_normal,
                                                      confidence)))
        if not predicted[0] <= fpr <= predicted[1]:
            result["shift_warning"] = (
                f"{counts['false_positives']} of {n_normal} test normals ({fpr:.1%}) are above "
                f"the threshold; the calibration predicted {predicted[0]:.1%}-{predicted[1]:.1%} "
                f"({confidence:.0%}): these normals do not score like the calibration normals")
    if n_anomalous:
        result.update(recall=counts["true_positives"] / n_anomalous,
                      recall_interval=list(rate_interval(counts["true_positives"], n_anomalous,
                                                         confidence)))
    return result


def _mean(groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    mean: dict[str, Any] = {}
    for key in METRIC_KEYS:
        values = [g[key] for g in groups.values() if g.get(key) is not None]
        mean[key] = float(np.mean(values)) if values and len(values) == len(groups) else None
    return mean


@dataclass
class TaskEvaluation:
    """Metrics of one task, with the predictions behind them (for reports)."""

    task: str
    per_group: dict[str, dict[str, Any]]
    pooled: dict[str, Any] | None
    predictions: dict[str, ScoredSamples]
    calibration: Calibration | None


def _check_masks(name: str, group: SampleSet) -> None:
    """Pixel metrics need a mask for every anomalous image of a group that has masks."""
    anomalous = [s for s in group if s.label == 1]
    missing = [s.image_path for s in anomalous if s.mask_path is None]
    if missing and len(missing) < len(anomalous):
        raise DatasetError(f"{missing[0]}: anomalous test image has no mask ({len(missing)} of "
                           f"{len(anomalous)} in {name!r} lack one); pixel metrics need every "
                           "mask: add them, or remove the ground_truth folder to evaluate this "
                           "category at image level only")


def adapt_to_references(detector: Detector, group: str, references: SampleSet, count: int,
                        seed: int, batch_size: int = 16, workers: int = 0) -> None:
    """Give the detector ``count`` of test group ``group``'s reference normals, a seeded draw.

    (:meth:`RunConfig.check_references` refuses a run whose data has too few before training;
    this guards a test on other data and direct callers.)"""
    if len(references) < count:
        raise DatasetError(f"test group {group!r}: {count} reference normals asked, "
                           f"{len(references)} training normals available")
    chosen = draw_references(references, count, seed)
    detector.adapt_to_references(make_loader(chosen, detector.preprocess, batch_size, workers))


def draw_references(references: SampleSet, count: int, seed: int) -> SampleSet:
    """``count`` of ``references`` drawn by ``seed``, in their order (all when fewer)."""
    order = np.random.default_rng(seed).permutation(len(references))[:count]
    return SampleSet(references[int(i)] for i in sorted(order))


def evaluate_task(detector: Detector, task: Task, batch_size: int = 16, workers: int = 0,
                  show_progress: bool = False, reference_normals: int = 0, seed: int = 0
                  ) -> TaskEvaluation:
    """Metrics per test group (and pooled for absolute-unified tasks), with the decision at
    the detector's calibrated threshold: a group of one category uses that category's own
    threshold when a unified model has one; pooled images, whose category is not known to the
    model, use the common one. A detector that adapts to the subclass under test is first
    given ``reference_normals`` of the group's reference normals (see
    :func:`adapt_to_references`)."""
    calibration = detector.calibration
    per_group, predictions = {}, {}
    for name, group in task.test_groups.items():
        if len(group) == 0:
            raise IadkitError(f"test group {name!r} of task {task.name!r} has no images")
        _check_masks(name, group)
        if detector.needs_references and reference_normals:
            adapt_to_references(detector, name, task.references.get(name, SampleSet([])),
                                reference_normals, seed, batch_size, workers)
        predicted = predict_samples(detector, group, batch_size, workers, show_progress,
                                    f"test {name}")
        predictions[name] = predicted
        per_group[name] = score_predictions(predicted, group.has_masks)
        per_group[name]["ms_per_image"] = round(1000 * predicted.seconds / len(group), 2)
        if calibration is not None:
            category = group.categories[0] if len(group.categories) == 1 and not task.pooled \
                else None
            per_group[name]["decision"] = decision_statistics(
                predicted.labels, predicted.scores, calibration.for_category(category))
    pooled = None
    if task.pooled:
        everything = ScoredSamples.concatenate(list(predictions.values()))
        pooled = score_predictions(everything, pixel=False)
        if calibration is not None:
            pooled["decision"] = decision_statistics(everything.labels, everything.scores,
                                                     calibration)
        # Pixel metrics pool the groups with masks: image-level-only categories have no pixels
        # to score.
        with_masks = [name for name, group in task.test_groups.items() if group.has_masks]
        if with_masks:
            pixels = score_predictions(ScoredSamples.concatenate([predictions[n] for n in with_masks]), pixel=True)
            pooled.update({k: pixels[k] for k in PIXEL_KEYS})
            pooled["pixel_groups"] = with_masks
    return TaskEvaluation(task.name, per_group, pooled, predictions, detector.calibration)


def summarise(evaluations: Sequence[TaskEvaluation], setting: str) -> dict[str, Any]:
    """The flat results object ``iadkit test --json`` writes."""
    per_category: dict[str, dict[str, Any]] = {}
    for evaluation in evaluations:
        per_category.update(evaluation.per_group)
    pooled = [e.pooled for e in evaluations if e.pooled is not None]
    headline = {k: pooled[0][k] for k in METRIC_KEYS} if pooled else _mean(per_category)
    return {"setting": setting, **headline, "per_category": per_category,
            "pooled": pooled[0] if pooled else None}
