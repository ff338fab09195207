"""PatchCore against anomalib's PatchCore: same data, matched settings, one run.

The script installs nothing. It needs a second Python environment holding anomalib, made once::

    python3 -m venv ../anomalib-env
    ../anomalib-env/bin/pip install -c constraints.txt torch torchvision anomalib==2.7.0

(``constraints.txt`` keeps torch and torchvision at ours.) torchvision 0.28 does not import on
the CPU-only torch 2.13 wheel (pytorch/vision issue 9077), so each side first imports it through
iadkit's workaround (``src/iadkit/_torchvision_compat.py``, loaded from its file; anomalib's
side imports nothing else of iadkit). Then, from the
repository root::

    .venv/bin/python benchmarks/anomalib_parity.py --anomalib-python ../anomalib-env/bin/python
        [--sets magnetic_tile deeppcb elpv-mono elpv-poly] [--max-train 200] [--seeds 0 1 2]
        [--components [--ladders both|reverse]] [--sides iadkit anomalib]

For every set and seed, each side runs in a child process of its own, one after the other:
``iadkit`` (our PatchCore through ``Detector.fit`` / ``predict``) and ``anomalib`` (anomalib's
``PatchcoreModel`` and its pre-processing, driven by a plain loop: Lightning's ``Engine`` adds
the loop and nothing else to PatchCore's fit and predict). Settings are matched: the same
training subsample, 256 x 256 input without a centre crop, EfficientNet-Lite0 with its
ImageNet weights from the PyPI package (handed to anomalib as a weight file) and Lite0's
normalisation, stages ``blocks.2`` + ``blocks.4`` (152-dim features), a 1 % greedy coreset,
9 neighbours for the image score, map smoothing sigma 4. A third row runs iadkit's cpu preset
as shipped, where it differs from these settings (today it does not). Every side's maps and scores are scored by the same metric code (iadkit's), so the
rows differ by their pipelines only; the anomalib row also carries the figures anomalib's own
metrics give on its maps (``anomalib_metrics``).

One JSON line per (set, seed, side): image AUROC, pixel AUROC, AUPRO (pixel metrics where the
set has masks), fit seconds (features + coreset, images read from disk), end-to-end ms per test
image (read, resize, predict), peak RSS of the side's process, and its settings.

``--components`` adds the stage-by-stage comparison on each set (run in the anomalib
environment with iadkit's ``src`` on its path, so both libraries see the same tensors): the
difference of each stage's output on identical input, and the metrics of pipelines that take
anomalib's choice at every stage but one ("ladder" lines), so each difference has its effect
on the metrics measured alone.

ELPV (``pip install elpv-dataset``) is prepared into ``--elpv`` and split by cell type; it has
image labels only, so its lines carry image AUROC only. The training normals are subsampled
(``--max-train``, the same images for both sides) to keep anomalib's coreset, which updates
every training patch once per selected patch, within minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
#: The matched settings, handed to both sides.
MATCHED = dict(image_size=256, layers=["blocks.2", "blocks.4"], coreset_ratio=0.01,
               num_neighbors=9, sigma=4.0, batch_size=16)


def _peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


# -- the parent (iadkit's environment) ----------------------------------------------------------
def _manifest(set_name: str, elpv_root: Path, max_train: int, max_test: int | None, seed: int
              ) -> dict[str, Any]:
    """The images of one set: the training subsample (seeded) and the test split (all of it
    unless ``max_test``: a quick check)."""
    from iadkit.data import load_dataset

    if set_name.startswith("elpv-"):
        if not (elpv_root / "elpv").is_dir():
            from iadkit.data.elpv import prepare_elpv

            prepare_elpv(elpv_root)
        samples = load_dataset(elpv_root).where(subclass=set_name.removeprefix("elpv-"))
    else:
        samples = load_dataset(REPO.parent / "shared" / "data" / set_name)
    train = sorted(str(s.image_path) for s in samples.where(split="train"))
    if len(train) > max_train:
        train = sorted(random.Random(seed).sample(train, max_train))
    test = [{"path": str(s.image_path), "label": int(s.label), "defect": s.defect_type,
             "mask": str(s.mask_path) if s.mask_path else None}
            for s in samples.where(split="test")]
    if max_test is not None and len(test) > max_test:
        test = random.Random(seed).sample(test, max_test)
    return {"set": set_name, "train": train, "test": test,
            "has_masks": all(t["mask"] for t in test if t["label"])}


def _export_backbone(path: Path) -> None:
    """Lite0's ImageNet weights under timm's names, for anomalib's timm model."""
    from safetensors.torch import save_file

    from iadkit.backbones.weights import build_with_weights

    model, _ = build_with_weights("tf_efficientnet_lite0", "pretrained")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _run_side(python: str, side: str, manifest: Path, out: Path, seed: int,
              extra_env: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()
              ) -> dict[str, Any]:
    command = [python, str(Path(__file__).resolve()), "--side", side, "--manifest", str(manifest),
               "--out", str(out), "--seed", str(seed), *extra_args]
    env = {**os.environ, "TQDM_DISABLE": "1", **(extra_env or {})}
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{side} side failed on {manifest}:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _score(out: Path, side: str, has_masks: bool) -> dict[str, Any]:
    import numpy as np

    from iadkit import metrics

    arrays = np.load(out / f"{side}.npz")
    result = {"image_auroc": round(metrics.auroc(arrays["labels"], arrays["scores"]), 4)}
    if has_masks:
        pixel = metrics.pixel_metrics(arrays["masks"], arrays["maps"])
        result.update(pixel_auroc=round(pixel["pixel_auroc"], 4),
                      aupro=round(pixel["pixel_aupro"], 4))
    return result


