"""The classic baselines (PaDiM, STFPM, EfficientAD): their pieces against references, and each separating
the synthetic defects of the toy data (the contract tests cover fit, save, export, options)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import predict_all

from iadkit import metrics
from iadkit.data import load_dataset, make_loader
from iadkit.methods import Detector, create_detector
from iadkit.methods.padim.gaussian import PositionGaussians, mahalanobis_maps


def test_position_gaussians_merged_over_batches_equal_numpy_mean_covariance_and_distance() -> None:
    generator = torch.Generator().manual_seed(0)
    # A large common offset: a naive sum of squares in float32 would lose the covariance.
    features = torch.randn(37, 5, 3, 2, generator=generator) * 0.1 + 100.0
    gaussians = PositionGaussians()
    for batch in features.split((16, 16, 5)):
        gaussians.add(batch)
    mean, precision = gaussians.mean_and_precision(regularisation=0.01)
    vectors = features.double().flatten(2).permute(2, 0, 1).numpy()  # (P, N, D)
    query = torch.randn(2, 5, 3, 2, generator=generator) * 0.1 + 100.0
    expected = np.empty((2, 6))
    for position, samples in enumerate(vectors):
        covariance = np.cov(samples, rowvar=False) + 0.01 * np.eye(5)
        np.testing.assert_allclose(mean[position].numpy(), samples.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(precision[position].numpy(), np.linalg.inv(covariance),
                                   rtol=1e-3, atol=1e-3)
        for image in range(2):
            centred = query[image].double().flatten(1)[:, position].numpy() - samples.mean(0)
            expected[image, position] = np.sqrt(centred @ np.linalg.inv(covariance) @ centred)
    distances = mahalanobis_maps(query, mean, precision)
    np.testing.assert_allclose(distances.flatten(1).numpy(), expected, rtol=1e-3)


def test_position_gaussians_refuse_a_single_image() -> None:
    gaussians = PositionGaussians()
    gaussians.add(torch.zeros(1, 2, 1, 1))
    with pytest.raises(ValueError, match="at least two"):
        gaussians.mean_and_precision(0.01)


@pytest.fixture(scope="module")
def alpha(toy_root):
    samples = load_dataset(toy_root, ["alpha"])
    return samples.where(split="train"), samples.where(split="test")


def _separation(detector: Detector, train, test) -> tuple[float, float]:
    detector.fit(make_loader(train, detector.preprocess, batch_size=8))
    maps, scores, masks, labels = predict_all(detector, test)
    return (metrics.auroc(labels, scores),
            metrics.pixel_metrics(masks, maps)["pixel_auroc"])


def test_padim_separates_synthetic_defects(alpha) -> None:
    detector = create_detector("padim", image_size=64, feature_dim=32, device="cpu")
    image_auroc, pixel_auroc = _separation(detector, *alpha)
    assert image_auroc >= 0.9 and pixel_auroc >= 0.85, (image_auroc, pixel_auroc)


def test_padim_refuses_more_channels_than_its_layers_have_before_fitting(alpha) -> None:
    from iadkit.errors import ConfigError

    detector = create_detector("padim", image_size=64, feature_dim=1000, device="cpu")
    with pytest.raises(ConfigError, match="feature_dim=1000 is more than the 176 channels"):
        detector.fit(torch.rand(2, 3, 64, 64))


def test_pyramid_distances_are_one_minus_the_cosine_similarity() -> None:
    from iadkit.methods.stfpm.stfpm import pyramid_distances

    generator = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 8, 4, 4, generator=generator), torch.randn(2, 16, 2, 2)]
    student = [torch.randn(2, 8, 4, 4, generator=generator), torch.randn(2, 16, 2, 2)]
    for distance, t, s in zip(pyramid_distances(teacher, student), teacher, student):
        torch.testing.assert_close(distance, 1 - torch.cosine_similarity(t, s, dim=1))


def test_recomputed_batch_norm_statistics_are_the_training_images_averages() -> None:
    from torch import nn

    from iadkit.methods.training import TrainingImages, recompute_batch_norm_statistics

    network = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    network[1].running_mean.fill_(100.0)  # stale, as after training at a high rate
    data = TrainingImages.collect(torch.rand(8, 3, 6, 6))
    assert recompute_batch_norm_statistics(network, data, 4, torch.device("cpu")) == 1
    with torch.no_grad():
        outputs = network[0](data.get(torch.arange(8), torch.device("cpu")))
    batch_means = torch.stack([half.mean(dim=(0, 2, 3)) for half in outputs.split(4)])
    torch.testing.assert_close(network[1].running_mean, batch_means.mean(dim=0))
    assert network[1].momentum == 0.1 and not network.training


def test_stfpm_separates_synthetic_defects_after_ten_epochs(alpha) -> None:
    detector = create_detector("stfpm", image_size=64, epochs=10, device="cpu")
    image_auroc, pixel_auroc = _separation(detector, *alpha)
    assert image_auroc >= 0.9 and pixel_auroc >= 0.9, (image_auroc, pixel_auroc)
    # the student trains from scratch: the loss falls steeply from its first epoch
    losses = detector.fit_info_["loss_history"]["match"]
    assert losses[-1] < 0.5 * losses[0]


def test_efficientad_separates_synthetic_defects_and_both_stages_learn(alpha) -> None:
    detector = create_detector("efficientad", image_size=64, distillation_steps=10,
                               distillation_batch_size=8, max_steps=30, device="cpu")
    image_auroc, pixel_auroc = _separation(detector, *alpha)
    assert image_auroc >= 0.9 and pixel_auroc >= 0.9, (image_auroc, pixel_auroc)
    # The toy defects are plain enough for untrained networks to light up, so the test also
    # asks that the teacher's distillation and the student + autoencoder's training progress.
    history = detector.fit_info_["loss_history"]
    assert history["distill"][-1] < 0.5 * history["distill"][0]
    assert history["train"][-1] < history["train"][0]


@pytest.mark.parametrize("size", ["small", "medium"])
def test_the_pdn_output_grid_is_the_one_efficientad_sizes_its_autoencoder_for(size: str) -> None:
    from iadkit.methods.efficientad.efficientad import pdn_output_size
    from iadkit.methods.efficientad.networks import AutoEncoder, PatchDescriptionNetwork

    network = PatchDescriptionNetwork(8, size)
    for image_size in (64, 96, 160):
        images = torch.rand(1, 3, image_size, image_size)
        grid = pdn_output_size(image_size)
        assert network(images).shape == (1, 8, grid, grid)
        assert AutoEncoder(8, image_size, grid)(images).shape == (1, 8, grid, grid)


def test_efficientad_networks_compute_channels_last_and_give_the_default_layout_back() -> None:
    from iadkit.methods.efficientad.networks import AutoEncoder, PatchDescriptionNetwork

    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    for network in (PatchDescriptionNetwork(8), AutoEncoder(8, 64, 10).eval()):
        weights = [p for p in network.parameters() if p.dim() == 4]
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
        output = network(images)
        # The same weights in the default layout compute the same output.
        reference = copy.deepcopy(network).to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            expected = (reference.layers(images) if isinstance(reference, PatchDescriptionNetwork)
                        else reference._layers(images))
        assert output.is_contiguous()
        torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)


def test_the_hard_feature_loss_averages_the_errors_above_their_quantile() -> None:
    from iadkit.methods.efficientad.efficientad import hard_feature_loss

    errors = torch.rand(2, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    values = errors.flatten().numpy()
    expected = values[values >= np.quantile(values, 0.999)].mean()
    assert float(hard_feature_loss(errors, 0.999)) == pytest.approx(expected, rel=1e-3)


def test_colour_jitter_changes_one_property_within_the_papers_range() -> None:
    from iadkit.methods.efficientad.efficientad import colour_jitter

    images = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    torch.manual_seed(0)
    jittered = colour_jitter(images)
    assert jittered.shape == images.shape and 0 <= float(jittered.min())
    ratio = jittered.mean(dim=(1, 2, 3)) / images.mean(dim=(1, 2, 3))
    assert float(ratio.min()) > 0.75 and float(ratio.max()) < 1.25
    assert not torch.equal(jittered, images)


def test_efficientad_reuses_a_distilled_teacher_and_refuses_a_file_without_one(
        tmp_path, alpha) -> None:
    from iadkit.errors import ConfigError

    train, _ = alpha
    tiny = dict(image_size=64, distillation_steps=2, distillation_batch_size=2, max_steps=1,
                device="cpu")
    first = create_detector("efficientad", **tiny)
    first.fit(make_loader(train, first.preprocess, batch_size=8))
    weights = first.save(tmp_path / "first") / "weights.safetensors"
    second = create_detector("efficientad", teacher_weights=str(weights), seed=1, **tiny)
    second.fit(make_loader(train, second.preprocess, batch_size=8))
    for name, tensor in first.teacher_.state_dict().items():
        torch.testing.assert_close(second.teacher_.state_dict()[name], tensor)
    assert second.fit_info_["teacher"].startswith("reused from")
    assert "distill" not in second.fit_info_["loss_history"]

    padim = create_detector("padim", image_size=64, feature_dim=8, device="cpu")
    padim_weights = padim.fit(torch.rand(2, 3, 64, 64)).save(tmp_path / "padim")
    wrong = create_detector("efficientad", teacher_weights=str(padim_weights /
                                                               "weights.safetensors"), **tiny)
    with pytest.raises(ConfigError, match="holds no small teacher of 384 channels"):
        wrong.fit(torch.rand(2, 3, 64, 64))


def test_efficientad_distils_on_a_folder_of_images_and_refuses_a_missing_one(tmp_path) -> None:
    from PIL import Image

    from iadkit.errors import ConfigError

    folder = tmp_path / "distillation"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for number in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
            folder / f"{number}.png")
    tiny = dict(image_size=64, distillation_steps=2, distillation_batch_size=2, max_steps=1,
                device="cpu")
    detector = create_detector("efficientad", distillation_dir=str(folder), **tiny)
    detector.fit(torch.rand(4, 3, 64, 64))
    assert detector.fit_info_["teacher"].endswith(f"on {folder}")
    # 3 training images (one held out) in batches of 2 make one step per epoch
    assert len(detector.fit_info_["loss_history"]["distill"]) == 2
    missing = create_detector("efficientad", distillation_dir=str(tmp_path / "none"), **tiny)
    with pytest.raises(ConfigError, match="distillation_dir: .*none: texture folder not found"):
        missing.fit(torch.rand(4, 3, 64, 64))
