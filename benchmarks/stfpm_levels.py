"""Where a fitted STFPM model's signal comes from: each pyramid level on its own.

For a fitted STFPM model and its dataset this prints one JSON line with, per level (and for the
model's own fusion of the levels):

- ``image_auroc`` (the map's maximum) and ``pixel_auroc`` of that level's distance map alone;
- the mean student-teacher distance on the training normals, on the test normals, on the
  anomalous test images' defect cells (mask covering at least half of the cell) and on their
  other cells. A student that reproduces the teacher on defects as well as on normals has
  about the same distance on defect cells as on normal ones: that level cannot see them;
- ``teacher_oracle``: image and pixel AUROC of the distance of each test position's
  channel-normalised teacher feature to its nearest training one (a seeded random
  ``--bank-fraction`` of the training positions): whether the teacher's features at that level
  tell the defects apart at all, whatever a student learns.

Usage::

    .venv/bin/python -m iadkit fit --method stfpm --preset cpu --data DATA --out RUN
    .venv/bin/python benchmarks/stfpm_levels.py RUN/models/CATEGORY DATA
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from iadkit import metrics
from iadkit.data import load_dataset, make_loader
from iadkit.methods.base import Detector
from iadkit.methods.stfpm.stfpm import pyramid_distances
from iadkit.nn.knn import nearest_neighbours


def level_distances(detector: Any, samples: Any, batch_size: int
                    ) -> tuple[list[np.ndarray], list[torch.Tensor], np.ndarray, np.ndarray]:
    """Per level the (N, h, w) student-teacher distances and the (N, h, w, C)
    channel-normalised teacher features; the (N, H, W) masks and the (N,) labels."""
    levels: list[list[np.ndarray]] = []
    teachers: list[list[torch.Tensor]] = []
    masks, labels = [], []
    with torch.no_grad():
        for batch in make_loader(samples, detector.preprocess, batch_size):
            images = batch["image"].to(detector.torch_device)
            teacher = detector.extractor(images)
            distances = pyramid_distances(teacher, detector.student_(images))
            levels.append([d.cpu().numpy() for d in distances])
            teachers.append([F.normalize(t, dim=1).permute(0, 2, 3, 1).cpu() for t in teacher])
            masks.append(batch["mask"].numpy())
            labels.append(batch["label"].numpy())
    count = len(levels[0])
    return ([np.concatenate([batch[k] for batch in levels]) for k in range(count)],
            [torch.cat([batch[k] for batch in teachers]) for k in range(count)],
            np.concatenate(masks), np.concatenate(labels))


def teacher_oracle(train: torch.Tensor, test: torch.Tensor, fraction: float, seed: int
                   ) -> np.ndarray:
    """(N, h, w) distance of each test position's teacher feature to the nearest in a seeded
    random ``fraction`` of the training positions."""
    channels = train.shape[-1]
    positions = train.reshape(-1, channels)
    chosen = torch.randperm(len(positions), generator=torch.Generator().manual_seed(seed))
    bank = positions[chosen[:max(1, round(fraction * len(positions)))]]
    nearest = nearest_neighbours(test.reshape(-1, channels), bank)[0]
    return nearest.view(test.shape[:-1]).numpy()


def map_metrics(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Image AUROC of the maps' maxima; pixel AUROC when the test set has masks."""
    result = {"image_auroc": round(metrics.auroc(labels, maps.reshape(len(maps), -1).max(1)), 4)}
    if masks.any():
        result["pixel_auroc"] = round(metrics.auroc(masks.reshape(-1) > 0, maps.reshape(-1)), 4)
    return result


def mean_distances(train_level: np.ndarray, test_level: np.ndarray, masks: np.ndarray,
                   labels: np.ndarray) -> dict[str, float | None]:
    """The level's mean distance on training normals, test normals and anomalous cells."""
    cells = F.interpolate(torch.from_numpy(masks[:, None].astype(np.float32)),
                          size=test_level.shape[-2:], mode="area")[:, 0].numpy() >= 0.5
    anomalous = (labels == 1)[:, None, None] & np.ones_like(cells)
    defect, other = anomalous & cells, anomalous & ~cells
    return {"train_normal": round(float(train_level.mean()), 4),
            "test_normal": round(float(test_level[labels == 0].mean()), 4),
            "test_defect_cells": round(float(test_level[defect].mean()), 4) if defect.any()
            else None,
            "test_anomalous_other_cells": round(float(test_level[other].mean()), 4)
            if other.any() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a fitted STFPM model folder (RUN/models/CATEGORY)")
    parser.add_argument("data", help="its dataset (the training and test split are read)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bank-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    detector = Detector.load(args.model)
    if detector.name != "stfpm":
        parser.error(f"{args.model} holds a {detector.name} model, not an STFPM one")
    samples = load_dataset(Path(args.data))
    train_levels, train_teacher, _, _ = level_distances(detector, samples.where(split="train"),
                                                        args.batch_size)
    test_levels, test_teacher, masks, labels = level_distances(
        detector, samples.where(split="test"), args.batch_size)
    size = masks.shape[-2:]

    def upsample(level: np.ndarray) -> np.ndarray:
        return F.interpolate(torch.from_numpy(level[:, None]), size=size, mode="bilinear",
                             align_corners=False)[:, 0].numpy()

    upsampled = [upsample(level) for level in test_levels]
    fused = upsampled[0]
    for level in upsampled[1:]:
        fused = fused * level if detector.level_fusion == "product" else fused + level
    record: dict[str, Any] = {"benchmark": "stfpm_levels", "model": args.model,
                              "data": args.data, "layers": list(detector.layers)}
    for k, level in enumerate(upsampled):
        record[f"level_{k + 1}"] = {**map_metrics(level, masks, labels),
                                    "mean_distance": mean_distances(
                                        train_levels[k], test_levels[k], masks, labels),
                                    "teacher_oracle": map_metrics(upsample(teacher_oracle(
                                        train_teacher[k], test_teacher[k], args.bank_fraction,
                                        args.seed)), masks, labels)}
    record[f"fused_{detector.level_fusion}"] = map_metrics(fused, masks, labels)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
