"""The contract every registered method keeps, checked over the registry: a new method gets all
of these tests by registering (its ``tiny_params`` make each fit take seconds).

For every method (and CADA over two bases): the paper preset builds with random weights; a fit
on a few tiny images gives finite maps and scores of the right shapes; the same seed gives the
same scores; save/load round-trips exactly; the ONNX export matches PyTorch; building, fitting
and loading leave the caller's random generators alone; every bad value of every declared
hyperparameter is refused at once, with its name, before any training, by the library and by
``iadkit fit`` (one line, exit code 2).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from iadkit.cli import main
from iadkit.data import load_dataset, make_loader
from iadkit.errors import CheckpointError, ConfigError
from iadkit.methods import Detector, available_methods, get_method
from iadkit.methods.base import BackboneDetector
from iadkit.validation import Choice

#: (case name, method, hyperparameters over the method's tiny ones).
CASES = [(name, name, {}) for name in available_methods()]
CASES.append(("cada_over_patchcore", "cada", {"base": "patchcore",
                                              "base_params": {"coreset_ratio": 0.25}}))
CASE_IDS = [case[0] for case in CASES]


def tiny(method: str, **extra: Any) -> Detector:
    """The method at its cpu preset with its tiny hyperparameters, on the CPU."""
    cls = get_method(method)
    return cls.from_preset("cpu", device="cpu", **{**cls.tiny_params, **extra})


@pytest.fixture(scope="module")
def toy(toy_root: Path):
    """Both toy categories: categories for the class-aware methods, subclasses for the
    mixture of experts."""
    samples = load_dataset(toy_root)
    return samples.where(split="train"), samples.where(split="test")


def _fit(method: str, extra: dict[str, Any], train) -> Detector:
    detector = tiny(method, **extra)
    return detector.fit(make_loader(train, detector.preprocess, batch_size=8))


@pytest.fixture(scope="module")
def fitted(toy) -> dict[str, Detector]:
    """One fitted detector per case, shared by the tests below (fitting costs time)."""
    train, _ = toy
    return {name: _fit(method, extra, train) for name, method, extra in CASES}


def _test_images(detector: Detector, test, count: int = 5) -> torch.Tensor:
    return next(iter(make_loader(test, detector.preprocess, batch_size=count)))["image"]


@pytest.mark.parametrize("method", available_methods())
def test_the_paper_preset_builds_with_random_weights(method: str) -> None:
    cls = get_method(method)
    random = ({"backbone_weights": "random"} if issubclass(cls, BackboneDetector)
              else {"base_params": {"backbone_weights": "random"}})
    detector = cls.from_preset("paper", device="cpu", **random)
    detector.check_resources()  # builds the paper's backbone and checks its stages
    assert detector.get_params() == cls(**detector.get_params()).get_params()


@pytest.mark.parametrize(("name", "method", "extra"), CASES, ids=CASE_IDS)
def test_fit_gives_finite_maps_and_scores_and_the_same_seed_the_same_scores(
        name: str, method: str, extra: dict[str, Any], fitted, toy) -> None:
    train, test = toy
    detector = fitted[name]
    images = _test_images(detector, test)
    first = detector.predict(images, categories=["alpha"] * len(images))
    side = detector.preprocess.output_size
    assert first.anomaly_maps.shape == (len(images), side, side)
    assert first.scores.shape == (len(images),)
    assert torch.isfinite(first.anomaly_maps).all() and torch.isfinite(first.scores).all()
    again = _fit(method, extra, train).predict(images, categories=["alpha"] * len(images))
    assert torch.equal(first.scores, again.scores)
    assert torch.equal(first.anomaly_maps, again.anomaly_maps)


@pytest.mark.parametrize("name", CASE_IDS)
def test_save_and_load_round_trip_exactly_and_leave_the_callers_rng_alone(
        name: str, fitted, toy, tmp_path: Path) -> None:
    _, test = toy
    detector = fitted[name]
    folder = detector.save(tmp_path / "model")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    loaded = Detector.load(folder, device="cpu")
    images = _test_images(detector, test)
    categories = ["alpha"] * len(images)
    loaded.predict(images, categories=categories)
    assert torch.equal(torch.rand(3), expected)  # loading and predicting drew nothing
    assert loaded.get_params() == detector.get_params()
    first, second = detector.predict(images, categories), loaded.predict(images, categories)
    assert torch.equal(first.scores, second.scores)
    assert torch.equal(first.anomaly_maps, second.anomaly_maps)


def test_building_and_fitting_leave_the_callers_rng_alone(toy) -> None:
    train, _ = toy
    torch.manual_seed(7)
    np.random.seed(7)
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(7)
    np.random.seed(7)
    _fit("rd", {}, train)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])


@pytest.mark.parametrize("name", CASE_IDS)
def test_the_onnx_export_matches_pytorch(name: str, fitted, toy, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime

    from iadkit.deploy.export import export_onnx

    _, test = toy
    detector = fitted[name]
    if detector.needs_categories:
        pytest.skip("a class-aware reference has no single graph")
    record = export_onnx(detector, tmp_path / "export")
    assert record["parity"]["maps_relative"] <= 1e-4
    graph = onnx.load(str(tmp_path / "export" / "model.onnx")).graph
    # No branch on a shape, no padding computed from one (a trained network's same padding is
    # a constant in an export): both cost time, and NNCF's bias correction refuses branches.
    assert not [node.name for node in graph.node if node.op_type in ("If", "Ceil")]
    session = onnxruntime.InferenceSession(str(tmp_path / "export" / "model.onnx"))
    images = _test_images(detector, test)
    maps, scores = session.run(None, {"images": images.numpy()})
    expected = detector.predict(images)
    for got, want in ((maps, expected.anomaly_maps.numpy()), (scores, expected.scores.numpy())):
        assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max())


def _weighted_leaves(detector: Detector) -> dict[int, str]:
    """The modules holding weights of their own (convolutions, linear layers, norms...) in
    every network the detector holds, by id."""
    from iadkit.deploy.export import _networks

    return {id(leaf): f"{name}.{leaf_name}" for name, network in _networks(detector).items()
            for leaf_name, leaf in network.named_modules()
            if next(leaf.parameters(recurse=False), None) is not None}


@contextmanager
def _autocast_of_every_call() -> Iterator[dict[int, set[bool]]]:
    """Whether CPU autocast was on, for every module call in the block, by module id."""
    seen: dict[int, set[bool]] = {}
    called: list[torch.nn.Module] = []  # kept alive, so that no id is reused

    def record(module: torch.nn.Module, *_: Any) -> None:
        called.append(module)
        seen.setdefault(id(module), set()).add(torch.is_autocast_enabled("cpu"))
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize(("name", "method", "extra"), CASES, ids=CASE_IDS)
def test_bf16_runs_every_network_in_bfloat16_and_keeps_the_scores(
        name: str, method: str, extra: dict[str, Any], fitted, toy) -> None:
    train, test = toy
    detector = fitted[name]
    images = _test_images(detector, test)
    categories = ["alpha"] * len(images)
    leaves = _weighted_leaves(detector)
    with _autocast_of_every_call() as seen:
        f32 = detector.predict(images, categories)
    assert {leaves[i] for i, modes in seen.items() if i in leaves and True in modes} == set()
    detector.set_inference_params(precision="bf16")
    try:
        with _autocast_of_every_call() as seen:
            bf16 = detector.predict(images, categories)
    finally:
        detector.set_inference_params(precision="f32")
    ran = {i for i in seen if i in leaves}
    assert ran, "no network ran"
    assert {leaves[i] for i in ran if False in seen[i]} == set()
    assert bf16.scores.dtype == bf16.anomaly_maps.dtype == torch.float32
    span = float(f32.anomaly_maps.max() - f32.anomaly_maps.min())
    assert float((bf16.anomaly_maps - f32.anomaly_maps).abs().max()) <= 0.15 * span
    # Training: every network that learns or feeds the learning computes in bfloat16 too.
    trained = tiny(method, **extra, precision="bf16")
    trained.check_resources()  # builds the backbone (folding its BatchNorm runs it in float32)
    with _autocast_of_every_call() as seen:
        trained.fit(make_loader(train, trained.preprocess, batch_size=8))
    leaves = _weighted_leaves(trained)
    assert {leaves[i] for i, modes in seen.items() if i in leaves and False in modes} == set()
    assert torch.isfinite(trained.predict(images, categories).scores).all()


def _bad_values(method: str) -> list[tuple[str, Any]]:
    """(hyperparameter, a value it may not take) for every rule's refused examples."""
    return [(name, value) for name, declared in get_method(method).hyperparameters.items()
            for value in declared.rule.invalid_examples()]