def parent(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="anomalib-parity-"))
    weights = work / "tf_efficientnet_lite0.safetensors"
    _export_backbone(weights)
    # The preset's own line only where it differs from the matched settings (it costs a fit).
    preset_differs = (_iadkit_detector(MATCHED, 0, preset=True).get_params()
                      != _iadkit_detector(MATCHED, 0, preset=False).get_params())
    sides = ("iadkit", "iadkit-preset", "anomalib") if preset_differs else ("iadkit", "anomalib")
    for set_name in args.sets:
        for seed in args.seeds:
            manifest = _manifest(set_name, Path(args.elpv), args.max_train, args.max_test,
                                 seed)
            manifest.update(settings=MATCHED, weights=str(weights))
            manifest_path = work / f"{set_name}-{seed}.json"
            manifest_path.write_text(json.dumps(manifest))
            common = {"set": set_name, "seed": seed, "n_train": len(manifest["train"]),
                      "n_test": len(manifest["test"])}
            for side in (s for s in sides if s.startswith(tuple(args.sides))):
                python = args.anomalib_python if side == "anomalib" else sys.executable
                facts = _run_side(python, side, manifest_path, work, seed)
                quality = _score(work, side, manifest["has_masks"])
                print(json.dumps({**common, "side": side, **quality, **facts}), flush=True)
        if args.components:
            path = work / f"{set_name}-{args.seeds[0]}.json"
            env = {"PYTHONPATH": str(REPO / "src")}
            facts = _run_side(args.anomalib_python, "components", path, work, args.seeds[0], env,
                              ("--ladders", args.ladders))
            for line in facts["lines"]:
                print(json.dumps({"set": set_name, **line}), flush=True)


# -- the iadkit side ------------------------------------------------------------------------------
def _iadkit_detector(settings: dict[str, Any], seed: int, preset: bool) -> Any:
    """Our PatchCore with the matched settings, or the cpu preset as shipped."""
    from iadkit.methods import create_detector

    params: dict[str, Any] = dict(seed=seed)
    if not preset:
        params.update(image_size=settings["image_size"], crop_size=None, layers=(2, 3),
                      coreset_ratio=settings["coreset_ratio"],
                      num_neighbors=settings["num_neighbors"],
                      smoothing_sigma=settings["sigma"])
    return create_detector("patchcore", "cpu", device="cpu", **params)


