"""PatchCore (Roth et al., CVPR 2022): a coreset memory bank of locally aware patch features.

Training keeps a greedy coreset of all training patch features; a test patch's anomaly score is
its distance to the nearest memory feature. The image score is the largest patch score,
re-weighted by how isolated that patch's nearest memory feature is among its neighbours
(paper Eq. 7). The map is the patch-score grid upsampled to the image and Gaussian-smoothed.

Every memory-bank entry remembers the training image it came from, so a training image can be
scored against the bank without its own entries (:meth:`Detector.predict_left_out`): an
out-of-sample normal score for every training image, for calibration. With the full bank
(``coreset_ratio=1``) that score equals the one from a bank fitted without the image; with a
coreset it can be a little higher (the coreset kept the image's own entries in place of nearby
ones of other images), which errs towards a higher threshold.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ... import distributed
from ...errors import IadkitError
from ...nn.anomaly_maps import UpsampleBlur, upsampled
from ...nn.coreset import StreamingCoreset
from ...nn.knn import BACKEND_RULE, FlatIndex
from ...progress import progress
from ...validation import Flag, Number, Optional
from .. import register
from ..base import BackboneDetector, Prediction, indexed_image_batches
from ..hyperparameters import hyperparameter
from .patch_features import LocalPatchFeatures


@register
class PatchCore(BackboneDetector):
    """PatchCore anomaly detector.

    Example:
        >>> detector = PatchCore.from_preset("cpu").fit(train_images)
        >>> prediction = detector.predict(test_images)
    """

    name = "patchcore"
    supports_leave_one_out = True
    summary = "coreset memory bank of locally aware patch features, nearest-neighbour scoring"
    # The map smoothing only changes pixel scores: choose it by pixel AUROC.
    default_search = ({"param": "smoothing_sigma", "values": [1, 2, 4, 6, 8, 12, 16],
                       "metric": "pixel_auroc"},)
    # Single generators disagree on the smoothing (see build_pseudo_validation): all of them.
    search_synthesis = "mixed"
    presets = {
        # No centre crop: on surfaces and strips it loses the border (Magnetic Tile: a quarter
        # of the defect pixels, 43 of 388 defects entirely; docs/patchcore.md).
        "cpu": dict(backbone="tf_efficientnet_lite0", layers=(2, 3), image_size=256,
                    crop_size=None, coreset_ratio=0.01),
        "paper": dict(backbone="wide_resnet50_2", layers=("layer2", "layer3"), image_size=256,
                      crop_size=224, feature_dim=1024, coreset_ratio=0.1),
    }
    tiny_params = dict(image_size=64, coreset_ratio=0.25)

    layers = (2, 3)
    patch_kernel: int = hyperparameter(3, Number(int, 1), "neighbourhood size of the locally "
                                       "aware features")
    grid_level: int = hyperparameter(0, Number(int, 0), "which of the layers sets the patch grid "
                                     "(0 = the first, finest)")
    feature_dim: int | None = hyperparameter(
        None, Optional(Number(int, 1)), "reduce each patch feature to this many values by "
        "adaptive average pooling over channels (the official code's embedding dimension); "
        "null keeps all channels")
    coreset_ratio: float = hyperparameter(0.01, Number(float, 0, 1, low_open=True),
                                          "share of training patches kept in the memory bank")
    coreset_memory_gb: float | None = hyperparameter(
        1.0, Optional(Number(float, 0, low_open=True)), "memory for the candidate patches the "
        "coreset holds at once (features and projections, all ranks together): when all patches "
        "fit, the exact greedy rule; else the two-stage chunked rule (iadkit.nn.coreset); null: "
        "no bound, always exact")
    projection_dim: int | None = hyperparameter(128, Optional(Number(int, 1)),
                                                "random-projection dimension of the coreset's "
                                                "distances (null: none)")
    num_neighbors: int = hyperparameter(9, Number(int, 1), "neighbourhood size b of the image-"
                                        "score re-weighting", inference=True)
    reweight: bool = hyperparameter(True, Flag(), "re-weight the image score (paper Eq. 7); "
                                    "false gives the plain max patch score", inference=True)
    smoothing_sigma: float = hyperparameter(4.0, Number(float, 0), "Gaussian sigma of the map "
                                            "smoothing (0: off)", inference=True)
    knn_backend: str = hyperparameter("auto", BACKEND_RULE, "nearest-neighbour search (all "
                                      "exact; see iadkit.nn.knn)")
    batch_size: int = hyperparameter(16, Number(int, 1), "images per forward pass")

    def _check_params(self) -> None:
        super()._check_params()
        if self.grid_level >= len(self.layers):
            raise self._refuse(f"grid_level={self.grid_level} names no level of layers="
                               f"{list(self.layers)}")

    @property
    def _aggregate(self) -> LocalPatchFeatures:
        return LocalPatchFeatures(self.patch_kernel, self.grid_level)

    # -- features -------------------------------------------------------------------------
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, D, h, w) patch features."""
        extractor = self.extractor
        features = self._aggregate(extractor(images))
        if self.feature_dim is not None and self.feature_dim != features.shape[1]:
            batch, channels, height, width = features.shape
            flat = features.permute(0, 2, 3, 1).reshape(-1, 1, channels)
            flat = F.adaptive_avg_pool1d(flat, self.feature_dim)
            features = flat.view(batch, height, width, -1).permute(0, 3, 1, 2)
        return features

    # -- Detector contract --------------------------------------------------------------------
    def _fit(self, train: Iterable[Any] | torch.Tensor, show_progress: bool,
             checkpoint_dir: str | Path | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        # Under torchrun each rank takes every world_size-th batch; every rank sees every
        # batch's size, so all number the patches alike and cut the coreset's chunks alike.
        ranks, rank = distributed.world_size(), distributed.rank()
        coreset: StreamingCoreset | None = None
        unit_images, patches_per_unit = [], 0
        batches = indexed_image_batches(train, self.batch_size)
        for number, (images, indices) in enumerate(progress(batches, "features", show_progress)):
            images = images.to(self.torch_device)
            if coreset is None:  # the feature shape, known to every rank
                channels, height, width = self.patch_features(images[:1]).shape[1:]
                patches_per_unit = height * width
                coreset = self._new_coreset(channels, show_progress)
                grid = [height, width]
            features = None
            if number % ranks == rank:
                features = self.patch_features(images)
                features = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
            # Rows are input-major: a patch's input (an image, or one tile) is its row over the
            # patches per input.
            coreset.add(features, images.shape[0] * patches_per_unit)
            unit_images.append(indices)  # every rank: whose image each input is
        if coreset is None:
            raise IadkitError("patchcore: no training images")
        extracted = time.perf_counter()
        # The chunked rule reduces chunks while features are still being extracted.
        reduced_while_extracting = coreset.selection_seconds
        indices, bank = coreset.finish()
        seconds_coreset = reduced_while_extracting + time.perf_counter() - extracted
        self._set_memory_bank(bank.contiguous())
        # Each entry's training image (the one a leave-one-out prediction removes).
        unit_images = torch.cat(unit_images)
        self.memory_bank_sources_ = unit_images[indices.cpu() // patches_per_unit].to(torch.int32)
        return {
            "n_train_images": len(unit_images.unique()),
            "n_patches": len(unit_images) * patches_per_unit,
            "memory_bank_size": int(self.memory_bank_.shape[0]),
            "feature_dim": channels,
            "feature_grid": grid,
            "coreset_rule": coreset.rule,
            "coreset_chunks": coreset.n_chunks,
            **self.backbone_facts(),
            "seconds_features": round(extracted - started - reduced_while_extracting, 2),
            "seconds_coreset": round(seconds_coreset, 2),
        }

    def _new_coreset(self, channels: int, show_progress: bool) -> StreamingCoreset:
        """The coreset selector, within ``coreset_memory_gb``."""
        memory_points = None
        if self.coreset_memory_gb is not None:
            # float32 features and their projections (one array when nothing is projected)
            projected = self.projection_dim is not None and self.projection_dim < channels
            bytes_per_point = 4 * (channels + (self.projection_dim if projected else 0))
            memory_points = max(1, int(self.coreset_memory_gb * 2**30 / bytes_per_point))
        return StreamingCoreset(channels, self.coreset_ratio, self.projection_dim, seed=self.seed,
                                memory_points=memory_points, device=self.torch_device,
                                show_progress=show_progress)

    def _score_patches(self, images: torch.Tensor, index: FlatIndex | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch features (B, D, h, w), and per patch the distance to and the index of the
        nearest feature of ``index`` (default: the memory bank), (B, h, w) and (B, h*w)."""
        features = self.patch_features(images)
        batch, dim, height, width = features.shape
        queries = features.permute(0, 2, 3, 1).reshape(-1, dim)
        distances, indices = (index or self._index).search(queries)
        return features, distances.view(batch, height, width), indices.view(batch, -1)

    def raw_maps_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unsmoothed maps, and the patch features (our choice of CADA input for PatchCore:
        it has no bottleneck)."""
        features, patch_scores, _ = self._score_patches(images)
        return upsampled(patch_scores, images.shape[-2:]), features

    def _predict(self, images: torch.Tensor) -> Prediction:
        return self._prediction(images, self.memory_bank_, self._index)

    def _predict_left_out(self, images: torch.Tensor, train_indices: torch.Tensor
                          ) -> Prediction:
        sources = getattr(self, "memory_bank_sources_", None)
        if sources is None:
            raise IadkitError("patchcore: this model was saved without its memory bank's "
                              "sources (by an earlier iadkit); fit it again to leave images out")
        predictions = []
        for image, source in zip(images, train_indices.tolist()):
            # The bank as a fit without this image would see it: its own entries removed.
            bank = self.memory_bank_[(sources != source).to(self.memory_bank_.device)]
            predictions.append(self._prediction(image[None], bank,
                                                FlatIndex(bank, self.knn_backend)))
        return Prediction(torch.cat([p.anomaly_maps for p in predictions]),
                          torch.cat([p.scores for p in predictions]))

    def _prediction(self, images: torch.Tensor, bank: torch.Tensor, index: FlatIndex
                    ) -> Prediction:
        features, patch_scores, nearest = self._score_patches(images, index)
        queries = features.flatten(2).transpose(1, 2)
        scores = self._image_scores(queries, patch_scores.flatten(1), nearest, bank, index)
        # Upsampling and smoothing in one step (the same maps as interpolating, then blurring).
        maps = self._to_maps(patch_scores, tuple(images.shape[-2:]), self.smoothing_sigma)
        return Prediction(maps, scores)

    @functools.cached_property
    def _to_maps(self) -> UpsampleBlur:
        return UpsampleBlur()

    def _image_scores(self, queries: torch.Tensor, patch_scores: torch.Tensor,
                      nearest: torch.Tensor, bank: torch.Tensor, index: FlatIndex
                      ) -> torch.Tensor:
        """Max patch score, re-weighted by the paper's Eq. 7 when ``reweight`` is on
        (``nearest`` indexes ``bank``, which ``index`` searches)."""
        best_score, best_patch = patch_scores.max(dim=1)
        if not self.reweight or bank.shape[0] < 2:
            return best_score
        # gather, not arange indexing: an exported graph keeps its batch dimension free
        # [:, 0] rather than squeeze(1): an exported graph gets no shape-dependent branch
        test_feature = queries.gather(
            1, best_patch.view(-1, 1, 1).expand(-1, 1, queries.shape[2]))[:, 0]  # (B, D)
        memory_feature = bank[nearest.gather(1, best_patch.view(-1, 1))[:, 0]]
        k = min(self.num_neighbors, bank.shape[0])
        _, support = index.search(memory_feature, k)  # N_b(m*), m* itself first
        support_distances = torch.linalg.vector_norm(
            bank[support] - test_feature.unsqueeze(1), dim=2)  # (B, k)
        weight = 1.0 - torch.softmax(support_distances, dim=1)[:, 0]
        return weight * best_score

    def _set_memory_bank(self, bank: torch.Tensor) -> None:
        self.memory_bank_ = bank
        self._index = FlatIndex(bank, self.knn_backend)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank_,
                "memory_bank_sources": self.memory_bank_sources_}

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._set_memory_bank(tensors["memory_bank"])
        # Absent from models saved before leave-one-out calibration existed.
        self.memory_bank_sources_ = tensors.get("memory_bank_sources")
        # Build the backbone now, so that loading fails early when its weights are missing.
        self._extractor = self.extractor
