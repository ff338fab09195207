"""Calibrating a fitted detector: normal scores no model was fitted on, then a threshold with a
stated false-positive rate (:class:`~iadkit.calibration.Calibration`).

Where the normal scores come from (``RunConfig.calibration``):

- ``"holdout"``: the share ``validation_fraction`` of the training normals is kept out of
  training and scored (or the layout's own validation split);
- ``"leave-one-out"``: every training normal, scored by a detector that leaves its own training
  contribution out (memory banks: :meth:`Detector.predict_left_out`); training uses all
  normals;
- ``"cv:K"``: the training normals in K folds; each fold is scored by an extra detector fitted
  on the other folds, and the detector that is kept is fitted on all of them (K extra fits);
- ``"auto"`` (default): leave-one-out where the method supports it and the layout has no
  validation split, else holdout;
- ``"none"``: no threshold, scores only.

Nothing here reads test data. The plan (which images train, which calibrate) is made and checked
for every task before anything is trained, so a calibration that cannot work stops the run at
once.

Example:
    >>> plan = plan_calibration(config, detector, task)
    >>> plan.method, len(plan.fit_samples)
    ('leave-one-out', 700)
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np

from ..calibration import CROSS_FITTED, HOLDOUT, LEAVE_ONE_OUT, Calibration
from ..data.dataset import make_loader
from ..data.samples import SampleSet
from ..data.settings import Task
from ..errors import ConfigError
from ..methods import Detector
from .config import RunConfig
from .evaluation import predict_images, predict_samples

log = logging.getLogger("iadkit")

#: Fewer normal scores than this cannot give a threshold worth the name.
MIN_CALIBRATION_IMAGES = 5


def holdout_split(train: SampleSet, fraction: float, seed: int) -> tuple[SampleSet, SampleSet]:
    """Split normal training samples into (fit, validation) by a seeded shuffle, holding out
    ``fraction`` of every category (at least one image each)."""
    if fraction <= 0:
        return train, SampleSet([])
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held: set[int] = set()
    for category in train.categories:
        members = [i for i in order if train[i].category == category]
        n_validation = max(1, round(fraction * len(members)))
        if n_validation >= len(members):
            raise ConfigError(f"validation_fraction {fraction} leaves no training images of "
                              f"{category!r}")
        held.update(members[:n_validation])
    return (SampleSet(s for i, s in enumerate(train) if i not in held),
            SampleSet(s for i, s in enumerate(train) if i in held))


def fold_assignment(samples: SampleSet, folds: int, seed: int) -> np.ndarray:
    """Each sample's fold (0..folds-1): a seeded shuffle dealt round-robin within every
    category, so each fold holds every category."""
    assignment = np.empty(len(samples), dtype=int)
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    for category in samples.categories:
        members = [i for i in order if samples[i].category == category]
        for position, index in enumerate(members):
            assignment[index] = position % folds
    return assignment


@dataclass(frozen=True)
class CalibrationPlan:
    """Which images train the detector, which give the search its held-out normals, and how
    the calibration scores are made.

    Attributes:
        method: "held-out", "leave-one-out", "cross-fitted", or None (no calibration).
        fit_samples: what the kept detector is fitted on.
        held_out: normals kept out of training (for a holdout calibration and for a search).
        folds: K of a cross-fitted calibration (0 otherwise).
    """

    method: str | None
    fit_samples: SampleSet
    held_out: SampleSet
    folds: int = 0

    @property
    def n_calibration(self) -> int:
        if self.method == HOLDOUT:
            return len(self.held_out)
        return len(self.fit_samples) if self.method else 0


def plan_calibration(config: RunConfig, detector: Detector, task: Task) -> CalibrationPlan:
    """The calibration plan of a task, checked before any training.

    Raises:
        ConfigError: leave-one-out for a method that cannot, a holdout without held-out images,
            more folds than normals of a category, or fewer than
            :data:`MIN_CALIBRATION_IMAGES` calibration images (with "auto", a warning and no
            calibration instead).
    """
    choice = config.calibration
    layout_split = len(task.validation) > 0
    if choice == "auto" and detector.needs_references:
        # Scores are made against references of the subclass under test, which the seen
        # subclasses' normals are not.
        choice = "none"
    if choice == "auto":
        choice = ("leave-one-out" if detector.supports_leave_one_out and not layout_split
                  else "holdout" if layout_split or config.validation_fraction > 0 else "none")
    if choice == "leave-one-out" and not detector.supports_leave_one_out:
        raise ConfigError(f"calibration leave-one-out: {detector.name} cannot leave a training "
                          "image out after fit; use holdout or cv:K")
    if choice == "holdout" and not layout_split and config.validation_fraction <= 0:
        raise ConfigError("calibration holdout needs validation_fraction > 0 (or use "
                          "leave-one-out or cv:K, which train on every normal)")
    # A search needs held-out normals whatever the calibration; a holdout calibration uses them.
    if layout_split:
        fit_samples, held_out = task.train, task.validation
    elif choice == "holdout" or config.search is not None:
        fit_samples, held_out = holdout_split(task.train, config.validation_fraction,
                                              config.seed)
    else:
        fit_samples, held_out = task.train, SampleSet([])
    folds = int(choice[3:]) if choice.startswith("cv:") else 0
    if folds:
        for category in fit_samples.categories:
            count = sum(1 for s in fit_samples if s.category == category)
            if folds > count - 1:
                raise ConfigError(f"calibration cv:{folds}: {category!r} has {count} training "
                                  f"normals; each fold model needs some (use at most "
                                  f"cv:{max(count - 1, 1)})")
    method = {"holdout": HOLDOUT, "leave-one-out": LEAVE_ONE_OUT, "none": None}.get(
        choice, CROSS_FITTED)
    plan = CalibrationPlan(method, fit_samples, held_out, folds)
    if method is not None and plan.n_calibration < MIN_CALIBRATION_IMAGES:
        if config.calibration == "auto":
            log.warning("task %r: %d held-out normals are too few to calibrate on (at least %d);"
                        " the model gives scores only (raise validation_fraction or use cv:K)",
                        task.name, plan.n_calibration, MIN_CALIBRATION_IMAGES)
            return CalibrationPlan(None, fit_samples, held_out)
        raise ConfigError(f"calibration {choice}: {plan.n_calibration} normal images of task "
                          f"{task.name!r} to calibrate on; at least {MIN_CALIBRATION_IMAGES} "
                          "are needed (raise validation_fraction, or use leave-one-out or "
                          "cv:K, which score every training normal)")
    return plan


def calibrate(detector: Detector, plan: CalibrationPlan, config: RunConfig
              ) -> Calibration | None:
    """The calibration of a fitted detector following ``plan`` (None for no calibration)."""
    if plan.method is None:
        return None
    if plan.method == HOLDOUT:
        scored = predict_samples(detector, plan.held_out, config.batch_size, config.loader_workers,
                                 config.show_progress, "calibrate")
        samples, scores, maxima = plan.held_out, scored.scores, scored.map_maxima
        described = "normal images held out from training"
    elif plan.method == LEAVE_ONE_OUT:
        samples = plan.fit_samples
        scores, maxima = _left_out_scores(detector, samples, config)
        described = "training normals, each scored without its own memory entries"
    else:
        samples = plan.fit_samples
        scores, maxima = _cross_fitted_scores(detector, plan, config)
        described = (f"training normals, each scored by one of {plan.folds} models fitted on "
                     "the other folds")
    calibration = Calibration.fit(
        scores, maxima, f"{plan.method} calibration on {len(samples)} {described}",
        config.target_fpr, config.fpr_confidence, plan.method,
        categories=[s.category for s in samples])
    for part in (calibration, *calibration.categories.values()):
        if part.warning:
            log.warning("%s: %s", part.source, part.warning)
    return calibration


def _left_out_scores(detector: Detector, samples: SampleSet, config: RunConfig
                     ) -> tuple[np.ndarray, np.ndarray]:
    # The detector was fitted on these samples in this order (fit_detector's loader), so a
    # sample's position is its training index.
    scores = np.empty(len(samples), dtype=np.float64)
    maxima = np.empty(len(samples), dtype=np.float64)
    for index, anomaly_map, score, _ in predict_images(
            detector, samples, config.batch_size, config.loader_workers, left_out=True,
            show_progress=config.show_progress, description="calibrate (leave-one-out)"):
        scores[index], maxima[index] = score, float(anomaly_map.max())
    return scores, maxima


def _cross_fitted_scores(detector: Detector, plan: CalibrationPlan, config: RunConfig
                         ) -> tuple[np.ndarray, np.ndarray]:
    samples = plan.fit_samples
    assignment = fold_assignment(samples, plan.folds, config.seed)
    scores = np.empty(len(samples), dtype=np.float64)
    maxima = np.empty(len(samples), dtype=np.float64)
    # Fold models use the kept detector's inference parameters (a search chose them).
    inference = {name: getattr(detector, name) for name in detector.inference_params}
    for fold in range(plan.folds):
        log.info("calibration fold %d of %d", fold + 1, plan.folds)
        inside = np.nonzero(assignment != fold)[0]
        outside = np.nonzero(assignment == fold)[0]
        model = config.new_detector().set_inference_params(**inference)
        model.fit(make_loader(SampleSet(samples[i] for i in inside), model.preprocess,
                              config.batch_size, config.loader_workers),
                  show_progress=config.show_progress)
        scored = predict_samples(model, SampleSet(samples[i] for i in outside),
                                 config.batch_size, config.loader_workers, config.show_progress,
                                 f"calibrate fold {fold + 1}")
        scores[outside] = scored.scores
        maxima[outside] = scored.map_maxima
    return scores, maxima