def iadkit_side(manifest: dict[str, Any], out: Path, seed: int, preset: bool) -> dict[str, Any]:
    import numpy as np

    from iadkit.data import make_loader
    from iadkit.data.samples import Sample, SampleSet
    from iadkit.engine.evaluation import predict_samples

    settings = manifest["settings"]
    detector = _iadkit_detector(settings, seed, preset)
    train = SampleSet(Sample(image_path=Path(p), label=0, category=manifest["set"],
                             defect_type="good", split="train") for p in manifest["train"])
    test = SampleSet(Sample(image_path=Path(t["path"]), label=t["label"], split="test",
                            category=manifest["set"], defect_type=t["defect"],
                            mask_path=Path(t["mask"]) if t["mask"] else None)
                     for t in manifest["test"])
    started = time.perf_counter()
    detector.fit(make_loader(train, detector.preprocess, settings["batch_size"]))
    fit_seconds = time.perf_counter() - started
    predicted = predict_samples(detector, test, batch_size=settings["batch_size"])
    name = "iadkit-preset" if preset else "iadkit"
    np.savez(out / f"{name}.npz", scores=predicted.scores, maps=predicted.maps,
             masks=predicted.masks, labels=predicted.labels)
    return {"fit_seconds": round(fit_seconds, 1),
            "ms_per_image": round(1000 * predicted.seconds / len(test), 1),
            "peak_rss_gb": _peak_rss_gb(),
            "settings": {k: v for k, v in detector.get_params().items()
                         if k in ("backbone", "layers", "image_size", "crop_size",
                                  "coreset_ratio", "projection_dim", "num_neighbors",
                                  "smoothing_sigma", "feature_dim")}}


