"""SimpleNet vs Adapted-MoE ablation in the unseen-subclass setting, on data available here.

``--split elpv`` (real data): ELPV solar cells (``mono``, ``poly``, from ``elpv-dataset``) and
Magnetic Tile (``magnetic_tile``, one subclass). The model trains on the normal images of ``mono``
and ``magnetic_tile`` (two visibly different subclasses, so two experts) and is tested on the
unseen ``poly`` cells (image labels only: ELPV has no masks, so no pixel AUROC).

``--split generated``: three generated texture styles with masks (``style0..2``, different stripe
angles and frequencies); trains on ``style0`` and ``style1``, tests on the unseen ``style2`` with
image and pixel AUROC.

Prints one JSON line per configuration:

    .venv/bin/python benchmarks/adapted_moe_unseen_subclass.py [--split elpv] [--epochs 8]

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
    from iadkit.data import generate_dataset
    from iadkit.data.elpv import prepare_elpv
    from iadkit.engine import RunConfig, fit_run, test_run

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=("elpv", "generated"), default="elpv")
    parser.add_argument("--magnetic-tile", default=str(SHARED / "magnetic_tile"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "data"
        if args.split == "elpv":
            prepare_elpv(root)
            (root / "magnetic_tile").symlink_to(Path(args.magnetic_tile).resolve())
            seen, unseen = ["mono", "magnetic_tile"], "poly"
        else:
            generate_dataset(root, categories=("style0", "style1", "style2"), n_train=120,
                             n_test_good=40, n_test_defect=40, size=256, seed=0)
            seen, unseen = ["style0", "style1"], "style2"
        for name in args.configs:
            config = RunConfig(method="adapted_moe", data=str(root), setting="unseen-subclass",
                               seen_subclasses=seen, unseen_subclasses=[unseen],
                               validation_fraction=0,
                               params={**CONFIGS[name], "epochs": args.epochs}, device="auto",
                               show_progress=False)
            run = Path(scratch) / name
            started = time.perf_counter()
            fit_run(config, run)
            fit_seconds = time.perf_counter() - started
            results, _ = test_run(run)
            tested = results["per_category"][unseen]
            print(json.dumps({
                "benchmark": "adapted_moe_unseen_subclass", "split": args.split, "config": name,
                "params": config.params, "seen": seen, "unseen": [unseen],
                "image_auroc": round(tested["image_auroc"], 4),
                "image_ap": round(tested["image_ap"], 4),
                "pixel_auroc": None if tested["pixel_auroc"] is None
                else round(tested["pixel_auroc"], 4),
                "n_test": tested["n_images"],
                "fit_seconds": round(fit_seconds, 1),
                "ms_per_image": tested["ms_per_image"],
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            }), flush=True)


if __name__ == "__main__":
    main()
