"""ONNX export: the torch-free inferencer, its preprocessing, refusals (every method's parity
with PyTorch is in test_contract.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from iadkit.cli import main
from iadkit.data import load_dataset, make_loader
from iadkit.deploy import quantize
from iadkit.deploy.export import export_onnx
from iadkit.errors import IadkitError
from iadkit.methods import Detector, create_detector


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
    assert answer["anomalous"] == (expected > config["calibration"]["image_threshold"])
    assert answer["shape"] == [detector.preprocess.output_size] * 2

    pytest.importorskip("openvino")
    from iadkit.deploy.inferencer import OnnxInferencer

    compiled = OnnxInferencer(out, runtime="openvino").predict_file(image)
    assert compiled.score == pytest.approx(expected, rel=1e-4)  # f32, not OpenVINO's bf16
    with pytest.raises(IadkitError, match="unknown precision 'fp8'"):
        OnnxInferencer(out, runtime="openvino", precision="fp8")
    with pytest.raises(IadkitError, match="unknown runtime 'tensorrt'"):
        OnnxInferencer(out, runtime="tensorrt")


def test_export_refuses_an_unfitted_or_class_aware_detector(tmp_path: Path) -> None:
    with pytest.raises(IadkitError, match="fit or load"):
        export_onnx(create_detector("patchcore", "cpu", device="cpu"), tmp_path / "x")
    with pytest.raises(IadkitError, match="category"):
        detector = create_detector("cada", "cpu", device="cpu", alignment="class")
        detector.fit_info_ = {}
        export_onnx(detector, tmp_path / "y")


def test_the_inferencer_sees_the_bytes_the_detector_sees_for_every_image_mode(
        toy_root: Path, tmp_path: Path) -> None:
    """One preprocessing: the detector's loader and the torch-free inferencer give byte-identical
    inputs for RGB, grayscale, RGBA and 16-bit files of an odd size."""
    from PIL import Image

    from iadkit.data import ImageDataset, SampleSet
    from iadkit.data.image_io import read_image
    from iadkit.data.samples import Sample
    from iadkit.deploy.inferencer import OnnxInferencer

    detector = create_detector("patchcore", "cpu", image_size=64, coreset_ratio=0.5,
                               device="cpu")
    train = load_dataset(toy_root, ["alpha"]).where(split="train")
    detector.fit(make_loader(train, detector.preprocess, batch_size=8))
    export_onnx(detector, tmp_path / "export")
    inferencer = OnnxInferencer(tmp_path / "export")
    generator = np.random.default_rng(0)
    arrays = {"RGB": generator.integers(0, 256, (37, 53, 3), dtype=np.uint8),
              "L": generator.integers(0, 256, (37, 53), dtype=np.uint8),
              "RGBA": generator.integers(0, 256, (37, 53, 4), dtype=np.uint8),
              "I;16": generator.integers(0, 65536, (37, 53), dtype=np.uint16)}
    paths = []
    for mode, array in arrays.items():
        path = tmp_path / f"{mode.replace(';', '')}.png"
        image = Image.fromarray(array)
        assert image.mode == mode
        image.save(path)
        paths.append(path)
    dataset = ImageDataset(SampleSet([Sample(path, 0, "alpha", "good", "test")
                                      for path in paths]), detector.preprocess)
    for index, path in enumerate(paths):
        by_loader = dataset[index]["image"].numpy()
        by_detector = detector.preprocess.load(path).numpy()
        by_inferencer = inferencer.preprocess.image_array(read_image(path))
        assert by_loader.tobytes() == by_detector.tobytes() == by_inferencer.tobytes(), path
        assert by_inferencer.shape == (3, 64, 64) and by_inferencer.dtype == np.float32
        assert inferencer.predict_file(path).score == pytest.approx(
            float(detector.predict(by_detector[None]).scores[0]), rel=1e-4)


def test_int8_export_calibrates_on_training_normals_and_refuses_a_drifting_model(
        toy_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("nncf")
    pytest.importorskip("openvino")
    from iadkit.data.image_io import read_image
    from iadkit.deploy.inferencer import OnnxInferencer
    from iadkit.metrics import auroc

    run, out = tmp_path / "run", tmp_path / "export"
    # The backbone's first blocks only: fewer operations to quantise, calibrate and rank.
    assert main(["fit", "--method", "patchcore", "--data", str(toy_root), "--category", "alpha",
                 "--out", str(run), "--param", "image_size=64", "--param", "coreset_ratio=0.25",
                 "--param", "layers=[1, 2]", "--device", "cpu", "--quiet"]) == 0
    int8 = ["export", str(run), "--format", "openvino", "--precision", "int8", "--out", str(out),
            "--quiet"]
    # Options that cannot work are refused before anything is written.
    assert main(["export", str(run), "--precision", "int8", "--out", str(out), "--quiet"]) == 2
    assert main([*int8, "--int8-tolerance", "0"]) == 2
    assert main([*int8, "--int8-max-minutes", "0"]) == 2
    assert not out.exists()
    # A drift whose repair (NNCF ranking every quantised operation on the held-out images)
    # would take longer than allowed: refused before the search, with its estimate.
    capsys.readouterr()
    assert main([*int8, "--int8-tolerance", "1e-9", "--int8-max-minutes", "1e-9"]) == 2
    assert re.search(r"for each of the [1-9]\d* quantised operations: about [\d.,]+ minutes",
                     capsys.readouterr().err)
    assert (out / "model.onnx").is_file() and not (out / "model_int8.xml").exists()
    # A tolerance no quantised model meets: refused, the INT8 model not written, the float32
    # export kept (one round of NNCF's accuracy control, the time its ranking takes, is enough
    # to show it).
    monkeypatch.setattr(quantize, "MAX_RESTORE_STEPS", 1)
    assert main([*int8, "--int8-tolerance", "1e-9"]) == 2
    assert (out / "model.onnx").is_file() and not (out / "model_int8.xml").exists()
    assert "openvino_int8" not in json.loads((out / "inference.json").read_text())

    assert main([*int8, "--int8-tolerance", "1000"]) == 0
    record = json.loads((out / "inference.json").read_text())["openvino_int8"]
    n_train = len(list((toy_root / "alpha" / "train").rglob("*.png")))
    # a quarter of the training images held out for the drift check, the rest calibrate
    assert record["n_held_out_images"] == n_train // 4
    assert record["n_calibration_images"] == n_train - n_train // 4
    assert 0 < record["drift"] <= 1000
    # Every depthwise (grouped) convolution's weights are stored as INT8 constants, not
    # fake-quantised floats, so OpenVINO can run them as INT8 kernels.
    import openvino

    model = openvino.Core().read_model(str(out / "model_int8.xml"))
    grouped = [op for op in model.get_ordered_ops() if op.get_type_name() == "GroupConvolution"]
    assert grouped and all(
        op.input(1).get_source_output().get_node().get_type_name() != "FakeQuantize"
        for op in grouped)

    test = load_dataset(toy_root, ["alpha"]).where(split="test")
    images = [read_image(sample.image_path) for sample in test]
    labels = [sample.label for sample in test]
    f32 = [r.score for r in OnnxInferencer(out, runtime="openvino").predict(images)]
    quantised = [r.score for r in OnnxInferencer(out, runtime="openvino",
                                                 precision="int8").predict(images)]
    assert quantised != f32  # the INT8 model runs, and it is not the float32 one
    assert auroc(labels, quantised) >= 0.9 and np.corrcoef(f32, quantised)[0, 1] > 0.9
    with pytest.raises(IadkitError, match="'int8' runs on the runtime 'openvino' only"):
        OnnxInferencer(out, precision="int8")
