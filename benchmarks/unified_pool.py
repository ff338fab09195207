"""The unified settings on the wide real pool: one base model over every real category, with
CADA, its class-aware references and an oracle alignment.

The pool is every real category here: ``magnetic_tile`` and ``deeppcb`` (``../shared/data``,
masks) and ELPV's ``elpv_mono`` and ``elpv_poly`` cells (``pip install elpv-dataset``, image
labels only). Each category gives a seeded subsample of ``--train-per-category`` training
normals, and ``--held-out-per-category`` further normals of its training folder that no model
trains on; every test image is kept.

For each base (``--bases``: rd, recontrast, uniad) one model is trained on the pooled training
normals (cpu preset, ``--epochs``; RD with the CADA paper's changes) and saved; then five models
share it:

- ``<base>``: the base alone;
- ``<base>+cada``: CADA (class-agnostic: statistics regressed from each image's features);
- ``<base>+cada_a``: CaDA-A (each category's mean statistics over the base's training images,
  the category given at test);
- ``<base>+cada_b``: CaDA-B (a classifier picks the category whose statistics are used);
- ``<base>+oracle``: an analysis tool, not a model: each test image is aligned with the mean
  statistics of its own category's *held-out* normals (CaDA-A fitted on those images). The
  base's maps on its own training images are biased low (it has learnt them), on unseen normals
  they are not: the oracle is the upper bound of what aligning the categories can give.

One fit serves both unified settings: ``per_category`` is the model-unified evaluation (each
category on its own), ``pooled`` the absolute-unified one (every test image under one
threshold). Each category's test-normal scores (median, quartiles) and anomalous median show
how far apart the categories sit under the model. Prints one JSON line per model, then one per
base comparing the pooled image AUROCs; resumable (a finished model or evaluation under
``--out`` is kept: delete the folder to measure afresh). Usage (repository root)::

    .venv/bin/python benchmarks/unified_pool.py [--bases rd recontrast uniad] [--epochs 5]
        [--train-per-category 200] [--out /tmp/iadkit-unified-pool] [--elpv DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from multi_category_data import SHARED, split_by_subclass, subsampled_category
from records import kept_record, peak_rss_gb

from iadkit.engine import RunConfig, fit_run, test_run
from iadkit.methods.cada.cada import PAPER_BASE_CHANGES

REAL_SETS = ("magnetic_tile", "deeppcb")
#: The models sharing one base: (suffix, CADA's parameters, fitted on the held-out normals).
ALIGNMENTS = {
    "": None,
    "+cada": ({"alignment": "image"}, False),
    "+cada_a": ({"alignment": "class"}, False),
    "+cada_b": ({"alignment": "classifier"}, False),
    "+oracle": ({"alignment": "class"}, True),
}

#: ``--models`` names: the base alone, and the alignments.
MODEL_NAMES = tuple(suffix.lstrip("+") or "base" for suffix in ALIGNMENTS)


def link_held_out(source: Path, destination: Path, skip: set[str], count: int,
                  seed: int) -> None:
    """Link ``count`` training normals of ``source`` not in ``skip`` as a category of their
    own (train/good only): the normals the oracle's statistics come from."""
    images = sorted(p for p in (source / "train" / "good").iterdir() if p.name not in skip)
    random.Random(seed + 1).shuffle(images)
    if len(images) < count:
        raise SystemExit(f"{source}: only {len(images)} training normals are left for the "
                         f"held-out set, {count} asked")
    folder = destination / "train" / "good"
    folder.mkdir(parents=True)
    for image in images[:count]:
        (folder / image.name).symlink_to(image.resolve())


def build_pool(out: Path, elpv: Path, n_train: int, n_held_out: int, n_test: int | None,
               seed: int) -> tuple[Path, Path]:
    """The pool's data root and the held-out normals' root (made once under ``out``)."""
    pool, held_out = out / "data" / "pool", out / "data" / "held_out"
    if pool.is_dir() and held_out.is_dir():
        return pool, held_out
    sources = out / "data" / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    if not (elpv / "elpv").is_dir():
        from iadkit.data.elpv import prepare_elpv

        prepare_elpv(elpv)
    names = [*REAL_SETS, *split_by_subclass(elpv / "elpv", sources)]
    for name in REAL_SETS:
        (sources / name).symlink_to((SHARED / name).resolve())
    for name in names:
        subsampled_category(sources / name, pool / name, n_train, seed, n_test)
        trained = {p.name for p in (pool / name / "train" / "good").iterdir()}
        link_held_out(sources / name, held_out / name, trained, n_held_out, seed)
    return pool, held_out


