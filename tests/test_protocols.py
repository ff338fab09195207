"""The benchmark layouts (MVTec AD 2, MVTec LOCO, Real-IAD, VisA) read from generated
miniatures, their protocols' tables against reference computations, and the MVTec AD 2
submission files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score

from iadkit import metrics
from iadkit.cli import main
from iadkit.data.generate import GENERATED_LAYOUTS, LOCO_DEFECTS, generate_dataset
from iadkit.data.image_io import read_mask, read_mask_regions
from iadkit.data.layouts import detect_layout, load_dataset
from iadkit.engine import test_run as run_tests
from iadkit.engine.protocols import check_protocol
from iadkit.errors import ConfigError, DatasetError, ImageReadError

SMALL = dict(categories=("a",), n_train=10, n_test_good=5, n_test_defect=10, size=64)


@pytest.mark.parametrize("layout", GENERATED_LAYOUTS)
def test_every_generated_layout_is_detected_and_read_with_its_splits_and_masks(
        layout: str, tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / layout, **SMALL, layout=layout)
    assert detect_layout(root) == layout
    samples = load_dataset(root)
    counts = Counter((s.split, s.label) for s in samples)
    assert counts[("train", 0)] == 10 and counts[("test", 0)] == 5 and counts[("test", 1)] == 10
    assert counts[("val", 0)] == (5 if layout in ("mvtec-ad2", "loco") else 0)
    assert samples.where(split="test").has_masks
    for sample in samples.where(label=1):
        assert read_mask(sample.mask_path).sum() > 0
    # The unlabelled MVTec AD 2 sets are for prediction, never test images.
    assert not any("private" in str(s.image_path) for s in samples)


def test_loco_ground_truth_is_the_union_of_its_region_files(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "loco", **SMALL, layout="loco")
    structural = load_dataset(root).where(defect_type="structural_anomalies")
    split = [s for s in structural if len(read_mask_regions(s.mask_path)) == 2]
    assert len(split) == 1, "the generator splits one scratch into two region files"
    regions = read_mask_regions(split[0].mask_path)
    assert {value for _, value in regions} == {LOCO_DEFECTS["scratch"][2]}
    np.testing.assert_array_equal(read_mask(split[0].mask_path), regions[0][0] | regions[1][0])
    # A region file must carry one defect's value.
    bad = split[0].mask_path / "002.png"
    values = np.zeros((64, 64), np.uint8)
    values[:2, :2], values[5:7, 5:7] = 10, 20
    Image.fromarray(values).save(bad)
    with pytest.raises(ImageReadError, match="002.png"):
        read_mask_regions(split[0].mask_path)


def test_a_half_downloaded_real_iad_names_what_is_missing(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "riad", **SMALL, layout="real-iad")
    images = root / "realiad_64"
    listed = sorted(images.rglob("*.jpg"))
    listed[3].unlink()
    listed[4].unlink()
    with pytest.raises(DatasetError, match=f"{listed[3].name}.*2 listed files are missing"):
        load_dataset(images)
    (root / "realiad_128").mkdir()
    with pytest.raises(DatasetError, match="realiad_128"):
        load_dataset(root)  # two resolutions: the user must choose one
    table = root / "realiad_jsons" / "realiad_jsons" / "a.json"
    table.write_text("{not json")
    with pytest.raises(DatasetError, match="a.json"):
        load_dataset(images)


def test_a_half_downloaded_visa_names_what_is_missing(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "visa", **SMALL, layout="visa")
    (root / "a" / "Data" / "Masks" / "Anomaly" / "003.png").unlink()
    with pytest.raises(DatasetError, match="003.png.*1 listed files are missing"):
        load_dataset(root)
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DatasetError, match="1cls.csv"):
        load_dataset(root, layout="visa")


def test_real_iad_views_of_one_object_share_an_object_id(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "riad", **SMALL, layout="real-iad")
    samples = load_dataset(root / "realiad_64")
    views = Counter(s.object_id for s in samples)
    assert set(views.values()) == {5}  # Real-IAD's five cameras
    for object_id in views:
        assert len({s.label for s in samples if s.object_id == object_id}) == 1


def test_segmentation_f1_equals_the_pooled_pixel_f1_of_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((4, 16, 16)) > 0.8
    maps = rng.random((4, 16, 16)) + masks * 0.4
    expected = f1_score(masks.ravel(), (maps > 0.9).ravel())
    assert metrics.segmentation_f1(masks, maps, 0.9) == pytest.approx(expected)
    assert metrics.segmentation_f1(list(masks), list(maps), 0.9) == pytest.approx(expected)


def test_a_protocol_is_refused_for_another_layout_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="loco layout"):
        check_protocol("loco", "mvtec", "one-class")
    with pytest.raises(ConfigError, match="unknown protocol"):
        check_protocol("mvtec-loco", "loco", "one-class")
    root = generate_dataset(tmp_path / "visa", **SMALL, layout="visa")
    run = tmp_path / "run"
    assert main(["fit", "--method", "patchcore", "--data", str(root), "--out", str(run),
                 "--param", "image_size=64", "--quiet"]) == 0
    assert main(["test", str(run), "--protocol", "real-iad", "--quiet"]) == 2


def _fit(root: Path, run: Path) -> None:
    assert main(["fit", "--method", "patchcore", "--data", str(root), "--out", str(run),
                 "--param", "image_size=64", "--param", "coreset_ratio=0.5", "--quiet"]) == 0


def test_mvtec_ad2_protocol_and_submission(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "ad2", **{**SMALL, "categories": ("a", "b")},
                            layout="mvtec-ad2")
    run = tmp_path / "run"
    _fit(root, run)
    results, evaluations = run_tests(run, categories=["a"], protocol="mvtec-ad2")
    table = results["protocol"]
    assert table["columns"] == ["seg_f1", "pixel_aupro_0.05", "image_auroc"]
    predicted = evaluations[0].predictions["a"]
    calibration = evaluations[0].calibration
    assert calibration.method == "held-out" and calibration.n_images == 5  # validation/good
    row = table["per_category"]["a"]["metrics"]
    assert row["seg_f1"] == pytest.approx(f1_score(
        np.asarray(predicted.masks).ravel(),
        (np.asarray(predicted.maps) > calibration.pixel_threshold).ravel()))
    assert row["pixel_aupro_0.05"] == pytest.approx(
        metrics.aupro(predicted.masks, predicted.maps, fpr_limit=0.05))
    assert row["image_auroc"] == pytest.approx(roc_auc_score(predicted.labels, predicted.scores))
    assert table["metrics"] == row  # one category: the mean is its row
    aupimo = table["per_category"]["a"]["beside"]["aupimo"]
    assert aupimo["mean"] is None and "cannot reach" in aupimo["reason"]  # 20,480 normal pixels

    # An object the run has no model for is refused before anything is written.
    (root / "c" / "test_private").mkdir(parents=True)
    (root / "c" / "test_private" / "000_regular.png").write_bytes(
        (root / "a" / "test_private" / "000_regular.png").read_bytes())
    out = tmp_path / "submission"
    private = [root / name / test_set for name in ("a", "b", "c")
               for test_set in ("test_private", "test_private_mixed")
               if (root / name / test_set).is_dir()]
    assert main(["predict", str(run), *map(str, private), "--format", "mvtec-ad2",
                 "--out", str(out), "--quiet"]) == 2
    assert not out.exists()
    # Each object's images go through that object's model.
    assert main(["predict", str(run), *map(str, private[:4]), "--format", "mvtec-ad2",
                 "--out", str(out), "--quiet"]) == 0
    assert len(list((out / "anomaly_images" / "b").rglob("*.tiff"))) == 30
    for test_set, suffix in (("test_private", "regular"), ("test_private_mixed", "mixed")):
        maps = sorted((out / "anomaly_images" / "a" / test_set).iterdir())
        segmentations = sorted((out / "anomaly_images_thresholded" / "a" / test_set).iterdir())
        assert [p.name for p in maps] == [f"{i:03d}_{suffix}.tiff" for i in range(15)]
        assert [p.stem for p in segmentations] == [p.stem for p in maps]
        anomaly_map = tifffile.imread(maps[0])
        assert anomaly_map.dtype == np.float16 and anomaly_map.shape == (64, 64)
        segmentation = np.asarray(Image.open(segmentations[0]))
        assert segmentation.ndim == 2 and set(np.unique(segmentation)) <= {0, 255}
        np.testing.assert_array_equal(
            segmentation == 255, anomaly_map.astype(np.float32) > calibration.pixel_threshold)
    # Only the unlabelled sets go to the server.
    assert main(["predict", str(run), str(root / "a" / "test_public" / "bad"), "--format",
                 "mvtec-ad2", "--out", str(tmp_path / "wrong"), "--quiet"]) == 2


def test_aupimo_beside_the_table_is_the_metric_of_each_anomalous_image() -> None:
    from iadkit.data.preprocess import Preprocess
    from iadkit.data.samples import Sample, SampleSet
    from iadkit.engine.evaluation import ScoredSamples
    from iadkit.engine.protocols import _aupimo

    rng = np.random.default_rng(0)
    masks = np.zeros((6, 200, 200), bool)
    masks[4, 20:40, 20:60] = masks[5, 100:150, 90:120] = True
    maps = rng.random((6, 200, 200)) + masks * rng.random((6, 200, 200))
    samples = SampleSet(Sample(Path(f"{i}.png"), int(m.any()), "a", "x", "test",
                               Path("m.png") if m.any() else None) for i, m in enumerate(masks))
    scored = ScoredSamples(samples, maps.max(axis=(1, 2)), maps, masks, 0.0, Preprocess(200))
    result = _aupimo(scored)
    expected = metrics.aupimo(masks, maps, (1e-5, 1e-4))
    assert result["images"] == ["4.png", "5.png"]
    np.testing.assert_allclose(result["values"], expected)
    assert result["mean"] == pytest.approx(expected.mean())


def test_loco_protocol_equals_the_saturated_pro_of_the_region_files(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "loco", **SMALL, layout="loco")
    run = tmp_path / "run"
    _fit(root, run)
    results, evaluations = run_tests(run, protocol="loco")
    predicted = evaluations[0].predictions["a"]
    config = {entry["pixel_value"]: entry for entry in
              json.loads((root / "a" / "defects_config.json").read_text())}
    kinds = [s.defect_type for s in predicted.samples]
    row = results["protocol"]["per_category"]["a"]["metrics"]
    for kind, short in (("logical_anomalies", "logical"), ("structural_anomalies",
                                                           "structural")):
        chosen = [i for i, k in enumerate(kinds) if k in ("good", kind)]
        regions = []
        for position, index in enumerate(chosen):
            if kinds[index] != kind:
                continue
            # 64 px images at 64 px: the evaluation shape is the image's, no rescaling.
            for mask, value in read_mask_regions(predicted.samples[index].mask_path):
                entry = config[value]
                saturation = entry["saturation_threshold"] * (
                    mask.sum() if entry["relative_saturation"] else 1)
                regions.append((position, mask, saturation))
        maps = np.stack([predicted.maps[i] for i in chosen])
        assert row[f"spro_0.05_{short}"] == pytest.approx(
            metrics.auspro(maps, regions, fpr_limit=0.05))
        labels = [predicted.labels[i] for i in chosen]
        assert row[f"image_auroc_{short}"] == pytest.approx(
            roc_auc_score(labels, predicted.scores[chosen]))
    assert row["spro_0.05"] == pytest.approx(
        (row["spro_0.05_logical"] + row["spro_0.05_structural"]) / 2)
    report = tmp_path / "report"
    assert main(["test", str(run), "--protocol", "loco", "--report", str(report),
                 "--quiet"]) == 0
    assert "Protocol loco" in (report / "index.html").read_text()
    # Without the defect list there is no sPRO: refused before any image is predicted.
    (root / "a" / "defects_config.json").unlink()
    with pytest.raises(DatasetError, match="defects_config.json"):
        run_tests(run, protocol="loco", device="no-such-device")


def test_real_iad_sample_auroc_scores_an_object_by_its_highest_view(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "riad", **SMALL, layout="real-iad")
    run = tmp_path / "run"
    _fit(root / "realiad_64", run)
    results, evaluations = run_tests(run, protocol="real-iad")
    predicted = evaluations[0].predictions["a"]
    objects = sorted({s.object_id for s in predicted.samples})
    views = [[i for i, s in enumerate(predicted.samples) if s.object_id == o] for o in objects]
    expected = roc_auc_score([predicted.labels[v].max() for v in views],
                             [predicted.scores[v].max() for v in views])
    assert len(views) == 3  # one good and two defective objects of five views
    assert results["protocol"]["metrics"]["sample_auroc"] == pytest.approx(expected)
    averaged, _ = run_tests(run, protocol="real-iad", views="mean")
    assert averaged["protocol"]["metrics"]["sample_auroc"] == pytest.approx(roc_auc_score(
        [predicted.labels[v].max() for v in views], [predicted.scores[v].mean() for v in views]))
    with pytest.raises(ConfigError, match="views"):
        run_tests(run, protocol="real-iad", views="median")


def test_cli_generates_each_layout(tmp_path: Path) -> None:
    assert main(["data", "generate", str(tmp_path / "g"), "--layout", "loco", "--n-train", "8",
                 "--size", "32", "--quiet"]) == 0
    assert detect_layout(tmp_path / "g") == "loco"
