"""PatchCore's fit at growing training sets: time, peak memory and which coreset rule ran.

Issue 24's bounded-memory goal: 7,000 training images (Magnetic Tile's 700 with seeded
augmentations: flips, half turns, brightness, contrast, shifts, noise; copy 0 is the original) at a
1% coreset within 4 GiB, with fit time linear in the number of images. Each size is fitted in a
fresh process, so ``peak_rss_gb`` is that fit's peak alone (read right after the fit, before any
test map exists); the model is then tested on Magnetic Tile's test set. Usage::

    .venv/bin/python benchmarks/patchcore_scale.py --sizes 700 1750 3500 7000 \\
        [--param coreset_chunk_gb=0.25] [--out /tmp/scale.jsonl]

With ``--out``, sizes (with the same parameters) already in the file are skipped, so a stopped
run resumes. One JSON line per size: ``fit_seconds`` (features + coreset), ``seconds_features``,
``seconds_coreset``, ``coreset_rule`` ('exact': the greedy over all patches; 'chunked': the
two-stage rule, see iadkit.nn.coreset), ``coreset_chunks``, ``peak_rss_gb``, image and pixel
AUROC and AUPRO on the 644 test images.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from timing import timed_predictions
from torch.utils.data import DataLoader, Dataset

from iadkit import metrics
from iadkit.data import load_dataset
from iadkit.data.dataset import ImageDataset
from iadkit.methods import create_detector

REPO = Path(__file__).resolve().parents[1]


class AugmentedImages(Dataset):
    """``copies`` seeded variants of every preprocessed training image (copy 0 unchanged)."""

    def __init__(self, images: ImageDataset, size: int, seed: int = 0) -> None:
        self.images, self.size, self.seed = images, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.images[index % len(self.images)])
        copy = index // len(self.images)
        image = item["image"]
        if copy:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            draw = torch.rand(6, generator=generator)
            if draw[0] < 0.5:
                image = image.flip(-1)
            if draw[1] < 0.5:
                image = image.flip(-2)
            # contrast and brightness within 10 % (in normalised units), then a shift of up to
            # 8 pixels (wrapping round) and a little noise
            image = image * (0.9 + 0.2 * draw[2]) + (draw[3] - 0.5) * 0.4
            shift = (int(draw[4] * 17) - 8, int(draw[5] * 17) - 8)
            image = torch.roll(image, shift, dims=(-2, -1))
            image = image + 0.02 * torch.randn(image.shape, generator=generator)
        item["image"], item["index"] = image.contiguous(), index
        return item


def fit_and_test(data: Path, n_train: int, params: dict[str, Any], batch_size: int
                 ) -> dict[str, Any]:
    samples = load_dataset(data)
    train, test = samples.where(split="train"), samples.where(split="test")
    detector = create_detector("patchcore", "cpu", device="cpu", **params)
    images = AugmentedImages(ImageDataset(train, detector.preprocess), n_train)
    started = time.perf_counter()
    detector.fit(DataLoader(images, batch_size=batch_size))
    fit_seconds = time.perf_counter() - started
    peak_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    info = detector.fit_info_
    timed = timed_predictions(detector, test, batch_size)
    image = metrics.image_metrics(timed.labels, timed.scores)
    pixel = metrics.pixel_metrics(timed.masks, timed.maps)
    return {
        "benchmark": "patchcore_scale", "params": params, "n_train": n_train,
        "n_patches": info["n_patches"], "memory_bank_size": info["memory_bank_size"],
        "coreset_rule": info["coreset_rule"], "coreset_chunks": info["coreset_chunks"],
        "fit_seconds": round(fit_seconds, 1), "seconds_features": info["seconds_features"],
        "seconds_coreset": info["seconds_coreset"],
        "ms_fit_per_image": round(1000 * fit_seconds / n_train, 2),
        "peak_rss_gb": round(peak_fit, 3),
        "image_auroc": round(image["image_auroc"], 4),
        "pixel_auroc": round(pixel["pixel_auroc"], 4),
        "pixel_aupro": round(pixel["pixel_aupro"], 4),
        "ms_per_image": round(1000 * timed.predict_seconds / len(test), 2),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "magnetic_tile"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[700, 1750, 3500, 7000])
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", help="JSON-lines file to append to (and resume from)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    params = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.param)}
    if args.one:
        print(json.dumps(fit_and_test(Path(args.data), args.sizes[0], params, args.batch_size)))
        return
    done = set()
    if args.out and Path(args.out).is_file():
        for line in Path(args.out).read_text().splitlines():
            record = json.loads(line)
            if record.get("params") == params:
                done.add(record["n_train"])
    for size in args.sizes:
        if size in done:
            continue
        command = [sys.executable, __file__, "--one", "--data", args.data, "--sizes", str(size),
                   "--batch-size", str(args.batch_size)]
        for pair in args.param:
            command += ["--param", pair]
        line = subprocess.run(command, check=True, capture_output=True, text=True
                              ).stdout.strip().splitlines()[-1]
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as out:
                out.write(line + "\n")


if __name__ == "__main__":
    main()
