"""Fit, calibrate, evaluate and predict for any detector in any evaluation setting.

The engine never looks at which method it drives: it builds detectors through the registry,
feeds them batches, and reads back maps and scores. Thresholds and score normalisation are fitted
on *normal validation images held out from training* (or a layout's own validation split), never
on the test set.

Example:
    >>> from iadkit.engine import RunConfig, fit_run, test_run
    >>> config = RunConfig(method="patchcore", data="data/magnetic_tile")
    >>> fit_run(config, "runs/mt")
    >>> results = test_run("runs/mt")
    >>> results["image_auroc"]
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics
from .calibration import calibrate
from .data.dataset import Preprocess, make_loader
from .data.layouts import load_dataset
from .data.samples import SampleSet
from .data.settings import Task, make_tasks
from .errors import IadkitError, ImageReadError
from .methods import Detector, create_detector
from .progress import progress
from .synthesis.pseudo_validation import PSEUDO_VALIDATION_KINDS, build_pseudo_validation
from .synthesis.textures import TextureSource

log = logging.getLogger("iadkit")

RUN_FILE = "run.json"
#: Run settings that change what a model learns (a resumed run must match them).
MODEL_SETTINGS = ("method", "data", "preset", "params", "categories", "layout", "setting",
                  "seen_subclasses", "unseen_subclasses", "validation_fraction",
                  "threshold_quantile", "search", "search_synthesis", "search_textures",
                  "search_metric", "seed")
METRIC_KEYS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")


@dataclass
class RunConfig:
    """Everything that defines a training run; saved as ``run.json`` in the run folder.

    Attributes:
        method: registered method name (``iadkit methods`` lists them).
        data: dataset root folder.
        preset: the method's preset ("cpu" or "paper").
        params: hyperparameters overriding the preset.
        categories: categories to use; None = all.
        layout: dataset layout ("auto" detects it).
        setting: evaluation setting (see :mod:`iadkit.data.settings`).
        seen_subclasses, unseen_subclasses: for the unseen-subclass setting.
        batch_size: images per batch when predicting.
        workers: DataLoader worker processes.
        validation_fraction: share of the training normals held out for calibration when the
            layout has no validation split; 0 trains on all of them and leaves the detector
            uncalibrated (scores only, no decision threshold).
        threshold_quantile: the image threshold is this quantile of held-out normal scores.
        search: inference parameters to choose after fitting, on a pseudo-validation set made
            from the held-out normals: "default" (the method's :attr:`Detector.default_search`)
            or a list of stages ``{"param": name, "values": [...], "fixed": {...}}``; None
            keeps the hyperparameters as given. See :func:`search_inference_params`.
        search_synthesis: the synthetic anomalies of the pseudo-validation set (a kind of
            :func:`iadkit.synthesis.build_pseudo_validation`); None: the method's own
            (:attr:`Detector.search_synthesis`: "fragments" as in LafitE, "mixed" for PatchCore).
        search_textures: a texture folder (e.g. DTD ``images/``) for the pseudo-validation
            anomalies that paste textures; procedural textures when None.
        search_metric: the metric the search maximises (mean over categories).
        device: "auto" (CUDA when present), "cpu", "cuda", ...
        seed: seeds the validation split and the detectors.
        show_progress: show progress bars.
    """

    method: str
    data: str
    preset: str = "cpu"
    params: dict[str, Any] = field(default_factory=dict)
    categories: list[str] | None = None
    layout: str = "auto"
    setting: str = "one-class"
    seen_subclasses: list[str] | None = None
    unseen_subclasses: list[str] | None = None
    batch_size: int = 16
    workers: int = 0
    validation_fraction: float = 0.1
    threshold_quantile: float = 0.99
    search: str | list[dict[str, Any]] | None = None
    search_synthesis: str | None = None
    search_textures: str | None = None
    search_metric: str = "image_auroc"
    device: str = "auto"
    seed: int = 0
    show_progress: bool = True

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise IadkitError(f"unknown run settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    def tasks(self, data: str | None = None, categories: list[str] | None = None) -> list[Task]:
        samples = load_dataset(data or self.data, categories or self.categories, self.layout)
        return make_tasks(samples, self.setting, self.seen_subclasses, self.unseen_subclasses)

    def new_detector(self) -> Detector:
        return create_detector(self.method, self.preset, device=self.device, seed=self.seed,
                               **self.params)

    def search_stages(self, detector: Detector) -> list[dict[str, Any]]:
        """The search stages for ``detector`` ([] when there is no search)."""
        if self.search is None:
            return []
        if self.search == "default":
            if not detector.default_search:
                raise IadkitError(f"{detector.name} has no default search; give the stages "
                                  f"(inference parameters: {list(detector.inference_params)})")
            return [dict(stage) for stage in detector.default_search]
        if isinstance(self.search, str) or not isinstance(self.search, list):
            raise IadkitError(f"search must be 'default' or a list of stages, got {self.search!r}")
        return self.search

    def check_search(self, detector: Detector) -> None:
        """Refuse a search that could not run, before any training: bad stages, an unknown
        pseudo-validation kind, a missing texture folder."""
        stages = self.search_stages(detector)
        if not stages:
            return
        check_search_stages(detector, stages, self.search_metric)
        kind = self.search_synthesis or detector.search_synthesis
        if kind not in PSEUDO_VALIDATION_KINDS:
            raise IadkitError(f"unknown search_synthesis {kind!r}; choose from "
                              f"{PSEUDO_VALIDATION_KINDS}")
        if self.search_textures:
            TextureSource(self.search_textures)


# -- calibration ---------------------------------------------------------------------------------
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
            raise IadkitError(f"validation_fraction {fraction} leaves no training images of "
                              f"{category!r}")
        held.update(members[:n_validation])
    return (SampleSet(s for i, s in enumerate(train) if i not in held),
            SampleSet(s for i, s in enumerate(train) if i in held))


# -- prediction ----------------------------------------------------------------------------------
@dataclass
class Predictions:
    """Predictions for a sample set, in sample order."""

    samples: SampleSet
    scores: np.ndarray  # (N,)
    maps: np.ndarray  # (N, S, S) float32
    masks: np.ndarray  # (N, S, S) bool
    seconds: float
    preprocess: Preprocess

    @property
    def labels(self) -> np.ndarray:
        return np.array(self.samples.labels, dtype=int)


def predict_samples(detector: Detector, samples: SampleSet, batch_size: int = 16,
                    workers: int = 0, show_progress: bool = False,
                    description: str = "predict") -> Predictions:
    """Run a fitted detector over samples, keeping maps, scores and ground-truth masks."""
    size = detector.preprocess.output_size
    n = len(samples)
    scores = np.empty(n, dtype=np.float32)
    maps = np.empty((n, size, size), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=bool)
    loader = make_loader(samples, detector.preprocess, batch_size, workers)
    started = time.perf_counter()
    total = -(-n // batch_size)
    for batch in progress(loader, description, show_progress, total=total):
        index = batch["index"].numpy()
        prediction = detector.predict(batch["image"], categories=batch["category"])
        scores[index] = prediction.scores.numpy()
        maps[index] = prediction.anomaly_maps.numpy()
        masks[index] = batch["mask"].numpy() > 0.5
    return Predictions(samples, scores, maps, masks, time.perf_counter() - started,
                       detector.preprocess)


def fit_detector(config: RunConfig, task: Task, checkpoint_dir: Path | None = None) -> Detector:
    """Fit a fresh detector on a task's training images and calibrate it on held-out normals.

    ``checkpoint_dir`` keeps the training state of multi-epoch methods (see
    :meth:`Detector.fit`), so that an interrupted fit resumes.
    """
    detector = config.new_detector()
    train, validation = task.train, task.validation
    if len(validation) == 0:
        train, validation = holdout_split(task.train, config.validation_fraction, config.seed)
    loader = make_loader(train, detector.preprocess, config.batch_size, config.workers,
                         shuffle=False, seed=config.seed)
    started = time.perf_counter()
    detector.fit(loader, show_progress=config.show_progress, checkpoint_dir=checkpoint_dir)
    detector.fit_info_["seconds_fit"] = round(time.perf_counter() - started, 2)
    detector.fit_info_["n_train_images"] = len(train)
    detector.fit_info_["n_validation_images"] = len(validation)
    stages = config.search_stages(detector)
    if stages:
        if len(validation) < 2:
            raise IadkitError("an inference-parameter search needs held-out normal images: "
                              "set validation_fraction > 0")
        search = search_on_held_out_normals(
            detector, validation, stages, config.search_metric,
            config.search_synthesis, config.search_textures,
            config.seed, config.batch_size, config.workers, config.show_progress)
        detector.fit_info_["search"] = search
        log.info("search chose %s", search["chosen"])
    detector.calibration = None
    if len(validation):
        held = predict_samples(detector, validation, config.batch_size, config.workers,
                               config.show_progress, "calibrate")
        source = (f"{config.threshold_quantile:.3g} quantile of {len(validation)} normal "
                  "validation images held out from training")
        detector.calibration = calibrate(held.scores, held.maps, config.threshold_quantile, source)
    return detector


# -- inference-parameter search ------------------------------------------------------------------
def search_on_held_out_normals(detector: Detector, normals: SampleSet,
                               stages: Sequence[dict[str, Any]], metric: str = "image_auroc",
                               synthesis: str | None = None, textures: str | None = None,
                               seed: int = 0, batch_size: int = 16, workers: int = 0,
                               show_progress: bool = False) -> dict[str, Any]:
    """:func:`search_inference_params` on a pseudo-validation set made from ``normals``.

    ``normals`` must be images the detector was not fitted on. The set is written to a
    temporary folder and removed afterwards.

    Args:
        synthesis: the pseudo-validation kind; None: the detector's ``search_synthesis``.
        textures: a texture folder for the generators that paste textures (procedural if None).

    Returns:
        The search result, with ``"source"`` saying what the set was made of.
    """
    kind = synthesis or detector.search_synthesis
    texture_source = TextureSource(textures) if textures else None
    with tempfile.TemporaryDirectory(prefix="iadkit-pseudo-") as folder:
        pseudo = build_pseudo_validation(normals, folder, kind, detector.preprocess.output_size,
                                         texture_source, seed=seed)
        search = search_inference_params(detector, pseudo, stages, metric, batch_size, workers,
                                         show_progress)
    search["source"] = (f"{kind} pseudo-validation set made from {len(normals)} normal images "
                        "held out from training")
    return search


def check_search_stages(detector: Detector, stages: Sequence[dict[str, Any]],
                        metric: str) -> None:
    """Raise :class:`IadkitError` for a stage :func:`search_inference_params` cannot run."""
    for stage in stages:
        unknown = sorted(set(stage) - {"param", "values", "fixed", "metric"})
        if unknown or "param" not in stage or not stage.get("values"):
            raise IadkitError(f"a search stage needs 'param' and a non-empty 'values' list "
                              f"(and optionally 'fixed' and 'metric'), got {stage}")
        if stage.get("metric", metric) not in METRIC_KEYS:
            raise IadkitError(f"unknown search metric {stage.get('metric', metric)!r}; "
                              f"choose from {METRIC_KEYS}")
        names = [stage["param"], *stage.get("fixed", {})]
        wrong = [n for n in names if n not in detector.inference_params]
        if wrong:
            raise IadkitError(f"{detector.name} cannot search {wrong}: only inference "
                              f"parameters can, {list(detector.inference_params)}")


def search_inference_params(detector: Detector, validation: SampleSet,
                            stages: Sequence[dict[str, Any]], metric: str = "image_auroc",
                            batch_size: int = 16, workers: int = 0, show_progress: bool = False
                            ) -> dict[str, Any]:
    """Choose inference parameters of a fitted detector by a staged grid search.

    Each stage tries every value of one parameter (with the stage's ``fixed`` parameters set
    for the stage only), scores ``validation`` (a labelled set made without test data, e.g. by
    :func:`iadkit.synthesis.build_pseudo_validation`), and keeps the value with the best
    ``metric`` (mean over categories; the first on ties; a stage's own ``"metric"`` overrides
    it) for the following stages. The detector is left with the chosen values.

    Args:
        detector: a fitted detector.
        validation: labelled samples; pixel metrics are recorded where they have masks.
        stages: ``{"param": name, "values": [...], "fixed": {name: value}, "metric": key}``
            each (``fixed`` and ``metric`` optional), names from ``detector.inference_params``.
        metric: a key of :func:`score_predictions`' result (higher is better).

    Returns:
        ``{"metric", "chosen": {param: value}, "stages": [{"param", "fixed", "chosen",
        "curve": [{"value", "image_auroc", "pixel_auroc", ...}]}]}`` (JSON-friendly).

    Example:
        >>> search_inference_params(detector, pseudo, [{"param": "tau", "values": [100, 300]}])
    """
    check_search_stages(detector, stages, metric)
    groups = {c: validation.where(category=c) for c in validation.categories}
    result: dict[str, Any] = {"metric": metric, "n_images": len(validation), "stages": [],
                              "chosen": {}}
    for stage in stages:
        param, fixed = stage["param"], dict(stage.get("fixed", {}))
        stage_metric = stage.get("metric", metric)
        restore = {name: getattr(detector, name) for name in fixed}
        detector.set_inference_params(**fixed)
        curve = []
        for value in stage["values"]:
            detector.set_inference_params(**{param: value})
            point: dict[str, Any] = {"value": value}
            per_group = [score_predictions(
                predict_samples(detector, group, batch_size, workers, show_progress,
                                f"search {param}={value}"), group.has_masks)
                for group in groups.values()]
            for key in dict.fromkeys(("image_auroc", "image_ap", "pixel_auroc", stage_metric)):
                values = [g[key] for g in per_group if g.get(key) is not None]
                point[key] = round(float(np.mean(values)), 5) if values else None
            if point[stage_metric] is None:
                raise IadkitError(f"the search metric {stage_metric} needs masks, and the "
                                  "validation set has none")
            curve.append(point)
        best = max(curve, key=lambda p: p[stage_metric])  # max keeps the first of equal values
        detector.set_inference_params(**restore, **{param: best["value"]})
        result["stages"].append({"param": param, "fixed": fixed, "metric": stage_metric,
                                 "chosen": best["value"], "curve": curve})
        result["chosen"][param] = best["value"]
    return result


# -- evaluation ----------------------------------------------------------------------------------
def score_predictions(predictions: Predictions, pixel: bool) -> dict[str, Any]:
    """The metric set of one test group (pixel metrics None where masks are missing)."""
    result: dict[str, Any] = {"n_images": len(predictions.samples),
                              "n_anomalous": int(predictions.labels.sum())}
    result.update(metrics.image_metrics(predictions.labels, predictions.scores))
    if pixel:
        result.update(metrics.pixel_metrics(predictions.masks, predictions.maps))
    else:
        result.update(pixel_auroc=None, pixel_ap=None, pixel_f1_max=None, pixel_aupro=None)
    return result


def _concat(parts: Sequence[Predictions]) -> Predictions:
    samples = SampleSet([s for p in parts for s in p.samples])
    return Predictions(samples, np.concatenate([p.scores for p in parts]),
                       np.concatenate([p.maps for p in parts]),
                       np.concatenate([p.masks for p in parts]), sum(p.seconds for p in parts),
                       parts[0].preprocess)


def _mean(groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    mean: dict[str, Any] = {}
    for key in METRIC_KEYS:
        values = [g[key] for g in groups.values() if g.get(key) is not None]
        mean[key] = float(np.mean(values)) if values and len(values) == len(groups) else None
    return mean


@dataclass
class TaskEvaluation:
    """Metrics of one task, with the predictions behind them (for reports)."""

    task: str
    per_group: dict[str, dict[str, Any]]
    pooled: dict[str, Any] | None
    predictions: dict[str, Predictions]
    calibration: dict[str, Any] | None


def evaluate_task(detector: Detector, task: Task, batch_size: int = 16, workers: int = 0,
                  show_progress: bool = False) -> TaskEvaluation:
    per_group, predictions = {}, {}
    for name, group in task.test_groups.items():
        if len(group) == 0:
            raise IadkitError(f"test group {name!r} of task {task.name!r} has no images")
        predicted = predict_samples(detector, group, batch_size, workers, show_progress,
                                    f"test {name}")
        predictions[name] = predicted
        per_group[name] = score_predictions(predicted, group.has_masks)
        per_group[name]["ms_per_image"] = round(1000 * predicted.seconds / len(group), 2)
    pooled = None
    if task.pooled:
        pooled = score_predictions(_concat(list(predictions.values())), pixel=False)
        # Pixel metrics pool the groups with masks: image-level-only categories have no pixels
        # to score.
        with_masks = [name for name, group in task.test_groups.items() if group.has_masks]
        if with_masks:
            pixels = score_predictions(_concat([predictions[n] for n in with_masks]), pixel=True)
            pooled.update({k: pixels[k] for k in PIXEL_KEYS})
            pooled["pixel_groups"] = with_masks
    return TaskEvaluation(task.name, per_group, pooled, predictions,
                          getattr(detector, "calibration", None))


def summarise(evaluations: Sequence[TaskEvaluation], setting: str) -> dict[str, Any]:
    """The flat results object ``iadkit test --json`` writes."""
    per_category: dict[str, dict[str, Any]] = {}
    for evaluation in evaluations:
        per_category.update(evaluation.per_group)
    pooled = [e.pooled for e in evaluations if e.pooled is not None]
    headline = {k: pooled[0][k] for k in METRIC_KEYS} if pooled else _mean(per_category)
    return {"setting": setting, **headline, "per_category": per_category,
            "pooled": pooled[0] if pooled else None}


# -- run folders ---------------------------------------------------------------------------------
def fit_run(config: RunConfig, run_dir: str | Path, resume: bool = False) -> list[Path]:
    """Fit one detector per task and save them (with ``run.json``) under ``run_dir``.

    With ``resume``, models already saved by an interrupted run with the same settings are kept,
    an interrupted training continues from its last checkpoint, and only what is missing is
    fitted.
    """
    run_dir = Path(run_dir)
    # Fail fast, before any training, on a bad method, preset, hyperparameter or search.
    config.check_search(config.new_detector())
    tasks = config.tasks()
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"config": asdict(config), "tasks": [t.name for t in tasks],
              "iadkit_version": _version()}
    record_file = run_dir / RUN_FILE
    if resume and record_file.is_file():
        before = json.loads(record_file.read_text())["config"]
        if any(before.get(key) != record["config"][key] for key in MODEL_SETTINGS):
            raise IadkitError(f"{run_dir} was fitted with other settings; use another --out "
                              "folder or drop --resume")
    # Written before fitting, so that a run interrupted at any point can be resumed.
    record_file.write_text(json.dumps(record, indent=2))
    saved = []
    for task in tasks:
        model_dir = run_dir / "models" / task.name
        if resume and (model_dir / "detector.json").is_file():
            log.info("keeping the finished model %s", model_dir)
            saved.append(model_dir)
            continue
        log.info("fitting %s on %d images (%s)", config.method, len(task.train), task.name)
        training_dir = model_dir.with_name(model_dir.name + ".training")
        if not resume and training_dir.exists():
            shutil.rmtree(training_dir)
        detector = fit_detector(config, task, training_dir)
        # Save to a temporary folder, then rename: an interruption never leaves half a model.
        partial = model_dir.with_name(model_dir.name + ".partial")
        detector.save(partial)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        partial.rename(model_dir)
        saved.append(model_dir)
        log.info("saved %s (%.1f s)", model_dir, detector.fit_info_["seconds_fit"])
    return saved


def read_run(run_dir: str | Path) -> tuple[RunConfig, list[str]]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise IadkitError(f"{path}: missing; {run_dir} is not a run folder made by 'iadkit fit'")
    record = json.loads(path.read_text())
    return RunConfig.from_dict(record["config"]), record["tasks"]


def resolve_model_dir(path: str | Path, model: str | None = None) -> Path:
    """A saved detector's folder from a model folder, or from a run folder (``model`` picks one
    of several models; a run with one model needs none)."""
    path = Path(path)
    if (path / "detector.json").is_file():
        return path
    _, tasks = read_run(path)
    if model is None and len(tasks) > 1:
        raise IadkitError(f"{path} holds several models {tasks}; choose one with --model")
    chosen = model or tasks[0]
    if chosen not in tasks:
        raise IadkitError(f"{path} has no model {chosen!r}; models: {tasks}")
    return path / "models" / chosen


def test_run(run_dir: str | Path, data: str | None = None, categories: list[str] | None = None,
             device: str | None = None, show_progress: bool = False
             ) -> tuple[dict[str, Any], list[TaskEvaluation]]:
    """Evaluate the saved detectors of a run folder on the test split of its setting."""
    config, task_names = read_run(run_dir)
    evaluations = []
    for task in config.tasks(data, categories):
        model_dir = Path(run_dir) / "models" / task.name
        if task.name not in task_names or not model_dir.is_dir():
            raise IadkitError(f"{run_dir}: no model for {task.name!r}; trained: {task_names}")
        detector = Detector.load(model_dir, device=device or config.device)
        evaluations.append(evaluate_task(detector, task, config.batch_size, config.workers,
                                         show_progress))
    return summarise(evaluations, config.setting), evaluations


@dataclass
class FilePrediction:
    """The prediction for one image file, or why there is none."""

    path: Path
    score: float | None
    anomaly_map: np.ndarray | None
    error: str | None = None


def iter_predictions(detector: Detector, paths: Sequence[Path], batch_size: int = 16
                     ) -> Iterator[FilePrediction]:
    """Predictions for image files, batch by batch, in bounded memory.

    A file that cannot be read yields a prediction with ``error`` set (naming the file and the
    problem); the other files are still scored.
    """
    preprocess: Preprocess = detector.preprocess
    for start in range(0, len(paths), batch_size):
        readable, images = [], []
        for path in paths[start:start + batch_size]:
            try:
                images.append(preprocess.load(path))
                readable.append(path)
            except ImageReadError as error:
                yield FilePrediction(Path(path), None, None, str(error))
        if not images:
            continue
        prediction = detector.predict(torch.stack(images))
        for path, score, anomaly_map in zip(readable, prediction.scores, prediction.anomaly_maps):
            yield FilePrediction(Path(path), float(score), anomaly_map.numpy())


def _version() -> str:
    from . import __version__

    return __version__
