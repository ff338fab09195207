"""Whether UniAD's input features can tell a set's defects apart.

UniAD rebuilds the frozen backbone's stage features, all resized to one token grid
(``aligned_features``), and its anomaly map is the rebuild error. When such a model ranks a
category's defective images no higher than its normal ones, two causes are possible: the
reconstruction rebuilds defects as well as normal structure, or the features on that grid do
not tell the defects apart at all. This script measures the second without training anything:
each test position is scored by the distance of its aligned feature to the nearest aligned
feature of the training images (every position of every training image, or a seeded random
``--bank-fraction``), then through UniAD's own map steps (``error_maps`` and ``scored`` of
``FeatureReconstruction``: its upsampling, smoothing and pooled-maximum image score). It is an
oracle, not a model: what those features allow whatever the reconstruction learns. (LafitE is
not covered: its features are standardised with statistics a fit learns.)

The bank is built from every category given (``--categories``; all of the dataset by default),
so several categories make the unified setting's bank. One JSON line per category (image AUROC,
pixel AUROC and AUPRO where it has masks, its normal and anomalous score medians) and one for
all test images pooled (the absolute-unified image AUROC). ``--param`` changes the detector's
preset (e.g. ``image_size=448`` for a finer token grid). Usage (repository root)::

    .venv/bin/python benchmarks/reconstruction_oracle.py --data ../shared/data/deeppcb
        [--categories A B] [--param image_size=448] [--bank-fraction 1.0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from records import peak_rss_gb

from iadkit import metrics
from iadkit.data import load_dataset, make_loader
from iadkit.methods import create_detector
from iadkit.nn.knn import nearest_neighbours


def training_bank(detector: Any, samples: Any, batch_size: int, fraction: float,
                  seed: int) -> torch.Tensor:
    """(N, C) aligned features of the training images' positions (a seeded share of them)."""
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for batch in make_loader(samples, detector.preprocess, batch_size):
        features = detector.aligned_features(batch["image"])
        rows = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        if fraction < 1.0:
            rows = rows[torch.rand(len(rows), generator=generator) < fraction]
        kept.append(rows)
    return torch.cat(kept)


def oracle_maps(detector: Any, samples: Any, bank: torch.Tensor, batch_size: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The nearest-training-feature maps through the model's own map pipeline: (N, S, S) maps,
    (N,) image scores, (N, S, S) masks, (N,) labels."""
    maps, scores, masks, labels = [], [], [], []
    for batch in make_loader(samples, detector.preprocess, batch_size):
        images = batch["image"]
        features = detector.aligned_features(images)
        count, channels, height, width = features.shape
        queries = features.permute(0, 2, 3, 1).reshape(-1, channels)
        distances, _ = nearest_neighbours(queries, bank, 1)
        prediction = detector.scored(detector.error_maps(distances.view(count, height, width),
                                                         images.shape[-2:]))
        maps.append(prediction.anomaly_maps.numpy())
        scores.append(prediction.scores.numpy())
        masks.append(batch["mask"].numpy())
        labels.append(batch["label"].numpy())
    return (np.concatenate(maps), np.concatenate(scores), np.concatenate(masks),
            np.concatenate(labels))


def category_record(name: str, scores: np.ndarray, labels: np.ndarray, maps: np.ndarray,
                    masks: np.ndarray) -> dict[str, Any]:
    record: dict[str, Any] = {"category": name, "n_test": len(labels),
                              "image_auroc": round(metrics.auroc(labels, scores), 4)}
    if masks.any():
        pixel = metrics.pixel_metrics(list(masks.astype(bool)), list(maps))
        record.update(pixel_auroc=round(pixel["pixel_auroc"], 4),
                      pixel_aupro=round(pixel["pixel_aupro"], 4))
    record.update(normal_median=round(float(np.median(scores[labels == 0])), 4),
                  anomalous_median=round(float(np.median(scores[labels == 1])), 4))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a dataset root (MVTec layout)")
    parser.add_argument("--categories", nargs="+", help="default: every category")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--bank-fraction", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    params = {key: yaml.safe_load(value) for key, value in
              (given.split("=", 1) for given in args.param)}
    detector = create_detector("uniad", "cpu", device="cpu", **params)
    if detector.geometry == "tile":
        parser.error("geometry=tile: the oracle scores whole images (use image_size for a "
                     "finer grid)")
    samples = load_dataset(Path(args.data), args.categories)
    categories = sorted({sample.category for sample in samples})
    started = time.perf_counter()
    with torch.no_grad():
        bank = training_bank(detector, samples.where(split="train"), args.batch_size,
                             args.bank_fraction, args.seed)
        scored = {name: oracle_maps(detector, samples.where(split="test", category=name),
                                    bank, args.batch_size) for name in categories}
    common = {"benchmark": "reconstruction_oracle", "method": "uniad", "params": params,
              "data": Path(args.data).name, "bank_categories": categories,
              "token_grid": list(detector.feature_grid), "bank_size": len(bank),
              "bank_fraction": args.bank_fraction}
    for name, (maps, scores, masks, labels) in scored.items():
        print(json.dumps({**common, **category_record(name, scores, labels, maps, masks)}))
    if len(categories) > 1:
        scores = np.concatenate([s for _, s, _, _ in scored.values()])
        labels = np.concatenate([y for *_, y in scored.values()])
        print(json.dumps({**common, "category": "pooled", "n_test": len(labels),
                          "image_auroc": round(metrics.auroc(labels, scores), 4),
                          "seconds": round(time.perf_counter() - started, 1),
                          "peak_rss_gb": peak_rss_gb()}))


if __name__ == "__main__":
    main()
