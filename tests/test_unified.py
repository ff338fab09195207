"""UniAD and CADA: the masked transformer, feature jitter, score alignment, class-aware
references, checkpoints, resumed training and the unified settings through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from iadkit import engine, metrics
from iadkit.cli import main
from iadkit.data import generate_dataset, load_dataset, make_loader
from iadkit.errors import IadkitError
from iadkit.methods import Detector, create_detector
from iadkit.methods.cada.networks import StatisticsRegressor, align_maps, map_statistics
from iadkit.methods.uniad.networks import UniADTransformer, feature_jitter, neighbour_mask
from iadkit.nn.multiscale import align_features
from iadkit.report import ALIGNMENT_ALT, write_comparison_report

#: UniAD small enough to learn the generated textures in seconds (8x8 tokens at 64 px).
SMALL_UNIAD = dict(image_size=64, feature_stride=8, neighbourhood=3, hidden_dim=64, ffn_dim=128,
                   num_heads=4, lr=1e-3, batch_size=4, device="cpu")
#: CADA over a tiny reverse distillation.
SMALL_CADA = dict(image_size=64, base_params={"epochs": 2, "batch_size": 8}, iterations=30,
                  device="cpu")


@pytest.fixture(scope="module")
def three_categories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("three"), categories=("a", "b", "c"),
                            n_train=12, n_test_good=4, n_test_defect=4, size=64, seed=3)


def _predict(detector: Detector, samples) -> tuple[np.ndarray, ...]:
    maps, scores, masks, labels = [], [], [], []
    for batch in make_loader(samples, detector.preprocess, 12):
        prediction = detector.predict(batch["image"], categories=batch["category"])
        maps.append(prediction.anomaly_maps)
        scores.append(prediction.scores)
        masks.append(batch["mask"] > 0.5)
        labels.append(batch["label"])
    return tuple(torch.cat(x).numpy() for x in (maps, scores, masks, labels))


# -- UniAD blocks ----------------------------------------------------------------------------
def test_neighbour_mask_hides_the_clipped_window() -> None:
    mask = neighbour_mask(5, 5, 3)
    hidden = torch.isinf(mask).view(5, 5, 5, 5)
    assert hidden[2, 2].sum() == 9 and hidden[2, 2, 1:4, 1:4].all()
    assert hidden[0, 0].sum() == 4 and hidden[0, 0, :2, :2].all()
    assert not torch.isinf(neighbour_mask(5, 5, 0)).any()
    with pytest.raises(ValueError, match="hides the whole 4x4 grid"):
        neighbour_mask(4, 4, 7)


def test_decoder_output_ignores_the_tokens_own_neighbourhood() -> None:
    """With one decoder layer and no encoder layer, a reconstructed token depends only on the
    input outside its window: the masked attentions cannot copy the token (or its neighbours)
    through. (Deeper stacks mix tokens, as in the paper; the mask then limits, not forbids.)"""
    torch.manual_seed(0)
    model = UniADTransformer(6, (5, 5), dim=8, heads=2, ffn_dim=16, dropout=0.0,
                             encoder_layers=0, decoder_layers=1, neighbourhood=3).eval()
    tokens = torch.randn(1, 25, 6, requires_grad=True)
    rebuilt, _ = model(tokens)
    rebuilt[0, 12].sum().backward()  # the centre token (2, 2)
    influence = tokens.grad[0].abs().sum(dim=1).view(5, 5)
    assert influence[1:4, 1:4].max() == 0
    assert (influence[0] > 0).all() and (influence[4] > 0).all()


def test_feature_jitter_scales_with_the_token_norm() -> None:
    torch.manual_seed(0)
    tokens = torch.randn(20000, 16) * 3
    noise = feature_jitter(tokens, scale=20.0) - tokens
    expected_std = 20.0 * tokens.norm(dim=1) / 16
    ratio = (noise / expected_std[:, None]).std()
    assert ratio == pytest.approx(1.0, abs=0.02)
    assert torch.equal(feature_jitter(tokens, 0.0), tokens)


def test_aligned_features_concatenate_on_the_coarsest_grid() -> None:
    levels = [torch.rand(2, 4, 16, 16), torch.rand(2, 6, 8, 8), torch.rand(2, 5, 4, 4)]
    aligned = align_features(levels, (4, 4))
    assert aligned.shape == (2, 15, 4, 4)
    assert torch.equal(aligned[:, 10:], levels[2])


# -- UniAD detector --------------------------------------------------------------------------
def test_uniad_separates_generated_defects_and_round_trips(toy_root: Path, tmp_path: Path) -> None:
    samples = load_dataset(toy_root, ["alpha"])
    detector = create_detector("uniad", "cpu", **SMALL_UNIAD, epochs=4)
    detector.fit(make_loader(samples.where(split="train"), detector.preprocess, 8))
    losses = detector.fit_info_["loss_history"]["reconstruct"]
    assert losses[-1] < losses[0]
    maps, scores, masks, labels = _predict(detector, samples.where(split="test"))
    assert maps.shape == (12, 64, 64)
    assert metrics.auroc(labels, scores) >= 0.8
    assert metrics.pixel_metrics(masks, maps)["pixel_auroc"] >= 0.8
    loaded = Detector.load(detector.save(tmp_path / "uniad"))
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(detector.predict(images).scores, loaded.predict(images).scores)


# -- CADA blocks -----------------------------------------------------------------------------
@pytest.mark.parametrize("spread", ["max", "sigma"])
def test_alignment_maps_an_images_own_statistics_to_zero_mean_and_unit_max(spread: str) -> None:
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 16, 16, generator=generator) * torch.tensor([0.1, 5.0, 40.0]).view(3, 1, 1)
    aligned = align_maps(maps, map_statistics(maps, spread), spread)
    torch.testing.assert_close(aligned.mean(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    if spread == "max":
        torch.testing.assert_close(aligned.amax(dim=(1, 2)), torch.ones(3))
    else:  # u + 3 sigma maps to 1: the standard deviation becomes 1/3
        torch.testing.assert_close(aligned.flatten(1).std(dim=1), torch.full((3,), 1 / 3))


def test_alignment_survives_an_upper_level_below_the_centre() -> None:
    maps = torch.rand(2, 8, 8)
    statistics = torch.tensor([[0.5, 0.2], [0.5, 0.5]])  # gamma <= u
    aligned = align_maps(maps, statistics)
    assert torch.isfinite(aligned).all()
    assert torch.equal(aligned.flatten(1).argsort(dim=1), maps.flatten(1).argsort(dim=1))


def test_regressor_layout_and_starting_point() -> None:
    regressor = StatisticsRegressor(12, outputs=2, hidden=8, dropout=0.25).eval()
    regressor.start_at(torch.tensor([0.3, 0.9]))
    torch.nn.init.zeros_(regressor.head[-1].weight)
    output = regressor(torch.rand(4, 12, 5, 5))
    assert output.shape == (4, 2)
    torch.testing.assert_close(output, torch.tensor([[0.3, 0.9]]).expand(4, 2))
    dropouts = [m for m in regressor.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 2 and all(d.p == 0.25 for d in dropouts)


# -- CADA detector ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted_cada(three_categories: Path) -> tuple[Detector, object]:
    samples = load_dataset(three_categories)
    # lr 0.01: the paper's 0.05 switches off every hidden unit on 36 images (see the test below).
    detector = create_detector("cada", "cpu", **{**SMALL_CADA, "iterations": 150, "lr": 0.01})
    detector.fit(make_loader(samples.where(split="train"), detector.preprocess, 8))
    return detector, samples


def test_cada_regressor_learns_each_categorys_statistics(fitted_cada) -> None:
    """On held-out normal images, the regressed statistics are nearer their own category's
    mean than to the mean over all categories (the categories' scales differ)."""
    detector, samples = fitted_cada
    losses = detector.fit_info_["loss_history"]["regressor"]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    base = detector.base_detector
    normal = samples.where(split="test", label=0)
    truths, predicted, categories = [], [], []
    with torch.no_grad():
        for batch in make_loader(normal, detector.preprocess, 12):
            maps, features = base.raw_maps_and_features(batch["image"])
            truths.append(map_statistics(maps))
            predicted.append(detector.image_statistics(features))
            categories += batch["category"]
    truth, prediction = torch.cat(truths), torch.cat(predicted)
    own_means = torch.stack([truth[[c == k for c in categories]].mean(0) for k in categories])
    regressed_error = (prediction - truth).abs().mean()
    global_error = (truth.mean(0) - truth).abs().mean()
    assert (own_means - truth).abs().mean() < global_error  # the scales do differ
    assert regressed_error < global_error


def test_cada_round_trip_and_class_aware_references(fitted_cada, tmp_path: Path) -> None:
    detector, samples = fitted_cada
    test = samples.where(split="test")
    maps, scores, _, labels = _predict(detector, test)
    assert maps.shape[1:] == (64, 64)
    loaded = Detector.load(detector.save(tmp_path / "cada"))
    assert loaded.base_detector.name == "rd"
    assert np.array_equal(_predict(loaded, test)[1], scores)
    # All test images pooled: the base's scales differ per category, CADA's agree.
    base_scores = torch.cat([detector.base_detector.predict(batch["image"]).scores
                             for batch in make_loader(test, detector.preprocess, 12)]).numpy()
    assert metrics.auroc(labels, scores) >= 0.9
    assert metrics.auroc(labels, scores) > metrics.auroc(labels, base_scores) + 0.1

    # CaDA-A and CaDA-B reuse the fitted base, saved on its own.
    base_folder = detector.base_detector.save(tmp_path / "base")
    class_aware = create_detector("cada", "cpu", base_checkpoint=str(base_folder),
                                  alignment="class", device="cpu")
    class_aware.fit(make_loader(samples.where(split="train"), class_aware.preprocess, 8))
    assert class_aware.fit_info_["classes"] == ["a", "b", "c"]
    with pytest.raises(IadkitError, match="needs the category of every image"):
        class_aware.predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(IadkitError, match=r"categories \['zzz'\] were not in training"):
        class_aware.predict(torch.rand(1, 3, 64, 64), categories=["zzz"])
    assert float(class_aware.class_statistics_[:, 0].std()) > 0  # one centre per category
    train = next(iter(make_loader(samples.where(split="train"), class_aware.preprocess, 36)))
    classifier = create_detector("cada", "cpu", base_checkpoint=str(base_folder),
                                 alignment="classifier", iterations=60, lr=0.01,
                                 device="cpu")  # the regressor's 0.05 overshoots here
    classifier.fit(make_loader(samples.where(split="train"), classifier.preprocess, 8))
    with torch.no_grad():
        _, features = classifier.base_detector.raw_maps_and_features(train["image"])
        chosen = classifier.network_(features).argmax(dim=1)
    truth = torch.tensor([["a", "b", "c"].index(c) for c in train["category"]])
    assert (chosen == truth).float().mean() >= 0.9
    reloaded = Detector.load(classifier.save(tmp_path / "cada_b"))
    images = train["image"][:4]
    assert torch.equal(reloaded.predict(images).scores, classifier.predict(images).scores)

    # The paper's lr 0.05 on these 36 images leaves a regressor that predicts a constant.
    collapsed = create_detector("cada", "cpu", base_checkpoint=str(base_folder),
                                iterations=150, lr=0.05, device="cpu")
    with pytest.warns(UserWarning, match="predicts the same statistics"):
        collapsed.fit(make_loader(samples.where(split="train"), collapsed.preprocess, 8))
    assert collapsed.fit_info_["regressed_std"] == [0.0, 0.0]
    assert min(detector.fit_info_["regressed_std"]) > 0.01
    # A regressor whose predictions vary far less than its targets is reported: here the
    # trained one against targets ten times as spread.
    regressed, targets = (detector.fit_info_[k] for k in ("regressed_std", "target_std"))
    assert all(r > 0.3 * t for r, t in zip(regressed, targets, strict=True))
    with torch.no_grad():
        maps, features = detector.base_detector.raw_maps_and_features(train["image"])
    spread_out = map_statistics(maps) * 10
    with pytest.warns(UserWarning, match="has learnt little"):
        detector._check_regressor(features, spread_out)


def test_interrupted_cada_keeps_its_base_and_resumes_identically(
        three_categories: Path, tmp_path: Path, interrupt_training) -> None:
    train = load_dataset(three_categories, ["a", "b"]).where(split="train")
    settings = dict(SMALL_CADA, base_params={"epochs": 1, "batch_size": 8, "image_size": 32},
                    image_size=32, iterations=6, batch_size=24, checkpoint_every_s=0)
    reference = create_detector("cada", "cpu", **settings)
    reference.fit(make_loader(train, reference.preprocess, 8))

    detector = create_detector("cada", "cpu", **settings)
    folder = tmp_path / "checkpoint"
    undo = interrupt_training(1 + 3)  # the base's one epoch, then three regressor epochs
    with pytest.raises(KeyboardInterrupt):
        detector.fit(make_loader(train, detector.preprocess, 8), checkpoint_dir=folder)
    assert (folder / "base_detector" / "detector.json").is_file()
    undo()
    resumed = create_detector("cada", "cpu", **settings)
    undo = interrupt_training(3)  # retraining the base would need one more epoch than allowed
    resumed.fit(make_loader(train, resumed.preprocess, 8), checkpoint_dir=folder)
    undo()
    assert not folder.exists()
    images = torch.rand(3, 3, 32, 32)
    assert torch.equal(resumed.predict(images).scores, reference.predict(images).scores)


def test_cada_over_uniad_uses_the_papers_loss_threshold(three_categories: Path) -> None:
    train = load_dataset(three_categories, ["a", "b"]).where(split="train")
    uniad = {k: v for k, v in SMALL_UNIAD.items() if k != "device"}
    detector = create_detector("cada", "cpu", base="uniad", base_params={**uniad, "epochs": 1},
                               iterations=5, device="cpu")
    detector.fit(make_loader(train, detector.preprocess, 8))
    assert detector.fit_info_["loss_beta"] == 10.0
    assert detector.fit_info_["feature_channels"] == SMALL_UNIAD["hidden_dim"]
    prediction = detector.predict(torch.rand(2, 3, 64, 64))
    assert prediction.anomaly_maps.shape == (2, 64, 64)


def test_cada_refuses_bases_and_settings_it_cannot_use(tmp_path: Path, toy_root: Path) -> None:
    with pytest.raises(IadkitError, match="alignment='oracle' is not allowed"):
        create_detector("cada", "cpu", alignment="oracle")
    with pytest.raises(IadkitError, match="other than cada"):
        create_detector("cada", "cpu", base="cada")
    detector = create_detector("cada", "cpu", base_params={"epochs": 1},
                               alignment="class", image_size=32, device="cpu")
    train = load_dataset(toy_root, ["alpha"]).where(split="train")
    with pytest.raises(IadkitError, match="needs at least two named training categories"):
        detector.fit(make_loader(train, detector.preprocess, 8))


def test_cli_absolute_unified_with_cada(three_categories: Path, tmp_path: Path) -> None:
    """Pooled metrics over all categories; pixels only from the categories with masks; the
    report shows the categories' score distributions."""
    data = tmp_path / "data"
    shutil.copytree(three_categories, data)
    shutil.rmtree(data / "c" / "ground_truth")  # c: image labels only
    run = tmp_path / "run"
    code = main(["fit", "--method", "cada", "--data", str(data), "--out", str(run),
                 "--setting", "absolute-unified", "--param", "image_size=32",
                 "--param", "base_params={epochs: 1}", "--param", "iterations=10", "--quiet"])
    assert code == 0
    assert main(["test", str(run), "--json", str(tmp_path / "m.json"), "--report",
                 str(tmp_path / "report"), "--quiet"]) == 0
    results = json.loads((tmp_path / "m.json").read_text())
    assert results["setting"] == "absolute-unified"
    pooled = results["pooled"]
    assert pooled["n_images"] == 24 and set(results["per_category"]) == {"a", "b", "c"}
    assert results["image_auroc"] == pooled["image_auroc"]
    assert pooled["pixel_groups"] == ["a", "b"] and pooled["pixel_auroc"] is not None
    assert results["per_category"]["c"]["pixel_auroc"] is None
    assert ALIGNMENT_ALT in (tmp_path / "report" / "index.html").read_text()

    _, evaluations = engine.test_run(run)
    page = write_comparison_report({"one": results, "again": results},
                                   {"one": evaluations[0], "again": evaluations[0]},
                                   tmp_path / "comparison")
    assert page.read_text().count(ALIGNMENT_ALT) == 1
