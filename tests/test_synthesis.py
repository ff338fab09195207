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
