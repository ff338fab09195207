"""Synthetic anomalies: Perlin masks, textures, DRAEM blending."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

from iadkit.errors import DatasetError
from iadkit.synthesis import (
    TEXTURE_OPERATIONS,
    DraemSynthesizer,
    TextureSource,
    augment_texture,
    perlin_mask,
    perlin_noise,
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def texture_source() -> TextureSource:
    folder = SHARED_DATA / "textures"
    return TextureSource(folder) if folder.is_dir() else TextureSource()


def test_perlin_noise_is_bounded_and_seeded() -> None:
    noise = perlin_noise(50, 70, (4, 8), seeded(0))
    assert noise.shape == (50, 70) and noise.abs().max() <= 1.5
    assert torch.equal(noise, perlin_noise(50, 70, (4, 8), seeded(0)))
    assert not torch.equal(noise, perlin_noise(50, 70, (4, 8), seeded(1)))


def test_perlin_masks_are_exact_binary_seeded_and_varied() -> None:
    masks = [perlin_mask(64, 48, seeded(s)) for s in range(20)]
    for mask in masks:
        assert mask.shape == (64, 48) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks[3], perlin_mask(64, 48, seeded(3)))
    coverage = torch.stack(masks).mean(dim=(1, 2))
    assert (coverage > 0).sum() >= 10 and coverage.std() > 0  # shapes and sizes vary


@pytest.mark.parametrize("name", sorted(TEXTURE_OPERATIONS))
def test_every_texture_operation_keeps_shape_and_range(name: str) -> None:
    out = TEXTURE_OPERATIONS[name](torch.rand(3, 32, 32), seeded(0))
    assert out.shape == (3, 32, 32)
    assert float(augment_texture(out, seeded(1)).min()) >= 0.0


def test_draem_blends_only_inside_a_nonempty_mask() -> None:
    synthesizer = DraemSynthesizer(texture_source(), anomaly_probability=1.0)
    image = torch.rand(3, 64, 64)
    for seed in range(8):
        sample = synthesizer(image, seeded(seed))
        assert sample.image.shape == image.shape and sample.image.dtype == image.dtype
        assert sample.mask.shape == (64, 64) and set(sample.mask.unique().tolist()) <= {0.0, 1.0}
        assert sample.mask.any() and sample.label == 1
        outside = sample.mask == 0
        assert torch.equal(sample.image[:, outside], image[:, outside])
        assert not torch.equal(sample.image, image)
        assert 0.0 <= float(sample.image.min()) and float(sample.image.max()) <= 1.0


def test_draem_respects_the_probability_of_no_anomaly_and_the_seed() -> None:
    image = torch.rand(3, 32, 32)
    never = DraemSynthesizer(anomaly_probability=0.0)
    sample = never(image, seeded(0))
    assert torch.equal(sample.image, image) and not sample.mask.any() and sample.label == 0
    sometimes = DraemSynthesizer(anomaly_probability=0.5)
    labels = [sometimes(image, seeded(s)).label for s in range(40)]
    assert 8 <= sum(labels) <= 32
    first, second = sometimes(image, seeded(7)), sometimes(image, seeded(7))
    assert torch.equal(first.image, second.image) and torch.equal(first.mask, second.mask)


def test_draem_keeps_anomalies_on_the_foreground() -> None:
    foreground = torch.zeros(64, 64)
    foreground[16:48, 16:48] = 1.0
    synthesizer = DraemSynthesizer(anomaly_probability=1.0)
    for seed in range(6):
        sample = synthesizer(torch.rand(3, 64, 64), seeded(seed), foreground=foreground)
        assert not (sample.mask * (1 - foreground)).any()


def test_self_blend_and_empty_texture_folder(tmp_path: Path) -> None:
    sample = DraemSynthesizer(anomaly_probability=1.0, self_blend=True)(torch.rand(3, 32, 32),
                                                                        seeded(2))
    assert sample.mask.any()
    (tmp_path / "images" / "banded").mkdir(parents=True)
    with pytest.raises(DatasetError, match="texture folder holds no images"):
        TextureSource(tmp_path / "images")
    with pytest.raises(DatasetError, match="texture folder not found"):
        TextureSource(tmp_path / "missing")


def _check_aligned(sample, image: torch.Tensor) -> None:
    assert sample.image.shape == image.shape and sample.image.dtype == image.dtype
    assert sample.mask.shape == image.shape[-2:]
    assert set(sample.mask.unique().tolist()) <= {0.0, 1.0}
    outside = sample.mask == 0
    assert torch.equal(sample.image[:, outside], image[:, outside])


@pytest.mark.parametrize("mode", ["normal", "scar"])
def test_cutpaste_pastes_inside_its_mask_only(mode: str) -> None:
    from iadkit.synthesis import CutPasteSynthesizer

    image = torch.rand(3, 64, 64)
    synthesizer = CutPasteSynthesizer(mode, anomaly_probability=1.0)
    for seed in range(6):
        sample = synthesizer(image, seeded(seed))
        _check_aligned(sample, image)
        assert sample.mask.any()
    assert not CutPasteSynthesizer(mode, 0.0)(image, seeded(0)).mask.any()
    three_way = [CutPasteSynthesizer("3way")(image, seeded(s)).label for s in range(30)]
    assert 5 <= three_way.count(0) <= 18  # about a third normal


def test_fragments_come_from_the_donor_and_shapes_differ() -> None:
    from iadkit.synthesis import FragmentSynthesizer, shape_mask

    image, donor = torch.zeros(3, 64, 64), torch.ones(3, 64, 64)
    for seed in range(6):
        sample = FragmentSynthesizer()(image, donor, seeded(seed))
        _check_aligned(sample, image)
        inside = sample.mask == 1
        assert inside.any() and torch.equal(sample.image[:, inside], donor[:, inside])
    areas = {s: float(shape_mask(s, 20, 20, seeded(0)).mean()) for s in
             ("rectangle", "ellipse", "polygon")}
    assert areas["rectangle"] == 1.0 and areas["ellipse"] < 0.85 and areas["polygon"] < 1.0


def test_cse_defects_of_every_kind() -> None:
    from iadkit.synthesis import CseDefectSynthesizer

    image = torch.rand(3, 64, 64)
    for kind in ("structural", "textural", "blur"):
        synthesizer = CseDefectSynthesizer(anomaly_probability=1.0, kinds=(kind,))
        sample = synthesizer(image, seeded(1))
        _check_aligned(sample, image)
        assert sample.mask.sum() >= 100 and not torch.equal(sample.image, image)
    with pytest.raises(ValueError, match="unknown defect kinds"):
        CseDefectSynthesizer(kinds=("melted",))


def test_foreground_rules() -> None:
    from iadkit.synthesis import foreground_mask, rule_for

    image = torch.zeros(3, 40, 40)
    image[:, 10:30, 10:30] = 1.0  # a bright object on black
    bright = foreground_mask(image, ("above", 50), blur_sigma=1.0)
    assert bright[20, 20] == 1 and bright[2, 2] == 0
    assert foreground_mask(image, ("at_most", 50), blur_sigma=1.0)[2, 2] == 1
    assert foreground_mask(image, rule_for("carpet")).all()  # textures: switched off
    disc = foreground_mask(image, rule_for("bottle"))
    assert disc[20, 20] == 1 and disc[0, 0] == 0


def test_pseudo_validation_is_half_synthetic_and_patchcore_separates_it(
        toy_root: Path, tmp_path: Path) -> None:
    from iadkit import engine
    from iadkit.data import SampleSet, load_dataset, make_loader
    from iadkit.methods import create_detector
    from iadkit.synthesis import build_pseudo_validation

    normals = list(load_dataset(toy_root, ["alpha"]).where(split="train"))
    fit_part, held = SampleSet(normals[:8]), SampleSet(normals[8:])  # disjoint normals
    pseudo = build_pseudo_validation(held, tmp_path / "pv", synthesis="fragments", size=64)
    assert len(pseudo) == len(held) and sum(pseudo.labels) == len(held) // 2
    assert pseudo.has_masks
    detector = create_detector("patchcore", image_size=64, crop_size=None, coreset_ratio=0.25)
    detector.fit(make_loader(fit_part, detector.preprocess, 8))
    result = engine.score_predictions(engine.predict_samples(detector, pseudo), pixel=True)
    assert result["image_auroc"] > 0.8 and result["pixel_auroc"] > 0.8


def test_mixed_pseudo_validation_gives_every_generator_an_equal_share(
        toy_root: Path, tmp_path: Path) -> None:
    from collections import Counter

    import numpy as np
    from PIL import Image

    from iadkit.data import load_dataset
    from iadkit.synthesis import SYNTHESES, build_pseudo_validation

    normals = load_dataset(toy_root, ["alpha"]).where(split="train")  # 16 -> 8 anomalous
    pseudo = build_pseudo_validation(normals, tmp_path / "pv", synthesis="mixed", size=48)
    anomalous = [s for s in pseudo if s.label == 1]
    counts = Counter(s.defect_type for s in anomalous)
    assert len(anomalous) == 8 and set(counts) <= set(SYNTHESES) and len(counts) == 5
    assert max(counts.values()) - min(counts.values()) <= 1
    for sample in anomalous:
        assert sample.image_path.parent.name == sample.defect_type
        assert np.asarray(Image.open(sample.mask_path)).any()
    again = build_pseudo_validation(normals, tmp_path / "again", synthesis="mixed", size=48)
    assert [s.defect_type for s in again] == [s.defect_type for s in pseudo]
    assert np.array_equal(np.asarray(Image.open(again[1].image_path)),
                          np.asarray(Image.open(pseudo[1].image_path)))
    with pytest.raises(ValueError, match="mixed"):
        build_pseudo_validation(normals, tmp_path / "bad", synthesis="perlin", size=48)


def test_synth_cli_preview_and_errors(toy_root: Path, tmp_path: Path) -> None:
    from iadkit.cli import main

    out = tmp_path / "grid.png"
    assert main(["synth", "preview", "--data", str(toy_root), "--kind", "scar", "--count", "3",
                 "--size", "48", "--out", str(out), "-q"]) == 0
    from PIL import Image

    assert Image.open(out).size == (3 * 48 + 8, 3 * (48 + 4))
    assert main(["synth", "preview", "--data", str(toy_root), "--textures",
                 str(tmp_path / "none"), "--out", str(out), "-q"]) == 2


@pytest.mark.parametrize("kind", ["fragments", "draem", "cse", "cutpaste", "scar"])
def test_every_kind_is_deterministic_and_can_produce_no_anomaly(kind: str) -> None:
    from iadkit.synthesis import make_synthesizer

    image, donor = torch.rand(3, 48, 48), torch.rand(3, 48, 48)
    always = make_synthesizer(kind, anomaly_probability=1.0)
    first, second = always(image, donor, seeded(4)), always(image, donor, seeded(4))
    assert torch.equal(first.image, second.image) and torch.equal(first.mask, second.mask)
    never = make_synthesizer(kind, anomaly_probability=0.0)(image, donor, seeded(4))
    assert torch.equal(never.image, image) and not never.mask.any()
