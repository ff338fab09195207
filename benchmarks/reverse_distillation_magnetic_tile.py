"""RD, AAND and ReContrast on Magnetic Tile Defects with the same training budget.

Prints one JSON line per method. Usage (from the repository root, after ``make test``)::

    .venv/bin/python benchmarks/reverse_distillation_magnetic_tile.py [--methods rd aand recontrast]
        [--epochs 10] [--preset cpu] [--textures ../shared/data/textures] [--param key=value ...]

Each method runs in its own process, so ``peak_rss_gb`` is that method's own peak. ``epochs`` is
the distillation budget of every method; AAND additionally trains its amplifiers for
``amplify_epochs`` (preset value unless given with ``--param``). All 700 training images are used
(nothing held out: metrics need no threshold). Timings:

- ``fit_seconds``: the whole fit, images read from disk included.
- ``images_per_second``: ``Detector.predict`` on preprocessed test batches.
- ``backbone_images_per_second``: the frozen teacher alone on the same batches.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def run_one(method: str, args: argparse.Namespace) -> dict:
    from timing import timed_predictions

    from iadkit import metrics
    from iadkit.data import load_dataset, make_loader
    from iadkit.methods import create_detector

    params = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.param)}
    params.setdefault("epochs", args.epochs)
    if method == "aand" and args.textures:
        params.setdefault("texture_dir", args.textures)
    samples = load_dataset(args.data)
    train, test = samples.where(split="train"), samples.where(split="test")
    detector = create_detector(method, args.preset, device="cpu", **params)

    started = time.perf_counter()
    detector.fit(make_loader(train, detector.preprocess, args.batch_size))
    fit_seconds = time.perf_counter() - started

    timed = timed_predictions(detector, test, args.batch_size)
    image = metrics.image_metrics(timed.labels, timed.scores)
    pixel = metrics.pixel_metrics(timed.masks, timed.maps)
    n_test = len(timed.labels)
    return {
        "benchmark": "reverse_distillation_magnetic_tile",
        "method": method,
        "preset": args.preset,
        "params": params,
        "n_train": len(train),
        "n_test": n_test,
        "image_auroc": round(image["image_auroc"], 4),
        "pixel_auroc": round(pixel["pixel_auroc"], 4),
        "pixel_aupro": round(pixel["pixel_aupro"], 4),
        "fit_seconds": round(fit_seconds, 1),
        "loss_history": detector.fit_info_["loss_history"],
        "images_per_second": round(n_test / timed.predict_seconds, 1),
        "backbone_images_per_second": round(n_test / timed.backbone_seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(SHARED / "magnetic_tile"))
    parser.add_argument("--textures", default=str(SHARED / "textures"),
                        help="texture folder for AAND's synthetic anomalies ('' = procedural)")
    parser.add_argument("--methods", nargs="+", default=["rd", "aand", "recontrast"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(run_one(args.methods[0], args)), flush=True)
        return
    for method in args.methods:
        command = [sys.executable, __file__, "--single", "--methods", method,
                   "--data", args.data, "--textures", args.textures, "--epochs", str(args.epochs),
                   "--preset", args.preset, "--batch-size", str(args.batch_size)]
        for param in args.param:
            command += ["--param", param]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
