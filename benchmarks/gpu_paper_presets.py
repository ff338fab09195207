"""The paper presets' speed on a GPU, in float32 and bfloat16 (issue 20's device figures).

Every method fits at its ``paper`` preset with random backbone weights (the papers' backbones
are not on the device machine; the accuracy is meaningless, the time real) on the training
images of ``--data``, its epochs capped at ``--epochs``, then predicts preprocessed test images
in batches of 32. One JSON line per method and precision: fit seconds, seconds per epoch and
training images per second (trained methods), the coreset's seconds (PatchCore), inference
images per second, peak GPU memory. Usage (repository root; ``--device cpu --image-size 64
--train-images 16`` makes a quick check of the script on a CPU)::

    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_paper_presets.py --data DATA \\
        [--methods patchcore rd ...] [--precisions f32 bf16] [--epochs 2] [--device cuda]

For the device machine (whose data must travel with the checkout): copy
``../shared/data/magnetic_tile`` and ``../shared/data/textures`` into a folder git ignores
(61 MB together, within the 64 MiB a run carries) and pass it with ``--data`` / ``--textures``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from records import peak_rss_gb

from iadkit.data import SampleSet, load_dataset, make_loader
from iadkit.methods import get_method
from iadkit.nn.precision import PRECISIONS

#: Issue 20's methods: PatchCore's fit and inference, the trained methods' epochs.
METHODS = ("patchcore", "rd", "aand", "simplenet", "uniad", "lafite")
#: Image folders a method needs at its paper preset (AAND's anomaly textures).
NEEDS_TEXTURES = {"aand": "texture_dir"}


def synchronised_seconds(device: torch.device, started: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def measure(method: str, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    cls = get_method(method)
    params: dict[str, Any] = {"device": args.device, "precision": precision,
                              "backbone_weights": "random"}
    if "epochs" in cls.hyperparameters:
        params["epochs"] = args.epochs
    if method == "aand":
        params["amplify_epochs"] = args.epochs
    if method in NEEDS_TEXTURES:
        params[NEEDS_TEXTURES[method]] = args.textures
    if args.image_size:
        params["image_size"] = args.image_size
    detector = cls.from_preset("paper", **params)
    device = detector.torch_device
    samples = load_dataset(args.data)
    train = SampleSet(list(samples.where(split="train"))[:args.train_images])
    test = SampleSet(list(samples.where(split="test"))[:args.test_images])
    workers = args.workers
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    detector.fit(make_loader(train, detector.preprocess, batch_size=32, workers=workers))
    fit_seconds = synchronised_seconds(device, started)
    info = detector.fit_info_ or {}
    line: dict[str, Any] = {"benchmark": "gpu_paper_presets", "method": method,
                            "precision": precision, "device": str(device),
                            "n_train": len(train), "fit_seconds": round(fit_seconds, 2)}
    epochs = sum(len(losses) for losses in info.get("loss_history", {}).values())
    if epochs and info.get("seconds_training"):
        line.update(epochs=epochs,
                    seconds_per_epoch=round(info["seconds_training"] / epochs, 3),
                    train_images_per_second=round(len(train) * epochs
                                                  / info["seconds_training"], 1))
    if "seconds_coreset" in info:
        line.update(seconds_coreset=info["seconds_coreset"],
                    seconds_features=info.get("seconds_features"))
    images = torch.cat([batch["image"] for batch in
                        make_loader(test, detector.preprocess, batch_size=32, workers=workers)])
    batches = list(images.split(32))
    detector.predict(batches[0])  # warm-up: kernels chosen, caches built
    started = time.perf_counter()
    for batch in batches:
        detector.predict(batch)  # returns CPU tensors: each batch is complete
    line["inference_images_per_second"] = round(len(images)
                                                / synchronised_seconds(device, started), 1)
    if device.type == "cuda":
        line["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        line["gpu"] = torch.cuda.get_device_name(device)
    line["peak_rss_gb"] = peak_rss_gb()
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a dataset in the MVTec layout")
    parser.add_argument("--textures", help="texture folder (AAND's anomalies)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS,
                        default=["f32", "bf16"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--image-size", type=int, help="override the presets' (CPU checks)")
    parser.add_argument("--train-images", type=int, default=100_000)
    parser.add_argument("--test-images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    for method in args.methods:
        for precision in args.precisions:
            try:
                line = measure(method, precision, args)
            except Exception as error:  # noqa: BLE001 (one method's failure ends its line only)
                line = {"benchmark": "gpu_paper_presets", "method": method,
                        "precision": precision, "error": f"{type(error).__name__}: {error}"}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
