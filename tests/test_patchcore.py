"""PatchCore through the Detector interface."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import predict_all

from iadkit import metrics
from iadkit.data import make_loader
from iadkit.errors import CheckpointError, ConfigError, NotFittedError
from iadkit.methods import Detector, create_detector


def test_patchcore_separates_synthetic_defects(fitted_patchcore) -> None:
    detector, samples = fitted_patchcore
    maps, scores, masks, labels = predict_all(detector, samples.where(split="test"))
    assert maps.shape == (12, 56, 56) and scores.shape == (12,)
    assert metrics.auroc(labels, scores) >= 0.95
    assert metrics.pixel_metrics(masks, maps)["pixel_auroc"] >= 0.85


def test_a_chunked_coreset_keeps_the_ratio_and_finds_the_defects(fitted_patchcore) -> None:
    _, samples = fitted_patchcore
    # 16 training images of 8 x 8 patches, 1,120 bytes each: 0.1 MiB holds 95 patches, fewer
    # than the 1,024 of the training set, so the chunked rule runs (with chunks as large as the
    # budget allows: 95 patches, 11 chunks).
    detector = create_detector("patchcore", "cpu", image_size=64, coreset_ratio=0.25,
                               coreset_memory_gb=0.0001, device="cpu")
    detector.fit(make_loader(samples.where(split="train"), detector.preprocess, batch_size=4))
    info = detector.fit_info_
    assert info["coreset_rule"] == "chunked" and info["coreset_chunks"] == 11
    assert detector.memory_bank_.shape[0] == int(0.25 * info["n_patches"])
    maps, scores, masks, labels = predict_all(detector, samples.where(split="test"))
    assert metrics.auroc(labels, scores) >= 0.95
    assert metrics.pixel_metrics(masks, maps)["pixel_auroc"] >= 0.85
    # Within the budget (the default 1 GiB) the exact rule runs: the unbounded fit's bank.
    banks = []
    for budget in (1.0, None):
        exact = create_detector("patchcore", "cpu", image_size=64, coreset_ratio=0.25,
                                coreset_memory_gb=budget, device="cpu")
        exact.fit(make_loader(samples.where(split="train"), exact.preprocess, batch_size=4))
        assert exact.fit_info_["coreset_rule"] == "exact"
        banks.append(exact.memory_bank_)
    assert torch.equal(banks[0], banks[1])
    assert banks[0].shape == detector.memory_bank_.shape
    assert not torch.equal(banks[0], detector.memory_bank_)


def test_default_search_chooses_the_smoothing_by_pixel_auroc(fitted_patchcore) -> None:
    from iadkit import engine

    detector, samples = fitted_patchcore
    before = detector.smoothing_sigma
    try:
        result = engine.search_on_held_out_normals(
            detector, samples.where(split="train"), engine.SearchSettings())
        assert result["source"].startswith("mixed pseudo-validation set")
        (stage,) = result["stages"]
        assert stage["metric"] == "pixel_auroc"
        best = max(stage["curve"], key=lambda point: point["pixel_auroc"])
        assert detector.smoothing_sigma == stage["chosen"] == best["value"]
        # the smoothing never changes PatchCore's image score
        assert len({point["image_auroc"] for point in stage["curve"]}) == 1
    finally:
        detector.set_inference_params(smoothing_sigma=before)


def test_errors_for_unfitted_detector_and_broken_checkpoints(tmp_path: Path) -> None:
    detector = create_detector("patchcore", image_size=32)
    with pytest.raises(NotFittedError):
        detector.predict(torch.rand(1, 3, 32, 32))
    with pytest.raises(CheckpointError, match="detector.json: missing"):
        Detector.load(tmp_path)
    (tmp_path / "detector.json").write_text("{not json")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Detector.load(tmp_path)


def test_paper_preset_runs_with_random_weights_on_tiny_input() -> None:
    detector = create_detector("patchcore", "paper", backbone_weights="random", image_size=72,
                               crop_size=64, device="cpu")
    detector.fit(torch.rand(2, 3, 64, 64))
    assert detector.memory_bank_.shape[1] == 1024  # the official embedding dimension
    prediction = detector.predict(torch.rand(1, 3, 64, 64))
    assert prediction.anomaly_maps.shape == (1, 64, 64)


def test_overriding_image_size_scales_the_preset_crop() -> None:
    detector = create_detector("patchcore", "paper", image_size=64)
    assert (detector.image_size, detector.crop_size) == (64, 56)
    assert create_detector("patchcore", "paper", image_size=64, crop_size=None).crop_size is None
    assert create_detector("patchcore", "cpu", image_size=64).crop_size is None
    with pytest.raises(ConfigError, match="crop_size=80 is larger than image_size=64"):
        _ = create_detector("patchcore", "cpu", image_size=64, crop_size=80).preprocess


def test_leaving_an_image_out_equals_fitting_without_it(fitted_patchcore) -> None:
    """With the full bank, a training image scored without its own entries gets exactly the
    score and map of a bank fitted without it; with a coreset it is at least that of the
    normal bank (never an in-sample score)."""
    _, samples = fitted_patchcore
    train = samples.where(split="train")
    images = torch.stack([b for batch in make_loader(train, create_detector(
        "patchcore", "cpu", image_size=64).preprocess, batch_size=16) for b in batch["image"]])
    full = create_detector("patchcore", "cpu", image_size=64, coreset_ratio=1.0,
                           device="cpu", knn_backend="torch").fit(images[:8])
    left_out = full.predict_left_out(images[[2, 5]], [2, 5])
    for position, index in enumerate([2, 5]):
        rest = torch.cat([images[:index], images[index + 1:8]])
        refit = create_detector("patchcore", "cpu", image_size=64, coreset_ratio=1.0,
                                device="cpu", knn_backend="torch").fit(rest)
        expected = refit.predict(images[index:index + 1])
        assert left_out.scores[position].item() == pytest.approx(expected.scores[0].item(),
                                                                 rel=1e-5)
        torch.testing.assert_close(left_out.anomaly_maps[position], expected.anomaly_maps[0],
                                   rtol=1e-4, atol=1e-5)
    in_sample = full.predict(images[[2, 5]]).scores
    assert (left_out.scores > in_sample + 1e-6).all()
