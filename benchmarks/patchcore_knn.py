"""Where PatchCore's inference time goes, and what each exact nearest-neighbour search costs.

For a fitted PatchCore model (a run or model folder) and ``--test`` preprocessed test images
(decoding excluded), in batches of 16 and one by one, milliseconds per image of:

- the backbone alone (the floor), and the patch features (backbone plus the neighbourhood
  average and the level resizing);
- the neighbour search of the patches, with each exact backend: ``torch`` (chunked matrix
  products), ``faiss`` (flat L2 index, when installed) and ``screened`` (a bfloat16 first pass,
  exact candidates, a proof per query), and for ``screened`` the share of queries it could not
  prove (searched exhaustively);
- the whole ``predict`` with each backend, and its largest relative score difference from
  the torch backend's (the exactness check; 1e-5 is the goal);
- ``predict`` with the default backend over the backbone alone, as a ratio per round of
  ``--rounds``: the two timed one after the other within each round, so that a slow spell of
  a shared machine slows both (the goal is 1.3 at batch 16 and at batch 1).

One JSON line per backend, then one of the stages, then one of the ratios. Usage (repository
root)::

    .venv/bin/python benchmarks/patchcore_knn.py RUN_OR_MODEL [--data magnetic_tile]
        [--test 64] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from onnx_vs_torch import rate
from records import cpu_model

from iadkit.data import SampleSet, load_dataset, make_loader
from iadkit.engine import resolve_model_dir
from iadkit.methods import Detector
from iadkit.nn.knn import FlatIndex, ScreenedSearch, faiss_available

REPO = Path(__file__).resolve().parents[1]


def timed_batches(images: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """The batches of ``batch`` images that are timed (16 images one by one)."""
    return list(images.split(batch))[:16 if batch == 1 else None]


def ms_per_image(function: Any, images: torch.Tensor, batch: int) -> float:
    """Milliseconds per image of ``function`` in batches of ``batch`` (16 images one by one)."""
    return round(1000 / rate(function, timed_batches(images, batch)), 2)


def paired_ratios(numerator: Any, denominator: Any, images: torch.Tensor, batch: int,
                  rounds: int) -> list[float]:
    """Per round, the time of ``numerator`` over that of ``denominator`` on the same batches
    (:func:`timed_batches`): each runs once untimed, then over every batch, the one after the
    other (a round takes seconds, so both see the same machine; calling them in turn batch by
    batch would time each with the other's data in the cache)."""
    batches = timed_batches(images, batch)
    return [rate(denominator, batches, repeats=1) / rate(numerator, batches, repeats=1)
            for _ in range(rounds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a fitted PatchCore: run folder or model folder")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "magnetic_tile"))
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    detector = Detector.load(resolve_model_dir(args.model), device="cpu")
    if detector.name != "patchcore":
        raise SystemExit(f"{args.model}: a {detector.name} model, not patchcore")
    test = load_dataset(args.data).where(split="test")
    spread = SampleSet(list(test)[::max(1, len(test) // args.test)][:args.test])
    images = torch.cat([b["image"] for b in make_loader(spread, detector.preprocess, 16)])
    bank = detector.memory_bank_
    common = {"benchmark": "patchcore_knn", "cpu": cpu_model(),
              "threads": torch.get_num_threads(), "bank": list(bank.shape),
              "n_test": len(images)}
    with torch.inference_mode():
        features = detector.patch_features(images)
        queries = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        per_image = queries.shape[0] // len(images)
        stages = {**common, "stage": "features",
                  "backbone_ms_batch16": ms_per_image(detector.extractor, images, 16),
                  "backbone_ms_batch1": ms_per_image(detector.extractor, images, 1),
                  "patch_features_ms_batch16": ms_per_image(detector.patch_features, images, 16),
                  "patch_features_ms_batch1": ms_per_image(detector.patch_features, images, 1)}
        detector._index = FlatIndex(bank, "torch")
        reference = detector.predict(images).scores
        backends = ["torch"] + (["faiss"] if faiss_available() else []) + ["screened"]
        for backend in backends:
            index = FlatIndex(bank, backend)
            # rate() counts queries: milliseconds per image are per_image times those per query
            line = {**common, "backend": backend, **{
                f"search_ms_batch{size}": round(1000 * per_image / rate(
                    index.search, list(queries.split(per_image * size))[:16]), 2)
                for size in (16, 1)}}
            if backend == "screened":
                screen = ScreenedSearch(bank)
                screen.search(queries)
                line["unproven_share"] = round(screen.unproven / len(queries), 4)
            detector._index = index
            line["predict_ms_batch16"] = ms_per_image(detector.predict, images, 16)
            line["predict_ms_batch1"] = ms_per_image(detector.predict, images, 1)
            scores = detector.predict(images).scores
            line["max_relative_score_difference"] = float(
                ((scores - reference).abs() / reference.abs().clamp_min(1e-12)).max())
            print(json.dumps(line), flush=True)
        print(json.dumps(stages), flush=True)
        detector._index = FlatIndex(bank, "auto")
        ratios = {**common, "ratio": "predict_over_backbone",
                  "default_backend": detector._index.backend, "rounds": args.rounds}
        for size in (16, 1):
            found = paired_ratios(detector.predict, detector.extractor, images, size,
                                  args.rounds)
            ratios[f"batch{size}"] = {
                "median": round(statistics.median(found), 3), "min": round(min(found), 3),
                "max": round(max(found), 3),
                "share_at_most_1.3": round(sum(r <= 1.3 for r in found) / len(found), 2)}
        print(json.dumps(ratios), flush=True)


if __name__ == "__main__":
    main()
