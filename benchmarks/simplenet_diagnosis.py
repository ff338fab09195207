"""What limits SimpleNet on a real set: its features, or the noise its discriminator learns from?

SimpleNet's discriminator learns "normal" as the adapted training features and "anomalous" as
copies moved by Gaussian noise of std ``noise_std`` (0.015, the paper's value for WRN50
features): a patch whose features lie further from the normal ones than the noise moves them is
scored anomalous. Whether that rule fits a set depends on two distances the paper never states,
measured here on a fitted model in its own adapted feature space:

- the noise's reach, ``noise_std * sqrt(D)`` (the length of a noise vector);
- the distance of each patch to its nearest training patch (a seeded random ``--bank-fraction``
  of the training patches as the bank): for patches of held-out training normals (a seeded
  ``--holdout`` share of the training images, kept out of the fit), of the test normals, and of
  the anomalous test images' defect patches (mask covering at least half of the patch cell).

and an *oracle* that keeps SimpleNet's features and replaces its discriminator by that
nearest-neighbour distance, with the same upsampling, smoothing and maximum (``--bank
coreset``: the bank is PatchCore's greedy coreset of the training patches instead, a
``--bank-fraction`` of them, so the oracle is PatchCore on SimpleNet's features): image and
pixel AUROC of both, on the adapted and on the raw patch features. When the oracle separates
the defects and the discriminator does not, the features are not what limits SimpleNet; when
normal patches already lie further from the bank than the noise reaches, the discriminator
calls normal variation anomalous.

Usage::

    .venv/bin/python benchmarks/simplenet_diagnosis.py --data ../shared/data/magnetic_tile
        [--epochs 24] [--param noise_std=0.05] [--bank random|coreset] [--bank-fraction 0.05]
        [--out /tmp/iadkit-simplenet-diagnosis]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from records import kept_record, peak_rss_gb

from iadkit import metrics
from iadkit.data import load_dataset, make_loader
from iadkit.data.samples import SampleSet
from iadkit.methods import create_detector
from iadkit.nn.anomaly_maps import gaussian_blur
from iadkit.nn.coreset import greedy_coreset
from iadkit.nn.knn import nearest_neighbours


def patch_grids(detector: Any, samples: Any, batch_size: int) -> dict[str, Any]:
    """Raw and adapted patch features (N, h, w, D), discriminator scores (N, h, w), the masks
    at the input size (N, S, S) and the labels of ``samples``."""
    head = detector.experts_[0]
    raw, adapted, scores, masks, labels = [], [], [], [], []
    with torch.no_grad():
        for batch in make_loader(samples, detector.preprocess, batch_size):
            images = batch["image"].to(detector.torch_device)
            features = detector.patch_features(images).permute(0, 2, 3, 1)
            raw.append(features.cpu())
            adapted.append(head.adaptor(features).cpu())
            scores.append(detector.patch_scores(features.permute(0, 3, 1, 2)).cpu())
            masks.append(batch["mask"])
            labels.append(batch["label"])
    return {"raw": torch.cat(raw), "adapted": torch.cat(adapted), "scores": torch.cat(scores),
            "masks": torch.cat(masks).numpy(), "labels": torch.cat(labels).numpy()}


def map_metrics(patch_scores: torch.Tensor, masks: np.ndarray, labels: np.ndarray,
                sigma: float) -> dict[str, float]:
    """SimpleNet's own map from (N, h, w) patch scores: upsampled, smoothed; its maximum."""
    maps = gaussian_blur(F.interpolate(patch_scores[:, None], size=masks.shape[-2:],
                                       mode="bilinear", align_corners=False)[:, 0], sigma)
    result = {"image_auroc": round(metrics.auroc(labels, patch_scores.flatten(1).amax(1)), 4)}
    if masks.any():
        result["pixel_auroc"] = round(metrics.auroc(masks.reshape(-1) > 0,
                                                    maps.numpy().reshape(-1)), 4)
    return result


def quantiles(values: torch.Tensor) -> dict[str, float] | None:
    if values.numel() == 0:
        return None
    q = torch.quantile(values[torch.randperm(len(values))[:1_000_000]].double(),
                       torch.tensor([0.5, 0.95], dtype=torch.float64))
    return {"median": round(float(q[0]), 4), "q95": round(float(q[1]), 4)}


