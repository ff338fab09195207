"""SimpleNet vs Adapted-MoE ablation in the unseen-subclass setting, on real data available here.

Subclasses: ELPV solar cells (``mono``, ``poly``, from ``elpv-dataset``) and Magnetic Tile
(``magnetic_tile``, one subclass). The model trains on the normal images of ``mono`` and
``magnetic_tile`` (two visibly different subclasses, so two experts) and is tested on the unseen
``poly`` cells (image labels only: ELPV has no masks, so no pixel AUROC) and, for pixel metrics,
on nothing else: Magnetic Tile is seen. Prints one JSON line per configuration:

    .venv/bin/python benchmarks/adapted_moe_unseen_subclass.py [--epochs 8] [--configs ...]

Configurations follow the paper's Table 3: baseline (SimpleNet), +MoE, +TTA, full.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CONFIGS = {
    "baseline": {"use_moe": False, "use_tta": False},
    "moe": {"use_moe": True, "use_tta": False},
    "tta": {"use_moe": False, "use_tta": True},
    "full": {"use_moe": True, "use_tta": True},
}


def main() -> None:
    from iadkit.data.elpv import prepare_elpv
    from iadkit.engine import RunConfig, fit_run, test_run

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--magnetic-tile", default=str(SHARED / "magnetic_tile"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "data"
        prepare_elpv(root)
        (root / "magnetic_tile").symlink_to(Path(args.magnetic_tile).resolve())
        for name in args.configs:
            config = RunConfig(method="adapted_moe", data=str(root), setting="unseen-subclass",
                               seen_subclasses=["mono", "magnetic_tile"],
                               unseen_subclasses=["poly"], validation_fraction=0,
                               params={**CONFIGS[name], "epochs": args.epochs}, device="auto",
                               show_progress=False)
            run = Path(scratch) / name
            started = time.perf_counter()
            fit_run(config, run)
            fit_seconds = time.perf_counter() - started
            results, _ = test_run(run)
            poly = results["per_category"]["poly"]
            print(json.dumps({
                "benchmark": "adapted_moe_unseen_subclass", "config": name,
                "params": config.params, "seen": config.seen_subclasses, "unseen": ["poly"],
                "image_auroc_poly": round(poly["image_auroc"], 4),
                "image_ap_poly": round(poly["image_ap"], 4),
                "n_test_poly": poly["n_images"],
                "fit_seconds": round(fit_seconds, 1),
                "ms_per_image": poly["ms_per_image"],
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            }), flush=True)


if __name__ == "__main__":
    main()
