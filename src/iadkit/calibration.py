"""Decision thresholds with a stated false-positive rate, fitted on out-of-sample normal scores.

A threshold is an order statistic of ``n`` normal scores that no model was fitted on: the
``k``-th smallest, ``s_(k)``, where an image is anomalous when its score is *above* it. Whatever
the scores' distribution (continuous), the false-positive rate of that threshold,
``FPR = P(normal score > s_(k))``, is Beta(n - k + 1, k) distributed over the draw of the
calibration images. :func:`threshold_rank` picks the smallest ``k`` (the lowest threshold, the
best recall) for which ``P(FPR <= target) >= confidence``; when ``n`` is too small for that,
the threshold is the largest score and the calibration carries a warning naming how many
normals the target needs (:func:`normals_needed`).

The decision itself is NumPy only (no torch, no SciPy), so that an exported model's inferencer
and service decide exactly as a saved detector does: every place that turns a score into a
decision (the service, the ONNX inferencer, batch prediction) calls :func:`decide`.

Example:
    >>> import numpy as np
    >>> scores = np.random.default_rng(0).normal(size=400)
    >>> calibration = Calibration.fit(scores, scores, "400 held-out normals", target_fpr=0.01)
    >>> calibration.rank, calibration.fpr_bound <= 0.01
    (399, True)
    >>> decide(10.0, calibration).anomalous
    True
    >>> decide(2.5, None).anomalous is None   # an uncalibrated model gives scores only
    True
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

log = logging.getLogger("iadkit")

#: Calibration methods: where the normal scores came from.
HOLDOUT, LEAVE_ONE_OUT, CROSS_FITTED, EARLIER = ("held-out", "leave-one-out", "cross-fitted",
                                                 "quantile")


def threshold_rank(n: int, target_fpr: float, confidence: float) -> tuple[int, bool]:
    """The smallest rank ``k`` (1-based) whose order statistic bounds the false-positive rate
    at ``target_fpr`` with probability ``confidence``, and whether one exists (else ``n``).

    ``P(FPR(s_(k)) <= a) = P(Binomial(n, a) >= n - k + 1)``, increasing in ``k``.

    Example:
        >>> threshold_rank(230, 0.01, 0.9), threshold_rank(100, 0.01, 0.9)
        ((230, True), (100, False))
    """
    from scipy.stats import binom

    ranks = np.arange(1, n + 1)
    meets = np.nonzero(binom.sf(n - ranks, n, target_fpr) >= confidence)[0]
    return (int(ranks[meets[0]]), True) if meets.size else (n, False)


def normals_needed(target_fpr: float, confidence: float) -> int:
    """How many normal scores the largest one needs to bound the rate at ``target_fpr`` with
    ``confidence``: the smallest ``n`` with ``1 - (1 - target)^n >= confidence``."""
    return math.ceil(math.log(1.0 - confidence) / math.log1p(-target_fpr))


def fpr_distribution(n: int, rank: int) -> tuple[float, float]:
    """The Beta parameters of the false-positive rate of the ``rank``-th of ``n`` scores."""
    return float(n - rank + 1), float(rank)


def rate_interval(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """Clopper-Pearson (exact, central) interval of a binomial rate."""
    from scipy.stats import beta

    if trials == 0:
        return 0.0, 1.0
    tail = (1.0 - confidence) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - tail, successes + 1,
                                                          trials - successes))
    return low, high


@dataclass(frozen=True)
class Calibration:
    """A decision threshold, the false-positive rate it promises, and the normal scores
    behind it.

    Attributes:
        image_threshold: an image is anomalous when its score is above this.
        pixel_threshold: the same order statistic of the normal maps' per-image maxima: a
            normal image has a pixel above it about as often as it is flagged (the level of
            the anomalous regions and of the overlays' colour scale).
        normal_median, normal_mean, normal_std: of the normal scores.
        n_images: how many normal scores the threshold was chosen from.
        method: where they came from: "held-out" (normals kept out of training),
            "leave-one-out" (every training image scored without its own memory entries),
            "cross-fitted" (each fold scored by a model fitted on the others).
        source: the same, in words, with the counts (shown by the service and the report).
        target_fpr, confidence: the requested false-positive rate and the confidence of its
            bound.
        rank: the threshold is the ``rank``-th smallest of the ``n_images`` scores.
        fpr_expected: the false-positive rate expected of the threshold, ``(n-k+1)/(n+1)``.
        fpr_interval: its central ``confidence`` interval.
        fpr_bound: its one-sided upper bound at ``confidence`` (<= target_fpr when met).
        warning: why the promise is weaker than asked (too few normals), or None.
        scores: the normal scores themselves (for the report's histogram).
        categories: per-category calibrations of a unified model (empty otherwise).
    """

    image_threshold: float
    pixel_threshold: float
    normal_median: float
    normal_mean: float
    normal_std: float
    n_images: int
    method: str
    source: str
    target_fpr: float
    confidence: float
    rank: int
    fpr_expected: float
    fpr_interval: tuple[float, float]
    fpr_bound: float
    warning: str | None = None
    scores: tuple[float, ...] = ()
    categories: dict[str, Calibration] = field(default_factory=dict)

    @classmethod
    def fit(cls, scores: np.ndarray, map_maxima: np.ndarray, source: str,
            target_fpr: float = 0.01, confidence: float = 0.9, method: str = HOLDOUT,
            categories: Sequence[str] | None = None) -> Calibration:
        """From the scores (N,) and anomaly-map maxima (N,) of normal images no model was
        fitted on. With ``categories`` (N,) naming two or more categories, each also gets a
        threshold of its own (unified models)."""
        from scipy.stats import beta

        scores = np.asarray(scores, dtype=np.float64)
        n = int(scores.size)
        if n == 0:
            raise ValueError("a calibration needs at least one normal score")
        rank, met = threshold_rank(n, target_fpr, confidence)
        a, b = fpr_distribution(n, rank)
        tail = (1.0 - confidence) / 2
        warning = None
        if not met:
            needed = normals_needed(target_fpr, confidence)
            warning = (f"{n} normal scores cannot bound the false-positive rate at "
                       f"{target_fpr:g} with {confidence:.0%} confidence (that needs at least "
                       f"{needed}); the threshold is the largest score, whose rate is at most "
                       f"{beta.ppf(confidence, a, b):.3g} with that confidence")
        per_category: dict[str, Calibration] = {}
        if categories is not None and len(set(categories)) > 1:
            names = np.asarray(categories)
            for name in sorted(set(categories)):
                chosen = names == name
                per_category[name] = cls.fit(scores[chosen], np.asarray(map_maxima)[chosen],
                                             f"{source}, category {name}", target_fpr,
                                             confidence, method)
        order = np.sort(scores)
        return cls(
            image_threshold=float(order[rank - 1]),
            pixel_threshold=float(np.sort(np.asarray(map_maxima, np.float64))[rank - 1]),
            normal_median=float(np.median(scores)), normal_mean=float(scores.mean()),
            normal_std=float(scores.std()), n_images=n, method=method, source=source,
            target_fpr=float(target_fpr), confidence=float(confidence), rank=rank,
            fpr_expected=a / (a + b),
            fpr_interval=(float(beta.ppf(tail, a, b)), float(beta.ppf(1 - tail, a, b))),
            fpr_bound=float(beta.ppf(confidence, a, b)), warning=warning,
            scores=tuple(float(s) for s in scores), categories=per_category)

    def for_category(self, category: str | None) -> Calibration:
        """The calibration of ``category`` when it has one of its own, else this one."""
        return self.categories.get(category, self) if category is not None else self

    def predicted_false_positives(self, n_normals: int) -> tuple[float, float]:
        """The central ``confidence`` interval of the false-positive *rate* that ``n_normals``
        new normal images will show at this threshold (beta-binomial: the threshold's own
        uncertainty and the sampling of the new images)."""
        from scipy.stats import betabinom

        a, b = fpr_distribution(self.n_images, self.rank)
        tail = (1.0 - self.confidence) / 2
        low, high = betabinom.ppf([tail, 1 - tail], n_normals, a, b)
        return float(low) / n_normals, float(high) / n_normals

    def normalised(self, scores: np.ndarray | float) -> np.ndarray | float:
        """``(score - normal median) / (threshold - normal median)``: 0 for a typical normal
        image, 1 at the threshold."""
        span = self.image_threshold - self.normal_median
        return (scores - self.normal_median) / (span if span > 0 else 1.0)

    def summary(self) -> str:
        """One line: the threshold and the false-positive rate it promises."""
        low, high = self.fpr_interval
        return (f"threshold {self.image_threshold:.5g} (the {self.rank}th of {self.n_images} "
                f"{self.method} normal scores): expected false-positive rate "
                f"{self.fpr_expected:.2%}, {self.confidence:.0%} interval {low:.2%}-{high:.2%}")

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["categories"] = {name: c.to_dict() for name, c in self.categories.items()}
        return record

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Calibration | None:
        """The calibration saved by :meth:`to_dict` (None stays None); one saved by an earlier
        iadkit (a plain quantile of held-out scores) is read with the rate its rank implies."""
        if not values:
            return None
        if "quantile" in values and "rank" not in values:
            return cls._from_quantile(values)
        known = {f.name for f in fields(cls)}
        record = {name: value for name, value in values.items() if name in known}
        record["fpr_interval"] = tuple(record["fpr_interval"])
        record["scores"] = tuple(record.get("scores", ()))
        record["categories"] = {name: cls.from_dict(c)
                                for name, c in record.get("categories", {}).items()}
        return cls(**record)

    @classmethod
    def _from_quantile(cls, values: dict[str, Any]) -> Calibration:
        from scipy.stats import beta

        n = int(values["n_images"])
        rank = min(n, max(1, round(float(values["quantile"]) * (n - 1)) + 1))
        a, b = fpr_distribution(n, rank)
        return cls(values["image_threshold"], values["pixel_threshold"], values["normal_median"],
                   values["normal_mean"], values["normal_std"], n, EARLIER, values["source"],
                   target_fpr=round(1.0 - float(values["quantile"]), 12), confidence=0.5,
                   rank=rank, fpr_expected=a / (a + b),
                   fpr_interval=(float(beta.ppf(0.25, a, b)), float(beta.ppf(0.75, a, b))),
                   fpr_bound=float(beta.ppf(0.5, a, b)),
                   warning="calibrated by an earlier iadkit (a plain quantile, no stated "
                   "error rate); fit again for a threshold with a bounded false-positive rate")

    def without_scores(self) -> Calibration:
        """The same calibration without the normal scores (a smaller record for exports)."""
        return replace(self, scores=(), categories={name: c.without_scores()
                                                    for name, c in self.categories.items()})


@dataclass(frozen=True)
class Decision:
    """What a calibrated model says of one image; the calibrated fields are None without a
    calibration."""

    score: float
    normalised_score: float | None
    anomalous: bool | None
    threshold: float | None
    threshold_source: str | None


def decide(score: float, calibration: Calibration | None, category: str | None = None
           ) -> Decision:
    """The decision on an image score: anomalous when it is above the calibrated threshold
    (of ``category``'s own calibration when a unified model has one)."""
    if calibration is None:
        return Decision(float(score), None, None, None, None)
    calibration = calibration.for_category(category)
    return Decision(float(score), float(calibration.normalised(float(score))),
                    bool(score > calibration.image_threshold), calibration.image_threshold,
                    calibration.source)
