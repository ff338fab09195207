"""Benchmark grids: methods x presets x datasets x settings, run cell by cell, resumable.

A grid file (YAML) names what to cross::

    methods:
      - patchcore                                   # preset cpu, preset defaults
      - {name: rd, presets: [cpu], params: {epochs: 2}}
    datasets:
      - {name: tiles, root: ../shared/data/magnetic_tile}
      - {name: toy, root: data/toy, categories: [alpha, beta]}
    settings: [one-class, model-unified]
    subclasses: {seen: [mono], unseen: [poly]}      # only for the unseen-subclass setting
    options: {device: auto, batch_size: 16, seed: 0, validation_fraction: 0.1}

Every cell runs in its own process (so its peak memory is its own) and leaves
``cells/<id>/result.json``; a cell with a result is never run again, and an interrupted cell
resumes its run folder (finished models are kept, training continues from its checkpoint).
After every cell, ``results.json``, ``results.csv`` and ``results.md`` are rewritten from the
finished cells.

Example:
    >>> cells = load_grid("grid.yaml")
    >>> run_grid(cells, "bench_out")
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .data.settings import SETTINGS
from .engine.config import RunConfig
from .errors import IadkitError
from .fanout import check_executor, start_ray
from .progress import progress

OPTION_KEYS = ("device", "batch_size", "seed", "validation_fraction", "workers")
#: Columns of results.csv and results.md, in order.
COLUMNS = ("method", "preset", "dataset", "setting", "status", "image_auroc", "image_ap",
           "pixel_auroc", "pixel_ap", "pixel_aupro", "fit_seconds", "images_per_second",
           "backbone_images_per_second", "peak_rss_gb", "n_train", "n_test")
RESULT_FILE = "result.json"


@dataclass
class Cell:
    """One run of the grid: a method with a preset and hyperparameters, on a dataset, in a
    setting; all of it is the cell's run configuration."""

    dataset: str
    config: RunConfig

    @property
    def id(self) -> str:
        """A folder-safe name; the hyperparameters are part of it, so two variants of one
        method are two cells."""
        config = self.config
        parts = [config.method, config.preset, self.dataset, config.setting]
        if config.params:
            parts.append("-".join(f"{k}={v}" for k, v in sorted(config.params.items())))
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "__".join(parts))[:180]

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Cell:
        return cls(values["dataset"], RunConfig.from_dict(values["config"]))


def load_grid(path: str | Path) -> list[Cell]:
    """Read a grid file (see the module docstring) into its cells, in run order."""
    path = Path(path)
    try:
        grid = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise IadkitError(f"{path}: cannot read the grid ({error})") from None
    if not isinstance(grid, dict):
        raise IadkitError(f"{path}: a grid is a mapping with methods, datasets and settings")
    unknown = sorted(set(grid) - {"methods", "datasets", "settings", "subclasses", "options"})
    if unknown:
        raise IadkitError(f"{path}: unknown grid keys {unknown}")
    for needed in ("methods", "datasets"):
        if not grid.get(needed):
            raise IadkitError(f"{path}: the grid needs at least one entry under {needed!r}")
    settings = grid.get("settings") or ["one-class"]
    bad = sorted(set(settings) - set(SETTINGS))
    if bad:
        raise IadkitError(f"{path}: unknown settings {bad}; choose from {list(SETTINGS)}")
    options = grid.get("options") or {}
    bad = sorted(set(options) - set(OPTION_KEYS))
    if bad:
        raise IadkitError(f"{path}: unknown options {bad}; known: {list(OPTION_KEYS)}")
    subclasses = grid.get("subclasses") or {}
    if "unseen-subclass" in settings and not subclasses.get("unseen"):
        raise IadkitError(f"{path}: the unseen-subclass setting needs subclasses: "
                          "{seen: [...], unseen: [...]}")
    base = path.parent
    cells = []
    for method in grid["methods"]:
        entry = {"name": method} if isinstance(method, str) else dict(method)
        if "name" not in entry:
            raise IadkitError(f"{path}: a method entry needs a name: {method!r}")
        for dataset in grid["datasets"]:
            if not isinstance(dataset, dict) or "root" not in dataset:
                raise IadkitError(f"{path}: a dataset entry needs a root: {dataset!r}")
            root = Path(dataset["root"]).expanduser()
            root = root if root.is_absolute() else (base / root)
            for preset in entry.get("presets", ["cpu"]):
                for setting in settings:
                    unseen = setting == "unseen-subclass"
                    cells.append(Cell(str(dataset.get("name", root.name)), RunConfig(
                        method=entry["name"], preset=preset, params=entry.get("params") or {},
                        data=str(root.resolve()), categories=dataset.get("categories"),
                        layout=dataset.get("layout", "auto"), setting=setting,
                        seen_subclasses=subclasses.get("seen") if unseen else None,
                        unseen_subclasses=subclasses.get("unseen") if unseen else None,
                        show_progress=False, **options)))
    ids = [cell.id for cell in cells]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise IadkitError(f"{path}: cells repeat: {duplicated}")
    for cell in cells:  # a bad method, preset or hyperparameter fails now, not hours later
        cell.config.new_detector()
    return cells


