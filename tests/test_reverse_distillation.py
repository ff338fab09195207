"""RD, AAND and ReContrast: blocks, losses, training, checkpoints and resumption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from iadkit import metrics
from iadkit.backbones import FeatureExtractor
from iadkit.cli import main
from iadkit.data import load_dataset, make_loader
from iadkit.errors import CheckpointError, IadkitError
from iadkit.methods import Detector, create_detector
from iadkit.methods.reverse_distillation.amplification import (
    ResidualAmplifier,
    amplification_loss,
    downsample_mask,
    gate_focal_loss,
    position_encoding,
)
from iadkit.methods.reverse_distillation.networks import hard_mined_cosine_loss, hard_patch_loss
from iadkit.methods.reverse_distillation.rd import ReverseStudent
from iadkit.nn.anomaly_maps import fuse_maps, image_scores

BACKBONES = {"paper": ("wide_resnet50_2", ("layer1", "layer2", "layer3")),
             "cpu": ("tf_efficientnet_lite0", (1, 2, 3))}
#: Tiny but complete settings: 64 px images, a couple of epochs.
TINY = dict(image_size=64, epochs=3, batch_size=8, device="cpu")


@pytest.fixture(scope="module")
def toy_alpha(toy_root: Path):
    samples = load_dataset(toy_root, ["alpha"])
    return samples.where(split="train"), samples.where(split="test")


def _loader(samples, detector: Detector, batch_size: int = 8):
    return make_loader(samples, detector.preprocess, batch_size)


def _predict(detector: Detector, samples) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    maps, scores, masks, labels = [], [], [], []
    for batch in _loader(samples, detector, 12):
        prediction = detector.predict(batch["image"])
        maps.append(prediction.anomaly_maps)
        scores.append(prediction.scores)
        masks.append(batch["mask"] > 0.5)
        labels.append(batch["label"])
    return tuple(torch.cat(x).numpy() for x in (maps, scores, masks, labels))


# -- blocks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["paper", "cpu"])
def test_student_rebuilds_every_teacher_shape(preset: str) -> None:
    backbone, layers = BACKBONES[preset]
    teacher = FeatureExtractor(backbone, layers, weights="random")
    features = teacher(torch.rand(2, 3, 64, 64))
    for heads in (0, 2):
        student = ReverseStudent(teacher.channels, teacher.strides, None, 3, (3, 4, 6), 0.5,
                                 "gelu", num_heads=heads)
        outputs = student(features)
        sets = outputs if heads else [outputs]
        assert len(sets) == max(heads, 1)
        for rebuilt in sets:
            assert [o.shape for o in rebuilt] == [f.shape for f in features]
    if preset == "paper":  # RD4AD's exact widths: 2048-channel embedding at 1/32
        assert student.bottleneck(features).shape == (2, 2048, 2, 2)
        assert teacher.channels == [256, 512, 1024]


def test_decoder_ends_linear_only_for_teachers_with_negative_features() -> None:
    student = ReverseStudent([8, 16], None, None, 1, (1, 1), 0.5, "relu", linear_outputs=True)
    features = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8)]
    assert all((o < 0).any() for o in student(features))
    relu_student = ReverseStudent([8, 16], None, None, 1, (1, 1), 0.5, "relu")
    assert all((o >= 0).all() for o in relu_student(features))


@pytest.mark.parametrize("channels", [24, 40, 112, 256, 1024])
def test_amplifier_gate_in_unit_interval_and_residual_shapes(channels: int) -> None:
    torch.manual_seed(0)
    amplifier = ResidualAmplifier(channels, num_memory=50)
    features = torch.randn(2, channels, 8, 8) * 5
    amplified, gate = amplifier(features)
    assert amplified.shape == features.shape and gate.shape == (2, 1, 8, 8)
    assert gate.min() >= 0 and gate.max() <= 1
    # A closed gate leaves the teacher untouched: normal features pass through unchanged.
    passed, _ = amplifier(features, gate=torch.zeros(2, 1, 8, 8))
    assert torch.equal(passed, features)
    # The residual scales each feature by a factor in (-1, 1): |Delta| < |F|.
    assert (amplifier.residual(features).abs() <= features.abs()).all()


def test_position_encoding_codes_x_then_y() -> None:
    encoding = position_encoding(8, 5, 7)
    assert encoding.shape == (8, 5, 7) and encoding.abs().max() <= 1
    x_part, y_part = encoding[:4], encoding[4:]
    assert torch.equal(x_part, x_part[:, :1].expand_as(x_part))  # constant along y
    assert torch.equal(y_part, y_part[:, :, :1].expand_as(y_part))  # constant along x
    assert torch.allclose(x_part[0, 0], torch.sin(torch.arange(7.0)))  # lowest frequency
    assert torch.allclose(y_part[1, :, 0], torch.cos(torch.arange(5.0)))


# -- losses ----------------------------------------------------------------------------------
def test_hard_distillation_uses_only_the_hardest_positions() -> None:
    torch.manual_seed(0)
    teacher = [torch.randn(2, 4, 6, 6)]
    student = [teacher[0] + 0.3 * torch.randn(2, 4, 6, 6)]
    distance = 1 - torch.nn.functional.cosine_similarity(teacher[0], student[0], dim=1).flatten(1)
    expected = distance.sort(dim=1, descending=True).values[:, :10].mean()
    assert torch.allclose(hard_patch_loss(teacher, student, 10), expected)
    # Making an easy position perfect changes nothing; making a hard one perfect does.
    easiest = int(distance[0].argmin())
    hardest = int(distance[0].argmax())
    for position, changes in ((easiest, False), (hardest, True)):
        edited = student[0].clone().flatten(2)
        edited[0, :, position] = teacher[0].flatten(2)[0, :, position]
        loss = hard_patch_loss(teacher, [edited.view_as(student[0])], 10)
        assert (not torch.allclose(loss, expected)) == changes


def test_hard_mining_keeps_gradient_only_above_the_threshold() -> None:
    torch.manual_seed(0)
    teacher = [torch.randn(2, 4, 5, 5)]
    student = [torch.randn(2, 4, 5, 5, requires_grad=True)]
    hard_mined_cosine_loss(teacher, [student[0] * 1.0], alpha=1.0).backward()
    distance = 1 - torch.nn.functional.cosine_similarity(teacher[0], student[0].detach(), dim=1)
    hard = distance >= distance.mean() + distance.flatten().std()
    gradient = student[0].grad.abs().sum(dim=1)
    assert hard.any() and (~hard).any()
    assert (gradient[~hard] == 0).all() and (gradient[hard] > 0).all()


def test_amplification_loss_has_the_dynamic_margin() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(1, 8, 4, 4)
    anomalous = torch.zeros(1, 1, 4, 4)
    anomalous[..., :2, :2] = 1
    normal = 1 - anomalous
    # Without amplification every pair sits exactly margin above its target.
    assert torch.allclose(amplification_loss(teacher, teacher, anomalous, normal, 0.3),
                          torch.tensor(0.3))
    residual = torch.zeros_like(teacher, requires_grad=True)
    optimizer = torch.optim.Adam([residual], lr=0.2)
    losses = []
    for _ in range(100):
        loss = amplification_loss(teacher + anomalous * residual, teacher, anomalous, normal, 0.3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    # The anomalous features moved away from the normal ones (lower mean cosine similarity).
    def mean_similarity(features: torch.Tensor) -> float:
        flat = torch.nn.functional.normalize(features.flatten(2)[0], dim=0)
        return float((flat[:, anomalous.flatten() > 0].t() @ flat[:, normal.flatten() > 0]).mean())
    moved = teacher + anomalous * residual.detach()
    assert mean_similarity(moved) < mean_similarity(teacher) - 0.1
    assert (residual.grad * normal).abs().sum() == 0  # normal features get no gradient
    assert float(amplification_loss(teacher, teacher, anomalous * 0, normal, 0.3)) == 0.0


def test_focal_loss_and_mask_downsampling() -> None:
    target = torch.tensor([[[[1.0, 0.0]]]])
    good, bad = torch.tensor([[[[0.9, 0.1]]]]), torch.tensor([[[[0.1, 0.9]]]])
    assert gate_focal_loss(good, target) < 0.01 < gate_focal_loss(bad, target)
    p = torch.tensor(0.9)
    expected = (-0.8 * (1 - p) ** 2 * torch.log(p) - 0.2 * 0.1 ** 2 * torch.log(p)) / 2
    assert torch.allclose(gate_focal_loss(good, target), expected)
    mask = torch.zeros(1, 8, 8)
    mask[0, :4, :2] = 1  # covers half of the top-left 4x4 cell, a quarter of another
    down = downsample_mask(mask, (2, 2), 0.3)
    assert down.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]


def test_map_fusion_and_scores() -> None:
    maps = [torch.ones(1, 2, 2), 2 * torch.ones(1, 4, 4)]
    assert torch.allclose(fuse_maps(maps, (8, 8), "sum"), torch.full((1, 8, 8), 3.0))
    assert torch.allclose(fuse_maps(maps, (8, 8), "mean"), torch.full((1, 8, 8), 1.5))
    values = torch.arange(200.0).view(1, 10, 20)
    assert image_scores(values, "max").item() == 199
    assert image_scores(values, "top_mean", 0.01).item() == pytest.approx(198.5)


# -- detectors -------------------------------------------------------------------------------
def test_rd_learns_and_separates_synthetic_defects(toy_alpha) -> None:
    train, test = toy_alpha
    detector = create_detector("rd", "cpu", **{**TINY, "epochs": 8})
    detector.fit(_loader(train, detector))
    losses = detector.fit_info_["loss_history"]["distill"]
    assert losses[-1] < losses[0]
    maps, scores, masks, labels = _predict(detector, test)
    assert maps.shape == (12, 64, 64)
    assert metrics.auroc(labels, scores) >= 0.8
    assert metrics.pixel_metrics(masks, maps)["pixel_auroc"] >= 0.8


@pytest.mark.parametrize("method,extra", [
    ("aand", dict(amplify_epochs=2)),
    ("recontrast", {}),
])
def test_trained_detectors_learn_and_round_trip(toy_alpha, tmp_path: Path, method: str,
                                                extra: dict) -> None:
    train, test = toy_alpha
    detector = create_detector(method, "cpu", **TINY, **extra)
    detector.fit(_loader(train, detector))
    for stage, losses in detector.fit_info_["loss_history"].items():
        assert len(losses) >= 2 and losses[-1] < losses[0], stage
    folder = detector.save(tmp_path / method)
    assert not list(folder.glob("*.pt*"))
    loaded = Detector.load(folder)
    images = next(iter(_loader(test, detector, 12)))["image"]
    first, second = detector.predict(images), loaded.predict(images)
    assert torch.equal(first.scores, second.scores)
    assert torch.equal(first.anomaly_maps, second.anomaly_maps)


def test_aand_ablations_change_what_is_scored(toy_alpha) -> None:
    train, test = toy_alpha
    images = next(iter(_loader(test, create_detector("aand", "cpu", **TINY), 4)))["image"]
    common = dict(TINY, epochs=1, amplify_epochs=1)
    gate_only = create_detector("aand", "cpu", score_source="gate", **common)
    gate_only.fit(_loader(train, gate_only))
    maps = gate_only.predict(images).anomaly_maps
    assert maps.min() >= 0 and maps.max() <= 3 + 1e-4  # a sum of three gates in [0, 1]
    no_gate = create_detector("aand", "cpu", gate="none", **common)
    no_gate.fit(_loader(train, no_gate))
    assert "amplify" in no_gate.fit_info_["loss_history"]
    with pytest.raises(IadkitError, match="aand: score_source='gate' needs gate='learned'"):
        create_detector("aand", "cpu", gate="none", score_source="gate")


def test_bad_settings_give_one_clear_error(toy_root: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(IadkitError, match="foreground=.bogus. is not allowed"):
        create_detector("aand", "cpu", foreground="bogus")
    code = main(["fit", "--method", "aand", "--data", str(toy_root), "--category", "alpha",
                 "--out", str(tmp_path / "run"), "--param", "texture_dir=" + str(tmp_path / "none"),
                 "--param", "image_size=32", "--quiet"])
    assert code == 2 and "texture_dir: " in (err := capsys.readouterr().err)
    assert "texture folder not found" in err
    broken = tmp_path / "training"
    broken.mkdir()
    (broken / "training.json").write_text("{")
    detector = create_detector("rd", "cpu", **{**TINY, "image_size": 32, "epochs": 1})
    train = load_dataset(toy_root, ["alpha"]).where(split="train")
    with pytest.raises(CheckpointError, match="training.json: damaged, not valid JSON"):
        detector.fit(_loader(train, detector), checkpoint_dir=broken)


def test_interrupted_training_resumes_to_the_same_model(toy_alpha, tmp_path: Path,
                                                        interrupt_training) -> None:
    train, _ = toy_alpha
    settings = dict(TINY, image_size=32, epochs=3, amplify_epochs=2, checkpoint_every_s=0)

    reference = create_detector("aand", "cpu", **settings)
    reference.fit(_loader(train, reference))

    # Two amplification epochs, one distillation epoch, then stop.
    undo_interrupt = interrupt_training(3)
    checkpoint = tmp_path / "training"
    interrupted = create_detector("aand", "cpu", **settings)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(_loader(train, interrupted), checkpoint_dir=checkpoint)
    saved = json.loads((checkpoint / "training.json").read_text())["progress"]
    assert len(saved["amplify"]) == 2 and len(saved["distill"]) == 1
    undo_interrupt()

    resumed = create_detector("aand", "cpu", **settings)
    resumed.fit(_loader(train, resumed), checkpoint_dir=checkpoint)
    assert not checkpoint.exists()
    assert resumed.fit_info_["loss_history"] == reference.fit_info_["loss_history"]
    for name, tensor in reference._state_tensors().items():
        assert torch.equal(tensor, resumed._state_tensors()[name]), name


def test_cli_trains_and_tests_aand_with_the_same_results(toy_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["--param", "image_size=64", "--param", "epochs=2", "--param", "amplify_epochs=1",
            "--quiet"]
    assert main(["fit", "--method", "aand", "--preset", "cpu", "--data", str(toy_root),
                 "--category", "beta", "--out", str(run), *args]) == 0
    assert not list((run / "models").glob("*.training"))
    results = []
    for name in ("a.json", "b.json"):
        assert main(["test", str(run), "--json", str(tmp_path / name), "--quiet"]) == 0
        results.append(json.loads((tmp_path / name).read_text()))
    assert results[0]["image_auroc"] == results[1]["image_auroc"]
    assert 0.0 <= results[0]["pixel_auroc"] <= 1.0


def test_head_sets_on_their_rows_equal_heads_on_the_whole_batch_sliced() -> None:
    torch.manual_seed(0)
    student = ReverseStudent([8, 16], [8, 16], None, 1, (1, 1), 0.5, "gelu", num_heads=2)
    features = [torch.randn(6, 8, 16, 16), torch.randn(6, 16, 8, 8)]
    embedding = student.bottleneck(features)
    whole_a, whole_b = student.decoder(embedding)
    rows_a, rows_b = student.decoder(embedding, head_rows=[slice(None, 3), slice(3, None)])
    for whole, part in zip(whole_a, rows_a, strict=True):
        torch.testing.assert_close(part, whole[:3])
    for whole, part in zip(whole_b, rows_b, strict=True):
        torch.testing.assert_close(part, whole[3:])
