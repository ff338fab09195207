"""Reverse distillation (RD4AD, Deng & Li, CVPR 2022), the base of AAND, ReContrast and CADA.

A frozen teacher encoder gives multi-scale features; a trainable one-class bottleneck (OCBE)
squeezes them into one embedding and a student decoder reconstructs the teacher's features from
it, trained on normal images only. At test time the student reconstructs normal regions well and
anomalies badly: the anomaly map is the sum over levels of the upsampled 1 - cos maps, Gaussian
smoothed (sigma 4), and the image score its maximum (METHODS.md §1.2).

Subclasses change one piece at a time: :meth:`ReverseDistillation.teacher_features` (AAND's
amplified teacher), :meth:`ReverseDistillation._distillation_loss`, or the whole training
(ReContrast).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn.reverse_distillation import (
    OneClassBottleneck,
    ReverseDecoder,
    cosine_distance_maps,
    flattened_cosine_loss,
    fuse_maps,
    hard_patch_loss,
    image_scores,
    pixel_cosine_loss,
    smooth_maps,
)
from . import register
from .base import Detector, Prediction
from .training import (
    TrainingCheckpoint,
    TrainingImages,
    cache_features,
    load_module_states,
    module_state_tensors,
    run_stage,
    set_learning_rates,
    step_decay,
    with_base_rates,
)

LOSSES = ("flattened", "pixel")


class ReverseStudent(nn.Module):
    """OCBE bottleneck + decoder: teacher features in, reconstructed teacher features out."""

    def __init__(self, channels: list[int], strides: list[int] | None, embed_channels: int | None,
                 bottleneck_blocks: int, decoder_blocks: tuple[int, ...], width_ratio: float,
                 activation: str, num_heads: int = 0, linear_outputs: bool = False) -> None:
        super().__init__()
        self.bottleneck = OneClassBottleneck(channels, embed_channels, bottleneck_blocks,
                                             width_ratio, strides)
        self.decoder = ReverseDecoder(channels, self.bottleneck.out_channels, decoder_blocks,
                                      width_ratio, activation, num_heads, linear_outputs)

    def forward(self, features: list[torch.Tensor]) -> list[Any]:
        return self.decoder(self.bottleneck(features))


@register
class ReverseDistillation(Detector):
    """Reverse distillation anomaly detector (RD4AD).

    Args:
        backbone: timm name or alias of the frozen teacher.
        layers: teacher stages, fine to coarse, each of twice the previous stride.
        backbone_weights: "pretrained", a weight file, or "random" (shape tests only).
        feature_location: "" for the stages' outputs, "expansion" for EfficientNet's activated
            inner features (see :class:`~iadkit.backbones.FeatureExtractor`).
        image_size: images are resized to this square size.
        crop_size: optional centre crop after resizing (RD4AD uses none).
        embed_channels: bottleneck embedding width (default: twice the coarsest teacher width).
        bottleneck_blocks: residual blocks of the one-class embedding (3).
        decoder_blocks: residual blocks per decoder stage, coarse to fine ((3, 4, 6)).
        width_ratio: inner width of the residual blocks relative to their output (0.5 = wide).
        decoder_activation: "relu" (RD4AD) or "gelu" (as in ReContrast and CADA).
        loss: "flattened" (official code: cosine of whole flattened maps) or "pixel" (the
            paper: per-position cosine).
        num_hard: add the mean distance of the N hardest positions per image and level (AAND's
            hard knowledge distillation); 0 switches it off.
        epochs: training epochs.
        batch_size: training batch size.
        lr: Adam learning rate.
        betas: Adam betas.
        lr_milestones: fractions of training after which the learning rate is multiplied by
            ``lr_gamma`` (RD4AD: none).
        lr_gamma: the decay factor.
        map_reduction: "sum" (RD4AD) or "mean" of the per-level maps.
        smoothing_sigma: Gaussian sigma of the map smoothing (0 switches it off).
        smoothing_kernel: None for scipy's support (4 sigma), or an odd kernel size (e.g. 5).
        score_reduction: "max" of the map (RD4AD) or "top_mean" (mean of the top pixels).
        top_fraction: share of pixels averaged by "top_mean".
        feature_cache_mb: keep the frozen teacher's training features in memory when they fit
            in this many MB (every epoch after the first then costs only the student).
        checkpoint_every_s: seconds between training checkpoints (when fit gets a folder).
        device: "auto", "cpu", "cuda", ...
        seed: seeds initialisation and batch order.

    Example:
        >>> detector = ReverseDistillation.from_preset("cpu", epochs=5).fit(train_loader)
        >>> detector.predict(images).scores
    """

    name = "rd"
    summary = "reverse distillation: a student decoder rebuilds frozen teacher features"
    presets = {
        # EfficientNet's stage outputs are linear bottlenecks the student cannot rebuild from a
        # 1/32 embedding; its expanded, activated features can be rebuilt (and two levels and
        # narrower residual blocks keep an epoch near half a minute on two CPU cores). 30 epochs:
        # on 700 Magnetic Tile images the training loss changes by under 1 % per epoch by then.
        "cpu": dict(backbone="tf_efficientnet_lite0", feature_location="expansion", layers=(2, 3),
                    width_ratio=0.25, bottleneck_blocks=2, decoder_blocks=(2, 2), image_size=256,
                    epochs=30),
        "paper": dict(backbone="wide_resnet50_2", layers=("layer1", "layer2", "layer3"),
                      image_size=256, epochs=200, batch_size=16, lr=0.005),
    }

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: tuple[int | str, ...] = (1, 2, 3),
        backbone_weights: str = "pretrained",
        feature_location: str = "",
        image_size: int = 256,
        crop_size: int | None = None,
        embed_channels: int | None = None,
        bottleneck_blocks: int = 3,
        decoder_blocks: tuple[int, ...] = (3, 4, 6),
        width_ratio: float = 0.5,
        decoder_activation: str = "relu",
        loss: str = "flattened",
        num_hard: int = 0,
        epochs: int = 200,
        batch_size: int = 16,
        lr: float = 0.005,
        betas: tuple[float, float] = (0.5, 0.999),
        lr_milestones: tuple[float, ...] = (),
        lr_gamma: float = 0.2,
        map_reduction: str = "sum",
        smoothing_sigma: float = 4.0,
        smoothing_kernel: int | None = None,
        score_reduction: str = "max",
        top_fraction: float = 0.01,
        feature_cache_mb: float = 4096,
        checkpoint_every_s: float = 60.0,
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.backbone = backbone
        self.layers = tuple(layers)
        self.backbone_weights = backbone_weights
        self.feature_location = feature_location
        self.image_size = image_size
        self.crop_size = crop_size
        self.embed_channels = embed_channels
        self.bottleneck_blocks = bottleneck_blocks
        self.decoder_blocks = tuple(decoder_blocks)
        self.width_ratio = width_ratio
        self.decoder_activation = decoder_activation
        self.loss = loss
        self.num_hard = num_hard
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.betas = tuple(betas)
        self.lr_milestones = tuple(lr_milestones)
        self.lr_gamma = lr_gamma
        self.map_reduction = map_reduction
        self.smoothing_sigma = smoothing_sigma
        self.smoothing_kernel = smoothing_kernel
        self.score_reduction = score_reduction
        self.top_fraction = top_fraction
        self.feature_cache_mb = feature_cache_mb
        self.checkpoint_every_s = checkpoint_every_s
        self.device = device
        self.seed = seed

    # -- networks -----------------------------------------------------------------------------
    def _build_networks(self) -> None:
        """Create the trainable networks (fresh weights, seeded) on the device."""
        extractor = self.extractor  # built first: building it draws random numbers
        torch.manual_seed(self.seed)
        self.student_ = self._make_student(extractor.channels, extractor.strides)
        self.student_.to(self.torch_device)

    def _make_student(self, channels: list[int], strides: list[int], num_heads: int = 0
                      ) -> ReverseStudent:
        return ReverseStudent(channels, strides, self.embed_channels, self.bottleneck_blocks,
                              self.decoder_blocks, self.width_ratio, self.decoder_activation,
                              num_heads, linear_outputs=self._teacher_has_negative_features())

    def _teacher_has_negative_features(self) -> bool:
        """Whether the teacher's features can be negative (then the decoder must end linear)."""
        with torch.no_grad():
            probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
            return any(bool((f < 0).any()) for f in self.extractor(probe.to(self.torch_device)))

    def _trained_modules(self) -> dict[str, nn.Module]:
        """The modules whose weights are learned, saved and checkpointed, by name."""
        return {"student": self.student_}

    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The features the student learns to rebuild (here: the frozen backbone's)."""
        return self.extractor(images)

    # -- training -----------------------------------------------------------------------------
    def _fit(self, train: Iterable[Any] | torch.Tensor, show_progress: bool,
             checkpoint_dir: str | Path | None) -> dict[str, Any]:
        started = time.perf_counter()
        data = TrainingImages.collect(train)
        self._build_networks()
        checkpoint = TrainingCheckpoint(checkpoint_dir, self.checkpoint_every_s)
        optimizers = self._make_optimizers()
        history = checkpoint.restore(self._trained_modules(), optimizers) or {}
        info = self._train(data, optimizers, history, checkpoint, show_progress)
        checkpoint.clear()
        return {
            "n_train_images": len(data),
            "backbone_weights": vars(self.extractor.resolved_weights),
            "loss_history": history,
            **info,
            "seconds_training": round(time.perf_counter() - started, 2),
        }

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"distill": with_base_rates(torch.optim.Adam(
            self.student_.parameters(), lr=self.lr, betas=self.betas))}

    def _train(self, data: TrainingImages, optimizers: dict[str, torch.optim.Optimizer],
               history: dict[str, list[float]], checkpoint: TrainingCheckpoint,
               show_progress: bool) -> dict[str, Any]:
        return self._distill(data, optimizers, history, checkpoint, show_progress)

    def _distill(self, data: TrainingImages, optimizers: dict[str, torch.optim.Optimizer],
                 history: dict[str, list[float]], checkpoint: TrainingCheckpoint,
                 show_progress: bool) -> dict[str, Any]:
        """Train the student to rebuild the (frozen) teacher features of normal images."""
        device = self.torch_device
        optimizer = optimizers["distill"]
        cached = None
        if len(history.get("distill", [])) < self.epochs:
            cached = cache_features(self.teacher_features, data, self.batch_size, device,
                                    self.feature_cache_mb)

        def run_epoch(epoch: int) -> float:
            set_learning_rates(optimizer,
                               step_decay(epoch / self.epochs, self.lr_milestones, self.lr_gamma))
            self.student_.train()
            total, count = 0.0, 0
            for indices in data.epoch_batches(self.batch_size, self.seed, epoch):
                if cached is not None:
                    teacher = [level[indices.to(level.device)] for level in cached]
                else:
                    with torch.no_grad():
                        teacher = self.teacher_features(data.get(indices, device))
                loss = self._distillation_loss(teacher, self.student_(teacher))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(indices)
                count += len(indices)
            return total / count

        run_stage("distill", self.epochs, run_epoch, history, self.seed, checkpoint,
                  self._trained_modules(), optimizers, show_progress)
        self.student_.eval()
        return {"teacher_features_cached": cached is not None}

    def _distillation_loss(self, teacher: list[torch.Tensor], student: list[torch.Tensor]
                           ) -> torch.Tensor:
        base = flattened_cosine_loss if self.loss == "flattened" else pixel_cosine_loss
        loss = base(teacher, student)
        if self.num_hard > 0:
            loss = loss + hard_patch_loss(teacher, student, self.num_hard)
        return loss

    # -- inference ----------------------------------------------------------------------------
    def _reconstruction(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per level (B, h, w) 1 - cos between teacher and student, and the bottleneck's
        embedding."""
        teacher = self.teacher_features(images)
        embedding = self.student_.bottleneck(teacher)
        return cosine_distance_maps(teacher, self.student_.decoder(embedding)), embedding

    def raw_maps_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unsmoothed fused maps and the one-class bottleneck's embedding (CADA's regressor
        input for reverse distillation)."""
        self.student_.eval()
        distances, embedding = self._reconstruction(images)
        return fuse_maps(distances, tuple(images.shape[-2:]), self.map_reduction), embedding

    def _predict(self, images: torch.Tensor) -> Prediction:
        maps, _ = self.raw_maps_and_features(images)
        maps = smooth_maps(maps, self.smoothing_sigma, self.smoothing_kernel)
        return Prediction(maps, image_scores(maps, self.score_reduction, self.top_fraction))

    # -- persistence --------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return module_state_tensors(self._trained_modules())

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build_networks()
        load_module_states(self._trained_modules(), tensors)
