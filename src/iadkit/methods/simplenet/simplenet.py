"""SimpleNet (Liu et al., CVPR 2023): a discriminator on adapted patch features.

Frozen backbone features become locally aware patch features; a linear adaptor maps them to a
target space, where Gaussian noise makes "anomalous" copies; a small discriminator learns to
score real features above +0.5 and noisy ones below -0.5 (truncated L1). At test time a patch's
score is minus the discriminator's output, the map is the score grid upsampled and smoothed
(sigma 4), and the image score the largest patch score (METHODS.md §1.5).

The official code evaluates on the test set after every meta-epoch and keeps the best image
AUROC; iadkit keeps the last epoch, so test data never chooses the model.

:class:`SimpleNet` trains a set of heads ("experts") indexed by an expert label per image; it
always has one. :class:`~iadkit.methods.adapted_moe.AdaptedMoE` gives each subclass its own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...nn.anomaly_maps import gaussian_blur, upsampled
from ...nn.knn import held_out_nearest_distances
from ...validation import Choice, Either, Number
from .. import register
from ..base import Prediction
from ..hyperparameters import hyperparameter
from ..training import (
    FrozenFeatures,
    Stage,
    TrainedDetector,
    TrainingImages,
    load_module_states,
)
from .networks import SimpleNetHead, UnfoldPatchFeatures


@register
class SimpleNet(TrainedDetector):
    """SimpleNet anomaly detector.

    Example:
        >>> detector = SimpleNet.from_preset("cpu", epochs=4).fit(train_loader)
        >>> detector.predict(images).anomaly_maps.shape
    """

    name = "simplenet"
    summary = "discriminator separating adapted patch features from noise-perturbed copies"
    presets = {
        # Lite0's stage outputs (std ~3) drown the paper's 0.015 noise; its activated
        # expansion features (std ~0.4) are in the range of WRN50's post-ReLU features. Even
        # there 0.015 moves a feature a fifth of the distance between normal patches of
        # different images: "auto" measures that distance (docs/simplenet.md). No centre
        # crop: on surfaces the border holds defects (as PatchCore's cpu preset).
        "cpu": dict(backbone="tf_efficientnet_lite0", feature_location="expansion", layers=(2, 3),
                    image_size=256, crop_size=None, level_dim=384, feature_dim=384,
                    hidden_dim=256, noise_std="auto", epochs=24),
        "paper": dict(backbone="wide_resnet50_2", layers=("layer2", "layer3"), image_size=329,
                      crop_size=288, level_dim=1536, feature_dim=1536, hidden_dim=1024,
                      epochs=160),
    }
    tiny_params = dict(image_size=64, epochs=1, level_dim=32, feature_dim=32, hidden_dim=16)

    layers = (2, 3)
    image_size = 329
    crop_size = 288
    epochs = 160
    batch_size = 8
    patch_kernel: int = hyperparameter(3, Number(int, 1), "neighbourhood size of the locally "
                                       "aware features")
    level_dim: int = hyperparameter(1536, Number(int, 1), "values kept per level "
                                    "('pretrain_embed_dimension')")
    feature_dim: int = hyperparameter(1536, Number(int, 1), "patch feature size "
                                      "('target_embed_dimension')")
    hidden_dim: int = hyperparameter(1024, Number(int, 1), "discriminator hidden width")
    noise_std: float | str = hyperparameter(
        0.015, Either(Choice("auto"), Number(float, 0)), "std of the Gaussian noise that makes "
        "anomalous features; 'auto': from the training images' own spread (see "
        "_training_noise_std)")
    margin: float = hyperparameter(0.5, Number(float, 0), "truncation threshold of the loss")
    adaptor_lr: float = hyperparameter(1e-4, Number(float, 0), "AdamW learning rate of the "
                                       "adaptor")
    discriminator_lr: float = hyperparameter(2e-4, Number(float, 0), "Adam learning rate of "
                                             "the discriminator")
    discriminator_weight_decay: float = hyperparameter(1e-5, Number(float, 0), "its weight "
                                                       "decay")
    smoothing_sigma: float = hyperparameter(4.0, Number(float, 0), "Gaussian sigma of the map "
                                            "smoothing (0: off)")
    feature_cache_mb: float = hyperparameter(4096.0, Number(float, 0), "keep the frozen patch "
                                             "features of the training set in memory up to "
                                             "this many MB")

    @functools.cached_property
    def _aggregate(self) -> UnfoldPatchFeatures:
        return UnfoldPatchFeatures(self.level_dim, self.feature_dim, self.patch_kernel)

    # -- features -----------------------------------------------------------------------------
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, feature_dim, h, w) locally aware patch features."""
        with torch.no_grad():
            return self._aggregate(self.extractor(images))

    # -- experts ------------------------------------------------------------------------------
    def _expert_names(self, data: TrainingImages) -> list[str]:
        """The expert of each training image, by name (SimpleNet: one for all)."""
        return ["all"] * len(data)

    def _build_networks(self, num_experts: int = 1) -> None:
        with self.seeded():
            self._create_networks(num_experts)

    def _create_networks(self, num_experts: int) -> None:
        """The trained networks, in the order their weights are drawn."""
        self.experts_ = nn.ModuleList(
            SimpleNetHead(self.feature_dim, self.hidden_dim, self.margin)
            for _ in range(num_experts))
        self.experts_.to(self.torch_device)

    def _trained_modules(self) -> dict[str, nn.Module]:
        return {"experts": self.experts_}

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        adaptors = [p for expert in self.experts_ for p in expert.adaptor.parameters()]
        discriminators = [p for expert in self.experts_ for p in expert.discriminator.parameters()]
        return {
            "adaptor": torch.optim.AdamW(adaptors, lr=self.adaptor_lr),
            "discriminator": torch.optim.Adam(discriminators, lr=self.discriminator_lr,
                                              weight_decay=self.discriminator_weight_decay),
        }

    def _prepare_experts(self, features: FrozenFeatures, data: TrainingImages,
                         labels: torch.Tensor) -> None:
        """Statistics the experts need before training (SimpleNet: none)."""

    def _expert_inputs(self, features: torch.Tensor, expert: int) -> torch.Tensor:
        """What expert ``expert`` sees of (B, C, h, w) features at inference (SimpleNet: the
        features)."""
        return features

    def _expert_training_inputs(self, features: torch.Tensor, expert: int) -> torch.Tensor:
        """What expert ``expert`` trains on of (B, C, h, w) features (SimpleNet: what it sees at
        inference)."""
        return self._expert_inputs(features, expert)

    def _inputs_by_expert(self, features: torch.Tensor, labels: torch.Tensor
                          ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """For each expert among ``labels``: its index, the mask of its images in the batch,
        and what it trains on of them (:meth:`_expert_training_inputs` over those images
        together)."""
        for expert in labels.unique().tolist():
            chosen = labels == expert
            yield expert, chosen, self._expert_training_inputs(features[chosen], expert)

    def _batch_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over the batch's images of their expert's SimpleNet loss."""
        total = features.new_zeros(())
        for expert, chosen, inputs in self._inputs_by_expert(features, labels):
            patches = inputs.permute(0, 2, 3, 1).reshape(-1, inputs.shape[1])
            share = chosen.sum() / labels.numel()
            total = total + self.experts_[expert].loss(patches, self.noise_std_) * share
        return total

    def _after_step(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Bookkeeping after each optimiser step (SimpleNet: none)."""

    def _expert_weights(self, features: torch.Tensor) -> torch.Tensor:
        """(B, n_experts) fusion weights of each image's experts (SimpleNet: the only one)."""
        return features.new_ones(features.shape[0], len(self.experts_))

    # -- training -----------------------------------------------------------------------------
    def _training_noise_std(self, features: FrozenFeatures, labels: torch.Tensor) -> float:
        """The noise std the experts train with: ``noise_std``, or for ``"auto"`` the median
        distance of held-out training patches (as their expert trains on them) to the nearest patch
        of the other training images, over sqrt(feature_dim).

        A noise vector of std s in D dimensions has length about s * sqrt(D). "auto" makes that
        length the typical distance between normal patches of different images, so that the
        noisy copies the discriminator learns to call anomalous lie at the edge of the normal
        spread rather than inside it. The paper's 0.015 reaches 0.29 on Lite0's features,
        where held-out normal patches lie 1.5 from the nearest training patch
        (docs/simplenet.md).
        """
        if self.noise_std != "auto":
            return float(self.noise_std)

        def patches_of(indices: torch.Tensor) -> torch.Tensor:
            grid = features(indices)[0]
            inputs = torch.empty_like(grid)
            for _, chosen, expert_inputs in self._inputs_by_expert(grid, labels[indices]):
                inputs[chosen] = expert_inputs
            return inputs.permute(0, 2, 3, 1).reshape(-1, inputs.shape[1])

        distances = held_out_nearest_distances(patches_of, len(labels),
                                               torch.Generator().manual_seed(self.seed),
                                               batch_size=self.batch_size)
        return float(distances.median()) / math.sqrt(self.feature_dim)

    def _fit(self, train: Iterable[Any] | torch.Tensor, show_progress: bool,
             checkpoint_dir: str | Path | None) -> dict[str, Any]:
        data = TrainingImages.collect(train)
        names = self._expert_names(data)
        expert_names = sorted(set(names))
        labels = torch.tensor([expert_names.index(n) for n in names])
        device = self.torch_device
        features = FrozenFeatures(lambda images: [self.patch_features(images)], data,
                                  self.batch_size, device, self.feature_cache_mb)
        self._build_networks(len(expert_names))
        self._prepare_experts(features, data, labels)
        self.noise_std_ = self._training_noise_std(features, labels)
        labels = labels.to(device)
        last: dict[str, torch.Tensor] = {}

        def loss(indices: torch.Tensor, step: int) -> torch.Tensor:
            last["features"], last["labels"] = features(indices)[0], labels[indices.to(device)]
            return self._batch_loss(last["features"], last["labels"])

        with self.training(checkpoint_dir, show_progress) as training:
            training.run(Stage("train", data, loss, list(training.optimizers.values()),
                               list(training.modules.values()), self.epochs, self.batch_size,
                               after_step=lambda: self._after_step(last["features"],
                                                                   last["labels"])))
        return self.fit_facts(
            data, training,
            experts={name: int((labels == i).sum()) for i, name in enumerate(expert_names)},
            noise_std=self.noise_std_,
            feature_grid=list(features.cached[0].shape[-2:]) if features.cached else None,
            features_cached=features.cached is not None)

    # -- inference ----------------------------------------------------------------------------
    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) patch features -> (B, h, w) scores, the experts' weighted sum."""
        weights = self._expert_weights(features)
        batch, _, height, width = features.shape
        scores = features.new_zeros(batch, height, width)
        if torch.onnx.is_in_onnx_export():  # one fixed graph: every expert on every image
            for expert in range(len(self.experts_)):
                scores = scores + weights[:, expert].view(-1, 1, 1) * \
                    self._expert_patch_scores(features, expert)
            return scores
        for expert in range(len(self.experts_)):
            rows = weights[:, expert] > 0
            if rows.any():
                scores[rows] += weights[rows, expert].view(-1, 1, 1) * \
                    self._expert_patch_scores(features[rows], expert)
        return scores

    def _expert_patch_scores(self, features: torch.Tensor, expert: int) -> torch.Tensor:
        """(B, C, h, w) patch features -> (B, h, w) scores of expert ``expert`` alone."""
        inputs = self._expert_inputs(features, expert)
        batch, channels, height, width = inputs.shape
        patches = inputs.permute(0, 2, 3, 1).reshape(-1, channels)
        return self.experts_[expert](patches).view(batch, height, width)

    def _score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch features (B, C, h, w), patch scores (B, h, w) and unsmoothed maps (B, S, S)."""
        for module in self._trained_modules().values():
            module.eval()
        features = self.patch_features(images)
        scores = self.patch_scores(features)
        maps = upsampled(scores, images.shape[-2:])
        return features, scores, maps

    def raw_maps_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unsmoothed maps, and the locally aware patch features (our choice of CADA input)."""
        features, _, maps = self._score(images)
        return maps, features

    def _predict(self, images: torch.Tensor) -> Prediction:
        _, scores, maps = self._score(images)
        return Prediction(gaussian_blur(maps, self.smoothing_sigma), scores.flatten(1).amax(1))

    # -- persistence --------------------------------------------------------------------------
    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        num_experts = len({key.split(".")[1] for key in tensors if key.startswith("experts.")})
        self.noise_std_ = (self.fit_info_ or {}).get("noise_std", self.noise_std)
        self._build_networks(num_experts)
        load_module_states(self._trained_modules(), tensors)
        self.extractor  # noqa: B018 (fail early when the backbone's weights are missing)

    @property
    def expert_names(self) -> list[str]:
        """The experts' names (subclasses), in the order of their index."""
        return list((self.fit_info_ or {}).get("experts", {}))
