"""ONNX export: parity with PyTorch per method, the torch-free inferencer, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from iadkit.cli import main
from iadkit.data import load_dataset, make_loader
from iadkit.deploy.export import export_onnx
from iadkit.errors import IadkitError
from iadkit.methods import Detector, create_detector

#: Largest differences accepted between onnxruntime and PyTorch (float32 graphs), relative to
#: the largest value (or absolute below 1).
MAP_TOLERANCE, SCORE_TOLERANCE = 1e-3, 1e-3
QUICK = {
    "patchcore": {"coreset_ratio": 0.25},
    "rd": {"epochs": 1},
    "simplenet": {"epochs": 1},
    "cse": {"epochs": 1, "min_steps": 0},
    "uniad": {"epochs": 1},
    "cada": {"base": "rd", "base_params": {"epochs": 1}, "iterations": 20},  # wraps a detector
    # the DDIM loop unrolls into the graph; the corruption noise is a constant of it
    "lafite": {"epochs": 1, "grid": 8, "base_channels": 16, "channel_mults": (1, 2),
               "attention_levels": (1,), "tau": 100, "ddim_steps": 4},
}


@pytest.fixture(scope="module")
def toy_alpha(toy_root: Path):
    samples = load_dataset(toy_root, ["alpha"])
    return samples.where(split="train"), samples.where(split="test")


@pytest.mark.parametrize("method", sorted(QUICK))
def test_exported_graph_matches_pytorch(method: str, toy_alpha, tmp_path: Path) -> None:
    train, test = toy_alpha
    # CSE's deepest level and UniAD's attention window need a grid of a few positions.
    image_size = 128 if method in ("cse", "uniad") else 64
    detector = create_detector(method, "cpu", device="cpu", image_size=image_size,
                               **QUICK[method])
    detector.fit(make_loader(train, detector.preprocess, batch_size=8))
    record = export_onnx(detector, tmp_path / "export")
    assert record["parity"]["maps_relative"] <= 1e-4

    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "export" / "model.onnx"))
    images = torch.cat([b["image"] for b in make_loader(test, detector.preprocess, 16)])[:5]
    maps, scores = session.run(None, {"images": images.numpy()})
    expected = detector.predict(images)
    for got, want, tolerance in ((maps, expected.anomaly_maps.numpy(), MAP_TOLERANCE),
                                 (scores, expected.scores.numpy(), SCORE_TOLERANCE)):
        assert np.abs(got - want).max() <= tolerance * max(1.0, np.abs(want).max())


def test_cli_export_and_torch_free_inferencer(toy_root: Path, tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "onnx"
    assert main(["fit", "--method", "patchcore", "--data", str(toy_root), "--category", "alpha",
                 "--out", str(run), "--param", "image_size=64", "--device", "cpu",
                 "--quiet"]) == 0
    assert main(["export", str(run), "--format", "onnx", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "inference.json").read_text())
    assert config["calibration"]["image_threshold"] > 0

    image = max((toy_root / "alpha" / "test").glob("*/*.png"))
    detector = Detector.load(run / "models" / "alpha", device="cpu")
    expected = float(detector.predict(detector.preprocess.load(image)[None]).scores[0])
    # In a fresh interpreter: the inferencer scores the file without importing torch.
    script = (
        "import json, sys\n"
        "from iadkit.deploy.inferencer import OnnxInferencer\n"
        f"result = OnnxInferencer({str(out)!r}).predict_file({str(image)!r})\n"
        "print(json.dumps({'score': result.score, 'anomalous': result.anomalous,\n"
        "                  'torch': 'torch' in sys.modules, 'shape': list(result.anomaly_map.shape)}))\n")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               check=True)
    answer = json.loads(completed.stdout)
    assert answer["torch"] is False
    assert answer["score"] == pytest.approx(expected, rel=1e-4)
    assert answer["anomalous"] == (expected >= config["calibration"]["image_threshold"])
    assert answer["shape"] == [detector.preprocess.output_size] * 2

    pytest.importorskip("openvino")
    from iadkit.deploy.inferencer import OnnxInferencer

    compiled = OnnxInferencer(out, runtime="openvino").predict_file(image)
    assert compiled.score == pytest.approx(expected, rel=1e-4)  # f32, not OpenVINO's bf16
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        OnnxInferencer(out, runtime="openvino", precision="fp8")
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        OnnxInferencer(out, runtime="tensorrt")


def test_export_refuses_an_unfitted_or_class_aware_detector(tmp_path: Path) -> None:
    with pytest.raises(IadkitError, match="fit or load"):
        export_onnx(create_detector("patchcore", "cpu", device="cpu"), tmp_path / "x")
    with pytest.raises(IadkitError, match="category"):
        detector = create_detector("cada", "cpu", device="cpu", alignment="class")
        detector.fit_info_ = {}
        export_onnx(detector, tmp_path / "y")
