"""Exact, vectorised anomaly-detection metrics.

Every rank metric here is computed from the scores split by label and sorted once, then read off
with binary searches: no threshold grid, no approximation, and ties are handled the way
scikit-learn handles them (``roc_auc_score``, ``average_precision_score``).

- :func:`auroc`, :func:`average_precision`, :func:`f1_max` for any binary labels (image or pixel).
- :func:`aupro`: the area under the per-region-overlap curve up to a false-positive-rate limit
  (0.3 by default), pooled over the whole test set as in the MVTec AD protocol, computed exactly:
  the curve is integrated with the trapezoid rule through every distinct score and interpolated at
  the limit. ``per_image=True`` averages per-image values instead (RD4AD's code does this).
- :func:`auspro`: MVTec LOCO's saturated PRO, with a saturation area per defect, exactly.
- :func:`aupimo`: the per-image overlap of each anomalous image at a low false-positive rate
  shared over the normal images (AUPIMO), exactly.
- :func:`image_metrics` and :func:`pixel_metrics` bundle them; pixel metrics share one sort.

Undefined cases (only one class present, no anomalous region) return NaN with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from .errors import MetricError


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for these labels; NaN was returned."""


def _as_array(values: Any, dtype: type | None = None) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    return array.astype(dtype, copy=False) if dtype is not None else array


def _check_scores(scores: np.ndarray, what: str) -> np.ndarray:
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        bad = int((~np.isfinite(scores)).sum())
        raise MetricError(f"{what}: {bad} scores are NaN or infinite; the detector output is invalid")
    return scores