# -- the anomalib side (anomalib's environment; no iadkit import) ---------------------------------
def _import_torchvision() -> None:
    """torchvision 0.28 does not import on a CPU-only torch without iadkit's workaround
    (pytorch/vision issue 9077); apply it from its file, without importing iadkit."""
    import importlib.util

    path = REPO / "src" / "iadkit" / "_torchvision_compat.py"
    spec = importlib.util.spec_from_file_location("_torchvision_compat", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.import_torchvision()


def _anomalib_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    from torchvision.transforms import v2

    # anomalib's Patchcore.configure_pre_processor without a crop, with the backbone's
    # normalisation in place of its ImageNet default
    return v2.Compose([v2.Resize((size, size), antialias=True), v2.Normalize(mean, std)])


def _anomalib_model(settings: dict[str, Any], weights: str) -> Any:
    from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    from safetensors.torch import load_file

    model = PatchcoreModel(layers=settings["layers"], backbone="tf_efficientnet_lite0",
                           pre_trained=False, num_neighbors=settings["num_neighbors"])
    extractor = model.feature_extractor.feature_extractor
    missing, _ = extractor.load_state_dict(load_file(weights), strict=False)
    if missing:
        raise SystemExit(f"anomalib's backbone lacks weights for {missing[:5]}")
    model.anomaly_map_generator = AnomalyMapGenerator(sigma=settings["sigma"])
    return model


def _anomalib_batches(paths: list[str], transform: Any, batch_size: int) -> Any:
    import torch
    from anomalib.data.utils import read_image

    for start in range(0, len(paths), batch_size):
        yield torch.stack([transform(read_image(p, as_tensor=True))
                           for p in paths[start:start + batch_size]])


def _anomalib_masks(manifest: dict[str, Any], size: int) -> Any:
    import torch
    from anomalib.data.utils import read_mask
    from torchvision.transforms import v2

    resize = v2.Resize((size, size), antialias=True)  # nearest on a Mask, as anomalib's loader
    masks = torch.zeros(len(manifest["test"]), size, size, dtype=torch.bool)
    for row, item in enumerate(manifest["test"]):
        if item["mask"]:
            masks[row] = resize(read_mask(item["mask"], as_tensor=True)[None])[0] > 0
    return masks


def _unit(values: Any) -> Any:
    return (values - values.min()) / (values.max() - values.min())


def anomalib_side(manifest: dict[str, Any], out: Path, seed: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from anomalib.metrics.aupro import _AUPRO
    from torchmetrics.classification import BinaryAUROC

    torch.manual_seed(seed)
    settings = manifest["settings"]
    size = settings["image_size"]
    model = _anomalib_model(settings, manifest["weights"])
    transform = _anomalib_transform(size, LITE_MEAN, LITE_STD)
    started = time.perf_counter()
    model.train()
    for images in _anomalib_batches(manifest["train"], transform, settings["batch_size"]):
        model(images)
    model.subsample_embedding(settings["coreset_ratio"])
    fit_seconds = time.perf_counter() - started
    model.eval()
    started = time.perf_counter()
    scores, maps = [], []
    with torch.no_grad():
        for images in _anomalib_batches([t["path"] for t in manifest["test"]], transform,
                                        settings["batch_size"]):
            output = model(images)
            scores.append(output.pred_score)
            maps.append(output.anomaly_map[:, 0])
    predict_seconds = time.perf_counter() - started
    scores_t, maps_t = torch.cat(scores), torch.cat(maps)
    labels = torch.tensor([t["label"] for t in manifest["test"]])
    masks = _anomalib_masks(manifest, size)
    # anomalib's metrics read [0, 1] values (torchmetrics applies a sigmoid to others, which
    # saturates on raw distances): its post-processor's min-max normalisation, here with the
    # whole test set as the validation set that sets the range.
    own = {"image_auroc": round(float(BinaryAUROC()(_unit(scores_t), labels)), 4)}
    if manifest["has_masks"]:
        unit_maps = _unit(maps_t)
        own["pixel_auroc"] = round(float(BinaryAUROC()(unit_maps.flatten(),
                                                       masks.flatten().int())), 4)
        aupro = _AUPRO(fpr_limit=0.3)
        aupro.update(unit_maps, masks.int())
        own["aupro"] = round(float(aupro.compute()), 4)
    np.savez(out / "anomalib.npz", scores=scores_t.numpy(), maps=maps_t.numpy(),
             masks=masks.numpy(), labels=labels.numpy())
    return {"fit_seconds": round(fit_seconds, 1),
            "ms_per_image": round(1000 * predict_seconds / len(manifest["test"]), 1),
            "peak_rss_gb": _peak_rss_gb(),
            "memory_bank_size": int(model.memory_bank.shape[0]),
            "anomalib_metrics": own,
            "settings": {**settings, "normalisation": "lite0", "crop_size": None,
                         "coreset": "KCenterGreedy, sparse random projection eps=0.9"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--anomalib-python", help="python of an environment holding anomalib")
    parser.add_argument("--sets", nargs="+",
                        default=["magnetic_tile", "deeppcb", "elpv-mono", "elpv-poly"])
    parser.add_argument("--elpv", default=str(Path(tempfile.gettempdir()) / "iadkit-elpv"))
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--max-test", type=int, help="test on a sample (quick checks only)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--components", action="store_true",
                        help="also compare the pipelines stage by stage")
    parser.add_argument("--ladders", choices=("both", "reverse"), default="both",
                        help="with --components: both ladders, or only the reverse one "
                        "(iadkit everywhere but one stage: minutes, no anomalib coreset)")
    parser.add_argument("--sides", nargs="+", choices=("iadkit", "anomalib"),
                        default=["iadkit", "anomalib"], help="the sides to run per seed")
    parser.add_argument("--side", choices=["iadkit", "iadkit-preset", "anomalib", "components"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is None:
        if not args.anomalib_python:
            parser.error("--anomalib-python is required (see the module docstring)")
        parent(args)
        return
    manifest = json.loads(Path(args.manifest).read_text())
    out = Path(args.out)
    _import_torchvision()
    if args.side == "anomalib":
        facts = anomalib_side(manifest, out, args.seed)
    elif args.side == "components":
        from anomalib_parity_components import compare_components

        facts = {"lines": compare_components(manifest, args.seed,
                                             first_ladder=args.ladders == "both")}
    else:
        facts = iadkit_side(manifest, out, args.seed, preset=args.side == "iadkit-preset")
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
