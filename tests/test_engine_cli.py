"""The engine and the command line on generated data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from iadkit import engine
from iadkit.cli import main
from iadkit.data import load_dataset, make_loader, make_tasks
from iadkit.data.samples import SampleSet
from iadkit.engine.calibrate import fold_assignment

FAST = ["--param", "image_size=48", "--param", "coreset_ratio=0.2", "--quiet"]


def test_cli_fit_test_predict_round_trip(toy_root: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["fit", "--method", "patchcore", "--data", str(toy_root), "--category", "alpha",
                 "--out", str(run), *FAST]) == 0
    assert (run / "models" / "alpha" / "detector.json").is_file()
    metrics_file = tmp_path / "m.json"
    assert main(["test", str(run), "--json", str(metrics_file), "--report", str(tmp_path / "r"),
                 "--quiet"]) == 0
    results = json.loads(metrics_file.read_text())
    for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro"):
        assert isinstance(results[key], float)
    assert results["per_category"]["alpha"]["image_auroc"] >= 0.9
    page = (tmp_path / "r" / "index.html").read_text()
    assert "data:image/png;base64" in page and "without its own memory entries" in page
    assert "false-positive rate" in page and results["per_category"]["alpha"]["decision"]

    out = tmp_path / "pred"
    assert main(["predict", str(run), str(toy_root / "alpha" / "test"), "--out", str(out),
                 "--quiet"]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 12 and len(list((out / "heatmaps").glob("*.png"))) == 12
    flagged = {Path(r["path"]).parent.name: 0 for r in rows}
    for row in rows:
        flagged[Path(row["path"]).parent.name] += int(row["anomalous"])
    assert flagged["good"] < flagged["blob"] + flagged["scratch"]


def test_threshold_comes_from_held_out_normals_not_test(toy_root: Path) -> None:
    config = engine.RunConfig(method="patchcore", data=str(toy_root), categories=["alpha"],
                              params={"image_size": 48, "coreset_ratio": 0.2},
                              calibration="holdout", validation_fraction=0.35,
                              target_fpr=0.2, show_progress=False)
    task = config.tasks()[0]
    detector = engine.fit_detector(config, task)
    assert detector.fit_info_["n_train_images"] == 10  # 16 normals minus 6 held out
    fit_part, held = engine.holdout_split(task.train, 0.35, config.seed)
    assert not {s.image_path for s in held} & {s.image_path for s in fit_part}
    held_scores = np.sort(engine.predict_samples(detector, held).scores)
    calibration = detector.calibration
    # 6 scores cannot bound 20% at 90% (that needs 11): the largest score, with a warning
    assert calibration.rank == 6 and calibration.warning and "11" in calibration.warning
    assert calibration.image_threshold == pytest.approx(held_scores[-1])
    assert calibration.method == "held-out" and "held out" in calibration.source


def test_leave_one_out_calibration_trains_on_every_normal(toy_root: Path) -> None:
    config = engine.RunConfig(method="patchcore", data=str(toy_root), categories=["alpha"],
                              params={"image_size": 48, "coreset_ratio": 0.2},
                              show_progress=False)
    detector = engine.fit_detector(config, config.tasks()[0])
    assert detector.fit_info_["n_train_images"] == 16
    assert detector.calibration.method == "leave-one-out"
    assert detector.calibration.n_images == 16 and len(detector.calibration.scores) == 16


def test_cross_fitted_calibration_scores_each_fold_with_a_model_that_never_saw_it(
        toy_root: Path) -> None:
    config = engine.RunConfig(method="patchcore", data=str(toy_root), categories=["alpha"],
                              params={"image_size": 48, "coreset_ratio": 0.2},
                              calibration="cv:4", show_progress=False)
    task = config.tasks()[0]
    detector = engine.fit_detector(config, task)
    calibration = detector.calibration
    assert calibration.method == "cross-fitted" and calibration.n_images == 16
    folds = fold_assignment(task.train, 4, config.seed)
    first = [task.train[i] for i in np.nonzero(folds == 0)[0]]
    model = config.new_detector().fit(make_loader(
        SampleSet(s for i, s in enumerate(task.train) if folds[i] != 0),
        detector.preprocess, batch_size=16))
    expected = engine.predict_samples(model, SampleSet(first)).scores
    positions = np.nonzero(folds == 0)[0]
    np.testing.assert_allclose(np.asarray(calibration.scores)[positions], expected, rtol=1e-5)


def test_unified_models_get_a_threshold_per_category_and_evaluation_uses_it(
        toy_root: Path) -> None:
    config = engine.RunConfig(method="patchcore", data=str(toy_root), setting="model-unified",
                              params={"image_size": 48, "coreset_ratio": 0.2},
                              target_fpr=0.2, show_progress=False)
    task = config.tasks()[0]
    detector = engine.fit_detector(config, task)
    calibration = detector.calibration
    assert sorted(calibration.categories) == ["alpha", "beta"]
    assert [c.n_images for c in calibration.categories.values()] == [16, 16]
    evaluation = engine.evaluate_task(detector, task)
    for name in ("alpha", "beta"):
        decision = evaluation.per_group[name]["decision"]
        assert decision["threshold"] == calibration.categories[name].image_threshold
        assert decision["true_positives"] + decision["false_negatives"] == 6


def test_loader_workers_are_none_on_the_cpu_by_default_and_as_given_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from iadkit.errors import ConfigError

    base = {"method": "patchcore", "data": "anywhere"}
    assert engine.RunConfig(**base, device="cpu").loader_workers == 0
    assert engine.RunConfig(**base, device="cpu", workers=3).loader_workers == 3
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert engine.RunConfig(**base, device="cuda").loader_workers == 8
    with pytest.raises(ConfigError, match="run setting workers"):
        engine.RunConfig(**base, workers="many")


@pytest.mark.parametrize("settings,message", [
    ({"calibration": "cv:20"}, "cv:20: 'alpha' has 16 training normals"),
    ({"calibration": "cv:1"}, "run setting calibration"),
    ({"calibration": "holdout", "validation_fraction": 0.1}, "at least 5 are needed"),
    ({"target_fpr": 0.6}, "run setting target_fpr"),
    ({"target_fpr": 0.0}, "run setting target_fpr"),
    ({"method": "rd", "calibration": "leave-one-out"}, "rd cannot leave a training image out"),
])
def test_a_calibration_that_cannot_work_is_refused_before_training(
        toy_root: Path, tmp_path: Path, settings: dict, message: str) -> None:
    from iadkit.errors import ConfigError

    values = {"method": "patchcore", "data": str(toy_root), "categories": ["alpha"],
              "params": {"image_size": 48}, "show_progress": False, **settings}
    with pytest.raises(ConfigError, match=message):
        engine.fit_run(engine.RunConfig.from_dict(values), tmp_path / "run")
    assert not (tmp_path / "run" / "models").exists()


def test_holdout_takes_its_share_of_every_category_and_batches_never_hold_one_image(
        toy_root: Path) -> None:
    from iadkit.methods.training import TrainingImages

    train = load_dataset(toy_root).where(split="train")  # 16 alpha + 16 beta
    fit_part, held = engine.holdout_split(train, 0.1, seed=0)
    assert [len(held.where(category=c)) for c in ("alpha", "beta")] == [2, 2]
    assert len(fit_part) == 28
    images = TrainingImages(torch.zeros(17, 3, 2, 2, dtype=torch.uint8), ["a"] * 17, [""] * 17)
    batches = images.epoch_batches(8, seed=0, epoch=0)
    assert [len(b) for b in batches] == [8, 9]
    assert sorted(torch.cat(batches).tolist()) == list(range(17))


def test_absolute_unified_pools_where_averaging_would_not(toy_root: Path) -> None:
    """Per-group AUROC can be perfect while pooled AUROC is not: scales differ per category."""
    samples = load_dataset(toy_root)
    task = make_tasks(samples, "absolute-unified")[0]
    groups = {}
    for offset, (name, group) in zip((0.0, 10.0), task.test_groups.items()):
        labels = np.array(group.labels)
        scores = labels + offset  # perfect within each group, shifted between groups
        groups[name] = engine.ScoredSamples(group, scores.astype(np.float32),
                                          np.zeros((len(group), 2, 2), np.float32),
                                          np.zeros((len(group), 2, 2), bool), 0.0, None)
    per_group = {n: engine.score_predictions(p, pixel=False) for n, p in groups.items()}
    pooled = engine.score_predictions(engine.ScoredSamples.concatenate(list(groups.values())),
                                       pixel=False)
    assert all(v["image_auroc"] == 1.0 for v in per_group.values())
    assert pooled["image_auroc"] < 0.8


def test_image_level_category_gives_null_pixel_metrics(tmp_path: Path) -> None:
    import shutil

    from iadkit.data import generate_dataset

    root = generate_dataset(tmp_path / "d", n_train=8, n_test_good=3, n_test_defect=3, size=48)
    shutil.rmtree(root / "texture" / "ground_truth")
    run = tmp_path / "run"
    assert main(["fit", "--method", "patchcore", "--data", str(root), "--out", str(run),
                 *FAST]) == 0
    assert main(["test", str(run), "--json", str(tmp_path / "m.json"), "--quiet"]) == 0
    results = json.loads((tmp_path / "m.json").read_text())
    assert results["pixel_auroc"] is None and results["pixel_aupro"] is None
    assert results["image_auroc"] is not None


def test_bad_input_gives_one_clear_error_and_exit_code_2(tmp_path: Path, capsys) -> None:
    code = main(["fit", "--method", "patchcore", "--data", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2 and "dataset folder not found" in capsys.readouterr().err
    assert main(["fit", "--method", "nope", "--data", str(tmp_path), "--out", "x", "-q"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["test", str(tmp_path), "-q"]) == 2
    assert "not a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--search", "default", "--search-synthesis", "perlin"], "unknown search synthesis 'perlin'"),
    (["--search", "default", "--search-textures", "no/such/folder"], "texture folder not found"),
    (["--search", "[{param: coreset_ratio, values: [0.1]}]"], "cannot search ['coreset_ratio']"),
])
def test_a_search_that_cannot_run_is_refused_before_training(
        toy_root: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch,
        flags: list[str], message: str) -> None:
    from iadkit.methods import Detector

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the search")

    monkeypatch.setattr(Detector, "fit", no_training)
    code = main(["fit", "--method", "patchcore", "--data", str(toy_root), "--category", "alpha",
                 *flags, "--out", str(tmp_path / "run"), "-q"])
    assert code == 2 and message in capsys.readouterr().err


def test_methods_command_lists_patchcore(capsys) -> None:
    assert main(["methods"]) == 0
    assert "patchcore" in capsys.readouterr().out


def test_config_file_and_param_overrides(toy_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"method: patchcore\ndata: {toy_root}\ncategories: [beta]\n"
                      "params: {image_size: 40, coreset_ratio: 0.5}\n")
    run = tmp_path / "run"
    assert main(["fit", "--config", str(config), "--param", "coreset_ratio=0.2", "--out", str(run),
                 "-q"]) == 0
    saved = json.loads((run / "models" / "beta" / "detector.json").read_text())["params"]
    assert saved["image_size"] == 40 and saved["coreset_ratio"] == 0.2


def test_elpv_prepare_writes_mvtec_layout_with_subclasses(tmp_path: Path) -> None:
    pytest.importorskip("elpv_dataset")
    assert main(["data", "prepare", "elpv", str(tmp_path / "elpv"), "--max-train", "20"]) == 0
    samples = load_dataset(tmp_path / "elpv")
    assert len(samples.where(split="train")) == 20
    test = samples.where(split="test")
    assert set(test.labels) == {0, 1} and not test.has_masks
    assert samples.subclasses == ["mono", "poly"]


def test_predict_records_unreadable_files_and_scores_the_rest(fitted_patchcore, tmp_path: Path,
                                                              toy_root: Path) -> None:
    import shutil

    detector, _ = fitted_patchcore
    model = detector.save(tmp_path / "model")
    images = tmp_path / "images"
    shutil.copytree(toy_root / "alpha" / "test" / "good", images)
    (images / "broken.png").write_bytes(b"\x89PNG truncated")
    assert main(["predict", str(model), str(images), "--out", str(tmp_path / "o"), "-q"]) == 1
    rows = {Path(r["path"]).name: r for r in csv.DictReader((tmp_path / "o" / "scores.csv").open())}
    assert "not a readable image" in rows["broken.png"]["error"]
    assert all(r["score"] and not r["error"] for n, r in rows.items() if n != "broken.png")
    assert len(rows) == 7


def test_interrupted_fit_resumes_keeping_finished_models(toy_root: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    args = ["fit", "--method", "patchcore", "--data", str(toy_root), "--out", str(run), *FAST]
    assert main(args) == 0
    kept = (run / "models" / "alpha" / "weights.safetensors").stat().st_mtime_ns
    shutil.rmtree(run / "models" / "beta")  # as if interrupted before the second model
    assert main([*args, "--resume"]) == 0
    assert (run / "models" / "alpha" / "weights.safetensors").stat().st_mtime_ns == kept
    assert (run / "models" / "beta" / "detector.json").is_file()
    assert not list((run / "models").glob("*.partial"))
    assert main([*args, "--resume", "--seed", "7"]) == 2  # other settings: refuse to mix


def test_batch_prediction_resumes_after_a_crash_mid_write(fitted_patchcore, tmp_path: Path,
                                                          toy_root: Path, capsys) -> None:
    detector, _ = fitted_patchcore
    model = detector.save(tmp_path / "model")
    images = str(toy_root / "alpha" / "test")
    out = tmp_path / "batch"
    assert main(["predict", str(model), images, "--out", str(out), "--format", "jsonl",
                 "-q"]) == 0
    complete = (out / "scores.jsonl").read_text().splitlines(keepends=True)
    assert len(complete) == 12
    # A crash after five rows, in the middle of writing the sixth.
    (out / "scores.jsonl").write_text("".join(complete[:5]) + complete[5][:20])
    capsys.readouterr()
    assert main(["predict", str(model), images, "--out", str(out), "--format", "jsonl",
                 "--resume", "-q"]) == 0
    assert "7 images scored, 0 unreadable, 5 already done" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == [json.loads(line)["path"] for line in complete]
    assert rows == [json.loads(line) for line in complete]  # same scores as the full run
    assert len(list((out / "heatmaps").glob("*.png"))) == 12


def test_serve_flags_default_to_the_service_settings_and_map_onto_them() -> None:
    from iadkit.cli import build_parser, service_settings
    from iadkit.deploy.settings import ServiceSettings

    parser = build_parser()
    assert service_settings(parser.parse_args(["serve", "run"])) == ServiceSettings()
    given = service_settings(parser.parse_args(
        ["serve", "run", "--max-upload-mb", "2", "--max-decoded-mb", "0.5", "--max-in-flight",
         "3", "--max-waiting", "0", "--body-timeout", "5", "--cors-origin", "https://a.example"]))
    assert (given.max_upload_bytes, given.max_decoded_bytes, given.max_in_flight,
            given.max_waiting, given.body_timeout_s, given.cors_origins) == (
        2 * 2**20, 2**19, 3, 0, 5.0, ("https://a.example",))