@pytest.mark.parametrize("method", available_methods())
def test_every_bad_value_is_refused_at_once_naming_the_hyperparameter(method: str) -> None:
    cls = get_method(method)
    bad_values = _bad_values(method)
    assert bad_values
    for name, value in bad_values:
        started = time.perf_counter()
        with pytest.raises(ConfigError, match=f"{name}=") as refused:
            cls.from_preset("cpu", **{"device": "cpu", name: value})
        assert time.perf_counter() - started < 1.0, (name, value)
        assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="no hyperparameter"):
        cls.from_preset("cpu", no_such_hyperparameter=1)


@pytest.mark.parametrize("name", CASE_IDS)
def test_set_inference_params_refuses_all_but_valid_inference_parameters(name: str,
                                                                        fitted) -> None:
    detector = fitted[name]
    others = [n for n in detector.hyperparameters if n not in detector.inference_params]
    with pytest.raises(ConfigError, match="cannot change after fit"):
        detector.set_inference_params(**{others[-1]: detector.get_params()[others[-1]]})
    for parameter in detector.inference_params:
        before = getattr(detector, parameter)
        for value in detector.hyperparameters[parameter].rule.invalid_examples():
            with pytest.raises(ConfigError, match=f"{parameter}="):
                detector.set_inference_params(**{parameter: value})
            assert getattr(detector, parameter) == before


