"""CSE on surfaces: image AUROC per category and inference time next to the backbone's.

Prints one JSON line per (variant, category). Usage (from the repository root)::

    .venv/bin/python benchmarks/cse_surfaces.py [--variants cse classifier no_decoder]
        [--textures ../shared/data/textures] [--epochs 15]

Categories:

- ``magnetic_tile``: real defects (Magnetic Tile Defects, MVTec layout).
- ``dtd_<class>``: surfaces cut from DTD photos (``--textures``; 256 px crops, 8 per photo).
  Photos are split 60/40 into train and test, so test crops come from unseen photos; half the
  test crops get a defect that CSE's training synthesis does not make: another class's texture
  blended into a Perlin region (DRAEM, opacity 0.2-1; textures from the other DTD classes), or a CutPaste patch or scar.
- ``generated_<i>``: iadkit's procedural striped textures with dark/bright blobs and scratches.

Timings (batches of 16 preprocessed images, decoding excluded; and single images, the paper's
latency): ``predict`` against the frozen backbone alone on the same images. The paper's claim
is that CSE costs almost nothing over its backbone; the target here is <= 1.15x.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timing import timed_predictions

from iadkit import metrics
from iadkit.data import generate_dataset, load_dataset, make_loader
from iadkit.methods import create_detector
from iadkit.synthesis import CutPasteSynthesizer, DraemSynthesizer, TextureSource

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
VARIANTS = {
    "cse": {},
    "classifier": {"objective": "classifier"},  # the paper's Table 4 baseline
    "no_decoder": {"decoder": "none"},  # Table 5
    "decoder_before": {"decoder": "before"},
    "decoder_joint": {"decoder": "joint"},
}
DTD_CLASSES = ("banded", "braided", "chequered", "crosshatched")


def _crops(photo: Path, count: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    image = Image.open(photo).convert("RGB")
    scale = 320 / min(image.size)
    image = image.resize((max(size, round(image.width * scale)),
                          max(size, round(image.height * scale))), Image.BILINEAR)
    array = np.asarray(image)
    crops = []
    for _ in range(count):
        top = int(rng.integers(0, array.shape[0] - size + 1))
        left = int(rng.integers(0, array.shape[1] - size + 1))
        crops.append(array[top:top + size, left:left + size])
    return crops


def build_dtd_surfaces(textures: Path, root: Path, classes: tuple[str, ...], size: int = 256,
                       crops_per_photo: int = 8, seed: int = 0) -> list[str]:
    """Write one MVTec-layout category per DTD class (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    names = []
    for index, name in enumerate(classes):
        rng = np.random.default_rng(seed * 100 + index)
        photos = sorted((textures / name).glob("*.jpg"))
        rng.shuffle(photos)
        cut = int(0.6 * len(photos))
        category = root / f"dtd_{name}"
        others = Path(tempfile.mkdtemp(prefix="others_", dir=root.parent))
        for other in sorted(textures.glob("*/*.jpg")):  # every other DTD class's photos
            if other.parent.name != name:
                (others / f"{other.parent.name}_{other.name}").symlink_to(other.resolve())
        defects = [("draem", DraemSynthesizer(TextureSource(others), 1.0, beta_range=(0.0, 0.8))),
                   ("cutpaste", CutPasteSynthesizer("normal", 1.0)),
                   ("scar", CutPasteSynthesizer("scar", 1.0))]
        count = 0
        for split, split_photos in (("train", photos[:cut]), ("test", photos[cut:])):
            for photo in split_photos:
                for crop in _crops(photo, crops_per_photo, size, rng):
                    count += 1
                    folder, mask = "good", None
                    if split == "test" and count % 2:
                        kind, synthesizer = defects[(count // 2) % len(defects)]
                        sample = synthesizer(torch.from_numpy(crop.copy()).permute(2, 0, 1) / 255.0,
                                             generator)
                        crop = (sample.image.permute(1, 2, 0).numpy() * 255).round()
                        folder, mask = kind, sample.mask.numpy()
                    out = category / split / folder / f"{count:04d}.png"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(crop.astype(np.uint8)).save(out)
                    if mask is not None:
                        mask_path = category / "ground_truth" / folder / f"{count:04d}_mask.png"
                        mask_path.parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray((mask > 0.5).astype(np.uint8) * 255).save(mask_path)
        names.append(category.name)
    return names


def single_image_ms(function, images: torch.Tensor, rounds: int = 3) -> float:
    """Milliseconds per image, one image at a time; the best of ``rounds`` passes (the least
    disturbed by other work on the machine)."""
    function(images[:1])
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for index in range(images.shape[0]):
            function(images[index:index + 1])
        best = min(best, (time.perf_counter() - started) / images.shape[0])
    return 1000 * best


def latency_only() -> None:
    """Latency of the cpu preset at 224 px (one image and batches of 16) against its backbone,
    with a briefly fitted model on random images: timing does not depend on the weights."""
    detector = create_detector("cse", "cpu", device="cpu", epochs=1, min_steps=0)
    detector.fit(torch.rand(20, 3, 224, 224))
    images = torch.rand(64, 3, 224, 224)
    with torch.no_grad():
        single = single_image_ms(detector.predict, images[:32]), \
            single_image_ms(detector.extractor, images[:32])
        batched = [min(_batch_seconds(function, images) for _ in range(3))
                   for function in (detector.predict, detector.extractor)]
    print(json.dumps({
        "benchmark": "cse_surfaces", "variant": "latency_only", "input_size": 224,
        "latency_ms": round(single[0], 2), "backbone_latency_ms": round(single[1], 2),
        "latency_over_backbone": round(single[0] / single[1], 3),
        "batch16_ms_per_image": round(1000 * batched[0] / len(images), 2),
        "backbone_batch16_ms_per_image": round(1000 * batched[1] / len(images), 2),
        "batch_time_over_backbone": round(batched[0] / batched[1], 3),
        "torch_threads": torch.get_num_threads(),
    }))


def _batch_seconds(function, images: torch.Tensor) -> float:
    function(images[:16])
    started = time.perf_counter()
    for batch in images.split(16):
        function(batch)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["cse"], choices=sorted(VARIANTS))
    parser.add_argument("--magnetic-tile", default=str(SHARED / "magnetic_tile"))
    parser.add_argument("--textures", default=str(SHARED / "textures"))
    parser.add_argument("--dtd-classes", nargs="*", default=list(DTD_CLASSES))
    parser.add_argument("--generated", type=int, default=2, help="procedural categories")
    parser.add_argument("--skip-magnetic-tile", action="store_true")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--latency-images", type=int, default=32)
    parser.add_argument("--latency-only", action="store_true",
                        help="only time the cpu preset against its backbone (no datasets)")
    args = parser.parse_args()
    if args.latency_only:
        latency_only()
        return

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        datasets: list[tuple[Path, str]] = []
        if not args.skip_magnetic_tile:
            datasets.append((Path(args.magnetic_tile), "magnetic_tile"))
        if args.dtd_classes:
            for name in build_dtd_surfaces(Path(args.textures), root / "dtd",
                                           tuple(args.dtd_classes)):
                datasets.append((root / "dtd", name))
        if args.generated:
            names = tuple(f"generated_{i}" for i in range(args.generated))
            generate_dataset(root / "generated", categories=names, n_train=120, n_test_good=30,
                             n_test_defect=30, size=256, seed=0)
            datasets += [(root / "generated", name) for name in names]

        for variant in args.variants:
            params = dict(VARIANTS[variant])
            if args.epochs is not None:
                params["epochs"] = args.epochs
            for data_root, category in datasets:
                samples = load_dataset(data_root, [category]) if category != "magnetic_tile" \
                    else load_dataset(data_root)
                train, test = samples.where(split="train"), samples.where(split="test")
                detector = create_detector("cse", "cpu", device="cpu", **params)
                started = time.perf_counter()
                detector.fit(make_loader(train, detector.preprocess, args.batch_size))
                fit_seconds = time.perf_counter() - started
                first = next(iter(make_loader(test, detector.preprocess, args.latency_images)))
                images = first["image"]
                detector.predict(images[:args.batch_size])  # warm-up: builds the map operator
                timed = timed_predictions(detector, test, args.batch_size)
                image = metrics.image_metrics(timed.labels, timed.scores)
                has_masks = bool(timed.masks.any())
                pixel = metrics.pixel_metrics(timed.masks, timed.maps) if has_masks else {}
                predict_ms = single_image_ms(detector.predict, images)
                backbone_ms = single_image_ms(detector.extractor, images)
                n = len(test)
                print(json.dumps({
                    "benchmark": "cse_surfaces", "variant": variant, "category": category,
                    "params": params, "n_train": len(train), "n_test": n,
                    "chosen_epoch": detector.fit_info_["chosen_epoch"],
                    "image_auroc": round(image["image_auroc"], 4),
                    "image_ap": round(image["image_ap"], 4),
                    "pixel_auroc": round(pixel["pixel_auroc"], 4) if has_masks else None,
                    "fit_seconds": round(fit_seconds, 1),
                    "images_per_second": round(n / timed.predict_seconds, 2),
                    "backbone_images_per_second": round(n / timed.backbone_seconds, 2),
                    "batch_time_over_backbone": round(timed.predict_seconds
                                                      / timed.backbone_seconds, 3),
                    "latency_ms": round(predict_ms, 2),
                    "backbone_latency_ms": round(backbone_ms, 2),
                    "latency_over_backbone": round(predict_ms / backbone_ms, 3),
                    "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                         / 1e6, 3),
                    "torch_threads": torch.get_num_threads(),
                }))
                sys.stdout.flush()


if __name__ == "__main__":
    main()
