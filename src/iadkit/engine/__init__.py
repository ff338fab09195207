"""Fit, calibrate, evaluate and predict for any detector in any evaluation setting.

The engine never looks at which method it drives: it builds detectors through the registry,
feeds them batches, and reads back maps and scores. By concern:

- :mod:`.config`: :class:`RunConfig`, the settings of a run (``run.json``);
- :mod:`.calibrate`: thresholds from out-of-sample normal scores;
- :mod:`.search`: choosing inference parameters on a pseudo-validation set;
- :mod:`.evaluation`: predictions over samples and their metrics;
- :mod:`.runs`: run folders (fit with calibration, resume, test).

Example:
    >>> from iadkit.engine import RunConfig, fit_run, test_run
    >>> config = RunConfig(method="patchcore", data="data/magnetic_tile")
    >>> fit_run(config, "runs/mt")
    >>> results, evaluations = test_run("runs/mt")
    >>> results["image_auroc"]
"""

from .calibrate import CalibrationPlan, holdout_split, plan_calibration
from .config import RunConfig
from .evaluation import (
    METRIC_KEYS,
    ScoredSamples,
    TaskEvaluation,
    evaluate_task,
    predict_samples,
    score_predictions,
    summarise,
)
from .runs import (
    RUN_FILE,
    fit_detector,
    fit_run,
    read_run,
    resolve_model_dir,
    test_run,
)
from .search import SearchSettings, search_inference_params, search_on_held_out_normals

__all__ = [
    "METRIC_KEYS",
    "RUN_FILE",
    "CalibrationPlan",
    "RunConfig",
    "ScoredSamples",
    "SearchSettings",
    "TaskEvaluation",
    "evaluate_task",
    "fit_detector",
    "fit_run",
    "holdout_split",
    "plan_calibration",
    "predict_samples",
    "read_run",
    "resolve_model_dir",
    "score_predictions",
    "search_inference_params",
    "search_on_held_out_normals",
    "summarise",
    "test_run",
]
