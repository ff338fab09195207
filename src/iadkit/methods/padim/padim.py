"""PaDiM (Defard et al., ICPR 2021 workshops): a Gaussian per patch position.

Each position of a multi-level feature map (the finer levels' grid; coarser levels upsampled by
nearest neighbour) is described by a vector of a random subset of the channels. Training fits
one multivariate Gaussian per position over the normal images, with the covariance regularised
by ``regularisation * I``; a test position's score is its Mahalanobis distance to the Gaussian
of its position. The map is the score grid upsampled bilinearly to the image and Gaussian
smoothed (sigma 4), the image score its maximum.

Memory and time are the per-position inverse covariances: positions x D x D float32 values
(cpu preset: 64 x 64 positions, D = 100: 164 MB; the paper's WRN50-2 with D = 550 on a 56 x 56
grid: 3.8 GB, kept and saved as such). Fit accumulates one covariance per position in float32
with a numerically stable batch merge, then inverts them in float64 in chunks.

The reference code (and many re-implementations) min-max normalises the scores over the test
set before computing metrics; iadkit never looks at the test set (the threshold comes from
held-out normals), and AUROC does not change under that normalisation.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import IadkitError
from ...nn.anomaly_maps import gaussian_blur, image_scores, upsampled
from ...progress import progress
from ...validation import Number, Optional
from .. import register
from ..base import BackboneDetector, Prediction, image_batches
from ..hyperparameters import hyperparameter
from .gaussian import PositionGaussians, mahalanobis_maps


def concatenate_levels(features: list[torch.Tensor]) -> torch.Tensor:
    """Upsample every level to the first's grid by nearest neighbour (each fine position takes
    its coarse parent's feature, as in the paper's embedding) and concatenate the channels."""
    grid = features[0].shape[-2:]
    return torch.cat([f if f.shape[-2:] == grid else F.interpolate(f, size=grid, mode="nearest")
                      for f in features], dim=1)


@register
class PaDiM(BackboneDetector):
    """PaDiM anomaly detector.

    Example:
        >>> detector = PaDiM.from_preset("cpu").fit(train_images)
        >>> detector.predict(test_images).anomaly_maps.shape
    """

    name = "padim"
    summary = "a multivariate Gaussian per patch position, Mahalanobis distance"
    presets = {
        # Lite0's stages 1-3 (24 + 40 + 112 channels at strides 4, 8, 16), no centre crop
        # (as PatchCore's cpu preset: surfaces lose their border to a crop).
        "cpu": dict(backbone="tf_efficientnet_lite0", layers=(1, 2, 3), image_size=256,
                    crop_size=None, feature_dim=100),
        # The paper's best model (PaDiM-WR50-Rd550): WRN50-2 layers 1-3, 550 random channels.
        "paper": dict(backbone="wide_resnet50_2", layers=("layer1", "layer2", "layer3"),
                      image_size=256, crop_size=224, feature_dim=550),
    }
    tiny_params = dict(image_size=64, feature_dim=16)

    layers = (1, 2, 3)
    feature_dim: int | None = hyperparameter(
        100, Optional(Number(int, 1)), "keep this many randomly chosen channels of the "
        "concatenated levels (the paper's dimension reduction; null keeps all)")
    regularisation: float = hyperparameter(0.01, Number(float, 0, low_open=True),
                                           "added to the covariances' diagonal (the paper's "
                                           "epsilon)")
    smoothing_sigma: float = hyperparameter(4.0, Number(float, 0), "Gaussian sigma of the map "
                                            "smoothing (0: off)", inference=True)
    batch_size: int = hyperparameter(16, Number(int, 1), "images per forward pass")

    def check_resources(self) -> None:
        super().check_resources()
        channels = sum(self.extractor.channels)
        if self.feature_dim is not None and self.feature_dim > channels:
            raise self._refuse(f"feature_dim={self.feature_dim} is more than the "
                               f"{channels} channels of layers {list(self.layers)} of "
                               f"{self.backbone}")

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, D, h, w): the chosen channels of the levels."""
        features = concatenate_levels(self.extractor(images))
        return features.index_select(1, self.channel_indices_)

    # -- Detector contract --------------------------------------------------------------------
    def _fit(self, train: Iterable[Any] | torch.Tensor, show_progress: bool,
             checkpoint_dir: str | Path | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        channels = sum(self.extractor.channels)
        kept = self.feature_dim or channels
        self.channel_indices_ = torch.randperm(channels)[:kept].sort().values.to(
            self.torch_device)
        gaussians, n_images, grid = PositionGaussians(), 0, [0, 0]
        for images in progress(image_batches(train, self.batch_size), "features", show_progress):
            embedding = self.embedding(images.to(self.torch_device))
            gaussians.add(embedding)
            n_images, grid = n_images + images.shape[0], [int(s) for s in embedding.shape[-2:]]
        if n_images < 2:
            raise IadkitError(f"padim: {n_images} training image(s); a covariance needs at "
                              "least two")
        extracted = time.perf_counter()
        self.mean_, self.precision_ = gaussians.mean_and_precision(self.regularisation)
        return {
            "n_train_images": n_images,
            "feature_dim": kept,
            "feature_grid": grid,
            "gaussians_mb": round(self.precision_.numel() * 4 / 2**20, 1),
            **self.backbone_facts(),
            "seconds_features": round(extracted - started, 2),
            "seconds_inversion": round(time.perf_counter() - extracted, 2),
        }

    def _predict(self, images: torch.Tensor) -> Prediction:
        distances = mahalanobis_maps(self.embedding(images), self.mean_, self.precision_)
        maps = upsampled(distances, images.shape[-2:])
        maps = gaussian_blur(maps, self.smoothing_sigma)
        return Prediction(maps, image_scores(maps))

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"channel_indices": self.channel_indices_, "mean": self.mean_,
                "precision": self.precision_}

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.channel_indices_ = tensors["channel_indices"]
        self.mean_, self.precision_ = tensors["mean"], tensors["precision"]
        self._extractor = self.extractor  # fail at load when the backbone's weights are missing
