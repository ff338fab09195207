"""SimpleNet and Adapted-MoE: blocks against their definitions, detection on generated defects,
routing, test-time adaption, checkpoints, the unseen-subclass setting and bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from iadkit.data import generate_dataset, load_dataset, make_loader
from iadkit.data.samples import SampleSet
from iadkit.errors import ConfigError, DatasetError, IadkitError
from iadkit.methods import Detector, create_detector
from iadkit.methods.simplenet.adapted_moe import AdaptedMoE
from iadkit.methods.simplenet.mixture import (
    RoutingNetwork,
    adapt_statistics,
    rescale_to_expert_norm,
    top_k_weights,
)
from iadkit.methods.simplenet.networks import SimpleNetHead, UnfoldPatchFeatures
from iadkit.nn.knn import nearest_neighbours

#: Small heads and few epochs: a fit takes seconds on 64 px images.
#: SimpleNet's discriminator needs a few hundred steps: batches of 2 images give them.
SMALL = dict(image_size=64, crop_size=None, level_dim=96, feature_dim=96, hidden_dim=64,
             batch_size=2, device="cpu")


def _official_patch_features(features: list[torch.Tensor], level_dim: int, feature_dim: int
                             ) -> torch.Tensor:
    """The official code's definition, step by step: unfold, resize, pool, stack, pool."""
    batch, grid = features[0].shape[0], tuple(features[0].shape[-2:])
    pooled = []
    for level in features:
        channels, height, width = level.shape[1:]
        patches = F.unfold(level, 3, padding=1).view(batch, channels * 9, height, width)
        patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
        vectors = patches.permute(0, 2, 3, 1).reshape(-1, 1, channels * 9)
        pooled.append(F.adaptive_avg_pool1d(vectors, level_dim))
    stacked = torch.cat(pooled, dim=1).reshape(-1, 1, level_dim * len(features))
    merged = F.adaptive_avg_pool1d(stacked, feature_dim)
    return merged.view(batch, *grid, feature_dim).permute(0, 3, 1, 2)


def test_patch_features_equal_the_unfold_definition() -> None:
    generator = torch.Generator().manual_seed(0)
    features = [torch.rand(2, 37, 10, 10, generator=generator),
                torch.rand(2, 50, 5, 5, generator=generator)]
    expected = _official_patch_features(features, level_dim=100, feature_dim=70)
    actual = UnfoldPatchFeatures(level_dim=100, feature_dim=70)(features)
    assert actual.shape == (2, 70, 10, 10)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_head_loss_is_truncated_l1() -> None:
    head = SimpleNetHead(8, 4, margin=0.5)
    head.eval()  # BatchNorm from running statistics: the loss is then a function of the scores
    features = torch.rand(6, 8)
    scores = head.discriminator(head.adaptor(features)).squeeze(1)
    # With zero noise both halves are the same features.
    expected = F.relu(0.5 - scores).mean() + F.relu(0.5 + scores).mean()
    torch.testing.assert_close(head.loss(features, noise_std=0.0), expected)
    torch.testing.assert_close(head(features), -scores)


