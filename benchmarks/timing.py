"""Shared by the benchmark scripts: predictions over a test set, timed against the backbone."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from iadkit.data import make_loader
from iadkit.data.samples import SampleSet
from iadkit.methods import Detector


@dataclass
class TimedPredictions:
    maps: np.ndarray  # (N, S, S)
    scores: np.ndarray  # (N,)
    masks: np.ndarray  # (N, S, S) bool
    labels: np.ndarray  # (N,)
    predict_seconds: float  # Detector.predict on preprocessed batches
    backbone_seconds: float  # the detector's frozen backbone alone on the same batches


def timed_predictions(detector: Detector, samples: SampleSet, batch_size: int) -> TimedPredictions:
    """Predict every sample, timing ``predict`` and ``detector.extractor`` batch by batch
    (image decoding excluded from both; the backbone in the detector's precision)."""
    maps, scores, masks, labels = [], [], [], []
    predict_seconds = backbone_seconds = 0.0
    for batch in make_loader(samples, detector.preprocess, batch_size):
        started = time.perf_counter()
        prediction = detector.predict(batch["image"])
        predict_seconds += time.perf_counter() - started
        started = time.perf_counter()
        with detector.networks_in_precision():  # the backbone in the detector's precision
            detector.extractor(batch["image"])
        backbone_seconds += time.perf_counter() - started
        maps.append(prediction.anomaly_maps.numpy())
        scores.append(prediction.scores.numpy())
        masks.append(batch["mask"].numpy() > 0.5)
        labels.append(batch["label"].numpy())
    return TimedPredictions(np.concatenate(maps), np.concatenate(scores), np.concatenate(masks),
                            np.concatenate(labels), predict_seconds, backbone_seconds)
