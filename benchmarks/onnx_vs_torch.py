"""Inference speed: PyTorch ``Detector.predict`` against the exported ONNX graph on onnxruntime
(and on OpenVINO when it is installed).

Prints one JSON line per method. Quality is not the point here: each detector is fitted briefly
on Magnetic Tile normals (``--train`` images, one epoch), exported, and both runtimes score the
same preprocessed test images (decoding excluded) in batches of ``--batch-size`` and one by one.

    .venv/bin/python benchmarks/onnx_vs_torch.py [--methods patchcore rd cse uniad]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from iadkit.data import SampleSet, load_dataset, make_loader
from iadkit.deploy.export import export_onnx
from iadkit.deploy.inferencer import OnnxInferencer
from iadkit.methods import create_detector

REPO = Path(__file__).resolve().parents[1]
QUICK = {"patchcore": {}, "rd": {"epochs": 1}, "cse": {"epochs": 1, "min_steps": 0},
         "uniad": {"epochs": 1}, "simplenet": {"epochs": 1}, "lafite": {"epochs": 1}}


def rate(function, batches: list, repeats: int = 2) -> float:
    """Images per second of ``function`` over ``batches`` (one warm-up batch first)."""
    function(batches[0])
    started = time.perf_counter()
    for _ in range(repeats):
        for batch in batches:
            function(batch)
    return repeats * sum(len(b) for b in batches) / (time.perf_counter() - started)


#: (column prefix, runtime, precision): OpenVINO in f32 (the default) and in bfloat16.
RUNTIMES = [("onnxruntime", "onnxruntime", "f32")] + (
    [("openvino", "openvino", "f32"), ("openvino_bf16", "openvino", "bf16")]
    if importlib.util.find_spec("openvino") else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "magnetic_tile"))
    parser.add_argument("--methods", nargs="+", default=list(QUICK), choices=sorted(QUICK))
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    samples = load_dataset(args.data)
    train = samples.where(split="train")
    test = samples.where(split="test")
    for method in args.methods:
        detector = create_detector(method, "cpu", device="cpu", **QUICK[method])
        detector.fit(make_loader(SampleSet(list(train)[:args.train]), detector.preprocess, 16))
        spread = list(test)[::max(1, len(test) // args.test)][:args.test]
        images = torch.cat([b["image"] for b in make_loader(
            SampleSet(spread), detector.preprocess, args.batch_size)])
        with tempfile.TemporaryDirectory() as folder:
            record = export_onnx(detector, folder)
            batched = list(images.split(args.batch_size))
            singles = list(images.split(1))[:16]
            line = {"benchmark": "onnx_vs_torch", "method": method,
                    "input_size": images.shape[-1], "batch_size": args.batch_size,
                    "torch_images_per_second": round(rate(detector.predict, batched), 2),
                    "torch_ms_single_image": round(1000 / rate(detector.predict, singles), 2)}
            expected = detector.predict(images).scores.numpy()
            for column, runtime, precision in RUNTIMES:
                inferencer = OnnxInferencer(folder, runtime=runtime, precision=precision)

                def run(x: torch.Tensor, inferencer: OnnxInferencer = inferencer) -> tuple:
                    return inferencer.run(x.numpy())

                line[f"{column}_images_per_second"] = round(rate(run, batched), 2)
                line[f"{column}_ms_single_image"] = round(1000 / rate(run, singles), 2)
                line[f"{column}_max_relative_score_difference"] = float(
                    (np.abs(run(images)[1] - expected) / np.abs(expected).clip(1e-6)).max())
        print(json.dumps({**line, "export_seconds": record["export_seconds"],
                          "torch_threads": torch.get_num_threads()}))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