def _string_option(method: str) -> str:
    """The method's last declared hyperparameter with a fixed set of string values."""
    return [name for name, declared in get_method(method).hyperparameters.items()
            if isinstance(declared.rule, Choice)][-1]


@pytest.mark.parametrize("method", available_methods())
def test_iadkit_fit_refuses_a_bad_option_with_one_line_before_any_work(
        method: str, toy_root: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    def no_fit(self, *args, **kwargs):
        raise AssertionError("a detector was fitted")

    monkeypatch.setattr(Detector, "fit", no_fit)
    option = _string_option(method)
    started = time.perf_counter()
    code = main(["fit", "--method", method, "--data", str(toy_root), "--out",
                 str(tmp_path / "run"), "--param", f"{option}=not-an-option", "--quiet"])
    seconds = time.perf_counter() - started
    error = capsys.readouterr().err
    assert code == 2 and seconds < 2.0
    assert error.count("\n") == 1 and f"{option}='not-an-option' is not allowed" in error
    assert not (tmp_path / "run").exists()


def test_a_saved_detector_with_a_bad_hyperparameter_is_refused_naming_its_file(
        fitted, tmp_path: Path) -> None:
    folder = fitted["rd"].save(tmp_path / "model")
    config = json.loads((folder / "detector.json").read_text())
    config["params"]["map_reduction"] = "avg"
    (folder / "detector.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError,
                       match=r"detector\.json: .*field 'params': rd: map_reduction='avg'"):
        Detector.load(folder)


def test_the_registry_refuses_a_taken_name_an_inherited_one_and_missing_pieces() -> None:
    from iadkit.methods import register
    from iadkit.methods.reverse_distillation import ReverseDistillation

    class Inherited(ReverseDistillation):
        pass

    class Taken(ReverseDistillation):
        name = "patchcore"

    class Untested(ReverseDistillation):
        name = "rd_untested"
        tiny_params: dict[str, Any] = {}

    for cls, message in ((Inherited, "own registry name"), (Taken, "taken by"),
                         (Untested, "tiny_params")):
        with pytest.raises(TypeError, match=message):
            register(cls)
    assert get_method("rd") is ReverseDistillation and "rd_untested" not in available_methods()


def test_a_subclass_changes_an_inherited_default_and_keeps_its_rule() -> None:
    from iadkit.methods.reverse_distillation import AAND, ReverseDistillation

    assert ReverseDistillation().num_hard == 0 and AAND().num_hard == 10
    assert AAND.hyperparameters["num_hard"].rule is ReverseDistillation.hyperparameters[
        "num_hard"].rule
    with pytest.raises(ConfigError, match="num_hard=-1"):
        AAND(num_hard=-1)
    with pytest.raises(TypeError, match="the default of num_hard=-1"):
        type("NegativeHard", (ReverseDistillation,), {"num_hard": -1})
