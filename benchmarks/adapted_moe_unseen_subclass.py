"""SimpleNet vs Adapted-MoE (the paper's four configurations) on unseen subclasses.

Splits (``--splits``), each training on the normal images of the seen subclasses and testing
on the unseen one only:

- ``elpv-poly`` (real): seen ELPV ``mono`` cells and ``magnetic_tile`` (two visibly different
  subclasses, so two experts), unseen ``poly`` cells (image labels only: no pixel AUROC).
- ``elpv-mono`` (real): seen ``poly`` and ``magnetic_tile``, unseen ``mono``.
- ``deeppcb`` (real product variants): DeepPCB's board designs (the first five digits of an
  image's name) are its subclasses; seen: every design but ``--deeppcb-unseen``, unseen: that
  one (box masks, so pixel AUROC too).
- ``shifted-tile`` (the sanity case of test-time adaption): seen Magnetic Tile as it is, unseen
  the same tiles' test images, each under its own global intensity change ``x -> a x + b``
  (contrast ``a`` from [0.35, 1], brightness ``b`` keeping the range inside [0, 255], seeded
  per image). A normal image made brighter or flatter then competes with a defective one made
  darker, so one score scale fails the baseline; the images differ from the seen subclass only
  in the statistics TTA re-styles, so TTA must help here if it works at all.
- ``shifted-generated``: the same sanity case on one procedural texture (120 training images:
  minutes instead of Magnetic Tile's hour).
- ``generated``: three procedural texture styles with masks; seen ``style0``, ``style1``,
  unseen ``style2``.

Configurations: the paper's Table 3 (baseline = SimpleNet, +MoE, +TTA, full). Prints one JSON
line per (split, configuration), then one per configuration with the mean over the real splits;
resumable (results under ``--out`` are kept: delete it to measure afresh). ``--param
key=value`` overrides a hyperparameter in every configuration (e.g. ``tta_statistics=batch``);
the configuration's name then carries the overrides (``tta+tta_statistics=batch``), so variants
keep their own results and runs; ``--reference-normals K`` (with ``--param
tta_statistics=reference``, or ``expert_choice=references``) gives the model K training
normals of the unseen subclass; ``--reference-draws N`` tests the fitted model N times with
the references drawn by seeds 0..N-1 and reports each draw and the mean (a figure from one draw
of a few images can be luck). Usage::

    .venv/bin/python benchmarks/adapted_moe_unseen_subclass.py [--splits elpv-poly deeppcb]
        [--epochs 8] [--out /tmp/iadkit-moe] [--elpv DIR] [--param key=value ...]
        [--reference-normals K [--reference-draws N]]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from multi_category_data import SHARED, link_file
from PIL import Image
from records import kept_record, peak_rss_gb

CONFIGS = {
    "baseline": {"use_moe": False, "use_tta": False},
    "moe": {"use_moe": True, "use_tta": False},
    "tta": {"use_moe": False, "use_tta": True},
    "full": {"use_moe": True, "use_tta": True},
}
REAL_SPLITS = ("elpv-poly", "elpv-mono", "deeppcb")
SPLITS = (*REAL_SPLITS, "shifted-tile", "shifted-generated", "generated")


def write_subclasses(category: Path, subclass_of: dict[str, str]) -> None:
    with open(category / "subclasses.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "subclass"])
        writer.writerows(sorted(subclass_of.items()))


def deeppcb_by_design(source: Path, root: Path) -> list[str]:
    """DeepPCB linked under ``root/deeppcb`` with each image's board design as its subclass."""
    category = root / "deeppcb"
    subclass_of = {}
    for image in sorted(source.glob("*/*/*.png")):
        split = image.parent.parent.name
        if split not in ("train", "test"):
            continue
        relative = image.relative_to(source).as_posix()
        link_file(image, category / relative)
        subclass_of[relative] = image.name[:5]
    (category / "ground_truth").symlink_to((source / "ground_truth").resolve())
    write_subclasses(category, subclass_of)
    return sorted(set(subclass_of.values()))