def score_spread(evaluation: Any) -> dict[str, dict[str, float]]:
    """Per category: its test normals' score median and quartiles, its anomalies' median."""
    spread = {}
    for name, predicted in evaluation.predictions.items():
        normal = predicted.scores[predicted.labels == 0]
        anomalous = predicted.scores[predicted.labels == 1]
        q25, median, q75 = np.quantile(normal, [0.25, 0.5, 0.75])
        spread[name] = {"normal_median": round(float(median), 5),
                        "normal_q25": round(float(q25), 5), "normal_q75": round(float(q75), 5),
                        "anomalous_median": round(float(np.median(anomalous)), 5)}
    return spread


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def run_model(name: str, method: str, params: dict[str, Any], data: Path, pool: Path,
              out: Path, seed: int) -> dict[str, Any]:
    """Fit (or keep) one model, evaluate it on the pool's test images (or keep the result)."""
    return kept_record(out / "results" / f"{name}.json",
                       lambda: measure_model(name, method, params, data, pool, out, seed))


def measure_model(name: str, method: str, params: dict[str, Any], data: Path, pool: Path,
                  out: Path, seed: int) -> dict[str, Any]:
    config = RunConfig(method=method, data=str(data), setting="absolute-unified",
                       calibration="none", validation_fraction=0.0, params=params,
                       device="auto", seed=seed, show_progress=False)
    run = out / "runs" / name
    started = time.perf_counter()
    (model_dir,) = fit_run(config, run, resume=True)
    fit_seconds = time.perf_counter() - started
    result, (evaluation,) = test_run(run, data=str(pool))
    pooled = result["pooled"]
    fit_info = json.loads((model_dir / "detector.json").read_text())["fit_info"]
    model_unified_mean = float(np.mean([v["image_auroc"]
                                        for v in result["per_category"].values()]))
    return {
        "benchmark": "unified_pool", "model": name, "params": params,
        **{key: rounded(pooled[key]) for key in ("image_auroc", "image_ap", "pixel_auroc",
                                                  "pixel_aupro")},
        "model_unified": {c: {k: rounded(v[k]) for k in ("image_auroc", "pixel_auroc",
                                                          "pixel_aupro")}
                          for c, v in result["per_category"].items()},
        "model_unified_mean_image_auroc": rounded(model_unified_mean),
        # What pooling costs: the model-unified mean minus the pooled AUROC. Near zero, the
        # categories' scores already sit on one scale and no alignment can gain much.
        "pooling_loss": rounded(model_unified_mean - pooled["image_auroc"]),
        "scores": score_spread(evaluation),
        "regressed_std": fit_info.get("regressed_std"),
        "n_test": pooled["n_images"],
        "fit_seconds": round(fit_seconds, 1),
        "ms_per_image": round(sum(v["ms_per_image"] * v["n_images"] for v in
                                  result["per_category"].values()) / pooled["n_images"], 2),
        "peak_rss_gb": peak_rss_gb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bases", nargs="+", default=["rd", "recontrast", "uniad"])
    parser.add_argument("--epochs", type=int, default=5, help="the bases' training epochs")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES,
                        help="which of a base's models to measure (e.g. 'base' alone to study "
                        "its schedule)")
    parser.add_argument("--iterations", type=int, default=1000, help="CADA's regressor steps")
    parser.add_argument("--train-per-category", type=int, default=200)
    parser.add_argument("--held-out-per-category", type=int, default=60)
    parser.add_argument("--test-per-group", type=int, default=None,
                        help="a seeded subsample of each test folder (default: every image)")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir())
                                             / "iadkit-unified-pool"))
    parser.add_argument("--elpv", default=str(Path(tempfile.gettempdir()) / "iadkit-elpv"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    pool, held_out = build_pool(out, Path(args.elpv), args.train_per_category,
                                args.held_out_per_category, args.test_per_group,
                                args.seed)
    for base in args.bases:
        base_params = {**PAPER_BASE_CHANGES.get(base, {}), "epochs": args.epochs}
        auroc = {}
        for suffix, alignment in ALIGNMENTS.items():
            if (suffix.lstrip("+") or "base") not in args.models:
                continue
            name = base + suffix
            if alignment is None:
                record = run_model(name, base, base_params, pool, pool, out, args.seed)
            else:
                params, on_held_out = alignment
                params = {**params, "iterations": args.iterations,
                          "base_checkpoint": str(out / "runs" / base / "models" / "unified")}
                record = run_model(name, "cada", params, held_out if on_held_out else pool,
                                   pool, out, args.seed)
            print(json.dumps(record), flush=True)
            auroc[suffix.lstrip("+") or "base"] = record["image_auroc"]
        if not {"base", "cada", "oracle"} <= set(auroc):
            continue
        oracle_gain = auroc["oracle"] - auroc["base"]
        print(json.dumps({
            "benchmark": "unified_pool", "base": base, "pooled_image_auroc": auroc,
            "oracle_gain": round(oracle_gain, 4), "cada_gain": round(auroc["cada"]
                                                                     - auroc["base"], 4),
            "cada_share_of_oracle_gain": round((auroc["cada"] - auroc["base"]) / oracle_gain, 3)
            if oracle_gain > 0 else None}), flush=True)


if __name__ == "__main__":
    main()
