"""Metrics against scikit-learn and against slow, obviously correct references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from iadkit import metrics
from iadkit.errors import MetricError


def _random_case(rng: np.random.Generator, n: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + labels * 0.8
    if ties:
        scores = np.round(scores, 1)  # many exact ties, also across classes
    return labels.astype(int), scores


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_ap_equal_sklearn(seed: int, ties: bool) -> None:
    labels, scores = _random_case(np.random.default_rng(seed), 2000, ties)
    assert metrics.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


@pytest.mark.parametrize("ties", [False, True])
def test_f1_max_equals_best_f1_over_sklearn_curve(ties: bool) -> None:
    labels, scores = _random_case(np.random.default_rng(5), 1500, ties)
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    assert metrics.f1_max(labels, scores) == pytest.approx(f1.max(), abs=1e-12)


def test_perfect_and_inverted_separation() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    assert metrics.auroc(labels, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0
    assert metrics.auroc(labels, [0.9, 0.8, 0.7, 0.1, 0.2]) == 0.0
    assert metrics.auroc(labels, [0.5] * 5) == 0.5


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_single_class_gives_nan_with_warning(labels: list[int]) -> None:
    with pytest.warns(metrics.UndefinedMetricWarning):
        assert np.isnan(metrics.auroc(labels, [0.1, 0.5, 0.9]))
    with pytest.warns(metrics.UndefinedMetricWarning):
        assert np.isnan(metrics.average_precision(labels, [0.1, 0.5, 0.9]))


def test_nan_scores_raise_a_clear_error() -> None:
    with pytest.raises(MetricError, match="NaN"):
        metrics.auroc([0, 1], [0.1, float("nan")])


def reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """Brute force: PRO and FPR at every distinct threshold, trapezoid, interpolated at limit."""
    structure = np.ones((3, 3), dtype=int)
    regions = []
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=structure)
        regions += [(index, labelled == i, (labelled == i).sum()) for i in range(1, count + 1)]
    return reference_saturated_pro(maps, regions, limit)


def reference_saturated_pro(maps: np.ndarray, regions: list, limit: float) -> float:
    """Brute force over every distinct threshold: the false-positive rate outside all regions,
    the mean over regions of min(found / saturation, 1) (saturation at most the region's
    area); trapezoid, interpolated at limit."""
    negatives = np.ones(maps.shape, bool)
    for index, region, _ in regions:
        negatives[index] &= ~region
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fprs.append((predicted & negatives).sum() / negatives.sum())
        pros.append(np.mean([min((predicted[i] & region).sum()
                                 / min(saturation, region.sum()), 1.0)
                             for i, region, saturation in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= limit
    x, y = list(fprs[keep]), list(pros[keep])
    if x[-1] < limit:
        after = int(np.argmax(fprs > limit))
        x0, x1, y0, y1 = fprs[after - 1], fprs[after], pros[after - 1], pros[after]
        x.append(limit)
        y.append(y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(np.trapezoid(y, x) / limit)


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("quantised", [False, True])
def test_aupro_equals_brute_force_reference(limit: float, quantised: bool) -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 12, 12), dtype=bool)
    masks[0, 2:5, 2:5] = True
    masks[0, 8:11, 6:8] = True  # two regions in one image
    masks[2, 0:12, 0:2] = True
    masks[3, 5, 5] = True
    maps = rng.random(masks.shape) + masks * rng.random(masks.shape) * 0.7
    if quantised:
        maps = np.round(maps, 1)  # heavy ties, also between normal and anomalous pixels
    expected = reference_aupro(masks, maps, limit)
    assert metrics.aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)
    assert metrics.pixel_metrics(masks, maps, fpr_limit=limit)["pixel_aupro"] == pytest.approx(
        expected, abs=1e-9
    )


@pytest.mark.parametrize("quantised", [False, True])
def test_aupro_at_several_limits_equals_each_limit_alone(quantised: bool) -> None:
    # One selection of the top negatives, made for the largest limit, serves the smaller ones.
    rng = np.random.default_rng(5)
    masks = np.zeros((5, 16, 16), dtype=bool)
    masks[0, 3:7, 3:9] = True
    masks[1, 10:12, :] = True
    maps = rng.random(masks.shape) + masks * rng.random(masks.shape) * 0.6
    if quantised:
        maps = np.round(maps, 1)
    limits = (0.05, 0.01, 0.3)
    together = metrics.aupro_at_limits(masks, maps, limits)
    assert list(together) == list(limits)
    for limit in limits:
        assert together[limit] == pytest.approx(reference_aupro(masks, maps, limit), abs=1e-9)
    with pytest.raises(MetricError, match="fpr_limit"):
        metrics.aupro_at_limits(masks, maps, (0.05, 1.5))


def test_aupro_large_input_uses_partial_selection_exactly() -> None:
    # > 4M negatives takes the sampled top-k path; it must agree with the presorted path.
    rng = np.random.default_rng(0)
    masks = np.zeros((70, 256, 256), dtype=bool)
    masks[::2, 100:130, 40:90] = True
    maps = rng.random(masks.shape, dtype=np.float32) + masks * 0.3
    assert metrics.aupro(masks, maps) == pytest.approx(
        metrics.pixel_metrics(masks, maps)["pixel_aupro"], abs=1e-12
    )
    at_limits = metrics.aupro_at_limits(masks, maps, (0.01, 0.3))
    assert at_limits[0.3] == metrics.aupro(masks, maps)
    assert at_limits[0.01] == metrics.aupro(masks, maps, fpr_limit=0.01)


def test_aupro_perfect_map_is_one_and_per_image_variant() -> None:
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 4:8, 4:8] = True
    masks[1, 0:3, 10:16] = True
    maps = masks.astype(float) + 0.01
    assert metrics.aupro(masks, maps) == pytest.approx(1.0)
    assert metrics.aupro(masks, maps, per_image=True) == pytest.approx(1.0)


def test_aupro_without_regions_is_nan_with_warning() -> None:
    with pytest.warns(metrics.UndefinedMetricWarning):
        assert np.isnan(metrics.aupro(np.zeros((2, 8, 8), bool), np.random.rand(2, 8, 8)))


def test_pixel_metrics_match_sklearn_on_pooled_pixels() -> None:
    rng = np.random.default_rng(7)
    masks = rng.random((5, 20, 20)) < 0.1
    maps = rng.random((5, 20, 20)) + masks * 0.4
    result = metrics.pixel_metrics(masks, maps)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert result["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()))


def test_shape_mismatch_is_reported() -> None:
    with pytest.raises(MetricError, match="must both be"):
        metrics.pixel_metrics(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


def _aupimo_on_a_threshold_grid(masks: np.ndarray, maps: np.ndarray, bounds: tuple[float, float],
                                 n_thresholds: int) -> np.ndarray:
    """AUPIMO as the reference implementation computes it: a linear threshold grid over the
    normal images' scores, the shared rate as the mean of per-image rates, the bounds snapped
    to the nearest grid rate, trapezoids in log rate."""
    anomalous = masks.reshape(len(masks), -1).any(axis=1)
    normal = maps[~anomalous]
    thresholds = np.linspace(normal.min(), normal.max(), n_thresholds)
    shared = np.mean([(image.ravel()[None, :] >= thresholds[:, None]).mean(axis=1)
                      for image in normal], axis=0)
    low = int(np.argmin(np.abs(shared - bounds[0])))
    high = int(np.argmin(np.abs(shared - bounds[1])))
    x = np.log(shared[high:low + 1][::-1])
    values = []
    for image, mask in zip(maps[anomalous], masks[anomalous]):
        positives = image[mask]
        tpr = (positives[None, :] >= thresholds[high:low + 1, None]).mean(axis=1)[::-1]
        values.append(np.trapezoid(tpr, x) / np.log(bounds[1] / bounds[0]))
    return np.clip(np.array(values), 0, 1)


def test_aupimo_is_the_limit_of_the_reference_threshold_grid() -> None:
    rng = np.random.default_rng(7)
    masks = np.zeros((7, 30, 30), bool)
    masks[4, 5:12, 5:15] = True
    masks[5, 20:28, 3:9] = True
    masks[6, :4, :] = True
    maps = rng.normal(size=masks.shape)
    maps[masks] += rng.uniform(0.5, 3.0, size=masks.sum())  # overlapping score ranges
    bounds = (0.01, 0.1)
    exact = metrics.aupimo(masks, maps, bounds)
    assert exact.shape == (3,) and 0.05 < exact.min() < exact.max() < 0.95
    grid = _aupimo_on_a_threshold_grid(masks, maps, bounds, 20_000)
    np.testing.assert_allclose(exact, grid, atol=2e-3)


def test_aupimo_perfect_inverted_and_bad_input() -> None:
    masks = np.zeros((4, 400, 300), bool)  # 360 000 normal pixels reach 1e-5
    masks[2, 10:20, 10:20] = True
    masks[3, 100:150, 5:9] = True
    maps = np.random.default_rng(1).random(masks.shape)
    perfect = maps + 2 * masks
    np.testing.assert_allclose(metrics.aupimo(masks, perfect), [1.0, 1.0])
    inverted = maps - 2 * masks
    np.testing.assert_allclose(metrics.aupimo(masks, inverted), [0.0, 0.0])
    with pytest.raises(MetricError, match="cannot reach a false-positive rate of 1e-05"):
        metrics.aupimo(masks[:, :100, :100], perfect[:, :100, :100])
    with pytest.raises(MetricError, match="normal images"):
        metrics.aupimo(masks[2:], perfect[2:])
    with pytest.raises(MetricError, match="fpr_bounds"):
        metrics.aupimo(masks, perfect, (1e-3, 1e-4))


@pytest.mark.parametrize("quantised", [False, True])
def test_saturated_pro_equals_brute_force_and_is_aupro_without_saturation(
        quantised: bool) -> None:
    rng = np.random.default_rng(5)
    masks = np.zeros((5, 14, 14), dtype=bool)
    masks[0, 2:6, 2:9] = True
    masks[1, 3:12, 3:5] = True
    masks[3, 7:9, 7:9] = True
    maps = rng.random(masks.shape) + masks * rng.random(masks.shape) * 0.8
    if quantised:
        maps = np.round(maps, 1)  # ties inside regions and with normal pixels
    overlapping = np.zeros((14, 14), bool)
    overlapping[4:8, 6:12] = True  # overlaps the first region
    regions = [(0, masks[0], 10.5), (1, masks[1], 18.0), (3, masks[3], 40.0),
               (0, overlapping, 6.0)]
    for limit in (0.05, 0.3):
        expected = reference_saturated_pro(maps, regions, limit)
        assert metrics.auspro(maps, regions, limit) == pytest.approx(expected, abs=1e-9)
    # Saturation at each connected region's area: AUPRO.
    whole = [(i, masks[i], masks[i].sum()) for i in (0, 1, 3)]
    assert metrics.auspro(maps, whole, 0.3) == pytest.approx(
        metrics.aupro(masks, maps, 0.3), abs=1e-12)
    with pytest.raises(MetricError, match="region 0: empty mask"):
        metrics.auspro(maps, [(0, np.zeros((14, 14), bool), 5.0)])
    with pytest.raises(MetricError, match="does not fit"):
        metrics.auspro(maps, [(7, masks[0], 5.0)])