def shifted(source: Path, root: Path, seed: int = 0) -> None:
    """A category's training images (subclass ``original``) and its test images, each under
    its own random global intensity change (subclass ``shifted``), masks linked."""
    rng = np.random.default_rng(seed)
    category = root / "shifted"
    subclass_of = {}
    for image in sorted((source / "train" / "good").iterdir()):
        relative = f"train/good/{image.name}"
        link_file(image, category / relative)
        subclass_of[relative] = "original"
    for image in sorted((source / "test").glob("*/*")):
        relative = image.relative_to(source).as_posix()
        values = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32)
        contrast = rng.uniform(0.35, 1.0)
        brightness = rng.uniform(0.0, 255.0 * (1.0 - contrast))
        changed = np.clip(contrast * values + brightness, 0, 255).round().astype(np.uint8)
        (category / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(changed).save((category / relative).with_suffix(".png"))
        subclass_of[Path(relative).with_suffix(".png").as_posix()] = "shifted"
    for mask in sorted((source / "ground_truth").glob("*/*")):
        link_file(mask, category / mask.relative_to(source))
    write_subclasses(category, subclass_of)


def prepare(split: str, root: Path, elpv: Path, deeppcb_unseen: str
            ) -> tuple[list[str], list[str]]:
    """Make the split's data under ``root`` (once); its seen and unseen subclasses."""
    ready = (root / ".ready").is_file()
    if split.startswith("elpv-"):
        if not ready:
            from iadkit.data.elpv import prepare_elpv

            if not (elpv / "elpv").is_dir():
                prepare_elpv(elpv)
            (root / "elpv").parent.mkdir(parents=True, exist_ok=True)
            (root / "elpv").symlink_to((elpv / "elpv").resolve())
            (root / "magnetic_tile").symlink_to((SHARED / "magnetic_tile").resolve())
        unseen = split.split("-", 1)[1]
        seen = ["poly" if unseen == "mono" else "mono", "magnetic_tile"]
    elif split == "deeppcb":
        designs = (sorted({p.name[:5] for p in (SHARED / "deeppcb").glob("*/*/*.png")})
                   if ready else deeppcb_by_design(SHARED / "deeppcb", root))
        if deeppcb_unseen not in designs:
            raise SystemExit(f"--deeppcb-unseen {deeppcb_unseen}: DeepPCB's designs are "
                             f"{designs}")
        seen, unseen = [d for d in designs if d != deeppcb_unseen], deeppcb_unseen
    elif split == "shifted-tile":
        if not ready:
            shifted(SHARED / "magnetic_tile", root)
        seen, unseen = ["original"], "shifted"
    elif split == "shifted-generated":
        if not ready:
            from iadkit.data import generate_dataset

            source = root.parent / "sources" / split
            generate_dataset(source, categories=("style0",), n_train=120, n_test_good=40,
                             n_test_defect=40, size=256, seed=0)
            shifted(source / "style0", root)
        seen, unseen = ["original"], "shifted"
    else:
        if not ready:
            from iadkit.data import generate_dataset

            generate_dataset(root, categories=("style0", "style1", "style2"), n_train=120,
                             n_test_good=40, n_test_defect=40, size=256, seed=0)
        seen, unseen = ["style0", "style1"], "style2"
    (root / ".ready").touch()
    return seen, [unseen]


def variant_name(config: str, overrides: dict[str, object], reference_normals: int = 0,
                 reference_draws: int = 1) -> str:
    """The configuration's name with its overrides: ``tta+tta_statistics=batch``."""
    settings = {**overrides, **({"reference_normals": reference_normals}
                                if reference_normals else {}),
                **({"reference_draws": reference_draws} if reference_draws > 1 else {})}
    return "+".join([config, *(f"{key}={value}" for key, value in sorted(settings.items()))])


def run(split: str, name: str, root: Path, seen: list[str], unseen: list[str], epochs: int,
        overrides: dict[str, object], reference_normals: int, reference_draws: int, out: Path
        ) -> dict[str, object]:
    variant = variant_name(name, overrides, reference_normals, reference_draws)
    return kept_record(out / "results" / f"{split}-{variant}.json",
                       lambda: measure(split, name, root, seen, unseen, epochs, overrides,
                                       reference_normals, reference_draws, out))


METRICS = ("image_auroc", "image_ap", "pixel_auroc")


def rounded(metrics: dict[str, object]) -> dict[str, float | None]:
    return {key: None if metrics[key] is None else round(float(metrics[key]), 4)
            for key in METRICS}


def measure(split: str, name: str, root: Path, seen: list[str], unseen: list[str], epochs: int,
            overrides: dict[str, object], reference_normals: int, reference_draws: int,
            out: Path) -> dict[str, object]:
    from iadkit.engine import RunConfig, evaluate_task, fit_run, test_run
    from iadkit.methods import Detector

    config = RunConfig(method="adapted_moe", data=str(root), setting="unseen-subclass",
                       seen_subclasses=seen, unseen_subclasses=unseen, calibration="none",
                       validation_fraction=0,
                       params={**CONFIGS[name], "epochs": epochs, **overrides},
                       reference_normals=reference_normals, device="auto",
                       show_progress=False)
    # The runs of every draw count share one model: the draws change testing only.
    run_dir = out / "runs" / split / variant_name(name, overrides, reference_normals)
    started = time.perf_counter()
    fit_run(config, run_dir, resume=True)
    fit_seconds = time.perf_counter() - started
    draws = []
    if reference_draws > 1:
        (task,) = config.tasks()
        detector = Detector.load(run_dir / "models" / task.name)
        for seed in range(reference_draws):
            draws.append(evaluate_task(detector, task, config.batch_size,
                                       reference_normals=reference_normals,
                                       seed=seed).per_group[unseen[0]])
            if detector.reference_scores_ is not None:  # expert_choice="references"
                draws[-1]["expert"] = detector.expert_names[detector.reference_scores_.chosen]
        tested = {**draws[0], **{key: None if draws[0][key] is None
                                 else float(np.mean([draw[key] for draw in draws]))
                                 for key in METRICS}}
    else:
        results, _ = test_run(run_dir)
        tested = results["per_category"][unseen[0]]
    return {
        "benchmark": "adapted_moe_unseen_subclass", "split": split,
        "config": variant_name(name, overrides, reference_normals, reference_draws),
        "params": config.params, "seen": seen, "unseen": unseen, **rounded(tested),
        **({"per_draw": [{**rounded(draw), **({"expert": draw["expert"]} if "expert" in draw
                                                else {})} for draw in draws]} if draws else {}),
        "n_test": tested["n_images"],
        "fit_seconds": round(fit_seconds, 1),
        "ms_per_image": tested["ms_per_image"],
        "peak_rss_gb": peak_rss_gb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--deeppcb-unseen", default="20085",
                        help="the DeepPCB board design kept unseen")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "iadkit-moe"))
    parser.add_argument("--elpv", default=str(Path(tempfile.gettempdir()) / "iadkit-elpv"))
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="hyperparameter override for every configuration")
    parser.add_argument("--reference-normals", type=int, default=0,
                        help="training normals of the unseen subclass given to the model")
    parser.add_argument("--reference-draws", type=int, default=1,
                        help="test with this many seeded draws of the references")
    args = parser.parse_args()
    overrides = {key: yaml.safe_load(value)
                 for key, value in (text.split("=", 1) for text in args.param)}
    out = Path(args.out)
    records = []
    for split in args.splits:
        root = out / "data" / split
        seen, unseen = prepare(split, root, Path(args.elpv), args.deeppcb_unseen)
        for name in args.configs:
            record = run(split, name, root, seen, unseen, args.epochs, overrides,
                         args.reference_normals, args.reference_draws, out)
            records.append(record)
            print(json.dumps(record), flush=True)
    for name in (variant_name(config, overrides, args.reference_normals, args.reference_draws)
                 for config in args.configs):
        real = [r for r in records if r["config"] == name and r["split"] in REAL_SPLITS]
        if not real:
            continue
        pixel = [r["pixel_auroc"] for r in real if r["pixel_auroc"] is not None]
        print(json.dumps({
            "benchmark": "adapted_moe_unseen_subclass", "config": name,
            "real_splits": [r["split"] for r in real],
            "mean_image_auroc": round(float(np.mean([r["image_auroc"] for r in real])), 4),
            "mean_pixel_auroc": round(float(np.mean(pixel)), 4) if pixel else None}),
            flush=True)


if __name__ == "__main__":
    main()
