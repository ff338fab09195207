"""The benchmark grid runner: cells, resume after a kill, result files."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from iadkit.benchmark import load_grid
from iadkit.cli import main
from iadkit.errors import IadkitError

METHODS = [{"name": "patchcore", "params": {"image_size": 64, "coreset_ratio": 0.25}},
           {"name": "patchcore", "params": {"image_size": 64, "coreset_ratio": 0.5}}]
GRID = {
    "methods": METHODS[:1],
    "settings": ["one-class", "absolute-unified"],
    "options": {"device": "cpu", "batch_size": 8},
}


def _grid_file(tmp_path: Path, toy_root: Path, **changes) -> Path:
    grid = {**GRID, "datasets": [{"name": "toy", "root": str(toy_root)}], **changes}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_grid_crosses_methods_datasets_and_settings(tmp_path: Path, toy_root: Path) -> None:
    cells = load_grid(_grid_file(tmp_path, toy_root, methods=METHODS))
    assert len(cells) == 4
    assert len({cell.id for cell in cells}) == 4
    assert {cell.config.setting for cell in cells} == {"one-class", "absolute-unified"}


@pytest.mark.parametrize(("changes", "message"), [
    ({"settings": ["two-class"]}, "unknown settings"),
    ({"methods": ["nope"]}, "unknown method"),
    ({"methods": [{"name": "patchcore", "params": {"colour": 1}}]}, "no hyperparameter"),
    ({"settings": ["unseen-subclass"]}, "needs subclasses"),
    ({"options": {"gpus": 8}}, "unknown options"),
])
def test_bad_grids_fail_before_running(tmp_path: Path, toy_root: Path, changes: dict,
                                       message: str) -> None:
    with pytest.raises(IadkitError, match=message):
        load_grid(_grid_file(tmp_path, toy_root, **changes))


def test_benchmark_resumes_after_being_killed_and_writes_parsable_results(
        tmp_path: Path, toy_root: Path) -> None:
    grid = _grid_file(tmp_path, toy_root)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "iadkit.cli", "benchmark", str(grid), "--out", str(out),
               "--quiet"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    first = out / "cells" / load_grid(grid)[0].id / "result.json"
    deadline = time.monotonic() + 240
    while not first.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.is_file(), "the first cell never finished"
    os.killpg(process.pid, signal.SIGKILL)  # the whole process group, cell child included
    process.wait()
    finished_before = {p.parent.name: p.stat().st_mtime_ns
                       for p in (out / "cells").glob("*/result.json")}
    assert len(finished_before) == 1

    assert main(["benchmark", str(grid), "--out", str(out), "--quiet"]) == 0
    for name, mtime in finished_before.items():  # finished cells were not run again
        assert (out / "cells" / name / "result.json").stat().st_mtime_ns == mtime

    records = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in records] == ["ok"] * 2
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    for row in rows:
        assert 0.0 <= float(row["image_auroc"]) <= 1.0
        assert float(row["images_per_second"]) > 0
        assert float(row["backbone_images_per_second"]) > 0
        assert float(row["peak_rss_gb"]) > 0
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| method | preset | dataset | setting")
    assert len(table) == 2 + 2
    unified = [r for r in records if r["setting"] == "absolute-unified"]
    assert all(r["n_test"] == 24 for r in unified)  # both toy categories pooled


def test_a_failing_cell_is_recorded_and_the_grid_goes_on(tmp_path: Path, toy_root: Path) -> None:
    grid = _grid_file(tmp_path, toy_root, settings=["one-class"],
                      datasets=[{"name": "toy", "root": str(toy_root)},
                                {"name": "missing", "root": str(tmp_path / "nowhere")}])
    out = tmp_path / "out"
    assert main(["benchmark", str(grid), "--out", str(out), "--quiet"]) == 1
    records = {r["dataset"]: r for r in json.loads((out / "results.json").read_text())}
    assert records["toy"]["status"] == "ok"
    assert records["missing"]["status"] == "failed"
    assert "nowhere" in records["missing"]["error"]
