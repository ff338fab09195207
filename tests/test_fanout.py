"""Fanning out on Ray (a local instance of two CPUs): a grid and a batch prediction give the
local executor's files; and prediction split over torchrun's ranks gives the one-process rows.
Bad executors and addresses are refused with one clear error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from test_distributed import _iadkit

from iadkit.cli import main

ray = pytest.importorskip("ray")

TIMINGS = ("fit_seconds", "images_per_second", "backbone_images_per_second", "peak_rss_gb",
           "ms_per_image")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def _without_timings(value, rel: float | None = None):
    """``value`` without its timings; with ``rel``, its numbers compared up to that relative
    difference (a Ray cell runs on one thread, the local one on two: the features differ in
    the last bits)."""
    if isinstance(value, dict):
        return {k: _without_timings(v, rel) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v, rel) for v in value]
    if isinstance(value, float) and rel is not None:
        return pytest.approx(value, rel=rel)
    return value


def test_a_grid_on_ray_gives_the_local_executors_results(local_ray, tmp_path: Path,
                                                         toy_root: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "methods": [{"name": "patchcore", "params": {"image_size": 64, "coreset_ratio": 0.25}}],
        "datasets": [{"name": "toy", "root": str(toy_root), "categories": ["alpha"]}],
        "settings": ["one-class", "model-unified"],
        "options": {"device": "cpu", "batch_size": 8}}))
    assert main(["benchmark", str(grid), "--out", str(tmp_path / "local"), "--quiet"]) == 0
    assert main(["benchmark", str(grid), "--out", str(tmp_path / "ray"), "--quiet",
                 "--executor", "ray"]) == 0
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    on_ray = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert len(on_ray) == 2 and all(r["status"] == "ok" for r in on_ray)
    assert _without_timings(on_ray) == _without_timings(local, rel=1e-4)


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]


def test_prediction_on_ray_actors_and_on_two_ranks_gives_the_local_rows(
        local_ray, fitted_patchcore, toy_root: Path, tmp_path: Path) -> None:
    detector, _ = fitted_patchcore
    fitted_run = detector.save(tmp_path / "model")
    images = str(toy_root / "alpha" / "test")
    assert main(["predict", str(fitted_run), images, "--out", str(tmp_path / "local"),
                 "--quiet", "--batch-size", "4"]) == 0
    assert main(["predict", str(fitted_run), images, "--out", str(tmp_path / "ray"),
                 "--quiet", "--batch-size", "4", "--executor", "ray", "--actors", "2"]) == 0
    _iadkit("predict", str(fitted_run), images, "--out", str(tmp_path / "ranks"),
            "--batch-size", "4", ranks=2)
    local = _rows(tmp_path / "local")
    assert len(local) == 12
    assert _rows(tmp_path / "ray") == local
    assert _rows(tmp_path / "ranks") == local
    for folder in ("ray", "ranks"):  # the same heatmaps, written by the workers
        assert sorted(p.name for p in (tmp_path / folder / "heatmaps").iterdir()) == \
            sorted(p.name for p in (tmp_path / "local" / "heatmaps").iterdir())
    assert (tmp_path / "ray" / "scores.csv").read_text() == \
        (tmp_path / "local" / "scores.csv").read_text()


def test_bad_executors_and_addresses_are_refused_before_any_work(
        tmp_path: Path, toy_root: Path, capsys, monkeypatch) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "methods": ["patchcore"], "datasets": [{"name": "toy", "root": str(toy_root)}]}))
    out = tmp_path / "out"
    cases = [
        (["--executor", "dask"], "--executor 'dask': one of local, ray"),
        (["--address", "127.0.0.1:6379"], "--address is the Ray cluster's"),
        (["--executor", "ray", "--address", "127.0.0.1:1"],
         "--address 127.0.0.1:1: no Ray cluster answers there"),
        (["--executor", "ray", "--address", "nowhere"], "expected HOST:PORT"),
    ]
    for flags, message in cases:
        assert main(["benchmark", str(grid), "--out", str(out), "--quiet", *flags]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["benchmark", str(grid), "--out", str(out), "--quiet",
                 "--executor", "ray"]) == 2
    assert "--executor ray needs Ray: pip install 'iadkit[ray]'" in capsys.readouterr().err
    assert not (out / "cells").exists()
