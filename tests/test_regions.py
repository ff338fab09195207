"""Outputs in the user's coordinates: maps at the original size, regions as boxes on it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iadkit.calibration import Calibration
from iadkit.data import make_loader
from iadkit.data.image_io import read_image, read_mask
from iadkit.data.preprocess import Preprocess
from iadkit.deploy.batch import predict_files
from iadkit.regions import find_regions


def test_map_back_has_the_original_size_and_marks_the_unseen_border() -> None:
    preprocess = Preprocess(image_size=64, crop_size=48)
    full = preprocess.map_to_original(np.ones((48, 48), np.float32), 90, 250)
    assert full.shape == (90, 250)
    # the crop keeps 48 of 64 resized pixels: 1/8 of each side is unseen
    assert np.isnan(full[:, :31]).all() and np.isnan(full[:, -31:]).all()
    assert np.isnan(full[:11]).all() and not np.isnan(full[12:-12, 32:-32]).any()
    # without a crop, every pixel is seen; a map resized from the original comes back to it
    ramp = np.add.outer(np.arange(90) * 0.5, np.arange(250) * 0.2).astype(np.float32)
    small = np.asarray(Image.fromarray(ramp, "F").resize((64, 64), Image.Resampling.BILINEAR))
    back = Preprocess(image_size=64).map_to_original(small, 90, 250)
    assert not np.isnan(back).any()
    assert np.abs(back - ramp)[5:-5, 5:-5].max() < 0.05 * np.ptp(ramp)


def test_regions_are_the_connected_areas_above_the_threshold() -> None:
    anomaly_map = np.zeros((100, 300), np.float32)
    anomaly_map[10:20, 200:260] = 3.0
    anomaly_map[70:75, 5:8] = 9.0
    anomaly_map[0:5, 0:5] = np.nan  # unseen: never a region
    regions = find_regions(anomaly_map, threshold=1.0)
    assert [(r.box, r.area, r.peak) for r in regions] == [
        ((5, 70, 3, 5), 15, 9.0), ((200, 10, 60, 10), 600, 3.0)]
    assert find_regions(anomaly_map, threshold=10.0) == []


def test_predict_reports_regions_and_heatmaps_in_the_files_own_coordinates(
        fitted_patchcore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    detector, samples = fitted_patchcore
    train = samples.where(split="train")
    scores, maxima = [], []
    for batch in make_loader(train, detector.preprocess, batch_size=16):
        prediction = detector.predict_left_out(batch["image"], batch["index"])
        scores.append(prediction.scores)
        maxima.append(prediction.anomaly_maps.flatten(1).max(dim=1).values)
    calibration = Calibration.fit(torch.cat(scores).numpy(), torch.cat(maxima).numpy(),
                                  "leave-one-out", target_fpr=0.2)
    monkeypatch.setattr(detector, "calibration", calibration)  # the fixture is shared
    defect = next(s for s in samples.where(split="test") if s.label == 1)
    # The same part photographed at 3 x 2 times the size: a non-square file.
    image = Image.fromarray(read_image(defect.image_path)).resize((192, 128))
    mask = Image.fromarray(read_mask(defect.mask_path)).resize((192, 128), Image.NEAREST)
    path = tmp_path / "wide.png"
    image.save(path)
    predict_files(detector, [path], tmp_path / "out")
    row = next(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    assert row["anomalous"] == "1"
    regions = json.loads(row["regions"])
    assert regions, "a flagged defect image has at least one region"
    rows, cols = np.nonzero(np.asarray(mask))
    x, y, width, height = (regions[0][k] for k in ("x", "y", "width", "height"))
    # the strongest region's box lies on the drawn defect (in the file's pixel coordinates)
    overlap_x = min(x + width, cols.max() + 1) - max(x, cols.min())
    overlap_y = min(y + height, rows.max() + 1) - max(y, rows.min())
    assert overlap_x > 0 and overlap_y > 0
    heatmap = Image.open(tmp_path / "out" / row["heatmap"])
    assert heatmap.size == (192, 128)
    # the centre crop's border (56 of 64) is drawn dimmed and hatched, not coloured
    drawn = np.asarray(heatmap)[:, :8].astype(np.float32)
    dimmed = np.asarray(image)[:, :8].astype(np.float32) * 0.35
    offset = drawn - dimmed
    assert ((np.abs(offset) < 1) | (np.abs(offset - 60) < 1)).all()


@pytest.mark.parametrize("size", [(40, 300), (300, 40)])
def test_elongated_images_map_back_both_ways(size: tuple[int, int]) -> None:
    height, width = size
    full = Preprocess(image_size=32, crop_size=28).map_to_original(
        np.arange(28 * 28, dtype=np.float32).reshape(28, 28), height, width)
    assert full.shape == size
    seen = ~np.isnan(full)
    assert 0.5 < seen.mean() < 0.9


def test_regions_of_large_images_are_found_at_a_working_size_and_scaled_back() -> None:
    from iadkit.regions import regions_in_original

    preprocess = Preprocess(image_size=64)
    anomaly_map = np.zeros((64, 64), np.float32)
    anomaly_map[20:30, 40:50] = 5.0
    exact = find_regions(preprocess.map_to_original(anomaly_map, 2000, 3000), 1.0)
    scaled = regions_in_original(anomaly_map, preprocess, 2000, 3000, 1.0)
    assert len(exact) == len(scaled) == 1
    (ex, ey, ew, eh), (sx, sy, sw, sh) = exact[0].box, scaled[0].box
    # the scaled box holds the exact one, within two working pixels (3000 / 1024 < 3) a side
    assert sx <= ex and sy <= ey and sx + sw >= ex + ew and sy + sh >= ey + eh
    assert max(ex - sx, ey - sy, sx + sw - ex - ew, sy + sh - ey - eh) <= 9
    assert scaled[0].area == pytest.approx(exact[0].area, rel=0.05)
