"""One process against torchrun's ranks (gloo) on this machine: wall time and equal results.

For each method, ``iadkit fit`` then ``iadkit test`` run once in one process and once under
``torchrun --standalone --nproc-per-node N`` on the same data (Magnetic Tile by default, the
cpu preset with ``--param`` overrides), each process with ``cores / ranks`` threads, so both
sides use the whole machine. One JSON line per (method, ranks): fit and test wall seconds
(process start and data decoding included), the test metrics, and how the results compare with
the one-process run: PatchCore's memory bank (equal or not), the largest weight difference of a
trained method, the difference of every test metric.

On two cores the speed-up is bounded by two and eaten by what every rank repeats (decoding the
training images, caching the teacher's features, calibration); the point on one machine is
that the results agree. Run from the repository root::

    .venv/bin/python benchmarks/distributed_cpu.py [--methods patchcore rd] [--ranks 2]
        [--data ../shared/data/magnetic_tile] [--param rd:epochs=2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], ranks: int, threads: int) -> float:
    """Seconds one ``iadkit`` command takes, in one process or on ``ranks`` ranks."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(ranks)] if ranks > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run([*launcher, "-m", "iadkit", *args, "--quiet", "--device", "cpu"],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"iadkit {' '.join(args)} on {ranks} ranks failed:\n"
                         f"{done.stderr[-3000:]}")
    return time.perf_counter() - started


def compare_weights(one: Path, many: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    first, second = load_file(str(one)), load_file(str(many))
    floats = [k for k in first if first[k].is_floating_point()]
    worst = max((float((first[k] - second[k]).abs().max()) for k in floats), default=0.0)
    return {"tensors_equal": all(torch.equal(first[k], second[k]) for k in first),
            "largest_weight_difference": worst}


def metrics(path: Path) -> dict[str, Any]:
    results = json.loads(path.read_text())
    return {k: results[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["patchcore", "rd"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/magnetic_tile"))
    parser.add_argument("--param", action="append", default=[],
                        help="METHOD:KEY=VALUE, a hyperparameter of one method")
    parser.add_argument("--calibration", default="holdout",
                        help="the fits' calibration (not what is measured; PatchCore's "
                        "leave-one-out default would dominate the fit time)")
    parser.add_argument("--work", default=tempfile.mkdtemp(prefix="iadkit-distributed-"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    work = Path(args.work)
    for method in args.methods:
        overrides = [p.split(":", 1)[1] for p in args.param if p.startswith(f"{method}:")]
        flags = [flag for value in overrides for flag in ("--param", value)]
        runs = {}
        for ranks in (1, args.ranks):
            out = work / f"{method}-{ranks}"
            threads = max(1, cores // ranks)
            fit = run_cli(["fit", "--method", method, "--data", args.data, "--out", str(out),
                           "--calibration", args.calibration, *flags], ranks, threads)
            test = run_cli(["test", str(out), "--json", str(out / "test.json")], ranks,
                           threads)
            runs[ranks] = out
            line: dict[str, Any] = {
                "method": method, "ranks": ranks, "threads_per_rank": threads,
                "data": Path(args.data).name, "params": overrides,
                "fit_seconds": round(fit, 1), "test_seconds": round(test, 1),
                **metrics(out / "test.json")}
            if ranks > 1:
                model = next((out / "models").iterdir()).name
                line.update(compare_weights(runs[1] / "models" / model / "weights.safetensors",
                                            out / "models" / model / "weights.safetensors"))
                one_process = metrics(runs[1] / "test.json")
                line["metric_differences"] = {
                    k: None if v is None else round(v - one_process[k], 6)
                    for k, v in metrics(out / "test.json").items()}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
