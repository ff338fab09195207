"""Stage-by-stage comparison of iadkit's and anomalib's PatchCore (see ``anomalib_parity.py``).

Runs in the anomalib environment with iadkit's ``src`` on ``PYTHONPATH``, so both libraries'
stages see the same tensors. Two kinds of result lines:

- ``"kind": "stage"``: one stage of both libraries on identical input, and how far their outputs
  differ (relative to the output's scale), with the part of the difference at the border where
  that is where it lives.
- ``"kind": "ladder"``: the metrics of a pipeline that takes anomalib's choice at every stage
  but the one named (``"iadkit <stage>"``), so the effect of each difference is measured alone;
  then the reverse, iadkit's choice at every stage but one (``"anomalib <stage>"``), free of
  the noise of anomalib's unseeded coreset. ``"all-anomalib"`` and ``"all-iadkit"`` bracket
  the ladders.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from iadkit import metrics
from iadkit.backbones.extractor import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_MEAN,
    LITE_STD,
    FeatureExtractor,
)
from iadkit.data.image_io import read_mask
from iadkit.data.preprocess import Preprocess
from iadkit.methods.patchcore import PatchCore
from iadkit.methods.patchcore.patch_features import LocalPatchFeatures
from iadkit.nn.anomaly_maps import gaussian_blur
from iadkit.nn.coreset import greedy_coreset
from iadkit.nn.knn import FlatIndex

STAGES = ("preprocess", "features", "aggregate", "coreset", "image_score", "map")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)), 6)


class Stages:
    """Both libraries' implementation of every stage, on one set's settings."""

    def __init__(self, settings: dict[str, Any], weights: str) -> None:
        from anomalib_parity import _anomalib_model

        self.size = settings["image_size"]
        self.ratio = settings["coreset_ratio"]
        self.sigma = settings["sigma"]
        self.anomalib = _anomalib_model(settings, weights).eval()
        self.folded = FeatureExtractor("lite0", layers=(2, 3), weights=weights, fold_bn=True)
        self.unfolded = FeatureExtractor("lite0", layers=(2, 3), weights=weights, fold_bn=False)
        self.aggregate_iadkit = LocalPatchFeatures(3, 0)
        self.preprocess_iadkit = Preprocess(self.size)
        self.scorer = PatchCore(num_neighbors=settings["num_neighbors"], reweight=True)

    # -- preprocess: file -> (3, S, S) in [0, 1] --------------------------------------------------
    def preprocess(self, choice: str, paths: list[str]) -> torch.Tensor:
        if choice == "iadkit":
            return torch.stack([self.preprocess_iadkit.load(p) for p in paths])
        from anomalib.data.utils import read_image
        from torchvision.transforms import v2

        resize = v2.Resize((self.size, self.size), antialias=True)
        return torch.stack([resize(read_image(p, as_tensor=True)) for p in paths])

    # -- features: [0, 1] images -> two levels ------------------------------------------------------
    def features(self, choice: str, images: torch.Tensor, normalisation: str = "lite0"
                 ) -> list[torch.Tensor]:
        with torch.no_grad():
            if choice == "iadkit":
                return self.folded(images)
            if choice == "iadkit-unfolded":
                return self.unfolded(images)
            mean, std = ((LITE_MEAN, LITE_STD) if normalisation == "lite0"
                         else (IMAGENET_MEAN, IMAGENET_STD))
            normalised = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
                1, 3, 1, 1)
            return list(self.anomalib.feature_extractor(normalised).values())

    def aggregate(self, choice: str, levels: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if choice == "iadkit":
                return self.aggregate_iadkit(levels)
            pooled = {str(i): self.anomalib.feature_pooler(level) for i, level in enumerate(levels)}
            self.anomalib.layers = list(pooled)
            return self.anomalib.generate_embedding(pooled)

    def coreset(self, choice: str, bank: torch.Tensor, seed: int) -> torch.Tensor:
        if choice == "iadkit":
            return bank[greedy_coreset(bank, self.ratio, 128, seed=seed)]
        from anomalib.models.components import KCenterGreedy

        torch.manual_seed(seed)
        return KCenterGreedy(bank, self.ratio).sample_coreset()

    def image_scores(self, choice: str, embedding: torch.Tensor, patch_scores: torch.Tensor,
                     nearest: torch.Tensor, bank: torch.Tensor, index: FlatIndex
                     ) -> torch.Tensor:
        """embedding (B, hw, D); patch_scores and nearest (B, hw)."""
        if choice == "iadkit":
            return self.scorer._image_scores(embedding, patch_scores, nearest, bank, index)
        self.anomalib.memory_bank = bank
        return self.anomalib.compute_anomaly_score(patch_scores, nearest,
                                                   embedding.reshape(-1, embedding.shape[2]))

    def maps(self, choice: str, patch_scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        grid_scores = patch_scores.view(-1, 1, *grid)
        if choice == "iadkit":
            upsampled = F.interpolate(grid_scores, size=(self.size, self.size), mode="bilinear",
                                      align_corners=False)
            return gaussian_blur(upsampled[:, 0], self.sigma)
        return self.anomalib.anomaly_map_generator(grid_scores, (self.size, self.size))[:, 0]


def _batched(function: Callable[[list[str]], torch.Tensor], paths: list[str], size: int = 16
             ) -> list[torch.Tensor]:
    return [function(paths[i:i + size]) for i in range(0, len(paths), size)]


def compare_components(manifest: dict[str, Any], seed: int, first_ladder: bool = True
                       ) -> list[dict[str, Any]]:
    from anomalib_parity import _anomalib_masks

    stages = Stages(manifest["settings"], manifest["weights"])
    train_paths = manifest["train"]
    test_paths = [t["path"] for t in manifest["test"]]
    labels = np.array([t["label"] for t in manifest["test"]])
    masks = _anomalib_masks(manifest, stages.size).numpy()
    lines: list[dict[str, Any]] = []
    lines.extend(_stage_differences(stages, manifest, masks, seed))

    features_cache: dict[tuple[str, str, str, str], list[torch.Tensor]] = {}

    def embeddings(split: str, preprocess: str, features: str, aggregate: str,
                   normalisation: str = "lite0") -> list[torch.Tensor]:
        key = (split, preprocess, features, aggregate + normalisation)
        if key not in features_cache:
            paths = train_paths if split == "train" else test_paths
            features_cache[key] = _batched(lambda batch: stages.aggregate(
                aggregate, stages.features(features, stages.preprocess(preprocess, batch),
                                           normalisation)), paths)
        return features_cache[key]

    banks: dict[tuple, torch.Tensor] = {}

    def run(name: str, choice: dict[str, str], normalisation: str = "lite0",
            train_share: float = 1.0) -> None:
        started = time.perf_counter()
        bank_key = (choice["preprocess"], choice["features"], choice["aggregate"],
                    choice["coreset"], normalisation, train_share)
        if bank_key not in banks:
            train = embeddings("train", choice["preprocess"], choice["features"],
                               choice["aggregate"], normalisation)
            n_images = max(1, round(train_share * len(train_paths)))
            flat = torch.cat([b.permute(0, 2, 3, 1).reshape(-1, b.shape[1]) for b in train])
            flat = flat[: n_images * train[0].shape[2] * train[0].shape[3]]
            banks[bank_key] = stages.coreset(choice["coreset"], flat, seed)
        bank = banks[bank_key]
        index = FlatIndex(bank, "torch")
        scores, maps = [], []
        for batch in embeddings("test", choice["preprocess"], choice["features"],
                                choice["aggregate"], normalisation):
            grid = tuple(batch.shape[-2:])
            flat = batch.permute(0, 2, 3, 1).reshape(batch.shape[0], -1, batch.shape[1])
            distances, nearest = index.search(flat.reshape(-1, flat.shape[2]))
            patch_scores = distances.view(batch.shape[0], -1)
            nearest = nearest.view(batch.shape[0], -1)
            scores.append(stages.image_scores(choice["image_score"], flat, patch_scores, nearest,
                                              bank, index))
            maps.append(stages.maps(choice["map"], patch_scores, grid))
        score_array = torch.cat(scores).numpy()
        line = {"kind": "ladder", "pipeline": name,
                "image_auroc": round(metrics.auroc(labels, score_array), 4)}
        if manifest["has_masks"]:
            pixel = metrics.pixel_metrics(masks, torch.cat(maps).numpy())
            line.update(pixel_auroc=round(pixel["pixel_auroc"], 4),
                        aupro=round(pixel["pixel_aupro"], 4))
        line["seconds"] = round(time.perf_counter() - started, 1)
        lines.append(line)

    anomalib_choice = dict.fromkeys(STAGES, "anomalib")
    if first_ladder:
        run("all-anomalib", anomalib_choice)
        for stage in STAGES:
            run(f"iadkit {stage}", {**anomalib_choice, stage: "iadkit"})
        run("anomalib with ImageNet normalisation (its default)", anomalib_choice, "imagenet")
    iadkit_choice = dict.fromkeys(STAGES, "iadkit")
    run("all-iadkit", iadkit_choice)
    run("all-iadkit, fitted on 90% of the normals", iadkit_choice, train_share=0.9)
    # The reverse ladder: iadkit's choice everywhere but one stage. Its coreset is seeded, so
    # these lines carry no coreset noise (anomalib's projection is drawn unseeded, and moves
    # the first ladder by about a percent from run to run).
    for stage in STAGES:
        run(f"anomalib {stage}", {**iadkit_choice, stage: "anomalib"})
    return lines


def _stage_differences(stages: Stages, manifest: dict[str, Any], anomalib_masks: np.ndarray,
                       seed: int) -> list[dict[str, Any]]:
    """Each stage of both libraries on identical input (the first 16 test images; the
    evaluation masks: all of them, ``anomalib_masks`` as anomalib's loader gives them)."""
    paths = [t["path"] for t in manifest["test"]][:16]
    out: list[dict[str, Any]] = []
    ours, theirs = stages.preprocess("iadkit", paths), stages.preprocess("anomalib", paths)
    out.append({"kind": "stage", "stage": "preprocess", "max_abs": round(float(
        (ours - theirs).abs().max()), 4), "mean_abs": round(float((ours - theirs).abs().mean()), 5),
        "note": "Pillow bilinear on uint8 vs torchvision antialiased bilinear on float"})
    folded, unfolded = stages.features("iadkit", theirs), stages.features("iadkit-unfolded", theirs)
    anomalib_levels = stages.features("anomalib", theirs)
    out.append({"kind": "stage", "stage": "features",
                "folded_vs_unfolded": [_relative(a, b) for a, b in zip(folded, unfolded)],
                "unfolded_vs_anomalib": [_relative(a, b) for a, b in zip(unfolded, anomalib_levels)]})
    ours_agg = stages.aggregate("iadkit", anomalib_levels)
    theirs_agg = stages.aggregate("anomalib", anomalib_levels)
    out.append({"kind": "stage", "stage": "aggregate", "all": _relative(ours_agg, theirs_agg),
                "interior": _relative(ours_agg[..., 4:-4, 4:-4], theirs_agg[..., 4:-4, 4:-4]),
                "note": "3x3 average: both count the outside of the map as zeros since "
                        "2026-12-01 (iadkit averaged the inside positions before); a border "
                        "difference reaches two fine cells in through the coarser level, hence "
                        "the 4-cell margin of 'interior'"})
    train = torch.cat([stages.aggregate("anomalib", stages.features(
        "anomalib", stages.preprocess("anomalib", manifest["train"][i:i + 16])))
        for i in range(0, min(len(manifest["train"]), 64), 16)])
    flat = train.permute(0, 2, 3, 1).reshape(-1, train.shape[1])
    coverage, banks = {}, {}
    for choice in ("iadkit", "anomalib"):
        started = time.perf_counter()
        banks[choice] = stages.coreset(choice, flat, seed)
        seconds = time.perf_counter() - started
        distances, _ = FlatIndex(banks[choice], "torch").search(flat)
        coverage[choice] = {"bank": int(banks[choice].shape[0]),
                            "radius": round(float(distances.max()), 3),
                            "mean_distance": round(float(distances.mean()), 4),
                            "seconds": round(seconds, 1)}
    out.append({"kind": "stage", "stage": "coreset", "n_patches": int(flat.shape[0]), **coverage,
                "note": "distance of every training patch to the nearest bank entry (64 images)"})
    bank = banks["anomalib"]
    queries = theirs_agg.permute(0, 2, 3, 1).reshape(len(paths), -1, theirs_agg.shape[1])
    index = FlatIndex(bank, "torch")
    distances, nearest = (x[:, 0] for x in index.search(queries.reshape(-1, queries.shape[2])))
    stages.anomalib.memory_bank = bank
    their_distances, their_nearest = stages.anomalib.nearest_neighbors(
        queries.reshape(-1, queries.shape[2]), 1)
    out.append({"kind": "stage", "stage": "nearest_neighbour",
                "distance_max_abs": round(float((distances - their_distances).abs().max()), 6),
                "same_neighbour": round(float((nearest == their_nearest).float().mean()), 4)})
    patch_scores, nearest = distances.view(len(paths), -1), nearest.view(len(paths), -1)
    ours_score = stages.image_scores("iadkit", queries, patch_scores, nearest, bank, index)
    theirs_score = stages.image_scores("anomalib", queries, patch_scores, nearest, bank, index)
    out.append({"kind": "stage", "stage": "image_score",
                "relative": _relative(ours_score, theirs_score)})
    grid = tuple(theirs_agg.shape[-2:])
    ours_map, theirs_map = stages.maps("iadkit", patch_scores, grid), stages.maps(
        "anomalib", patch_scores, grid)
    border = 16
    out.append({"kind": "stage", "stage": "map", "all": _relative(ours_map, theirs_map),
                "interior": _relative(ours_map[:, border:-border, border:-border],
                                      theirs_map[:, border:-border, border:-border]),
                "note": "iadkit: bilinear upsampling, scipy-style symmetric border; anomalib: "
                        "nearest upsampling, kornia reflect border; both Gaussian sigma 4"})
    ours_masks = np.stack([stages.preprocess_iadkit.mask_array(read_mask(t["mask"]))
                           if t["mask"] else np.zeros((stages.size,) * 2, np.float32)
                           for t in manifest["test"]]) > 0.5
    out.append({"kind": "stage", "stage": "evaluation_masks",
                "pixels_differing": int((ours_masks != anomalib_masks).sum()),
                "anomalous_pixels": int(anomalib_masks.sum())})
    return out
