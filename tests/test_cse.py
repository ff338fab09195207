"""CSE: embedder and decoder shapes, losses, k-means bank, training behaviour and persistence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from iadkit.data import generate_dataset, load_dataset, make_loader
from iadkit.methods import Detector, create_detector
from iadkit.methods.cse.kmeans import kmeans
from iadkit.methods.cse.networks import (
    FeatureDecoder,
    FusionEmbedder,
    cluster_distances,
    contrastive_cosine_loss,
    feature_reconstruction_loss,
)
from iadkit.methods.training import TrainingImages, one_cycle

TINY = dict(device="cpu", image_size=64, crop_size=None, batch_size=4, min_steps=0)


@pytest.fixture(scope="module")
def toy_alpha(toy_root: Path):
    samples = load_dataset(toy_root, ["alpha"])
    return samples.where(split="train"), samples.where(split="test")


def _loader(samples, detector: Detector):
    return make_loader(samples, detector.preprocess, batch_size=8)


@pytest.mark.parametrize(("backbone", "channels", "size"), [
    ("tf_efficientnet_lite0", [112, 320], 224),  # the cpu preset
    ("efficientnet_b3", [136, 384], 224),  # the paper's extractor: 520 -> 64 x 7 x 7
])
def test_embedder_and_decoder_shapes_on_the_preset_backbones(backbone: str, channels: list[int],
                                                              size: int) -> None:
    detector = create_detector("cse", "cpu", backbone=backbone, backbone_weights="random",
                               device="cpu")
    assert detector.extractor.channels == channels
    features = detector.extractor(torch.rand(2, 3, size, size))
    embedder = FusionEmbedder(channels)
    embedding, pooled = embedder(features)
    assert embedding.shape == (2, 64, 14, 14)
    assert pooled.shape == (2, 64, 7, 7)
    assert [layer.out_channels for layer in embedder.layers if hasattr(layer, "out_channels")] \
        == [sum(channels) // 2, sum(channels) // 4, 64]
    rebuilt = FeatureDecoder(64, channels)(embedding, [f.shape[-2:] for f in features])
    assert [tuple(r.shape) for r in rebuilt] == [tuple(f.shape) for f in features]


def test_contrastive_loss_pulls_normal_pairs_and_pushes_defective_ones() -> None:
    first = torch.randn(3, 8, 4, 4)
    for axis in ("width", "channel", "flatten"):
        same = contrastive_cosine_loss(first, first, torch.tensor([0, 0, 0]), axis)
        assert same.item() == pytest.approx(0.0, abs=1e-5)
        # Identical embeddings of a defective pair cost the most, opposite ones nothing.
        assert contrastive_cosine_loss(first, first, torch.tensor([1, 1, 1]), axis).item() \
            == pytest.approx(3.0, abs=1e-5)
        assert contrastive_cosine_loss(first, -first, torch.tensor([1, 1, 1]), axis).item() \
            == pytest.approx(0.0, abs=1e-5)
        # Summed over the batch: one opposite normal pair costs 2.
        mixed = contrastive_cosine_loss(first, torch.stack([-first[0], first[1], first[2]]),
                                        torch.tensor([0, 0, 0]), axis)
        assert mixed.item() == pytest.approx(2.0, abs=1e-5)
    with pytest.raises(ValueError, match="cosine axis"):
        contrastive_cosine_loss(first, first, torch.zeros(3), "rows")


def test_contrastive_width_axis_is_the_mean_of_row_cosines() -> None:
    first, second = torch.randn(1, 2, 3, 5), torch.randn(1, 2, 3, 5)
    rows = [torch.nn.functional.cosine_similarity(first[0, c, r], second[0, c, r], dim=0)
            for c in range(2) for r in range(3)]
    expected = 1 - torch.stack(rows).mean()
    assert contrastive_cosine_loss(first, second, torch.zeros(1), "width").item() \
        == pytest.approx(expected.item(), abs=1e-6)


def test_reconstruction_loss_is_zero_for_scaled_features_and_positive_otherwise() -> None:
    target = [torch.randn(2, 6, 4, 4), torch.randn(2, 9, 2, 2)]
    assert feature_reconstruction_loss([3 * t for t in target], target).item() \
        == pytest.approx(0.0, abs=1e-6)
    assert feature_reconstruction_loss([torch.randn_like(t) for t in target], target).item() > 0.1


def test_kmeans_with_one_cluster_is_the_mean_and_finds_separated_groups() -> None:
    points = torch.randn(50, 12)
    centres, assignment = kmeans(points, 1)
    assert torch.allclose(centres[0], points.mean(dim=0))
    assert (assignment == 0).all()
    offsets = torch.tensor([[0.0] * 12, [20.0] * 12, [-20.0] * 12])
    groups = torch.cat([torch.randn(30, 12) + offset for offset in offsets])
    centres, assignment = kmeans(groups, 3, seed=1)
    for group in range(3):
        labels = assignment[group * 30:(group + 1) * 30]
        assert (labels == labels[0]).all()
        assert torch.allclose(centres[labels[0]], groups[group * 30:(group + 1) * 30].mean(0),
                              atol=1e-5)
    with pytest.raises(ValueError, match="k-means needs"):
        kmeans(points, 51)


def test_cluster_distance_is_zero_at_the_centre() -> None:
    centres = torch.randn(2, 8, 3, 3)
    distances = cluster_distances(torch.stack([centres[1], -centres[0]]), centres)
    assert distances.shape == (2, 2, 3, 3)
    assert torch.allclose(distances[0, 1], torch.zeros(3, 3), atol=1e-6)
    assert torch.allclose(distances[1, 0], torch.full((3, 3), 2.0), atol=1e-6)


def test_one_cycle_matches_torch_schedule() -> None:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=4e-3, total_steps=23)
    for step in range(23):
        factor, momentum = one_cycle()(step, 23)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-3 * factor, rel=1e-9)
        assert optimizer.param_groups[0]["betas"][0] == pytest.approx(momentum, rel=1e-9)
        optimizer.step()
        schedule.step()


def test_training_keeps_the_random_decoder_frozen_and_lowers_the_loss(toy_alpha) -> None:
    train, _ = toy_alpha
    detector = create_detector("cse", "cpu", epochs=4, **TINY)
    detector.fit(_loader(train, detector))
    trained_decoder = {k: v.clone() for k, v in detector.decoder_.state_dict().items()}
    trained_embedder = {k: v.clone() for k, v in detector.network_.state_dict().items()}
    detector._build_networks()  # the same seeded initialisation
    for key, value in detector.decoder_.state_dict().items():
        if key.endswith("weight") and value.ndim == 4:  # convolutions; BN statistics may move
            assert torch.equal(value, trained_decoder[key]), key
    assert any(not torch.equal(value, trained_embedder[key])
               for key, value in detector.network_.state_dict().items())
    history = detector.fit_info_["loss_history"]
    assert len(history["embed"]) == 4 and len(history["validation"]) == 4
    assert history["embed"][-1] < history["embed"][0]
    assert detector.fit_info_["chosen_epoch"] == \
        history["validation"].index(min(history["validation"])) + 1


def test_the_bank_of_one_cluster_is_the_mean_training_embedding(toy_alpha) -> None:
    train, _ = toy_alpha
    # 16 images: 5 held out, 11 in batches of 4 = 3 steps per epoch; 6 steps need 2 epochs.
    detector = create_detector("cse", "cpu", epochs=1, **{**TINY, "min_steps": 6})
    detector.fit(_loader(train, detector))
    assert detector.fit_info_["epochs"] == 2
    assert len(detector.fit_info_["loss_history"]["embed"]) == 2
    data = TrainingImages.collect(_loader(train, detector))  # the images as fit stores them
    images = data.get(torch.arange(len(data)), torch.device("cpu"))
    with torch.no_grad():
        pooled = detector.embed(images)[2]
    assert detector.centres_.shape == (1, *pooled.shape[1:])
    assert torch.allclose(detector.centres_[0], pooled.mean(dim=0), atol=1e-5)

    nearest = create_detector("cse", "cpu", epochs=1, clusters=3,
                              cluster_representative="nearest_sample", **TINY)
    nearest.fit(_loader(train, nearest))
    with torch.no_grad():
        pooled = nearest.embed(images)[2]
    for centre in nearest.centres_:  # every representative is one of the training embeddings
        assert (pooled - centre).flatten(1).norm(dim=1).min() < 1e-4


def test_cse_separates_synthetic_defects_and_round_trips(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "data", categories=("surface",), n_train=24,
                            n_test_good=8, n_test_defect=8, size=128, seed=3)
    samples = load_dataset(root)
    detector = create_detector("cse", "cpu", epochs=3, min_steps=0, device="cpu",
                               image_size=128, crop_size=None)
    detector.fit(_loader(samples.where(split="train"), detector))
    test = list(_loader(samples.where(split="test"), detector))
    images = torch.cat([batch["image"] for batch in test])
    labels = np.concatenate([np.asarray(batch["label"]) for batch in test])
    prediction = detector.predict(images)
    assert prediction.anomaly_maps.shape == (len(labels), 128, 128)
    auroc = roc_auc_score(labels, prediction.scores.numpy())
    print("AUROC", auroc)
    assert auroc > 0.8

    detector.save(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "detector.json").read_text())["method"] == "cse"
    loaded = Detector.load(tmp_path / "model", device="cpu")
    again = loaded.predict(images)
    assert torch.equal(again.scores, prediction.scores)
    assert torch.equal(again.anomaly_maps, prediction.anomaly_maps)


@pytest.mark.parametrize("variant", [dict(decoder="none"), dict(decoder="before"),
                                     dict(decoder="joint"), dict(objective="classifier")])
def test_ablation_variants_train_and_score(toy_alpha, variant: dict) -> None:
    train, test = toy_alpha
    detector = create_detector("cse", "cpu", epochs=2, **TINY, **variant)
    initial = None
    if variant.get("decoder") in ("before", "joint"):
        detector._build_networks()
        initial = {k: v.clone() for k, v in detector.decoder_.state_dict().items()}
    detector.fit(_loader(train, detector))
    if initial is not None:  # a trained decoder's weights move
        assert any(not torch.equal(v, detector.decoder_.state_dict()[k])
                   for k, v in initial.items() if v.ndim == 4)
    if variant.get("decoder") == "before":
        assert len(detector.fit_info_["loss_history"]["decoder"]) == 2
    images = torch.cat([batch["image"] for batch in _loader(test, detector)])
    prediction = detector.predict(images)
    assert prediction.scores.shape == (images.shape[0],)
    assert torch.isfinite(prediction.anomaly_maps).all()


def test_bad_hyperparameters_are_refused() -> None:
    from iadkit.errors import IadkitError

    for bad in (dict(decoder="pretrained"), dict(cosine_axis="rows"), dict(clusters=0),
                dict(validation_fraction=1.0), dict(defect_kinds=("scratch",))):
        with pytest.raises(IadkitError):
            create_detector("cse", "cpu", **bad)


def test_interrupted_training_resumes_to_the_same_model(toy_alpha, tmp_path: Path,
                                                        interrupt_training) -> None:
    train, _ = toy_alpha
    settings = dict(TINY, epochs=3, checkpoint_every_s=0)
    reference = create_detector("cse", "cpu", **settings)
    reference.fit(_loader(train, reference))

    undo_interrupt = interrupt_training(2)
    checkpoint = tmp_path / "training"
    interrupted = create_detector("cse", "cpu", **settings)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(_loader(train, interrupted), checkpoint_dir=checkpoint)
    saved = json.loads((checkpoint / "training.json").read_text())["progress"]
    assert len(saved["embed"]) == 2 and len(saved["validation"]) == 2
    undo_interrupt()

    resumed = create_detector("cse", "cpu", **settings)
    resumed.fit(_loader(train, resumed), checkpoint_dir=checkpoint)
    assert resumed.fit_info_["loss_history"] == reference.fit_info_["loss_history"]
    for name, tensor in reference._state_tensors().items():
        assert torch.equal(tensor, resumed._state_tensors()[name]), name