class RankedScores:
    """Scores of negatives and positives, each sorted ascending, for exact rank metrics."""

    def __init__(self, negatives: np.ndarray, positives: np.ndarray) -> None:
        self.negatives = negatives  # sorted ascending
        self.positives = positives  # sorted ascending

    @classmethod
    def from_labels(cls, labels: Any, scores: Any, what: str = "scores") -> RankedScores:
        labels = _as_array(labels).astype(bool).ravel()
        scores = _check_scores(_as_array(scores).ravel(), what)
        if labels.shape != scores.shape:
            raise MetricError(f"{what}: {labels.size} labels for {scores.size} scores")
        negatives = scores[~labels]
        positives = scores[labels]
        negatives.sort()
        positives.sort()
        return cls(negatives, positives)

    def _defined(self, name: str) -> bool:
        if self.negatives.size and self.positives.size:
            return True
        which = "normal" if not self.negatives.size else "anomalous"
        warnings.warn(f"{name} is undefined: no {which} samples; returning NaN",
                      UndefinedMetricWarning, stacklevel=3)
        return False

    def auroc(self) -> float:
        """Probability that a random positive outscores a random negative (ties count half)."""
        if not self._defined("AUROC"):
            return float("nan")
        below = np.searchsorted(self.negatives, self.positives, side="left").sum(dtype=np.float64)
        below_or_tied = np.searchsorted(self.negatives, self.positives, side="right").sum(
            dtype=np.float64
        )
        return float((below + below_or_tied) / 2.0 / (self.positives.size * self.negatives.size))

    def _curve_at_positive_thresholds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each distinct positive score t (descending): positives equal to t, TP(>=t), FP(>=t)."""
        values, counts = np.unique(self.positives, return_counts=True)
        values, counts = values[::-1], counts[::-1]
        true_positives = np.cumsum(counts)
        false_positives = self.negatives.size - np.searchsorted(self.negatives, values, side="left")
        return counts, true_positives, false_positives

    def average_precision(self) -> float:
        """Area under the precision-recall curve as a step sum (scikit-learn's definition)."""
        if not self._defined("average precision"):
            return float("nan")
        counts, tp, fp = self._curve_at_positive_thresholds()
        return float(np.sum(counts / self.positives.size * tp / (tp + fp)))

    def f1_max(self) -> tuple[float, float]:
        """The best F1 over all thresholds, and the threshold reaching it (score >= threshold)."""
        if not self._defined("F1-max"):
            return float("nan"), float("nan")
        _, tp, fp = self._curve_at_positive_thresholds()
        f1 = 2.0 * tp / (tp + fp + self.positives.size)
        best = int(np.argmax(f1))
        thresholds = np.unique(self.positives)[::-1]
        return float(f1[best]), float(thresholds[best])


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve; equals ``sklearn.metrics.roc_auc_score``."""
    return RankedScores.from_labels(labels, scores).auroc()


def average_precision(labels: Any, scores: Any) -> float:
    """Equals ``sklearn.metrics.average_precision_score``."""
    return RankedScores.from_labels(labels, scores).average_precision()


def f1_max(labels: Any, scores: Any) -> float:
    """The maximum F1 score over all thresholds."""
    return RankedScores.from_labels(labels, scores).f1_max()[0]


def _region_ids(masks: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """Connected-component id of every anomalous pixel (in the order of the images' anomalous
    pixels, image by image), and the count. Components are 8-connected within each image,
    never across images."""
    ids, count = [], 0
    for mask in masks:
        if not mask.any():
            continue
        labels, found = ndimage.label(mask, structure=np.ones((3, 3), bool))
        ids.append(labels[mask] + count)
        count += found
    return (np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)), count


def _maps_and_masks(masks: Any, maps: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Masks (bool) and maps (checked scores) as lists of 2-D arrays of matching shapes, from
    ``(N, H, W)`` arrays or sequences of ``(H_i, W_i)`` arrays (images of different sizes)."""
    maps = [_check_scores(_as_array(m), "anomaly maps") for m in maps]
    masks = [_as_array(m).astype(bool) for m in masks]
    mismatch = next(((k.shape, m.shape) for k, m in zip(masks, maps, strict=False)
                     if m.shape != k.shape or m.ndim != 2), None)
    if len(maps) != len(masks) or mismatch is not None:
        where = f", first mismatch (mask, map): {mismatch}" if mismatch is not None else ""
        raise MetricError(f"masks and maps must both be (N, H, W) arrays or lists of (H, W) "
                          f"arrays of the same shapes; got {len(masks)} masks and {len(maps)} "
                          f"maps{where}")
    return masks, maps


def _pro_area(
    top_negatives: np.ndarray,
    n_negatives: int,
    positive_scores: np.ndarray,
    positive_weights: np.ndarray,
    fpr_limit: float,
) -> float:
    """Exact trapezoid area under PRO(FPR) on [0, fpr_limit], divided by fpr_limit.

    ``top_negatives`` is sorted ascending and must contain every negative score >= the score at
    which the FPR reaches ``fpr_limit``. PRO at a threshold is the weighted count of positive
    pixels at or above it (weight 1 / (number of regions * region area)).

    Between consecutive distinct thresholds the curve moves by (#negatives tied there)/N in FPR
    and from PRO(> t) to PRO(>= t), so the area is the sum over negatives above the cut of
    (PRO(> v) + PRO(>= v)) / 2N, plus the part of the segment that straddles the limit.
    """
    n_at_limit = fpr_limit * n_negatives
    k = min(max(int(np.ceil(n_at_limit)), 1), n_negatives)
    cut_value = top_negatives[top_negatives.size - k]
    base = np.searchsorted(top_negatives, cut_value, side="right")  # entries <= cut_value
    above_cut = top_negatives.size - base  # negatives strictly above the cut (a)
    at_or_above = top_negatives.size - np.searchsorted(top_negatives, cut_value, side="left")  # b

    order = np.argsort(positive_scores, kind="stable")
    scores = positive_scores[order]
    weights = positive_weights[order]
    start = np.searchsorted(scores, cut_value, side="right")  # positives strictly above the cut
    upper_scores, upper_weights = scores[start:], weights[start:]
    negatives_below_or_at = np.searchsorted(top_negatives, upper_scores, side="right") - base
    negatives_below = np.searchsorted(top_negatives, upper_scores, side="left") - base
    area = float(np.dot(upper_weights, negatives_below_or_at + negatives_below)) / (2.0 * n_negatives)

    pro_above = float(upper_weights.sum())
    pro_at_or_above = pro_above + float(weights[np.searchsorted(scores, cut_value, "left"):start].sum())
    fraction = (n_at_limit - above_cut) / (at_or_above - above_cut)
    pro_at_limit = pro_above + (pro_at_or_above - pro_above) * min(fraction, 1.0)
    width = min(n_at_limit, at_or_above) / n_negatives - above_cut / n_negatives
    area += width * (pro_above + pro_at_limit) / 2.0
    return float(area / fpr_limit)


def _select_top(negatives: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted negatives that surely include the k largest, without sorting all of them."""
    if negatives.size > 4_000_000:
        sample = negatives[rng.integers(0, negatives.size, 200_000)]
        quantile = 1.0 - min(1.0, k / negatives.size * 1.05 + 0.005)
        bound = np.quantile(sample, quantile)
        top = negatives[negatives >= bound]
        if top.size >= k:
            top.sort()
            return top
    top = negatives.copy()
    top.sort()
    return top


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3, per_image: bool = False) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (exact).

    Args:
        masks: (N, H, W) ground-truth masks (bool or 0/1), or a list of (H, W) masks of images
            of different sizes.
        maps: (N, H, W) anomaly maps, or a list of (H, W) maps, shaped as ``masks``.
        fpr_limit: integrate over FPR in [0, fpr_limit]; the result is divided by it.
        per_image: average the per-image AUPRO of anomalous images instead of pooling.
    """
    if per_image:
        masks, maps = _maps_and_masks(masks, maps)
        _check_fpr_limit(fpr_limit)
        values = [aupro([m], [s], fpr_limit) for m, s in zip(masks, maps, strict=True)
                  if m.any()]
        if not values:
            warnings.warn("AUPRO is undefined: no anomalous region; returning NaN",
                          UndefinedMetricWarning, stacklevel=2)
            return float("nan")
        return float(np.mean(values))
    return aupro_at_limits(masks, maps, (fpr_limit,))[fpr_limit]


def aupro_at_limits(masks: Any, maps: Any, fpr_limits: Sequence[float]) -> dict[float, float]:
    """Pooled :func:`aupro` at several integration limits, the pixels sorted once.

    Example:
        >>> masks = np.zeros((1, 4, 4), bool); masks[0, :2] = True
        >>> maps = np.zeros((1, 4, 4)); maps[0, :2] = 1.0
        >>> aupro_at_limits(masks, maps, (0.05, 0.3))
        {0.05: 1.0, 0.3: 1.0}
    """
    masks, maps = _maps_and_masks(masks, maps)
    if not fpr_limits:
        raise MetricError("give at least one fpr_limit")
    for limit in fpr_limits:
        _check_fpr_limit(limit)
    negatives = np.concatenate([m[~k] for m, k in zip(maps, masks, strict=True)])
    values = _aupro_pooled(masks, maps, negatives, fpr_limits, presorted=False)
    return dict(zip(fpr_limits, values, strict=True))


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise MetricError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def auspro(maps: Any, regions: Sequence[tuple[int, Any, float]], fpr_limit: float = 0.05
           ) -> float:
    """Normalised area under the saturated PRO curve up to ``fpr_limit`` (exact): MVTec LOCO's
    sPRO, where a defect counts as fully found once ``saturation`` of its pixels are.

    At a threshold, each region's overlap is ``min(found pixels / saturation, 1)``; sPRO is
    their mean, the false-positive rate counts the pixels of all images outside every region.
    Since pixels are found in descending score order, that equals a weighted count: a region's
    ``saturation`` highest pixels weigh ``1 / saturation`` each (a fractional last one its
    share), the rest nothing; so the curve is integrated exactly as :func:`aupro`'s. With
    ``saturation`` = the region's area and connected components as regions, it is AUPRO.

    Args:
        maps: (N, H, W) anomaly maps.
        regions: ``(image index, (H, W) bool mask, saturation in pixels)`` per defect; regions
            may overlap (a pixel then counts for each). A saturation above the region's area
            is taken as the area, so that every defect can be found in full (our reading of
            the LOCO paper's definition).
        fpr_limit: integrate over FPR in [0, fpr_limit] (LOCO reports 0.05).
    """
    maps = _check_scores(_as_array(maps), "anomaly maps")
    if maps.ndim != 3:
        raise MetricError(f"maps {maps.shape} must be (N, H, W)")
    _check_fpr_limit(fpr_limit)
    if not regions:
        raise MetricError("sPRO needs at least one defect region")
    outside = np.ones(maps.shape, bool)
    scores, weights = [], []
    for number, (image, mask, saturation) in enumerate(regions):
        mask = _as_array(mask).astype(bool)
        if mask.shape != maps.shape[1:] or not 0 <= image < len(maps):
            raise MetricError(f"region {number}: a mask of {mask.shape} for image {image} does "
                              f"not fit maps of {maps.shape}")
        if not mask.any() or not saturation > 0:
            raise MetricError(f"region {number}: empty mask or saturation {saturation} <= 0")
        outside[image] &= ~mask
        values = np.sort(maps[image][mask])[::-1]
        saturation = min(float(saturation), float(values.size))
        # The first floor(saturation) pixels weigh 1 / saturation, the next its remainder.
        share = np.clip(saturation - np.arange(values.size), 0.0, 1.0) / saturation
        scores.append(values)
        weights.append(share / len(regions))
    negatives = maps[outside]
    if negatives.size == 0:
        raise MetricError("sPRO needs pixels outside every region")
    k = min(max(int(np.ceil(fpr_limit * negatives.size)), 1), negatives.size)
    top = _select_top(negatives, k, np.random.default_rng(0))
    return _pro_area(top, negatives.size, np.concatenate(scores), np.concatenate(weights),
                     fpr_limit)


def _aupro_pooled(masks: list[np.ndarray], maps: list[np.ndarray], negatives: np.ndarray,
                  fpr_limits: Sequence[float], presorted: bool) -> list[float]:
    """AUPRO at each of ``fpr_limits``: the regions labelled and the negatives selected once."""
    region_ids, n_regions = _region_ids(masks)
    if n_regions == 0 or negatives.size == 0:
        which = "anomalous region" if n_regions == 0 else "normal pixel"
        warnings.warn(f"AUPRO is undefined: no {which}; returning NaN",
                      UndefinedMetricWarning, stacklevel=3)
        return [float("nan")] * len(fpr_limits)
    sizes = np.bincount(region_ids, minlength=n_regions + 1).astype(np.float64)
    weights = 1.0 / (n_regions * sizes[region_ids])
    k = min(max(int(np.ceil(max(fpr_limits) * negatives.size)), 1), negatives.size)
    top = negatives if presorted else _select_top(negatives, k, np.random.default_rng(0))
    positives = np.concatenate([m[k] for m, k in zip(maps, masks, strict=True)])
    return [_pro_area(top, negatives.size, positives, weights, limit) for limit in fpr_limits]


def aupimo(masks: Any, maps: Any, fpr_bounds: tuple[float, float] = (1e-5, 1e-4)
           ) -> np.ndarray:
    """AUPIMO (Bertoldo et al. 2024) of every anomalous image, exactly: the area under its
    per-image overlap curve, its true-positive rate against the log of the shared false-positive
    rate, over ``fpr_bounds``, divided by ``log(upper / lower)`` (so 1 is perfect).

    Images with an empty mask are the normal images; the shared false-positive rate at a
    threshold is the mean over them of their own false-positive rates (pixels at or above the
    threshold). The curve is integrated with the trapezoid rule through every distinct normal
    score, from the rate nearest the lower bound to the one nearest the upper bound: the limit
    of the reference implementation's threshold grid (anomalib's ``aupimo_scores``) as it gets
    finer.

    Returns:
        (n_anomalous,) float64 AUPIMO values, in image order.

    Raises:
        MetricError: no normal or no anomalous image, bad bounds, or too few normal pixels for
            the normal images to reach the lower bound (1e-5 needs about 100 000).

    Example:
        >>> masks = np.zeros((2, 10, 10), bool); masks[1, :2] = True
        >>> maps = np.random.default_rng(0).random((2, 10, 10)); maps[1, :2] += 1
        >>> aupimo(masks, maps, fpr_bounds=(0.01, 0.5))
        array([1.])
    """
    masks = _as_array(masks).astype(bool)
    maps = _check_scores(_as_array(maps), "anomaly maps")
    if masks.shape != maps.shape or masks.ndim != 3:
        raise MetricError(f"masks {masks.shape} and maps {maps.shape} must both be (N, H, W)")
    lower, upper = fpr_bounds
    if not 0 < lower < upper <= 1:
        raise MetricError(f"fpr_bounds must satisfy 0 < lower < upper <= 1, got {fpr_bounds}")
    anomalous = masks.reshape(len(masks), -1).any(axis=1)
    if anomalous.all() or not anomalous.any():
        raise MetricError("AUPIMO needs normal images (empty masks) and anomalous ones")
    # Distinct normal scores, highest first, and the shared false-positive rate once the
    # threshold has come down to each of them.
    normal = maps[~anomalous].astype(np.float64)
    values, counts = np.unique(normal, return_counts=True)
    values, counts = values[::-1], counts[::-1]
    rates = np.cumsum(counts) / normal.size
    if lower < rates[0]:
        raise MetricError(f"the normal images' {normal.size} pixels cannot reach a false-"
                          f"positive rate of {lower:g} (their smallest is {rates[0]:.3g})")
    first = int(np.argmin(np.abs(rates - lower)))
    last = int(np.argmin(np.abs(rates - upper)))
    # From the rate at ``first`` to the one at ``last``, the rate steps up where the threshold
    # crosses ``values[k]``: the step's trapezoid joins the true-positive rates just above and
    # at that value.
    steps = values[first + 1:last + 1]
    widths = np.diff(np.log(rates[first:last + 1]))
    result = []
    for image, mask in zip(maps[anomalous], masks[anomalous], strict=True):
        positives = np.sort(image[mask].astype(np.float64))
        above = positives.size - np.searchsorted(positives, steps, side="right")
        at_or_above = positives.size - np.searchsorted(positives, steps, side="left")
        heights = (above + at_or_above) / (2 * positives.size)
        result.append(float(np.sum(widths * heights)) / np.log(upper / lower))
    return np.clip(np.array(result), 0.0, 1.0)


def segmentation_f1(masks: Any, maps: Any, threshold: float) -> float:
    """The F1 score of the pixels above ``threshold`` against the masks, over all pixels of
    all images pooled (MVTec AD 2's SegF1, the threshold chosen beforehand on normal images).
    ``masks`` and ``maps`` as for :func:`aupro`; 0 when nothing is found or nothing is there.

    Example:
        >>> masks = np.zeros((1, 4, 4), bool); masks[0, :2] = True
        >>> maps = np.zeros((1, 4, 4)); maps[0, :3] = 1.0
        >>> round(segmentation_f1(masks, maps, 0.5), 4)  # 8 found, 4 false: 2*8 / (16 + 12)
        0.8
    """
    masks, maps = _maps_and_masks(masks, maps)
    true_positives = found = present = 0
    for mask, anomaly_map in zip(masks, maps, strict=True):
        above = anomaly_map > threshold
        true_positives += int(np.count_nonzero(above & mask))
        found += int(np.count_nonzero(above))
        present += int(np.count_nonzero(mask))
    total = found + present
    return 2.0 * true_positives / total if total else 0.0


def image_metrics(labels: Any, scores: Any) -> dict[str, float]:
    """Image AUROC, AP and F1-max (with its threshold)."""
    ranked = RankedScores.from_labels(labels, scores, "image scores")
    f1, threshold = ranked.f1_max()
    return {
        "image_auroc": ranked.auroc(),
        "image_ap": ranked.average_precision(),
        "image_f1_max": f1,
        "image_f1_threshold": threshold,
    }


def pixel_metrics(masks: Any, maps: Any, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AUPRO over all pixels of all images, pooled; one sort.
    ``masks`` and ``maps`` as for :func:`aupro`."""
    masks, maps = _maps_and_masks(masks, maps)
    negatives = np.concatenate([m[~k] for m, k in zip(maps, masks, strict=True)])
    negatives.sort()
    positives = np.concatenate([m[k] for m, k in zip(maps, masks, strict=True)])
    positives.sort()
    ranked = RankedScores(negatives, positives)
    f1, _ = ranked.f1_max()
    return {
        "pixel_auroc": ranked.auroc(),
        "pixel_ap": ranked.average_precision(),
        "pixel_f1_max": f1,
        "pixel_aupro": _aupro_pooled(masks, maps, negatives, (fpr_limit,), presorted=True)[0],
    }