def run_grid(cells: list[Cell], out_dir: str | Path, show_progress: bool = True,
             executor: str = "local", address: str | None = None, cpus_per_cell: int = 1
             ) -> list[dict[str, Any]]:
    """Run the cells that have no result yet, each in a child process; returns every record.

    A cell that fails records ``status: "failed"`` and its error, and is tried again the next
    time the grid runs; the others go on. With ``executor="ray"`` the cells run as Ray tasks
    (``cpus_per_cell`` CPUs each, and a GPU for a cell on CUDA) on the cluster at ``address``
    or a local Ray instance; the results files are the same.
    """
    check_executor(executor, address)
    out_dir = Path(out_dir)
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
    pending = []
    for cell in cells:
        cell_dir = out_dir / "cells" / cell.id
        result = _read_result(cell_dir)
        if result is not None and result.get("status") == "ok":
            continue
        cell_dir.mkdir(parents=True, exist_ok=True)
        (cell_dir / "cell.json").write_text(json.dumps(cell.to_dict(), indent=2))
        pending.append((cell, cell_dir))
    if executor == "ray":
        ray = start_ray(address)
        task = ray.remote(run_cell_process)
        waiting = {task.options(num_cpus=cpus_per_cell,
                                num_gpus=1 if cell.config.device.startswith("cuda") else 0)
                   .remote(cell.to_dict(), str(cell_dir), cpus_per_cell): cell
                   for cell, cell_dir in pending}
        bar = progress(range(len(waiting)), "benchmark cells", show_progress)
        for _ in bar:
            finished, _ = ray.wait(list(waiting), num_returns=1)
            ray.get(finished[0])  # a cell's own failures are in its result; this re-raises Ray's
            del waiting[finished[0]]
            write_outputs(out_dir, _collect(cells, out_dir))
    else:
        for cell, cell_dir in progress(pending, "benchmark cells", show_progress):
            run_cell_process(cell.to_dict(), str(cell_dir), None)
            write_outputs(out_dir, _collect(cells, out_dir))
    records = _collect(cells, out_dir)
    write_outputs(out_dir, records)
    return records


def run_cell_process(cell: dict[str, Any], cell_dir: str, threads: int | None) -> None:
    """Run one cell (its ``cell.json`` written) in a child process, with ``threads`` torch
    threads; a child that dies before writing its result gets a failed one."""
    cell_dir_path = Path(cell_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    completed = subprocess.run([sys.executable, "-m", "iadkit.benchmark",
                                str(cell_dir_path / "cell.json")],
                               capture_output=True, text=True, check=False, env=env)
    (cell_dir_path / "log.txt").write_text(completed.stdout + completed.stderr)
    if _read_result(cell_dir_path) is None:  # the child died before it could write a result
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:]
        _write_result(cell_dir_path, {**_identity(Cell.from_dict(cell)), "status": "failed",
                                      "error": f"exit code {completed.returncode}: "
                                               f"{tail[0] if tail else 'no output'}"})


