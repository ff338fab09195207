"""How well a fitted CADA's regressor predicts its base's map statistics, per category.

For each category of a pool made by ``unified_pool.py``, on up to ``--images`` images of its
training normals, its held-out normals and its test normals: the mean true statistics of the
base's raw maps (centre ``u`` and upper level ``gamma``), the mean regressed ones, and their
correlation over the images. A regressor that predicts little more than one overall value
aligns nothing (docs/unified.md). Prints one JSON line per category::

    .venv/bin/python benchmarks/cada_regressor_fit.py RUN_DIR [--pool /tmp/iadkit-unified-pool]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from iadkit.methods import Detector
from iadkit.methods.cada.networks import map_statistics


def summary(truth: torch.Tensor, predicted: torch.Tensor) -> dict[str, float | None]:
    row: dict[str, float | None] = {}
    for column, name in enumerate(("u", "gamma")):
        row[f"true_{name}"] = round(float(truth[:, column].mean()), 4)
        row[f"regressed_{name}"] = round(float(predicted[:, column].mean()), 4)
        if float(predicted[:, column].std()) > 0 and float(truth[:, column].std()) > 0:
            row[f"{name}_correlation"] = round(float(np.corrcoef(
                truth[:, column].numpy(), predicted[:, column].numpy())[0, 1]), 3)
        else:  # a constant prediction has no correlation
            row[f"{name}_correlation"] = None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a CADA run folder (with models/unified)")
    parser.add_argument("--pool", default=str(Path(tempfile.gettempdir())
                                               / "iadkit-unified-pool"))
    parser.add_argument("--images", type=int, default=32)
    args = parser.parse_args()
    cada = Detector.load(Path(args.run) / "models" / "unified", device="cpu")
    base, preprocess = cada.base_detector, cada.preprocess
    cada.network_.eval()
    data = Path(args.pool) / "data"
    folders = {"train": data / "pool" / "{}" / "train" / "good",
               "held_out": data / "held_out" / "{}" / "train" / "good",
               "test_normal": data / "pool" / "{}" / "test" / "good"}
    print(json.dumps({"regressor_loss_history": cada.fit_info_["loss_history"]["regressor"],
                      "regressed_std": cada.fit_info_.get("regressed_std"),
                      "target_std": cada.fit_info_.get("target_std")}))
    for category in cada.fit_info_["classes"]:
        row: dict[str, object] = {"category": category}
        for name, folder in folders.items():
            files = sorted(Path(str(folder).format(category)).iterdir())[:args.images]
            images = torch.stack([preprocess.load(f) for f in files])
            with torch.no_grad():
                maps, features = base.raw_maps_and_features(images)
                row[name] = summary(map_statistics(maps.float()), cada.network_(features))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
