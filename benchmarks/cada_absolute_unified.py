"""Reverse distillation with and without CADA in the absolute-unified setting, on real data here.

One model is trained on the normal images of three categories with very different score scales,
then all their test images are pooled into one image AUROC/AP (one threshold for everything) and
all pixels with masks into one pixel AUROC/AP:

- ``magnetic_tile``: real defects with masks (``../shared/data/magnetic_tile``);
- ``elpv``: real solar cells from ``elpv-dataset`` (image labels only: no pixel metrics);
- ``generated``: a procedural texture with masks (:func:`iadkit.data.generate_dataset`).

The base (``--base``: RD with the paper's changes, GELU decoder and mean of level maps; or UniAD)
is trained once with its ``cpu`` preset; CADA and the class-aware reference CaDA-A calibrate that
same saved base. Each training set is a
seeded subsample of ``--train-per-category`` normal images (all test images are kept). Prints
one JSON line per model and writes a comparison report (score histograms before/after, the
paper's Fig. 5) to ``--report``:

    .venv/bin/python benchmarks/cada_absolute_unified.py [--base rd] [--epochs 5] [--iterations 1000]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    from multi_category_data import SHARED, subsampled_category

    from iadkit.data import generate_dataset
    from iadkit.data.elpv import prepare_elpv
    from iadkit.engine import RunConfig, fit_run, test_run
    from iadkit.methods.cada.cada import PAPER_BASE_CHANGES
    from iadkit.report import write_comparison_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--magnetic-tile", default=str(SHARED / "magnetic_tile"))
    parser.add_argument("--train-per-category", type=int, default=300)
    parser.add_argument("--base", choices=("rd", "uniad"), default="rd")
    parser.add_argument("--epochs", type=int, default=5, help="the base's training epochs")
    parser.add_argument("--iterations", type=int, default=1000, help="CADA regressor steps")
    parser.add_argument("--report", default=None,
                        help="report folder (default benchmarks/reports/cada_<base>)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base_params = {**PAPER_BASE_CHANGES.get(args.base, {}), "epochs": args.epochs}
    with tempfile.TemporaryDirectory() as scratch:
        sources = Path(scratch) / "sources"
        prepare_elpv(sources)
        generate_dataset(sources, categories=("generated",), n_train=args.train_per_category,
                         n_test_good=60, n_test_defect=60, size=256, seed=args.seed)
        (sources / "magnetic_tile").symlink_to(Path(args.magnetic_tile).resolve())
        root = Path(scratch) / "data"
        for name in ("magnetic_tile", "elpv", "generated"):
            subsampled_category(sources / name, root / name, args.train_per_category, args.seed)

        runs = {
            args.base: (args.base, base_params),
            f"{args.base}+cada": ("cada", {"iterations": args.iterations}),
            f"{args.base}+cada_a": ("cada", {"alignment": "class"}),
        }
        results, evaluations = {}, {}
        base_dir = None
        for name, (method, params) in runs.items():
            if method == "cada":
                params = {**params, "base_checkpoint": str(base_dir)}
            config = RunConfig(method=method, data=str(root), setting="absolute-unified",
                               validation_fraction=0.1, params=params, device="auto",
                               seed=args.seed, show_progress=False)
            run = Path(scratch) / "runs" / name
            started = time.perf_counter()
            (model_dir,) = fit_run(config, run)
            fit_seconds = time.perf_counter() - started
            base_dir = base_dir or model_dir
            result, (evaluation,) = test_run(run)
            results[name], evaluations[name] = result, evaluation
            pooled = result["pooled"]
            fit_info = json.loads((model_dir / "detector.json").read_text())["fit_info"]
            print(json.dumps({
                "benchmark": "cada_absolute_unified", "model": name, "params": params,
                "train_per_category": args.train_per_category,
                **{key: None if pooled[key] is None else round(pooled[key], 4)
                   for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap")},
                "pixel_groups": pooled.get("pixel_groups"),
                "per_category_image_auroc": {c: round(v["image_auroc"], 4)
                                             for c, v in result["per_category"].items()},
                "n_test": pooled["n_images"],
                # Nil when the regressor collapsed to one constant (see docs/unified.md).
                "regressed_std": fit_info.get("regressed_std"),
                "fit_seconds": round(fit_seconds, 1),
                "ms_per_image": round(sum(v["ms_per_image"] * v["n_images"] for v in
                                          result["per_category"].values()) / pooled["n_images"], 2),
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            }), flush=True)
        report = args.report or REPO / "benchmarks" / "reports" / f"cada_{args.base}"
        page = write_comparison_report(results, evaluations, report,
                                       title=f"{args.base} with and without CADA, "
                                             "absolute-unified")
        print(json.dumps({"report": str(page)}))


if __name__ == "__main__":
    main()