def run_cell(cell_file: str | Path) -> dict[str, Any]:
    """Fit (resuming), evaluate and time one cell; writes its ``result.json``."""
    from .engine import fit_run, test_run

    cell_dir = Path(cell_file).parent
    cell = Cell.from_dict(json.loads(Path(cell_file).read_text()))
    record: dict[str, Any] = _identity(cell)
    try:
        started = time.perf_counter()
        models = fit_run(cell.config, cell_dir / "run", resume=True)
        record["fit_seconds"] = round(time.perf_counter() - started, 2)
        results, evaluations = test_run(cell_dir / "run")
        record.update({key: results.get(key) for key in COLUMNS if key in results})
        predictions = [p for e in evaluations for p in e.predictions.values()]
        n_test = sum(len(p.samples) for p in predictions)
        record["n_test"] = n_test
        record["images_per_second"] = round(n_test / sum(p.seconds for p in predictions), 2)
        record["backbone_images_per_second"] = _backbone_rate(models[0], predictions[0])
        record["n_train"] = sum(json.loads((m / "detector.json").read_text())
                                ["fit_info"].get("n_train_images", 0) for m in models)
        record["per_category"] = results["per_category"]
        record["status"] = "ok"
    except (IadkitError, ValueError, OSError, RuntimeError) as error:
        record.update(status="failed", error=f"{type(error).__name__}: {error}")
    record["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)
    _write_result(cell_dir, record)
    return record


def write_outputs(out_dir: str | Path, records: list[dict[str, Any]]) -> None:
    """results.json (everything), results.csv and results.md (the headline columns)."""
    out_dir = Path(out_dir)
    (out_dir / "results.json").write_text(json.dumps(records, indent=2))
    with (out_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for record in records:
        lines.append("| " + " | ".join(_cell_text(record.get(key)) for key in COLUMNS) + " |")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")


def _cell_text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _identity(cell: Cell) -> dict[str, Any]:
    config = cell.config
    return {"id": cell.id, "method": config.method, "preset": config.preset,
            "params": config.params, "dataset": cell.dataset, "setting": config.setting}


def _backbone_rate(model_dir: Path, predictions: Any, count: int = 32) -> float | None:
    """Images/second of the detector's frozen backbone alone, on up to ``count`` of the test
    images (already preprocessed): the floor of any feature-based method."""
    import torch

    from .data import make_loader
    from .methods import Detector

    detector = Detector.load(model_dir)
    try:
        extractor = detector.extractor
    except (IadkitError, AttributeError):  # a detector without a backbone of its own
        return None
    batch = next(iter(make_loader(predictions.samples, detector.preprocess, count)))
    images = batch["image"].to(detector.torch_device)
    with torch.no_grad():
        extractor(images[:2])
        started = time.perf_counter()
        for chunk in images.split(16):
            extractor(chunk)
        if images.is_cuda:
            torch.cuda.synchronize()
    return round(images.shape[0] / (time.perf_counter() - started), 2)


def _read_result(cell_dir: Path) -> dict[str, Any] | None:
    path = cell_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:  # written half when the process was killed: run again
        return None


def _write_result(cell_dir: Path, record: dict[str, Any]) -> None:
    partial = cell_dir / (RESULT_FILE + ".partial")
    partial.write_text(json.dumps(record, indent=2))
    partial.replace(cell_dir / RESULT_FILE)


def _collect(cells: list[Cell], out_dir: Path) -> list[dict[str, Any]]:
    records = []
    for cell in cells:
        result = _read_result(out_dir / "cells" / cell.id)
        if result is not None:
            records.append(result)
    return records


def main() -> None:
    """Child-process entry: ``python -m iadkit.benchmark CELL_JSON``."""
    parser = argparse.ArgumentParser(description="run one benchmark cell (used by run_grid)")
    parser.add_argument("cell_file")
    run_cell(parser.parse_args().cell_file)


if __name__ == "__main__":
    main()
