"""INT8 OpenVINO export against the float32 one: quality and throughput on Magnetic Tile.

For each method: fit at its cpu preset on the 700 training images (or reuse the run folder),
``iadkit export --format openvino --precision int8`` (calibrated on training normals, refused when
held-out normals' scores drift), then score the 644 test images with OpenVINO in float32 and in
INT8: image and pixel AUROC of each, and throughput at batch 16 and batch 1 (the runtime alone on
preprocessed inputs, decoding excluded, best of three passes). Usage::

    .venv/bin/python benchmarks/int8_export.py [--methods patchcore reverse_distillation]
        [--work /tmp/int8] [--data ../shared/data/magnetic_tile] [--param epochs=4 ...]

``--param`` passes a hyperparameter to the fit (a shortened schedule, where the cpu preset's
would take hours); the JSON line records it.

One JSON line per method. ``refused`` is the export's refusal message when the drift check
failed (the INT8 model is then still measured, from a tolerance-free export, so the size of the
loss is known).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from iadkit import metrics
from iadkit.cli import main as iadkit
from iadkit.data import load_dataset
from iadkit.data.image_io import read_image, read_mask
from iadkit.deploy.export import export_onnx
from iadkit.deploy.inferencer import OnnxInferencer
from iadkit.deploy.quantize import (
    DEFAULT_DRIFT_TOLERANCE,
    DEFAULT_MAX_RESTORE_MINUTES,
    quantize_export,
)
from iadkit.engine import resolve_model_dir
from iadkit.errors import IadkitError
from iadkit.methods import Detector

REPO = Path(__file__).resolve().parents[1]


def evaluate(inferencer: OnnxInferencer, test: Any) -> dict[str, Any]:
    preprocess = inferencer.preprocess
    units = np.stack([preprocess.units_array(read_image(s.image_path))[0] for s in test])
    masks = np.stack([preprocess.mask_array(read_mask(s.mask_path)) > 0.5
                      if s.mask_path else np.zeros(units.shape[-2:], bool) for s in test])
    labels = np.array([s.label for s in test])
    maps, scores = zip(*(inferencer.run(units[i:i + 16]) for i in range(0, len(units), 16)))
    maps, scores = np.concatenate(maps), np.concatenate(scores)
    throughput = {}
    for batch in (16, 1):
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for i in range(0, 64, batch):
                inferencer.run(units[i:i + batch])
            best = min(best, time.perf_counter() - started)
        throughput[f"images_per_second_batch{batch}"] = round(64 / best, 2)
    return {"image_auroc": round(metrics.auroc(labels, scores), 4),
            "pixel_auroc": round(metrics.pixel_metrics(masks, maps)["pixel_auroc"], 4),
            **throughput, "scores": scores}


def run_method(method: str, data: str, work: Path, tolerance: float, max_minutes: float,
               params: list[str]) -> dict[str, Any]:
    run = work / f"run_{method}"
    fitted = any((run / "models").glob("*/detector.json"))
    flags = [flag for param in params for flag in ("--param", param)]
    if not fitted and iadkit(["fit", "--method", method, "--preset", "cpu", "--data", data,
                              "--out", str(run), "--quiet", *flags]):
        raise SystemExit(f"fitting {method} failed")
    export = work / f"export_{method}"
    samples = load_dataset(data)
    train, test = samples.where(split="train"), samples.where(split="test")
    export_onnx(Detector.load(resolve_model_dir(run), device="cpu"), export)
    training_images = [s.image_path for s in train]
    refused = None
    try:
        record = quantize_export(export, training_images, tolerance=tolerance,
                                 max_restore_minutes=max_minutes)
    except IadkitError as error:
        refused = str(error)
        # Measure the refused model anyway: what would the tolerance have let through?
        record = quantize_export(export, training_images, tolerance=float("inf"))
    f32 = evaluate(OnnxInferencer(export, runtime="openvino"), test)
    int8 = evaluate(OnnxInferencer(export, runtime="openvino", precision="int8"), test)
    f32_scores, int8_scores = f32.pop("scores"), int8.pop("scores")
    return {
        "benchmark": "int8_export", "method": method, "params": params, "n_test": len(test),
        "f32": f32, "int8": int8,
        "speedup_batch16": round(int8["images_per_second_batch16"]
                                 / f32["images_per_second_batch16"], 3),
        "speedup_batch1": round(int8["images_per_second_batch1"]
                                / f32["images_per_second_batch1"], 3),
        "image_auroc_change": round(int8["image_auroc"] - f32["image_auroc"], 4),
        "pixel_auroc_change": round(int8["pixel_auroc"] - f32["pixel_auroc"], 4),
        "test_score_correlation": round(float(np.corrcoef(f32_scores, int8_scores)[0, 1]), 5),
        "held_out_drift": record["drift"], "tolerance": tolerance, "refused": refused,
        "n_quantized_inputs": record["n_quantized_inputs"],
        "n_calibration_images": record["n_calibration_images"],
        "quantize_seconds": record["quantize_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "magnetic_tile"))
    parser.add_argument("--methods", nargs="+", default=["patchcore"])
    parser.add_argument("--work", default="/tmp/iadkit_int8")
    parser.add_argument("--int8-tolerance", type=float, default=DEFAULT_DRIFT_TOLERANCE,
                        help="the export's drift tolerance (iadkit export --int8-tolerance)")
    parser.add_argument("--int8-max-minutes", type=float, default=DEFAULT_MAX_RESTORE_MINUTES,
                        help="the export's limit on NNCF's accuracy control (iadkit export "
                             "--int8-max-minutes)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a hyperparameter for the fit (iadkit fit --param), repeatable")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        print(json.dumps(run_method(method, args.data, work, args.int8_tolerance,
                                    args.int8_max_minutes, args.param)), flush=True)


if __name__ == "__main__":
    main()
