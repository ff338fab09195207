"""Run folders: fit the detectors of a run configuration (calibrated, see :mod:`.calibrate`)
and save them, resume an interrupted run, and test a saved run.

Thresholds are fitted on normal scores no model was fitted on (held-out, leave-one-out or
cross-fitted), never on the test set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from .. import distributed
from ..data.dataset import make_loader
from ..data.layouts import detect_layout
from ..data.settings import Task
from ..errors import CheckpointError, IadkitError
from ..files import read_json_record, write_text_atomic
from ..methods import Detector
from .calibrate import CalibrationPlan, calibrate, plan_calibration
from .config import RunConfig
from .evaluation import TaskEvaluation, evaluate_task, summarise
from .protocols import check_protocol, protocol_results
from .search import search_on_held_out_normals

log = logging.getLogger("iadkit")

RUN_FILE = "run.json"


def fit_detector(config: RunConfig, task: Task, checkpoint_dir: Path | None = None,
                 plan: CalibrationPlan | None = None) -> Detector:
    """Fit a fresh detector on a task's training images and calibrate it (see
    :mod:`.calibrate`; ``plan`` is made here when not given).

    ``checkpoint_dir`` keeps the training state of multi-epoch methods (see
    :meth:`Detector.fit`), so that an interrupted fit resumes.
    """
    detector = config.new_detector()
    plan = plan or plan_calibration(config, detector, task)
    train, held_out = plan.fit_samples, plan.held_out
    # Not shuffled: a training image's position is its index for leave-one-out calibration.
    loader = make_loader(train, detector.preprocess, config.batch_size, config.loader_workers,
                         shuffle=False, seed=config.seed)
    started = time.perf_counter()
    detector.fit(loader, show_progress=config.show_progress, checkpoint_dir=checkpoint_dir)
    assert detector.fit_info_ is not None
    detector.fit_info_["seconds_fit"] = round(time.perf_counter() - started, 2)
    detector.fit_info_["n_train_images"] = len(train)
    detector.fit_info_["n_validation_images"] = len(held_out)
    if config.search is not None:
        if len(held_out) < 2:
            raise IadkitError("an inference-parameter search needs held-out normal images: "
                              "set validation_fraction > 0")
        search = search_on_held_out_normals(detector, held_out, config.search, config.seed,
                                            config.batch_size, config.loader_workers,
                                            config.show_progress)
        detector.fit_info_["search"] = search
        log.info("search chose %s", search["chosen"])
    started = time.perf_counter()
    detector.calibration = calibrate(detector, plan, config)
    detector.fit_info_["seconds_calibration"] = round(time.perf_counter() - started, 2)
    return detector


def fit_run(config: RunConfig, run_dir: str | Path, resume: bool = False) -> list[Path]:
    """Fit one detector per task and save them (with ``run.json``) under ``run_dir``.

    With ``resume``, models already saved by an interrupted run with the same settings are kept,
    an interrupted training continues from its last checkpoint, and only what is missing is
    fitted.
    """
    run_dir = Path(run_dir)
    # The run folder works from any directory: it records the data folder's absolute path
    # (and the path as given, for display).
    data_as_given = config.data
    config = dataclasses.replace(config, data=str(Path(config.data).resolve()))
    # Fail fast, before any data is read or anything trained: a bad method, preset,
    # hyperparameter, search, backbone or folder.
    detector = config.new_detector()
    if config.search is not None:
        config.search.check(detector)
    detector.check_resources()
    tasks = config.tasks()
    config.check_references(detector, tasks)
    plans = {task.name: plan_calibration(config, detector, task) for task in tasks}
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"config": config.to_dict(), "data_as_given": data_as_given,
              "tasks": [t.name for t in tasks], "iadkit_version": _version()}
    record_file = run_dir / RUN_FILE
    if resume and record_file.is_file():
        before, _ = read_run(run_dir)
        before = dataclasses.replace(before, data=str(Path(before.data).resolve()))
        if before.model_settings() != config.model_settings():
            raise IadkitError(f"{run_dir} was fitted with other settings; use another --out "
                              "folder or drop --resume")
    # Under torchrun every rank fits (each its share of the work) and rank 0 alone writes;
    # the others wait for its files before they read them.
    distributed.barrier()
    # Written before fitting, so that a run interrupted at any point can be resumed.
    if distributed.is_main():
        write_text_atomic(record_file, json.dumps(record, indent=2))
    saved = []
    for task in tasks:
        model_dir = run_dir / "models" / task.name
        if resume and (model_dir / "detector.json").is_file():
            log.info("keeping the finished model %s", model_dir)
            saved.append(model_dir)
            continue
        log.info("fitting %s on %d images (%s)", config.method, len(task.train), task.name)
        training_dir = model_dir.with_name(model_dir.name + ".training")
        if not resume and training_dir.exists() and distributed.is_main():
            shutil.rmtree(training_dir)
        distributed.barrier()
        detector = fit_detector(config, task, training_dir, plans[task.name])
        if distributed.is_main():
            # Save to a temporary folder, then rename: an interruption never leaves half a
            # model.
            partial = model_dir.with_name(model_dir.name + ".partial")
            detector.save(partial)
            if model_dir.exists():
                shutil.rmtree(model_dir)
            partial.rename(model_dir)
        distributed.barrier()
        saved.append(model_dir)
        log.info("saved %s (%.1f s)", model_dir, (detector.fit_info_ or {})["seconds_fit"])
    return saved


def read_run(run_dir: str | Path) -> tuple[RunConfig, list[str]]:
    """The configuration and model names of a run folder.

    Raises:
        CheckpointError: ``run.json`` missing, damaged, or holding settings this version
            cannot read (the field named).
    """
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {run_dir} is not a run folder made by "
                              "'iadkit fit'")
    record = read_json_record(path, {"config": dict, "tasks": list})
    tasks = record["tasks"]
    if not tasks or not all(isinstance(name, str) and name for name in tasks):
        raise CheckpointError(f"{path}: damaged, field 'tasks' must list the models' names")
    try:
        config = RunConfig.from_dict(record["config"])
    except (IadkitError, TypeError) as error:
        raise CheckpointError(f"{path}: damaged, field 'config': {error}") from None
    return config, tasks


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
             device: str | None = None, show_progress: bool = False,
             accept_backbone_change: bool = False, protocol: str | None = None,
             views: str = "max", precision: str | None = None
             ) -> tuple[dict[str, Any], list[TaskEvaluation]]:
    """Evaluate the saved detectors of a run folder on the test split of its setting
    (``accept_backbone_change`` and ``precision``: see :meth:`Detector.load`); with ``protocol`` (see
    :mod:`.protocols`; ``views`` for multi-view samples), the results gain that benchmark's
    table as ``"protocol"``. A protocol that cannot apply is refused before any prediction."""
    config, task_names = read_run(run_dir)
    tasks = config.tasks(data, categories)
    chosen = None
    if protocol is not None:
        layout = config.layout if config.layout != "auto" else \
            detect_layout(Path(data or config.data))
        chosen = check_protocol(protocol, layout, config.setting, views)
        for task in tasks:
            for group in task.test_groups.values():
                chosen.check_data(group)
    evaluations = []
    for task in tasks:
        model_dir = Path(run_dir) / "models" / task.name
        if task.name not in task_names:
            raise IadkitError(f"{run_dir}: no model for {task.name!r}; the run's models: "
                              f"{task_names}")
        if not (model_dir / "detector.json").is_file():
            raise IadkitError(f"{run_dir}: the model for {task.name!r} was never saved (its fit "
                              "did not finish); complete it with the same 'iadkit fit' command "
                              "and --resume")
        detector = Detector.load(model_dir, device=device or config.device,
                                 accept_backbone_change=accept_backbone_change,
                                 precision=precision)
        if chosen is not None:
            chosen.check_model(task.name, detector.calibration)
        evaluations.append(evaluate_task(detector, task, config.batch_size, config.loader_workers,
                                         show_progress, config.reference_normals, config.seed))
    results = summarise(evaluations, config.setting)
    if chosen is not None:
        results["protocol"] = protocol_results(chosen, evaluations, views)
    return results, evaluations


def _version() -> str:
    from .. import __version__

    return __version__
