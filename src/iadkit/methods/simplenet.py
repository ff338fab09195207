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

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.simplenet import SimpleNetHead, UnfoldPatchFeatures
from ..nn.smoothing import gaussian_blur
from . import register
from .base import Detector, Prediction
from .training import (
    TrainingCheckpoint,
    TrainingImages,
    cache_features,
    load_module_states,
    module_state_tensors,
    run_stage,
)


@register
class SimpleNet(Detector):
    """SimpleNet anomaly detector.

    Args:
        backbone: timm name or alias of the frozen feature extractor.
        layers: backbone stages whose features are combined (the first sets the patch grid).
        backbone_weights: "pretrained", a weight file, or "random" (shape tests only).
        feature_location: "" for the stages' outputs, "expansion" for EfficientNet's activated
            inner features (see :class:`~iadkit.backbones.FeatureExtractor`).
        image_size: images are resized to this square size (329 in the paper).
        crop_size: centre crop after resizing (288 in the paper).
        patch_kernel: neighbourhood size of the locally aware features.
        level_dim: values kept per level ("pretrain_embed_dimension", 1536).
        feature_dim: patch feature size ("target_embed_dimension", 1536).
        hidden_dim: discriminator hidden width (1024).
        noise_std: Gaussian noise that makes anomalous features (0.015).
        margin: truncation threshold of the loss (0.5).
        epochs: passes over the training set (160 = 40 meta-epochs x 4).
        batch_size: training images per step (8).
        adaptor_lr: AdamW learning rate of the adaptor (1e-4).
        discriminator_lr: Adam learning rate of the discriminator (2e-4).
        discriminator_weight_decay: its weight decay (1e-5).
        smoothing_sigma: Gaussian sigma of the map smoothing (0 switches it off).
        feature_cache_mb: keep the frozen patch features of the training set in memory when
            they fit in this many MB (every epoch then costs only the heads).
        checkpoint_every_s: seconds between training checkpoints (when fit gets a folder).
        device: "auto", "cpu", "cuda", ...
        seed: seeds initialisation, batch order and noise.

    Example:
        >>> detector = SimpleNet.from_preset("cpu", epochs=4).fit(train_loader)
        >>> detector.predict(images).anomaly_maps.shape
    """

    name = "simplenet"
    summary = "discriminator separating adapted patch features from noise-perturbed copies"
    presets = {
        # Lite0's stage outputs (std ~3) drown SimpleNet's 0.015 noise; its activated
        # expansion features (std ~0.4) are in the range of WRN50's post-ReLU features.
        "cpu": dict(backbone="tf_efficientnet_lite0", feature_location="expansion", layers=(2, 3),
                    image_size=256, crop_size=224, level_dim=384, feature_dim=384, hidden_dim=256,
                    epochs=24),
        "paper": dict(backbone="wide_resnet50_2", layers=("layer2", "layer3"), image_size=329,
                      crop_size=288, level_dim=1536, feature_dim=1536, hidden_dim=1024,
                      epochs=160),
    }

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: tuple[int | str, ...] = (2, 3),
        backbone_weights: str = "pretrained",
        feature_location: str = "",
        image_size: int = 329,
        crop_size: int | None = 288,
        patch_kernel: int = 3,
        level_dim: int = 1536,
        feature_dim: int = 1536,
        hidden_dim: int = 1024,
        noise_std: float = 0.015,
        margin: float = 0.5,
        epochs: int = 160,
        batch_size: int = 8,
        adaptor_lr: float = 1e-4,
        discriminator_lr: float = 2e-4,
        discriminator_weight_decay: float = 1e-5,
        smoothing_sigma: float = 4.0,
        feature_cache_mb: float = 4096,
        checkpoint_every_s: float = 60.0,
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        self.backbone = backbone
        self.layers = tuple(layers)
        self.backbone_weights = backbone_weights
        self.feature_location = feature_location
        self.image_size = image_size
        self.crop_size = crop_size
        self.patch_kernel = patch_kernel
        self.level_dim = level_dim
        self.feature_dim = feature_dim
        self.hidden_dim = hidden_dim
        self.noise_std = noise_std
        self.margin = margin
        self.epochs = epochs
        self.batch_size = batch_size
        self.adaptor_lr = adaptor_lr
        self.discriminator_lr = discriminator_lr
        self.discriminator_weight_decay = discriminator_weight_decay
        self.smoothing_sigma = smoothing_sigma
        self.feature_cache_mb = feature_cache_mb
        self.checkpoint_every_s = checkpoint_every_s
        self.device = device
        self.seed = seed
        self._aggregate = UnfoldPatchFeatures(level_dim, feature_dim, patch_kernel)

    # -- features -----------------------------------------------------------------------------
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, feature_dim, h, w) locally aware patch features."""
        with torch.no_grad():
            return self._aggregate(self.extractor(images))

    # -- experts ------------------------------------------------------------------------------
    def _expert_names(self, data: TrainingImages) -> list[str]:
        """The expert of each training image, by name (SimpleNet: one for all)."""
        return ["all"] * len(data)

    def _build_networks(self, num_experts: int) -> None:
        """Create the trainable networks (fresh weights, seeded) on the device."""
        torch.manual_seed(self.seed)
        self.experts_ = nn.ModuleList(
            SimpleNetHead(self.feature_dim, self.hidden_dim, self.noise_std, self.margin)
            for _ in range(num_experts))
        self.experts_.to(self.torch_device)

    def _trained_modules(self) -> dict[str, nn.Module]:
        """The modules whose weights are learned, saved and checkpointed, by name."""
        return {"experts": self.experts_}

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        adaptors = [p for expert in self.experts_ for p in expert.adaptor.parameters()]
        discriminators = [p for expert in self.experts_ for p in expert.discriminator.parameters()]
        return {
            "adaptor": torch.optim.AdamW(adaptors, lr=self.adaptor_lr),
            "discriminator": torch.optim.Adam(discriminators, lr=self.discriminator_lr,
                                              weight_decay=self.discriminator_weight_decay),
        }

    def _prepare_experts(self, features: torch.Tensor | None, data: TrainingImages,
                         labels: torch.Tensor) -> None:
        """Statistics the experts need before training (SimpleNet: none)."""

    def _expert_inputs(self, features: torch.Tensor, expert: int) -> torch.Tensor:
        """What expert ``expert`` sees of (B, C, h, w) features (SimpleNet: the features)."""
        return features

    def _batch_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over the batch's images of their expert's SimpleNet loss."""
        total = features.new_zeros(())
        for expert in labels.unique().tolist():
            chosen = labels == expert
            inputs = self._expert_inputs(features[chosen], expert)
            patches = inputs.permute(0, 2, 3, 1).reshape(-1, inputs.shape[1])
            share = chosen.sum() / labels.numel()
            total = total + self.experts_[expert].loss(patches) * share
        return total

    def _after_step(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Bookkeeping after each optimiser step (SimpleNet: none)."""

    def _expert_weights(self, features: torch.Tensor) -> torch.Tensor:
        """(B, n_experts) fusion weights of each image's experts (SimpleNet: the only one)."""
        return features.new_ones(features.shape[0], len(self.experts_))

    # -- training -----------------------------------------------------------------------------
    def _fit(self, train: Iterable[Any] | torch.Tensor, show_progress: bool,
             checkpoint_dir: str | Path | None) -> dict[str, Any]:
        started = time.perf_counter()
        data = TrainingImages.collect(train)
        names = self._expert_names(data)
        expert_names = sorted(set(names))
        labels = torch.tensor([expert_names.index(n) for n in names])
        device = self.torch_device
        cached = cache_features(lambda images: [self.patch_features(images)], data,
                                self.batch_size, device, self.feature_cache_mb)
        features = cached[0] if cached is not None else None
        self._build_networks(len(expert_names))
        self._prepare_experts(features, data, labels)
        checkpoint = TrainingCheckpoint(checkpoint_dir, self.checkpoint_every_s)
        optimizers = self._make_optimizers()
        modules = self._trained_modules()
        history = checkpoint.restore(modules, optimizers) or {}
        labels = labels.to(device)

        def run_epoch(epoch: int) -> float:
            for module in modules.values():
                module.train()
            total, count = 0.0, 0
            for indices in data.epoch_batches(self.batch_size, self.seed, epoch):
                if features is not None:
                    batch = features[indices.to(features.device)]
                else:
                    batch = self.patch_features(data.get(indices, device))
                batch_labels = labels[indices.to(device)]
                loss = self._batch_loss(batch, batch_labels)
                for optimizer in optimizers.values():
                    optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for optimizer in optimizers.values():
                    optimizer.step()
                self._after_step(batch, batch_labels)
                total += float(loss.detach()) * len(indices)
                count += len(indices)
            return total / count

        run_stage("train", self.epochs, run_epoch, history, self.seed, checkpoint, modules,
                  optimizers, show_progress)
        checkpoint.clear()
        for module in modules.values():
            module.eval()
        return {
            "n_train_images": len(data),
            "experts": {name: int((labels == i).sum()) for i, name in enumerate(expert_names)},
            "feature_grid": list(features.shape[-2:]) if features is not None else None,
            "features_cached": features is not None,
            "backbone_weights": vars(self.extractor.resolved_weights),
            "loss_history": history,
            "seconds_training": round(time.perf_counter() - started, 2),
        }

    # -- inference ----------------------------------------------------------------------------
    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) patch features -> (B, h, w) scores, the experts' weighted sum."""
        weights = self._expert_weights(features)
        batch, channels, height, width = features.shape
        scores = features.new_zeros(batch, height, width)
        if torch.onnx.is_in_onnx_export():  # one fixed graph: every expert on every image
            for expert, head in enumerate(self.experts_):
                inputs = self._expert_inputs(features, expert)
                patches = inputs.permute(0, 2, 3, 1).reshape(-1, channels)
                scores = scores + weights[:, expert].view(-1, 1, 1) * head(patches).view(
                    -1, height, width)
            return scores
        for expert, head in enumerate(self.experts_):
            rows = weights[:, expert] > 0
            if not rows.any():
                continue
            inputs = self._expert_inputs(features[rows], expert)
            patches = inputs.permute(0, 2, 3, 1).reshape(-1, channels)
            expert_scores = head(patches).view(-1, height, width)
            scores[rows] += weights[rows, expert].view(-1, 1, 1) * expert_scores
        return scores

    def _score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch features (B, C, h, w), patch scores (B, h, w) and unsmoothed maps (B, S, S)."""
        for module in self._trained_modules().values():
            module.eval()
        features = self.patch_features(images)
        scores = self.patch_scores(features)
        maps = F.interpolate(scores.unsqueeze(1), size=images.shape[-2:], mode="bilinear",
                             align_corners=False).squeeze(1)
        return features, scores, maps

    def raw_maps_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unsmoothed maps, and the locally aware patch features (our choice of CADA input)."""
        features, _, maps = self._score(images)
        return maps, features

    def _predict(self, images: torch.Tensor) -> Prediction:
        _, scores, maps = self._score(images)
        return Prediction(gaussian_blur(maps, self.smoothing_sigma), scores.flatten(1).amax(1))

    # -- persistence --------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return module_state_tensors(self._trained_modules())

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        num_experts = len({key.split(".")[1] for key in tensors if key.startswith("experts.")})
        self._build_networks(num_experts)
        load_module_states(self._trained_modules(), tensors)
        self._extractor = self.extractor  # fail early when the backbone's weights are missing

    @property
    def expert_names(self) -> list[str]:
        """The experts' names (subclasses), in the order of their index."""
        return list((self.fit_info_ or {}).get("experts", {}))
