"""Thresholds with a stated false-positive rate: the guarantee holds over many draws."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from iadkit.calibration import Calibration, decide, normals_needed, threshold_rank


def _draws(n: int, target: float, repeats: int = 2000) -> tuple[np.ndarray, list[Calibration]]:
    rng = np.random.default_rng(0)
    calibrations = [Calibration.fit(scores, scores, "synthetic", target, 0.9)
                    for scores in rng.normal(size=(repeats, n))]
    true_fpr = np.array([norm.sf(c.image_threshold) for c in calibrations])
    return true_fpr, calibrations


@pytest.mark.parametrize("n,target", [(500, 0.05), (1000, 0.01)])
def test_the_threshold_bounds_the_false_positive_rate_with_the_stated_confidence(
        n: int, target: float) -> None:
    true_fpr, calibrations = _draws(n, target)
    covered = np.mean(true_fpr <= target)
    # at least 90% (sampling error of 2000 draws: about 0.7%), and not wastefully more: the
    # rank is the smallest that meets the bound
    assert 0.88 <= covered <= 0.97
    assert all(c.fpr_bound <= target and c.warning is None for c in calibrations)
    # the stated expectation and interval describe the realised rates
    assert np.mean(true_fpr) == pytest.approx(calibrations[0].fpr_expected, rel=0.08)
    low, high = calibrations[0].fpr_interval
    assert 0.87 <= np.mean((low <= true_fpr) & (true_fpr <= high)) <= 0.93


def test_predicted_interval_covers_the_rate_new_normals_show() -> None:
    rng = np.random.default_rng(1)
    inside = []
    for _ in range(1000):
        calibration = Calibration.fit(rng.normal(size=300), np.zeros(300), "synthetic", 0.05)
        test = rng.normal(size=120)
        low, high = calibration.predicted_false_positives(test.size)
        realised = np.mean(test > calibration.image_threshold)
        inside.append(low <= realised <= high)
    assert np.mean(inside) >= 0.88


def test_too_few_normals_fall_back_to_the_largest_score_and_say_how_many_are_needed() -> None:
    assert normals_needed(0.01, 0.9) == 230
    assert threshold_rank(229, 0.01, 0.9) == (229, False)
    assert threshold_rank(230, 0.01, 0.9) == (230, True)
    scores = np.arange(21, dtype=float)
    calibration = Calibration.fit(scores, scores, "21 normals", 0.01)
    assert calibration.image_threshold == 20.0 and calibration.rank == 21
    assert "at least 230" in calibration.warning
    assert calibration.fpr_bound == pytest.approx(1 - 0.1 ** (1 / 21))


def test_per_category_thresholds_and_a_strict_decision() -> None:
    scores = np.r_[np.arange(10.0), 100 + np.arange(10.0)]
    categories = ["a"] * 10 + ["b"] * 10
    calibration = Calibration.fit(scores, scores, "two categories", 0.2, categories=categories)
    assert calibration.categories["a"].image_threshold == 9.0
    assert calibration.categories["b"].image_threshold == 109.0
    assert decide(50.0, calibration, "a").anomalous
    assert not decide(50.0, calibration, "b").anomalous
    assert decide(50.0, calibration).threshold == calibration.image_threshold
    assert not decide(9.0, calibration, "a").anomalous  # at the threshold: normal
    restored = Calibration.from_dict(calibration.to_dict())
    assert restored == calibration


def test_a_calibration_saved_by_an_earlier_version_still_decides() -> None:
    earlier = {"image_threshold": 3.0, "pixel_threshold": 1.0, "normal_median": 1.0,
               "normal_mean": 1.0, "normal_std": 0.5, "n_images": 70, "quantile": 0.99,
               "source": "0.99 quantile of 70 normal validation images"}
    calibration = Calibration.from_dict(earlier)
    assert calibration.method == "quantile" and "earlier iadkit" in calibration.warning
    assert calibration.target_fpr == 0.01 and decide(3.5, calibration).anomalous


def test_test_normals_that_score_unlike_the_calibration_ones_raise_a_shift_warning() -> None:
    from iadkit.engine.evaluation import decision_statistics

    rng = np.random.default_rng(3)
    calibration = Calibration.fit(rng.normal(size=500), np.zeros(500), "synthetic", 0.05)
    labels = np.r_[np.zeros(200, int), np.ones(50, int)]
    same = np.r_[rng.normal(size=200), rng.normal(4, 1, size=50)]
    shifted = same + np.r_[np.full(200, 1.0), np.zeros(50)]  # the normals drifted up
    steady = decision_statistics(labels, same, calibration)
    drifted = decision_statistics(labels, shifted, calibration)
    assert steady["shift_warning"] is None
    assert drifted["shift_warning"] and drifted["fpr"] > drifted["predicted_fpr_interval"][1]
    assert steady["true_positives"] + steady["false_negatives"] == 50
    from sklearn.metrics import f1_score

    assert steady["f1"] == pytest.approx(
        f1_score(labels, same > calibration.image_threshold))
    low, high = steady["recall_interval"]
    assert low <= steady["recall"] <= high
