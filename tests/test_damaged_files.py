"""Damaged run, model and export folders give one clear error naming the file and the field."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from iadkit.cli import main
from iadkit.errors import CheckpointError


def _edit_json(path: Path, change: Callable[[dict], object]) -> None:
    record = json.loads(path.read_text())
    path.write_text(json.dumps(change(record)))


def _drop(key: str) -> Callable[[dict], dict]:
    return lambda record: {k: v for k, v in record.items() if k != key}


def _set(key: str, value: object) -> Callable[[dict], dict]:
    return lambda record: {**record, key: value}


DETECTOR_DAMAGE = {
    "truncated": (lambda p: p.write_text(p.read_text()[:40]), "not valid JSON"),
    "empty": (lambda p: p.write_text(""), "not valid JSON"),
    "a list": (lambda p: p.write_text("[1, 2]"), "expected a JSON object"),
    "no params": (lambda p: _edit_json(p, _drop("params")), "field 'params' is missing"),
    "unknown parameter": (lambda p: _edit_json(p, lambda r: {**r, "params": {
        **r["params"], "warp_factor": 9}}), "field 'params'"),
    "mistyped parameter": (lambda p: _edit_json(p, lambda r: {**r, "params": {
        **r["params"], "coreset_ratio": "lots"}}), "field 'params'"),
    "bad calibration": (lambda p: _edit_json(p, _set("calibration", {"image_threshold": 1})),
                        "field 'calibration'"),
}


@pytest.fixture(scope="module")
def saved_model(fitted_patchcore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    detector, _ = fitted_patchcore
    return detector.save(tmp_path_factory.mktemp("saved") / "model")


def _image(toy_root: Path) -> str:
    return str(next((toy_root / "alpha" / "test" / "good").glob("*.png")))


@pytest.mark.parametrize("damage", sorted(DETECTOR_DAMAGE))
def test_damaged_detector_json_gives_exit_2_naming_the_field(
        saved_model: Path, toy_root: Path, tmp_path: Path, capsys, damage: str) -> None:
    model = Path(shutil.copytree(saved_model, tmp_path / "model"))
    change, message = DETECTOR_DAMAGE[damage]
    change(model / "detector.json")
    assert main(["predict", str(model), _image(toy_root), "--out", str(tmp_path / "o"),
                 "-q"]) == 2
    error = capsys.readouterr().err
    assert "detector.json" in error and message in error
    assert len(error.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["missing tensor", "wrong shape"])
def test_weights_that_do_not_fit_fail_at_load_not_at_predict(
        saved_model: Path, tmp_path: Path, damage: str) -> None:
    from iadkit.methods import Detector

    model = Path(shutil.copytree(saved_model, tmp_path / "model"))
    tensors = load_file(str(model / "weights.safetensors"))
    if damage == "missing tensor":
        tensors.pop("memory_bank")
    else:
        tensors["memory_bank"] = torch.zeros(10, 7)
    save_file(tensors, str(model / "weights.safetensors"))
    with pytest.raises(CheckpointError, match="weights.safetensors: the saved tensors do not"):
        Detector.load(model)


RUN_DAMAGE = {
    "truncated": (lambda p: p.write_text(p.read_text()[:30]), "not valid JSON"),
    "empty": (lambda p: p.write_text(""), "not valid JSON"),
    "no tasks": (lambda p: _edit_json(p, _drop("tasks")), "field 'tasks' is missing"),
    "no config": (lambda p: _edit_json(p, _set("config", [])), "field 'config' is list"),
    "bad setting": (lambda p: _edit_json(p, lambda r: {**r, "config": {
        **r["config"], "setting": "sideways"}}), "field 'config'"),
}


@pytest.mark.parametrize("damage", sorted(RUN_DAMAGE))
@pytest.mark.parametrize("command", ["test", "predict"])
def test_damaged_run_json_gives_exit_2_naming_the_field(
        toy_root: Path, tmp_path: Path, capsys, damage: str, command: str) -> None:
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({
        "config": {"method": "patchcore", "data": str(toy_root)}, "tasks": ["alpha"]}))
    change, message = RUN_DAMAGE[damage]
    change(run / "run.json")
    arguments = [str(run), "-q"] if command == "test" else [
        str(run), _image(toy_root), "--out", str(tmp_path / "o"), "-q"]
    assert main([command, *arguments]) == 2
    error = capsys.readouterr().err
    assert "run.json" in error and message in error


def test_a_run_whose_fit_never_finished_says_so(toy_root: Path, tmp_path: Path,
                                                capsys) -> None:
    run = tmp_path / "run"
    (run / "models" / "alpha.training").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({
        "config": {"method": "patchcore", "data": str(toy_root), "categories": ["alpha"]},
        "tasks": ["alpha"]}))
    assert main(["test", str(run), "-q"]) == 2
    assert "was never saved (its fit did not finish)" in capsys.readouterr().err


def test_run_folders_record_the_absolute_data_path(toy_root: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(toy_root.parent)
    run = tmp_path / "run"
    assert main(["fit", "--method", "patchcore", "--data", toy_root.name, "--category",
                 "alpha", "--out", str(run), "--param", "image_size=48", "-q"]) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["data"] == str(toy_root.resolve())
    assert record["data_as_given"] == toy_root.name
    monkeypatch.chdir(tmp_path)  # elsewhere, the run still finds its data
    assert main(["test", str(run), "-q"]) == 0


@pytest.fixture(scope="module")
def exported(fitted_patchcore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    from iadkit.deploy.export import export_onnx

    detector, _ = fitted_patchcore
    folder = tmp_path_factory.mktemp("export") / "exported"
    export_onnx(detector, folder)
    return folder


@pytest.mark.parametrize("damage,message", [
    ("truncated inference.json", "inference.json: damaged, not valid JSON"),
    ("no preprocess", "field 'preprocess' is missing"),
    ("empty model", "model.onnx: not a readable ONNX model"),
    ("truncated model", "model.onnx: not a readable ONNX model"),
])
def test_damaged_exports_give_one_checkpoint_error(exported: Path, tmp_path: Path,
                                                   damage: str, message: str) -> None:
    from iadkit.deploy.inferencer import OnnxInferencer

    folder = Path(shutil.copytree(exported, tmp_path / "exported"))
    config, model = folder / "inference.json", folder / "model.onnx"
    if damage == "truncated inference.json":
        config.write_text(config.read_text()[:50])
    elif damage == "no preprocess":
        _edit_json(config, _drop("preprocess"))
    elif damage == "empty model":
        model.write_bytes(b"")
    else:
        model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=message):
        OnnxInferencer(folder)


def test_a_missing_test_mask_warns_at_fit_and_stops_only_the_pixel_metrics(
        toy_root: Path, tmp_path: Path, caplog) -> None:
    data = Path(shutil.copytree(toy_root / "alpha", tmp_path / "data" / "alpha"))
    missing = next((data / "ground_truth").rglob("*.png"))
    missing.unlink()
    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger="iadkit"):
        assert main(["fit", "--method", "patchcore", "--data", str(tmp_path / "data"),
                     "--out", str(run), "--param", "image_size=48", "-q"]) == 0
    assert "has no mask" in caplog.text
    assert main(["test", str(run), "-q"]) == 2  # pixel metrics need every mask


def test_synth_preview_into_an_existing_folder(toy_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "previews"
    out.mkdir()
    assert main(["synth", "preview", "--data", str(toy_root), "--category", "alpha",
                 "--out", str(out), "--count", "2", "--size", "48", "-q"]) == 0
    assert (out / "preview.png").is_file()
    assert main(["synth", "preview", "--data", str(toy_root), "--category", "alpha",
                 "--out", str(tmp_path / "grid.txt"), "-q"]) == 2
    assert "give a .png path or a folder" in capsys.readouterr().err


def test_other_backbone_weights_are_refused_unless_accepted(saved_model: Path, toy_root: Path,
                                                             tmp_path: Path, capsys) -> None:
    from iadkit.methods import Detector

    model = Path(shutil.copytree(saved_model, tmp_path / "model"))
    recorded = json.loads((model / "detector.json").read_text())["fit_info"]["backbone_weights"]
    assert recorded["sha256"]  # the packaged Lite0 file's
    _edit_json(model / "detector.json", lambda r: {**r, "fit_info": {
        **r["fit_info"], "backbone_weights": {**recorded, "sha256": "0" * 64}}})
    with pytest.raises(CheckpointError, match="SHA-256 000000000000"):
        Detector.load(model)
    assert Detector.load(model, accept_backbone_change=True).is_fitted
    arguments = [str(model), _image(toy_root), "--out", str(tmp_path / "o"), "-q"]
    assert main(["predict", *arguments]) == 2
    assert "--accept-backbone-change" in capsys.readouterr().err
    assert main(["predict", *arguments, "--accept-backbone-change"]) == 0


@pytest.mark.parametrize("damage,message", [
    ("truncated", "training.json: damaged, not valid JSON"),
    ("no progress", "field 'progress' is missing"),
])
def test_a_damaged_training_checkpoint_is_one_clear_error(tmp_path: Path, damage: str,
                                                          message: str) -> None:
    from iadkit.methods import create_detector, get_method

    folder = tmp_path / "training"
    folder.mkdir()
    record = {"progress": {"stage": "train", "epoch": 1}, "optimizers": {}}
    if damage == "truncated":
        (folder / "training.json").write_text(json.dumps(record)[:20])
    else:
        (folder / "training.json").write_text(json.dumps({"optimizers": {}}))
    save_file({"x": torch.zeros(1)}, str(folder / "training.safetensors"))
    detector = create_detector("rd", "cpu", **get_method("rd").tiny_params,
                               backbone_weights="random", device="cpu")
    with pytest.raises(CheckpointError, match=message):
        detector.fit(torch.rand(4, 3, 64, 64), checkpoint_dir=folder)
