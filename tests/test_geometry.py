"""Input geometries (resize, letterbox, tile) of the shared preprocessing, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iadkit.data import load_dataset, make_loader
from iadkit.data.dataset import ImageDataset, ImageUnitsDataset
from iadkit.data.preprocess import LETTERBOX_FILL, Preprocess, predict_by_units
from iadkit.engine.evaluation import predict_samples
from iadkit.errors import ConfigError
from iadkit.methods import create_detector, get_method
from iadkit.metrics import auroc


def test_letterbox_keeps_the_aspect_ratio_and_cuts_the_padding_off_the_map() -> None:
    preprocess = Preprocess(64, geometry="letterbox")
    image = np.full((100, 300, 3), 200, np.uint8)
    unit = preprocess.units_array(image)
    assert unit.shape == (1, 3, 64, 64)
    # 100 x 300 -> 21 x 64, centred: rows 21..41 hold the image, the others the fill.
    assert preprocess.evaluation_shape(100, 300) == (21, 64)
    rows = unit[0, 0, :, 32]
    assert np.allclose(rows[21:42], 200 / 255) and np.allclose(rows[:21], LETTERBOX_FILL / 255)
    unit_map = np.zeros((1, 64, 64), np.float32)
    unit_map[0, 21:42] = 1.0  # the image's area only
    anomaly_map, score = preprocess.combine(unit_map, np.array([0.7]), 100, 300)
    assert anomaly_map.shape == (21, 64) and np.all(anomaly_map == 1.0) and score == 0.7
    mask = np.zeros((100, 300), bool)
    assert preprocess.mask_array(mask).shape == (21, 64)
    assert preprocess.map_to_original(anomaly_map, 100, 300).shape == (100, 300)


def test_tiled_maps_stitch_back_a_smooth_function_of_position() -> None:
    """Each tile's map is a smooth function of the image position its pixels come from (tiles
    magnified 2x): the stitched map is that function, without seams."""
    preprocess = Preprocess(64, geometry="tile", tile_size=32, tile_overlap=0.25)
    height, width = 90, 150

    def field(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return np.sin(rows / 25.0)[:, None] + np.cos(cols / 40.0)[None, :]

    grid = preprocess.grid(height, width)
    centres = (np.arange(64) + 0.5) * 32 / 64 - 0.5  # unit pixel -> tile pixel
    maps = np.stack([field(top + centres, left + centres) for top, left in grid.origins])
    scores = np.arange(len(grid), dtype=np.float32)
    stitched, score = preprocess.combine(maps, scores, height, width)
    truth = field(np.arange(height, dtype=float), np.arange(width, dtype=float))
    assert stitched.shape == (height, width)
    assert np.abs(stitched - truth).max() < 0.01
    assert score == len(grid) - 1  # the image's score: its most anomalous tile's


def test_tiled_map_is_capped_and_small_images_are_padded_to_one_tile() -> None:
    preprocess = Preprocess(64, geometry="tile", max_map_side=100)
    assert preprocess.evaluation_shape(300, 200) == (100, 67)
    assert preprocess.n_units(20, 30) == 1  # smaller than a tile: padded, not refused
    units = preprocess.units_array(np.zeros((20, 30, 3), np.uint8))
    assert units.shape == (1, 3, 64, 64)
    anomaly_map, _ = preprocess.combine(np.ones((1, 64, 64)), np.ones(1), 20, 30)
    assert anomaly_map.shape == (20, 30)


@pytest.mark.parametrize(("params", "problem"), [
    ({"geometry": "squash"}, "geometry"),
    ({"geometry": "tile", "tile_overlap": 1.0}, "tile_overlap"),
    ({"geometry": "letterbox", "crop_size": 56}, "crop_size 56 would cut the image off"),
    ({"geometry": "tile", "tile_size": 4}, "tile_size"),
])
def test_bad_geometry_options_are_refused_naming_the_option(params: dict, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        get_method("patchcore")(image_size=64, **params)


def test_choosing_a_geometry_drops_the_presets_centre_crop() -> None:
    detector = create_detector("patchcore", "paper", geometry="letterbox", device="cpu")
    assert detector.crop_size is None and detector.preprocess.geometry == "letterbox"


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def scratch_data(root: Path, size: int = 1024, seed: int = 0, n_train: int = 3) -> Path:
    """Textured gray images with a 3-pixel-wide scratch on the defective ones (MVTec layout)."""
    rng = np.random.default_rng(seed)

    def texture() -> np.ndarray:
        noise = rng.normal(0, 1, (size // 16, size // 16))
        coarse = np.asarray(Image.fromarray(noise.astype(np.float32), mode="F").resize(
            (size, size), Image.Resampling.BICUBIC))
        grain = rng.normal(0, 6, (size, size))
        return np.clip(128 + 18 * coarse + grain, 0, 255)

    category = root / "plate"
    for k in range(n_train):
        _write(category / "train" / "good" / f"{k}.png", texture().astype(np.uint8))
    for k in range(2):
        _write(category / "test" / "good" / f"{k}.png", texture().astype(np.uint8))
        image, mask = texture(), np.zeros((size, size), np.uint8)
        row = int(rng.integers(size // 4, 3 * size // 4))
        start = int(rng.integers(0, size // 2))
        mask[row:row + 3, start:start + size // 3] = 255
        image[mask > 0] = np.clip(image[mask > 0] - 60, 0, 255)
        _write(category / "test" / "scratch" / f"{k}.png", image.astype(np.uint8))
        _write(category / "ground_truth" / "scratch" / f"{k}_mask.png", mask)
    return root


def test_tiled_patchcore_finds_a_thin_scratch_the_resized_one_misses(tmp_path: Path) -> None:
    samples = load_dataset(scratch_data(tmp_path), ["plate"])
    train, test = samples.where(split="train"), samples.where(split="test")
    natives = {}
    for geometry in ("resize", "tile"):
        detector = create_detector("patchcore", "cpu", image_size=128, crop_size=None,
                                   geometry=geometry, tile_size=256, tile_overlap=0.25,
                                   coreset_ratio=0.05, device="cpu")
        loader = make_loader(train, detector.preprocess, batch_size=16)
        assert len(loader.dataset) == 3 * (25 if geometry == "tile" else 1)
        detector.fit(loader)
        scored = predict_samples(detector, test)
        assert scored.maps[0].shape == ((1024, 1024) if geometry == "tile" else (128, 128))
        # Both judged at native resolution against the native masks.
        natives[geometry] = np.stack([detector.preprocess.map_to_original(m, 1024, 1024)
                                      for m in scored.maps])
    masks = np.stack([np.asarray(Image.open(s.mask_path)) > 0 if s.mask_path else
                      np.zeros((1024, 1024), bool) for s in test])
    pixel = {g: auroc(masks.ravel(), m.ravel()) for g, m in natives.items()}
    assert pixel["tile"] > 0.9
    assert pixel["tile"] > pixel["resize"] + 0.1, pixel


def test_units_datasets_index_tiles_by_their_image(tmp_path: Path) -> None:
    samples = load_dataset(scratch_data(tmp_path, size=200), ["plate"])
    preprocess = Preprocess(64, geometry="tile", tile_size=100, tile_overlap=0.0)
    train = samples.where(split="train")
    units = ImageDataset(train, preprocess)
    assert len(units) == 3 * 4
    assert [units[k]["index"] for k in range(len(units))] == [0] * 4 + [1] * 4 + [2] * 4
    defective = [s for s in samples.where(split="test") if s.label == 1]
    item = ImageUnitsDataset(type(samples)(defective), preprocess)[0]
    assert item["units"][:].shape == (4, 3, 64, 64) and item["mask"].shape == (200, 200)
    assert item["mask"].sum() == 3 * (200 // 3)
    # Training items cut the mask like the image: tile by tile, as the whole cut would.
    tiles = ImageDataset(type(samples)(defective[:1]), preprocess)
    whole = preprocess.mask_units_array(np.asarray(Image.open(defective[0].mask_path)) > 0)
    assert whole.shape == (4, 64, 64) and whole.any()
    assert all(np.array_equal(tiles[k]["mask"].numpy(), whole[k]) for k in range(4))


def test_units_of_several_images_share_batches_and_come_back_in_order() -> None:
    preprocess = Preprocess(32, geometry="tile", tile_overlap=0.0)
    images = [np.zeros((32 * h, 32 * w, 3), np.uint8) for h, w in [(1, 1), (2, 3), (1, 2)]]
    calls = []

    def predict(units: np.ndarray, keys: list) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(units))
        return np.zeros((len(units), 32, 32)), np.array([float(k) for k in keys])

    items = [(k, preprocess.units(image, eager=k != 1)) for k, image in enumerate(images)]
    results = list(predict_by_units(preprocess, items, predict, batch_size=4))
    assert [key for key, _, _ in results] == [0, 1, 2]
    assert [score for _, _, score in results] == [0.0, 1.0, 2.0]
    assert [m.shape for _, m, _ in results] == [(32, 32), (64, 96), (32, 64)]
    assert calls == [4, 4, 1]  # units of several images share batches


def test_a_tiled_model_exports_predicts_files_and_serves_its_own_maps(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from iadkit.deploy.batch import predict_files
    from iadkit.deploy.export import export_onnx
    from iadkit.deploy.inferencer import OnnxInferencer
    from iadkit.deploy.service import load_scorer
    from iadkit.methods import Detector

    samples = load_dataset(scratch_data(tmp_path / "data", size=200), ["plate"])
    detector = create_detector("patchcore", "cpu", image_size=64, geometry="tile",
                               tile_size=100, coreset_ratio=0.1, device="cpu")
    detector.fit(make_loader(samples.where(split="train"), detector.preprocess))
    test = samples.where(split="test")
    scored = predict_samples(detector, test)
    detector.save(tmp_path / "model")
    export_onnx(detector, tmp_path / "onnx")
    inferencer = OnnxInferencer(tmp_path / "onnx")
    for k, sample in enumerate(test):
        result = inferencer.predict_file(sample.image_path)
        assert result.anomaly_map.shape == (200, 200)  # native: the stitched map
        np.testing.assert_allclose(result.anomaly_map, scored.maps[k], rtol=1e-3, atol=1e-3)
        assert result.decision.score == pytest.approx(float(scored.scores[k]), rel=1e-3)

    predict_files(Detector.load(tmp_path / "model", device="cpu"),
                  [s.image_path for s in test], tmp_path / "out")
    heatmaps = sorted((tmp_path / "out" / "heatmaps").glob("*.png"))
    assert len(heatmaps) == len(test)
    assert all(Image.open(h).size == (200, 200) for h in heatmaps)

    pytest.importorskip("fastapi")
    served = load_scorer(tmp_path / "model", device="cpu").score(
        Path(test[0].image_path).read_bytes(), "upload.png")
    assert served["score"] == pytest.approx(float(scored.scores[0]), rel=1e-4)


def test_a_search_is_refused_for_a_tiled_detector_before_any_work() -> None:
    from iadkit.engine import SearchSettings

    detector = create_detector("patchcore", "cpu", geometry="tile", device="cpu")
    with pytest.raises(ConfigError, match="geometry=resize only; this detector uses "
                                          "geometry=tile"):
        SearchSettings().check(detector)


def test_the_command_line_fits_calibrates_and_tests_a_tiled_model(tmp_path: Path) -> None:
    """Images of two sizes: maps of different shapes go through the leave-one-out calibration
    (all of an image's tiles left out), the test JSON and the report."""
    import json

    from iadkit.cli import main

    root = scratch_data(tmp_path / "data", size=200, n_train=6)
    extra = root / "plate" / "test" / "good" / "wide.png"
    Image.new("RGB", (300, 120), (128, 128, 128)).save(extra)
    run = tmp_path / "run"
    assert main(["fit", "--method", "patchcore", "--data", str(root), "--out", str(run),
                 "--param", "image_size=64", "--param", "geometry=tile", "--param",
                 "tile_size=100", "--param", "coreset_ratio=0.2", "--calibration",
                 "leave-one-out", "--device", "cpu", "--quiet"]) == 0
    assert main(["test", str(run), "--json", str(tmp_path / "test.json"), "--report",
                 str(tmp_path / "report"), "--quiet"]) == 0
    results = json.loads((tmp_path / "test.json").read_text())
    plate = results["per_category"]["plate"]
    assert plate["n_images"] == 5 and 0.0 <= plate["pixel_aupro"] <= 1.0
    assert plate["decision"]["threshold"] > 0


def test_leave_one_out_leaves_every_tile_of_the_image_out(tmp_path: Path) -> None:
    from iadkit.engine.evaluation import predict_images

    samples = load_dataset(scratch_data(tmp_path, size=150, n_train=3), ["plate"])
    train = samples.where(split="train")
    detector = create_detector("patchcore", "cpu", image_size=64, geometry="tile",
                               tile_size=75, tile_overlap=0.0, coreset_ratio=1.0, device="cpu")
    detector.fit(make_loader(train, detector.preprocess, batch_size=5))
    own = {k: score for k, _, score, _ in predict_images(detector, train)}
    left_out = {k: score for k, _, score, _ in predict_images(detector, train, left_out=True)}
    # With every patch in the bank, an image's own tiles match themselves exactly; left out,
    # none of its 4 tiles may find itself.
    assert all(abs(own[k]) < 1e-3 for k in own), own
    assert all(left_out[k] > 0.1 for k in left_out), left_out
