"""Input geometries (resize, letterbox, tile) on the real sets: quality at native resolution,
fit time, inference time, memory.

For each set (``--sets``: magnetic_tile, deeppcb), method (``--methods``, cpu preset) and
geometry (``--geometries``, each a name and its options, e.g. ``tile:tile_size=128``), one
detector is fitted on every training image and tested on every test image. Each line has:

- ``image_auroc``, and ``pixel_auroc`` / ``pixel_aupro`` **at native resolution**: every map
  is brought onto its image's own pixels (``Preprocess.map_to_original``) and compared with
  the original mask, so the geometries are judged on the same pixels (the engine's own
  figures, at each geometry's evaluation shape, are under ``evaluation_shape``);
- ``fit_seconds`` (reading and tiling included), ``ms_per_image`` (``predict_samples``: reading,
  units, network, stitching), ``units_per_image``, ``backbone_units_per_second`` (the floor);
- ``peak_rss_gb`` of this process so far (models run one after the other).

With ``--overlays DIR``, each run also writes the anomaly map over its original image (the
report's overlay, at the image's own size) for the first ``--overlay-count`` anomalous test
images, so the geometries can be compared picture by picture.

Resumable: a finished (set, method, geometry) is kept under ``--out``. Usage::

    .venv/bin/python benchmarks/geometry_real.py [--sets magnetic_tile] [--methods patchcore]
        [--geometries resize letterbox tile:tile_size=128] [--out /tmp/iadkit-geometry]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from multi_category_data import SHARED
from records import kept_record, peak_rss_gb

from iadkit import metrics
from iadkit.data import load_dataset, make_loader
from iadkit.data.image_io import read_image, read_mask
from iadkit.engine.evaluation import predict_samples, score_predictions
from iadkit.methods import create_detector
from iadkit.overlay import save_overlay


def parse_geometry(text: str) -> tuple[str, dict[str, Any]]:
    """``tile:tile_size=128,tile_overlap=0.25`` -> ("tile", {...})."""
    name, _, options = text.partition(":")
    params: dict[str, Any] = {"geometry": name}
    for option in filter(None, options.split(",")):
        key, value = option.split("=", 1)
        params[key] = yaml.safe_load(value)
    return name, params


def native_metrics(scored: Any) -> dict[str, float]:
    """Image AUROC, and pixel AUROC and AUPRO with every map on its image's own pixels."""
    maps, masks = [], []
    for sample, anomaly_map in zip(scored.samples, scored.maps, strict=True):
        height, width = read_image(sample.image_path).shape[:2]
        maps.append(scored.preprocess.map_to_original(anomaly_map, height, width))
        masks.append(read_mask(sample.mask_path) if sample.mask_path is not None
                     else np.zeros((height, width), bool))
    # A centre crop leaves pixels the model never saw (NaN): they count as the lowest score.
    low = min(float(np.nanmin(m)) for m in maps)
    maps = [np.nan_to_num(m, nan=low) for m in maps]
    pixel = metrics.pixel_metrics(masks, maps)
    return {"image_auroc": round(metrics.auroc(scored.labels, scored.scores), 4),
            "pixel_auroc": round(pixel["pixel_auroc"], 4),
            "pixel_aupro": round(pixel["pixel_aupro"], 4)}


def backbone_units_per_second(detector: Any, samples: Any, batch_size: int) -> float:
    """The frozen backbone alone on the detector's units of the first test images."""
    units = next(iter(make_loader(samples, detector.preprocess, 4 * batch_size)))["image"]
    with torch.no_grad():
        detector.extractor(units[:2])
        started = time.perf_counter()
        for chunk in units.split(batch_size):
            detector.extractor(chunk)
    return round(len(units) / (time.perf_counter() - started), 2)


def save_overlays(scored: Any, folder: Path, count: int) -> None:
    """The first ``count`` anomalous test images with their maps over them (own colour scale)."""
    anomalous = [k for k, s in enumerate(scored.samples) if s.label == 1][:count]
    for k in anomalous:
        sample = scored.samples[k]
        save_overlay(sample.image_path, scored.maps[k], scored.preprocess, None,
                     folder / f"{sample.defect_type}_{Path(sample.image_path).stem}.png")


def measure(data: Path, method: str, name: str, params: dict[str, Any], batch_size: int,
            overlays: Path | None, overlay_count: int) -> dict[str, Any]:
    samples = load_dataset(data)
    train, test = samples.where(split="train"), samples.where(split="test")
    detector = create_detector(method, "cpu", device="cpu", **params)
    started = time.perf_counter()
    loader = make_loader(train, detector.preprocess, batch_size)
    detector.fit(loader)
    fit_seconds = time.perf_counter() - started
    scored = predict_samples(detector, test, batch_size)
    engine = score_predictions(scored, pixel=True)
    if overlays is not None:
        save_overlays(scored, overlays, overlay_count)
    return {
        "benchmark": "geometry_real", "set": data.name, "method": method, "geometry": name,
        "params": params, **native_metrics(scored),
        "evaluation_shape": {k: round(engine[k], 4) for k in
                             ("pixel_auroc", "pixel_aupro")},
        "n_train": len(train), "n_test": len(test),
        "units_per_image": round(len(loader.dataset) / len(train), 2),
        "fit_seconds": round(fit_seconds, 1),
        "ms_per_image": round(1000 * scored.seconds / len(test), 2),
        "backbone_units_per_second": backbone_units_per_second(detector, test, batch_size),
        "peak_rss_gb": peak_rss_gb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(SHARED), help="the folder holding the sets")
    parser.add_argument("--sets", nargs="+", default=["magnetic_tile", "deeppcb"])
    parser.add_argument("--methods", nargs="+", default=["patchcore", "rd", "padim"])
    parser.add_argument("--geometries", nargs="+",
                        default=["resize", "letterbox", "tile:tile_size=128"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "iadkit-geometry"))
    parser.add_argument("--overlays", help="write overlays of anomalous test images here")
    parser.add_argument("--overlay-count", type=int, default=4)
    args = parser.parse_args()
    out = Path(args.out)
    for set_name in args.sets:
        for method in args.methods:
            for text in args.geometries:
                name, params = parse_geometry(text)
                key = f"{set_name}-{method}-{text.replace(':', '-').replace(',', '-')}"
                data = Path(args.root) / set_name
                overlays = Path(args.overlays) / key if args.overlays else None
                record = kept_record(out / f"{key}.json", lambda data=data, name=name,
                                     params=params, method=method, overlays=overlays: measure(
                                         data, method, name, params, args.batch_size, overlays,
                                         args.overlay_count))
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
