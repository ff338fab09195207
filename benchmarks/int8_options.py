"""What NNCF's quantisation options do to an export's INT8 accuracy on Magnetic Tile.

Quantises one float32 export (``iadkit export --format onnx``) several ways, each with plain
``nncf.quantize`` (no accuracy control) on the calibration images ``quantize_export`` uses (the
training normals after its 64 held-out ones, at most 300), and scores the 644 test images with
OpenVINO: image and pixel AUROC of float32 and of each INT8 variant, and the correlation of
their image scores. Accuracy only (nothing here is timed). Usage::

    .venv/bin/python benchmarks/int8_options.py EXPORT_DIR [--variants default full_bias ...]
        [--data ../shared/data/magnetic_tile]

A variant is a ``+``-joined list of options: ``default``; ``full_bias`` (NNCF's full bias
correction instead of the fast one); ``mixed`` (the MIXED preset: asymmetric activations);
``quantile`` (activation ranges from quantiles rather than extremes); ``float_stem`` (the stem
convolutions left in float32). One JSON line per variant, float32 first.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import nncf
import numpy as np
import openvino
from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
from nncf.quantization.range_estimator import RangeEstimatorParametersSet

from iadkit import metrics
from iadkit.data import load_dataset
from iadkit.data.image_io import read_image, read_mask
from iadkit.data.preprocess import Preprocess
from iadkit.deploy.inferencer import CONFIG_FILE, MODEL_FILE
from iadkit.deploy.quantize import (
    _F32,
    _constants_folded,
    _held_out_and_calibration,
    _nncf_settings,
    _Units,
)

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ("default", "full_bias", "mixed", "quantile", "float_stem")


def checked_options(variant: str) -> list[str]:
    """A ``+``-joined variant's options; ValueError naming the unknown ones."""
    options = variant.split("+")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"--variants {variant}: unknown option(s) {unknown}; choose from "
                         f"{OPTIONS}")
    return options


def quantize_settings(variant: str, base: dict[str, Any]) -> dict[str, Any]:
    """``nncf.quantize``'s keyword arguments for a variant: ``quantize_export``'s ``base``
    (matrix products left in float32) with the variant's options."""
    options = checked_options(variant)
    settings = dict(base)
    if "float_stem" in options:
        settings["ignored_scope"] = nncf.IgnoredScope(
            types=["MatMul", "Gemm"], patterns=[".*conv_stem.*"], validate=False)
    if "full_bias" in options:
        settings["fast_bias_correction"] = False
    if "mixed" in options:
        settings["preset"] = nncf.QuantizationPreset.MIXED
    if "quantile" in options:
        settings["advanced_parameters"] = AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MEAN_QUANTILE)
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--variants", nargs="+", default=["default", "full_bias"])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "magnetic_tile"))
    args = parser.parse_args()
    for variant in args.variants:  # refuse a bad variant before any work
        try:
            checked_options(variant)
        except ValueError as error:
            parser.error(str(error))
    preprocess = Preprocess(**json.loads((args.export / CONFIG_FILE).read_text())["preprocess"])
    samples = load_dataset(args.data)
    train, test = list(samples.where(split="train")), list(samples.where(split="test"))
    _, calibration = _held_out_and_calibration([Path(sample.image_path) for sample in train])
    base = _nncf_settings(calibration, preprocess)
    units = np.stack([preprocess.units_array(read_image(s.image_path))[0] for s in test]
                     ).astype(np.float32)
    masks = np.stack([preprocess.mask_array(read_mask(s.mask_path)) > 0.5 if s.mask_path
                      else np.zeros(units.shape[-2:], bool) for s in test])
    labels = np.array([s.label for s in test])
    core = openvino.Core()

    def evaluated(model: Any) -> tuple[float, float, np.ndarray]:
        compiled = core.compile_model(model, "CPU", _F32)
        maps, scores = [], []
        for start in range(0, len(units), 16):
            outputs = compiled([units[start:start + 16]])
            maps.append(outputs[compiled.output(0)])
            scores.append(outputs[compiled.output(1)])
        all_maps, all_scores = np.concatenate(maps), np.concatenate(scores).reshape(-1)
        return (metrics.auroc(labels, all_scores),
                metrics.pixel_metrics(masks, all_maps.reshape(masks.shape))["pixel_auroc"],
                all_scores)

    float_model = _constants_folded(core.read_model(str(args.export / MODEL_FILE)))
    float_image, float_pixel, float_scores = evaluated(float_model)
    print(json.dumps({"benchmark": "int8_options", "export": str(args.export), "variant": "f32",
                      "image_auroc": round(float_image, 4),
                      "pixel_auroc": round(float_pixel, 4)}), flush=True)
    for variant in args.variants:
        started = time.perf_counter()
        quantized = nncf.quantize(float_model, nncf.Dataset(_Units(calibration, preprocess)),
                                  **quantize_settings(variant, base))
        seconds = time.perf_counter() - started
        image, pixel, scores = evaluated(quantized)
        print(json.dumps({
            "benchmark": "int8_options", "export": str(args.export), "variant": variant,
            "image_auroc": round(image, 4), "pixel_auroc": round(pixel, 4),
            "image_auroc_change": round(image - float_image, 4),
            "pixel_auroc_change": round(pixel - float_pixel, 4),
            "test_score_correlation": round(float(np.corrcoef(float_scores, scores)[0, 1]), 4),
            "quantize_seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
