"""The classic baselines beside ours on every real set: PaDiM, STFPM (and EfficientAD when
registered) next to PatchCore and RD, cpu presets, one-class setting.

Prints one JSON line per (set, method): image AUROC, pixel AUROC, AUPRO (when the set has
masks), the whole fit's seconds (training and calibration, as ``iadkit fit`` runs it), ms per
image and images/second of prediction, the backbone alone's images/second (the floor), peak RSS
of the cell's own process. Usage (repository root, after ``make test``)::

    .venv/bin/python benchmarks/baselines_real.py [--methods padim stfpm patchcore rd]
        [--sets magnetic_tile deeppcb elpv-mono elpv-poly] [--out /tmp/iadkit-baselines]
        [--elpv DIR] [--param method:key=value ...]

It runs the benchmark grid of :mod:`iadkit.benchmark` (each cell in its own process, resumable:
a cell with a result is not run again, so delete ``--out`` to measure afresh). ELPV
(``pip install elpv-dataset``) is split by cell type: ``elpv-mono`` and ``elpv-poly`` each train
and test on one kind of cell (folders of links to the prepared images, made under ``--out``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import yaml

from iadkit.benchmark import load_grid, run_grid

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def elpv_subclass_root(elpv_root: Path, subclass: str, out: Path) -> Path:
    """An MVTec-layout folder of links to the ELPV images of one subclass."""
    if not (elpv_root / "elpv").is_dir():
        from iadkit.data.elpv import prepare_elpv

        prepare_elpv(elpv_root)
    root = out / f"elpv-{subclass}"
    with open(elpv_root / "elpv" / "subclasses.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["subclass"] != subclass:
                continue
            link = root / "elpv" / row["path"]
            if not link.is_symlink():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to((elpv_root / "elpv" / row["path"]).resolve())
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["padim", "stfpm", "patchcore", "rd"])
    parser.add_argument("--sets", nargs="+",
                        default=["magnetic_tile", "deeppcb", "elpv-mono", "elpv-poly"])
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "iadkit-baselines"))
    parser.add_argument("--elpv", default=str(Path(tempfile.gettempdir()) / "iadkit-elpv"))
    parser.add_argument("--param", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="a hyperparameter of one method (e.g. stfpm:epochs=2)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params: dict[str, dict[str, object]] = defaultdict(dict)
    for given in args.param:
        method, assignment = given.split(":", 1)
        key, value = assignment.split("=", 1)
        params[method][key] = yaml.safe_load(value)
    datasets = []
    for name in args.sets:
        if name.startswith("elpv-"):
            root = elpv_subclass_root(Path(args.elpv), name.split("-", 1)[1], out)
        else:  # a set of ../shared/data, or any folder in a layout iadkit reads
            root = Path(name) if Path(name).is_dir() else DATA / name
        datasets.append({"name": root.name, "root": str(root.resolve())})
    grid = {"methods": [{"name": m, "params": params.get(m, {})} for m in args.methods],
            "datasets": datasets, "settings": ["one-class"], "options": {"device": "cpu"}}
    grid_file = out / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid, sort_keys=False))
    for record in run_grid(load_grid(grid_file), out, show_progress=False):
        images_per_second = record.get("images_per_second")
        print(json.dumps({
            "benchmark": "baselines_real", "set": record.get("dataset"),
            "method": record.get("method"), "preset": record.get("preset"),
            "status": record.get("status"), "error": record.get("error"),
            **{key: record.get(key) for key in ("image_auroc", "pixel_auroc", "pixel_aupro",
                                                "fit_seconds", "images_per_second",
                                                "backbone_images_per_second", "peak_rss_gb",
                                                "n_train", "n_test")},
            "ms_per_image": round(1000 / images_per_second, 1) if images_per_second else None,
        }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