@pytest.mark.parametrize("statistics", ["channel", "scalar", "batch"])
def test_tta_output_has_the_target_statistics(statistics: str) -> None:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(3, 6, 7, 7, generator=generator) * 4 + 2
    target_mean = torch.linspace(-1, 1, 6)
    target_std = torch.linspace(0.5, 2, 6)
    adapted = adapt_statistics(features, target_mean, target_std, statistics, normalize=False)
    if statistics == "channel":
        torch.testing.assert_close(adapted.mean(dim=(2, 3)), target_mean.expand(3, 6),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(adapted.std(dim=(2, 3)), target_std.expand(3, 6),
                                   atol=1e-4, rtol=1e-4)
    elif statistics == "batch":
        torch.testing.assert_close(adapted.mean(dim=(0, 2, 3)), target_mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(adapted.std(dim=(0, 2, 3)), target_std, atol=1e-4, rtol=1e-4)
    else:
        overall_mean = target_mean.mean()
        overall_std = ((target_std**2 + target_mean**2).mean() - overall_mean**2).sqrt()
        torch.testing.assert_close(adapted.mean(dim=(1, 2, 3)), overall_mean.expand(3),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(adapted.std(dim=(1, 2, 3)), overall_std.expand(3),
                                   atol=1e-4, rtol=1e-4)
    # Normalised, each position's feature has the target's root-mean-square norm: adapted
    # features keep the size of the expert's training features.
    normalised = adapt_statistics(features, target_mean, target_std, statistics, normalize=True)
    expected = float((target_mean**2 + target_std**2).sum().sqrt())
    torch.testing.assert_close(normalised.norm(dim=1), torch.full((3, 7, 7), expected))


def test_reference_statistics_re_style_like_the_batch_rule_on_the_reference_itself() -> None:
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(4, 6, 5, 5, generator=generator) * 3 + 1
    target_mean, target_std = torch.linspace(-1, 1, 6), torch.linspace(0.5, 2, 6)
    reference = (features.mean(dim=(0, 2, 3)), features.std(dim=(0, 2, 3)))
    for normalize in (False, True):
        torch.testing.assert_close(
            adapt_statistics(features, target_mean, target_std, "reference", normalize,
                             reference=reference),
            adapt_statistics(features, target_mean, target_std, "batch", normalize))
    with pytest.raises(ValueError, match="reference"):
        adapt_statistics(features, target_mean, target_std, "reference")


def test_fusion_weights_sum_to_one_over_the_top_k() -> None:
    scores = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    for k in (1, 3, 6, 10):
        weights = top_k_weights(scores, k)
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(5))
        assert ((weights > 0).sum(dim=1) == min(k, 6)).all()
        kept = weights > 0
        assert (scores[kept].view(5, -1).min(dim=1).values
                >= scores.masked_fill(kept, -1e9).max(dim=1).values).all()


def test_centre_update_follows_the_centre_loss_rule() -> None:
    router = RoutingNetwork(3, num_subclasses=2)
    router.centres.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    embeddings = torch.tensor([[0.0, 0, 1], [0, 0, 3], [5, 5, 5]])
    labels = torch.tensor([0, 0, 1])
    router.update_centres(embeddings, labels, rate=0.5)
    # c_0 - 0.5 * ((c_0 - x_0) + (c_0 - x_1)) / 3 ; c_1 - 0.5 * (c_1 - x_2) / 2
    expected_0 = torch.tensor([1.0, 0, 0]) - 0.5 * torch.tensor([2.0, 0, -4]) / 3
    expected_1 = torch.tensor([0.0, 1, 0]) - 0.5 * torch.tensor([-5.0, -4, -5]) / 2
    torch.testing.assert_close(router.centres, torch.stack([expected_0, expected_1]))


# -- detectors on generated data ------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_styles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three visibly different generated categories, used as subclasses."""
    return generate_dataset(tmp_path_factory.mktemp("styles"), categories=("s0", "s1", "s2"),
                            n_train=16, n_test_good=6, n_test_defect=6, size=64, seed=3)


def _as_subclasses(samples: SampleSet) -> SampleSet:
    return SampleSet(s.with_subclass(s.category) for s in samples)


def _predict(detector: Detector, samples: SampleSet) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = [], []
    for batch in make_loader(samples, detector.preprocess, batch_size=8):
        scores.append(detector.predict(batch["image"]).scores.numpy())
        labels.append(batch["label"].numpy())
    return np.concatenate(scores), np.concatenate(labels)


def test_simplenet_separates_generated_defects_and_round_trips(toy_root: Path,
                                                              tmp_path: Path) -> None:
    samples = load_dataset(toy_root, ["alpha"])
    detector = create_detector("simplenet", "cpu", epochs=16, **SMALL)
    detector.fit(make_loader(samples.where(split="train"), detector.preprocess, batch_size=8))
    assert detector.fit_info_["loss_history"]["train"][-1] < detector.fit_info_[
        "loss_history"]["train"][0]
    scores, labels = _predict(detector, samples.where(split="test"))
    assert roc_auc_score(labels, scores) > 0.8
    loaded = Detector.load(detector.save(tmp_path / "model"))
    reloaded, _ = _predict(loaded, samples.where(split="test"))
    np.testing.assert_array_equal(reloaded, scores)


def test_automatic_noise_follows_the_spread_of_the_training_features(toy_root: Path,
                                                                    tmp_path: Path) -> None:
    train = load_dataset(toy_root, ["alpha"]).where(split="train")
    fixed = create_detector("simplenet", "cpu", epochs=1, noise_std=0.2, **SMALL)
    fixed.fit(make_loader(train, fixed.preprocess, batch_size=8))
    assert fixed.noise_std_ == fixed.fit_info_["noise_std"] == 0.2
    auto = create_detector("simplenet", "cpu", epochs=1, noise_std="auto", **SMALL)
    auto.fit(make_loader(train, auto.preprocess, batch_size=8))
    # The features' own scale: the median distance of a patch to the nearest patch of
    # another training image, over sqrt(D), lies within the features' value range.
    features = torch.cat([auto.patch_features(batch["image"]) for batch in
                          make_loader(train, auto.preprocess, batch_size=8)])
    patches = features.permute(0, 2, 3, 1).reshape(len(features), -1, features.shape[1])
    first_to_others = nearest_neighbours(patches[0], patches[1:].flatten(0, 1))[0]
    spread = float(first_to_others.median()) / features.shape[1] ** 0.5
    assert 0.5 * spread < auto.noise_std_ < 2 * spread
    assert Detector.load(auto.save(tmp_path / "model")).noise_std_ == auto.noise_std_
    with pytest.raises(ConfigError, match="noise_std"):
        create_detector("simplenet", "cpu", noise_std="automatic")


def test_adapted_moe_without_moe_and_tta_equals_simplenet(three_styles: Path) -> None:
    samples = _as_subclasses(load_dataset(three_styles))
    train, test = samples.where(split="train"), samples.where(split="test")
    common = dict(epochs=1, **SMALL)
    simplenet = create_detector("simplenet", "cpu", **common)
    simplenet.fit(make_loader(train, simplenet.preprocess, batch_size=8))
    plain = create_detector("adapted_moe", "cpu", use_moe=False, use_tta=False, **common)
    plain.fit(make_loader(train, plain.preprocess, batch_size=8))
    for batch in make_loader(test, simplenet.preprocess, batch_size=8):
        expected, actual = simplenet.predict(batch["image"]), plain.predict(batch["image"])
        assert torch.equal(expected.scores, actual.scores)
        assert torch.equal(expected.anomaly_maps, actual.anomaly_maps)


@pytest.fixture(scope="module")
def fitted_moe(three_styles: Path) -> tuple[Detector, SampleSet]:
    samples = _as_subclasses(load_dataset(three_styles))
    detector = create_detector("adapted_moe", "cpu", epochs=12, top_k=2, **SMALL)
    detector.fit(make_loader(samples.where(split="train"), detector.preprocess, batch_size=8))
    return detector, samples


def test_experts_train_on_unadapted_features_unless_asked(
        fitted_moe: tuple[Detector, SampleSet]) -> None:
    # The paper's TTA is a test-time step: by default an expert trains on its features only
    # L2-normalised (to its training norm), while inference re-styles them first.
    detector, _ = fitted_moe
    features = torch.randn(2, detector.feature_dim, 5, 5, generator=torch.Generator().manual_seed(3))
    mean, std = detector.statistics_.mean[1], detector.statistics_.std[1]
    trained_on = detector._expert_training_inputs(features, 1)
    torch.testing.assert_close(trained_on, rescale_to_expert_norm(features, mean, std))
    seen_at_test = detector._expert_inputs(features, 1)
    assert not torch.allclose(trained_on, seen_at_test, atol=1e-3)
    restyled = copy.deepcopy(detector)
    restyled.tta_in_training = True
    torch.testing.assert_close(restyled._expert_training_inputs(features, 1), seen_at_test)


def test_reference_tta_re_styles_from_the_given_normals(fitted_moe: tuple[Detector, SampleSet],
                                                       tmp_path: Path) -> None:
    detector, samples = fitted_moe
    adapted = copy.deepcopy(detector)
    adapted.tta_statistics = "reference"
    images = next(iter(make_loader(samples.where(split="test"), adapted.preprocess,
                                   batch_size=4)))["image"]
    with pytest.raises(IadkitError, match="adapt_to_references"):
        adapted.predict(images)
    references = make_loader(samples.where(split="train", subclass="s2"), adapted.preprocess,
                             batch_size=3)
    adapted.adapt_to_references(references)
    features = torch.cat([adapted.patch_features(batch["image"]) for batch in references])
    torch.testing.assert_close(adapted.reference_.mean[0], features.mean(dim=(0, 2, 3)),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(adapted.reference_.std[0], features.std(dim=(0, 2, 3)),
                               atol=1e-4, rtol=1e-4)
    scores = adapted.predict(images).scores
    assert not torch.allclose(scores, detector.predict(images).scores)
    # The references are saved with the model: adapted once, it is deployed as it is.
    reloaded = Detector.load(adapted.save(tmp_path / "adapted"))
    assert torch.equal(reloaded.predict(images).scores, scores)
    # A model saved before adapting loads, then asks for its references.
    waiting = copy.deepcopy(adapted)
    waiting.reference_ = None
    with pytest.raises(IadkitError, match="adapt_to_references"):
        Detector.load(waiting.save(tmp_path / "waiting")).predict(images)
    with pytest.raises(IadkitError, match="tta_statistics='reference'"):
        detector.adapt_to_references(references)
    # Testing on data with fewer reference normals than asked names the group.
    from iadkit.data.settings import Task
    from iadkit.engine.evaluation import evaluate_task

    few = Task("seen-s0+s1", samples.where(split="train", subclass="s0"),
               {"s2": samples.where(split="test", subclass="s2")},
               references={"s2": SampleSet(list(samples.where(split="train", subclass="s2"))[:2])})
    with pytest.raises(DatasetError, match="test group 's2': 3 reference normals asked, 2"):
        evaluate_task(adapted, few, reference_normals=3)


def test_reference_expert_choice_takes_the_expert_that_finds_the_references_normal(
        fitted_moe: tuple[Detector, SampleSet], tmp_path: Path) -> None:
    detector, samples = fitted_moe
    chooser = copy.deepcopy(detector)
    chooser.expert_choice = "references"
    test = samples.where(split="test")
    images = next(iter(make_loader(test, chooser.preprocess, batch_size=6)))["image"]
    with pytest.raises(IadkitError, match="adapt_to_references"):
        chooser.predict(images)
    for subclass in ("s0", "s1", "s2"):
        chooser.adapt_to_references(make_loader(
            samples.where(split="train", subclass=subclass), chooser.preprocess, batch_size=8))
        # Each expert trained on one style: the references' own style's expert scores them
        # lowest, and from then on it alone scores every image.
        assert chooser.expert_names[chooser.reference_scores_.chosen] == subclass
        assert chooser.reference_scores_.scores.shape == (3,)
        chosen = chooser.expert_names.index(subclass)
        expected = torch.zeros(len(images), 3)
        expected[:, chosen] = 1
        torch.testing.assert_close(chooser.routing_weights(images), expected)
        features = chooser.patch_features(images)
        torch.testing.assert_close(chooser.patch_scores(features),
                                   chooser._expert_patch_scores(features, chosen))
    scores = chooser.predict(images).scores
    reloaded = Detector.load(chooser.save(tmp_path / "chosen"))
    assert reloaded.reference_scores_.chosen == chooser.reference_scores_.chosen
    assert torch.equal(reloaded.predict(images).scores, scores)
    with pytest.raises(ConfigError, match="expert_choice='references'.*use_moe=True"):
        create_detector("adapted_moe", "cpu", use_moe=False, expert_choice="references")
    # `iadkit adapt` makes the same choice from the same images and saves it.
    from iadkit.cli import main

    waiting = copy.deepcopy(detector)
    waiting.expert_choice = "references"
    references = [str(s.image_path) for s in samples.where(split="train", subclass="s1")]
    out = tmp_path / "adapted"
    assert main(["adapt", str(waiting.save(tmp_path / "waiting")), *references, "--out",
                 str(out), "--quiet"]) == 0
    adapted = Detector.load(out)
    assert adapted.expert_names[adapted.reference_scores_.chosen] == "s1"


def test_iadkit_adapt_saves_a_model_adapted_to_reference_images(
        fitted_moe: tuple[Detector, SampleSet], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from iadkit.cli import main

    detector, samples = fitted_moe
    waiting = copy.deepcopy(detector)
    waiting.tta_statistics = "reference"
    waiting_dir = waiting.save(tmp_path / "waiting")
    references = [str(s.image_path) for s in samples.where(split="train", subclass="s2")]
    out = tmp_path / "adapted"
    assert main(["adapt", str(waiting_dir), *references, "--out", str(out), "--quiet"]) == 0
    expected = copy.deepcopy(waiting)
    expected.adapt_to_references(make_loader(samples.where(split="train", subclass="s2"),
                                             expected.preprocess, batch_size=16))
    images = next(iter(make_loader(samples.where(split="test"), expected.preprocess,
                                   batch_size=4)))["image"]
    torch.testing.assert_close(Detector.load(out).predict(images).scores,
                               expected.predict(images).scores)
    with pytest.raises(IadkitError, match="adapt_to_references"):  # the original is unchanged
        Detector.load(waiting_dir).predict(images)
    capsys.readouterr()
    # Refused, one line, nothing written: an occupied --out, a model without references,
    # a missing reference file.
    plain_dir = detector.save(tmp_path / "plain")
    for arguments, message in [
            ([str(waiting_dir), *references, "--out", str(out)], "not an empty folder"),
            ([str(plain_dir), *references, "--out", str(tmp_path / "a")],
             "does not adapt to reference images"),
            ([str(waiting_dir), str(tmp_path / "none.png"), "--out", str(tmp_path / "b")],
             "none.png: no such file")]:
        assert main(["adapt", *arguments, "--quiet"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_routing_learns_the_subclasses(fitted_moe: tuple[Detector, SampleSet]) -> None:
    detector, samples = fitted_moe
    assert detector.expert_names == ["s0", "s1", "s2"]
    hits, total = 0, 0
    for batch in make_loader(samples.where(split="test"), detector.preprocess, batch_size=8):
        weights = detector.routing_weights(batch["image"])
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(len(weights)))
        assert ((weights > 0).sum(dim=1) == 2).all()  # top_k = 2
        routed = [detector.expert_names[i] for i in weights.argmax(dim=1).tolist()]
        hits += sum(r == c for r, c in zip(routed, batch["subclass"]))
        total += len(routed)
    assert hits / total > 0.9


def test_adapted_moe_detects_and_round_trips(fitted_moe: tuple[Detector, SampleSet],
                                             tmp_path: Path) -> None:
    detector, samples = fitted_moe
    test = samples.where(split="test")
    scores, labels = _predict(detector, test)
    subclasses = np.array([s.subclass for s in test])
    per_subclass = [roc_auc_score(labels[subclasses == name], scores[subclasses == name])
                    for name in detector.expert_names]
    assert np.mean(per_subclass) > 0.7
    loaded = Detector.load(detector.save(tmp_path / "moe"))
    assert loaded.expert_names == detector.expert_names
    reloaded, _ = _predict(loaded, samples.where(split="test"))
    np.testing.assert_array_equal(reloaded, scores)


def test_interrupted_adapted_moe_training_resumes_identically(
        three_styles: Path, tmp_path: Path, interrupt_training) -> None:
    samples = _as_subclasses(load_dataset(three_styles, ["s0", "s1"]))
    train = samples.where(split="train")
    params = dict(epochs=3, checkpoint_every_s=0.0, **SMALL)
    reference = create_detector("adapted_moe", "cpu", **params)
    reference.fit(make_loader(train, reference.preprocess, batch_size=8))

    undo_interrupt = interrupt_training(2)
    folder = tmp_path / "training"
    interrupted = create_detector("adapted_moe", "cpu", **params)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(make_loader(train, interrupted.preprocess, batch_size=8),
                        checkpoint_dir=folder)
    assert len(json.loads((folder / "training.json").read_text())["progress"]["train"]) == 2
    undo_interrupt()

    resumed = create_detector("adapted_moe", "cpu", **params)
    resumed.fit(make_loader(train, resumed.preprocess, batch_size=8), checkpoint_dir=folder)
    assert not folder.exists()
    assert resumed.fit_info_["loss_history"] == reference.fit_info_["loss_history"]
    for name, tensor in reference._state_tensors().items():
        assert torch.equal(tensor, resumed._state_tensors()[name]), name


def test_unseen_subclass_run_reports_each_unseen_subclass(three_styles: Path,
                                                          tmp_path: Path) -> None:
    from iadkit.engine import RunConfig, fit_run, test_run

    config = RunConfig(method="adapted_moe", data=str(three_styles), setting="unseen-subclass",
                       unseen_subclasses=["s2"], device="cpu", show_progress=False,
                       params={"epochs": 1,
                               **{k: v for k, v in SMALL.items() if k != "device"}})
    fit_run(config, tmp_path / "run")
    results, _ = test_run(tmp_path / "run")
    assert list(results["per_category"]) == ["s2"]
    assert results["image_auroc"] == results["per_category"]["s2"]["image_auroc"]
    saved = Detector.load(tmp_path / "run" / "models" / "seen-s0+s1")
    assert saved.expert_names == ["s0", "s1"]


def test_reference_normals_are_drawn_from_the_unseen_subclass_training_images(
        three_styles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from iadkit.engine import RunConfig, fit_run, test_run

    params = {"epochs": 1, "tta_statistics": "reference",
              **{k: v for k, v in SMALL.items() if k != "device"}}
    base = dict(method="adapted_moe", data=str(three_styles), setting="unseen-subclass",
                unseen_subclasses=["s2"], device="cpu", show_progress=False, params=params)
    refused = tmp_path / "refused"
    for settings, message in [({}, "reference_normals >= 1"),
                              ({"reference_normals": 2, "calibration": "holdout"},
                               "calibration none"),
                              ({"reference_normals": 17}, "'s2' has 16 training normals"),
                              ({"reference_normals": 2, "params": {**params,
                                "tta_statistics": "channel"}}, "uses no reference images"),
                              ({"params": {**params, "use_tta": False,
                                           "expert_choice": "references"}},
                               "reference_normals >= 1")]:
        with pytest.raises(ConfigError, match=message):
            fit_run(RunConfig(**{**base, **settings}), refused)
    assert not refused.exists()
    given: list[SampleSet] = []
    adapt = AdaptedMoE.adapt_to_references

    def recorded(self: AdaptedMoE, references: Any) -> AdaptedMoE:
        given.append(references.dataset.samples)
        return adapt(self, references)

    monkeypatch.setattr(AdaptedMoE, "adapt_to_references", recorded)
    fit_run(RunConfig(**base, reference_normals=3), tmp_path / "run")
    first, _ = test_run(tmp_path / "run")
    second, _ = test_run(tmp_path / "run")
    assert len(given) == 2 and len(given[0]) == 3
    assert all(s.split == "train" and s.subclass == "s2" for s in given[0])
    assert [s.image_path for s in given[0]] == [s.image_path for s in given[1]]
    assert first["per_category"]["s2"]["image_auroc"] == \
        second["per_category"]["s2"]["image_auroc"]


def test_adapted_moe_needs_subclasses_and_valid_options() -> None:
    detector = create_detector("adapted_moe", "cpu", epochs=1, **SMALL)
    with pytest.raises(IadkitError, match="subclass"):
        detector.fit(torch.rand(4, 3, 64, 64))
    with pytest.raises(IadkitError, match="adapted_moe: tta_statistics"):
        create_detector("adapted_moe", "cpu", tta_statistics="median")
    with pytest.raises(IadkitError, match="top_k"):
        create_detector("adapted_moe", "cpu", top_k=0)
