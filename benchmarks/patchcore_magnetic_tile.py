"""PatchCore on Magnetic Tile Defects: quality, fit time, throughput, memory, metric speed.

Prints one JSON line. Usage (from the repository root, after ``make test`` or ``make demo``)::

    .venv/bin/python benchmarks/patchcore_magnetic_tile.py [--data ../shared/data/magnetic_tile]
        [--preset cpu] [--param key=value ...]

All 700 training images are used for fitting (no calibration hold-out: metrics need no
threshold). With ``--search``, PatchCore's ``default_search`` (the map smoothing sigma, by pixel
AUROC) first runs on a model fitted to 90 % of them, on a pseudo-validation set made from the
other 10 % (``mixed``: every synthetic generator in turn); then the detector is fitted again on
all 700 with the chosen value (as scikit-learn's ``refit``). No test image is involved in the
choice; the curve is printed in the JSON line. Timings:

- ``fit_seconds``: feature extraction + coreset, images read from disk included.
- ``search_seconds`` (with ``--search``): the 90 % fit, building the pseudo-validation set and
  scoring it once per candidate value; the final fit is ``fit_seconds``.
- ``images_per_second``: ``Detector.predict`` on preprocessed test batches (decoding excluded).
- ``backbone_images_per_second``: the frozen backbone alone on the same batches: the floor
  any feature-based method pays.
- ``ms_per_image_end_to_end``: reading, resizing and predicting each test image.
- ``aupro_seconds_500``: our AUPRO on 500 of the 256x256 test maps.
- ``peak_rss_gb``: the process's peak resident memory in GiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

import torch
import yaml
from timing import timed_predictions

from iadkit import engine, metrics
from iadkit.data import load_dataset, make_loader
from iadkit.methods import create_detector

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "magnetic_tile"))
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--search", action="store_true",
                        help="choose the inference parameters on held-out pseudo-validation data")
    parser.add_argument("--search-textures", help="texture folder for the pseudo-validation "
                        "anomalies (procedural textures without it)")
    args = parser.parse_args()
    params = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.param)}

    samples = load_dataset(args.data)
    train, test = samples.where(split="train"), samples.where(split="test")
    search, search_seconds = None, None
    if args.search:
        started = time.perf_counter()
        searched = create_detector("patchcore", args.preset, device="cpu", **params)
        fitted, held_out = engine.holdout_split(train, 0.1, seed=0)
        searched.fit(make_loader(fitted, searched.preprocess, args.batch_size))
        search = engine.search_on_held_out_normals(
            searched, held_out, engine.SearchSettings(textures=args.search_textures),
            batch_size=args.batch_size)
        params.update(search["chosen"])
        del searched
        gc.collect()  # its memory bank and features, before the final fit
        search_seconds = round(time.perf_counter() - started, 1)
    detector = create_detector("patchcore", args.preset, device="cpu", **params)

    started = time.perf_counter()
    detector.fit(make_loader(train, detector.preprocess, args.batch_size))
    fit_seconds = time.perf_counter() - started

    end_to_end_started = time.perf_counter()
    for batch in make_loader(test, detector.preprocess, args.batch_size):
        detector.predict(batch["image"])
    end_to_end = time.perf_counter() - end_to_end_started

    # Second pass: time predict() and the backbone alone on the same preprocessed batches.
    timed = timed_predictions(detector, test, args.batch_size)
    predict_seconds, backbone_seconds = timed.predict_seconds, timed.backbone_seconds
    started = time.perf_counter()
    metrics.aupro(timed.masks[:500], timed.maps[:500])
    aupro_seconds = time.perf_counter() - started
    image = metrics.image_metrics(timed.labels, timed.scores)
    pixel = metrics.pixel_metrics(timed.masks, timed.maps)
    n = len(test)
    result = {
        "benchmark": "patchcore_magnetic_tile",
        "preset": args.preset,
        "params": params,
        "n_train": len(train),
        "n_test": n,
        "image_auroc": round(image["image_auroc"], 4),
        "image_ap": round(image["image_ap"], 4),
        "pixel_auroc": round(pixel["pixel_auroc"], 4),
        "pixel_ap": round(pixel["pixel_ap"], 4),
        "pixel_aupro": round(pixel["pixel_aupro"], 4),
        "fit_seconds": round(fit_seconds, 1),
        "search_seconds": search_seconds,
        "seconds_features": detector.fit_info_["seconds_features"],
        "seconds_coreset": detector.fit_info_["seconds_coreset"],
        "memory_bank_size": detector.fit_info_["memory_bank_size"],
        "images_per_second": round(n / predict_seconds, 2),
        "ms_per_image": round(1000 * predict_seconds / n, 2),
        "backbone_images_per_second": round(n / backbone_seconds, 2),
        "ms_per_image_end_to_end": round(1000 * end_to_end / n, 2),
        "aupro_seconds_500": round(aupro_seconds, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "torch_threads": torch.get_num_threads(),
        "search": None if search is None else [
            {"param": stage["param"], "metric": stage["metric"], "chosen": stage["chosen"],
             "source": search["source"],
             "curve": {str(p["value"]): p[stage["metric"]] for p in stage["curve"]}}
            for stage in search["stages"]],
    }
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