def measure(data: Path, params: dict[str, Any], holdout: float, bank: str, bank_fraction: float,
            batch_size: int, seed: int) -> dict[str, Any]:
    samples = load_dataset(data)
    train, test = samples.where(split="train"), samples.where(split="test")
    order = np.random.default_rng(seed).permutation(len(train))
    n_held = max(1, round(holdout * len(train)))
    held = SampleSet(train[int(i)] for i in order[:n_held])
    fitted = SampleSet(train[int(i)] for i in order[n_held:])
    detector = create_detector("simplenet", "cpu", device="cpu", **params)
    started = time.perf_counter()
    detector.fit(make_loader(fitted, detector.preprocess, batch_size))
    fit_seconds = time.perf_counter() - started
    generator = torch.Generator().manual_seed(seed)
    train_grids = patch_grids(detector, fitted, batch_size)
    held_grids = patch_grids(detector, held, batch_size)
    test_grids = patch_grids(detector, test, batch_size)
    labels, masks = test_grids["labels"], test_grids["masks"]
    height, width = test_grids["scores"].shape[1:]
    cells = F.interpolate(torch.from_numpy(masks[:, None].astype(np.float32)),
                          size=(height, width), mode="area")[:, 0] >= 0.5
    normal = torch.from_numpy(labels == 0)[:, None, None].expand_as(cells)
    record: dict[str, Any] = {
        "benchmark": "simplenet_diagnosis", "set": data.name, "params": params,
        "n_fit": len(fitted), "n_held_out": len(held), "n_test": len(test),
        "discriminator": map_metrics(test_grids["scores"], masks, labels,
                                     detector.smoothing_sigma)}
    dimension = train_grids["adapted"].shape[-1]
    record["noise_reach"] = round(detector.noise_std_ * math.sqrt(dimension), 4)
    for space in ("adapted", "raw"):
        patches = train_grids[space].reshape(-1, dimension)
        if bank == "coreset":
            chosen = greedy_coreset(patches, bank_fraction, seed=seed)
        else:
            chosen = torch.randperm(len(patches), generator=generator)[
                :max(1, round(bank_fraction * len(patches)))]
        held_distances = nearest_neighbours(held_grids[space].reshape(-1, dimension),
                                            patches[chosen])[0][:, 0]
        test_distances = nearest_neighbours(test_grids[space].reshape(-1, dimension),
                                            patches[chosen])[0].view(len(labels), height, width)
        record[f"oracle_{space}"] = map_metrics(test_distances, masks, labels,
                                                detector.smoothing_sigma)
        record[f"nearest_distance_{space}"] = {
            "held_out_normal": quantiles(held_distances),
            "test_normal": quantiles(test_distances[normal]),
            "test_defect": quantiles(test_distances[cells])}
    record.update(fit_seconds=round(fit_seconds, 1), bank=bank, bank_fraction=bank_fraction,
                  peak_rss_gb=peak_rss_gb())
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="an MVTec-layout category")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the cpu preset's)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a SimpleNet hyperparameter (repeatable)")
    parser.add_argument("--holdout", type=float, default=0.1)
    parser.add_argument("--bank", choices=("random", "coreset"), default="random",
                        help="the oracle's bank: a random sample or the greedy coreset")
    parser.add_argument("--bank-fraction", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir())
                                             / "iadkit-simplenet-diagnosis"))
    args = parser.parse_args()
    params: dict[str, Any] = {k: yaml.safe_load(v) for k, v in
                              (text.split("=", 1) for text in args.param)}
    if args.epochs is not None:
        params["epochs"] = args.epochs
    data = Path(args.data)
    key = "-".join([data.name] + [f"{k}={v}" for k, v in sorted(params.items())]
                   + ([f"{args.bank}{args.bank_fraction}"] if args.bank != "random" else []))
    record = kept_record(Path(args.out) / f"{key}.json", lambda: measure(
        data, params, args.holdout, args.bank, args.bank_fraction, args.batch_size, args.seed))
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
