"""Checks on real data from ../shared (skipped when it is absent). Marked slow."""

from __future__ import annotations

import pytest
from conftest import SHARED_DATA

from iadkit import metrics
from iadkit.data import SampleSet, load_dataset, make_loader
from iadkit.methods import create_detector

MAGNETIC_TILE = SHARED_DATA / "magnetic_tile"


@pytest.mark.slow
@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="../shared/data/magnetic_tile not present")
def test_patchcore_detects_real_magnetic_tile_defects() -> None:
    """A reduced run (175 training tiles, 128 px) must still clearly detect real defects."""
    samples = load_dataset(MAGNETIC_TILE)
    train = SampleSet(list(samples.where(split="train"))[::4])  # every 4th training tile
    test = samples.where(split="test")
    test = SampleSet(list(test.where(label=0)) + list(test.where(label=1))[::3])
    detector = create_detector("patchcore", image_size=128, device="cpu")
    detector.fit(make_loader(train, detector.preprocess, 16))
    assert len(train) == 175
    scores, labels, maps, masks = [], [], [], []
    for batch in make_loader(test, detector.preprocess, 32):
        prediction = detector.predict(batch["image"])
        scores += prediction.scores.tolist()
        labels += batch["label"].tolist()
        maps.append(prediction.anomaly_maps.numpy())
        masks.append(batch["mask"].numpy() > 0.5)
    import numpy as np

    assert metrics.auroc(labels, scores) > 0.75
    assert metrics.pixel_metrics(np.concatenate(masks), np.concatenate(maps))["pixel_auroc"] > 0.7
