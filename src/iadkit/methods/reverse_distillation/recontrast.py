"""ReContrast (Guo et al., NeurIPS 2023): reverse distillation with a trainable encoder and
cross reconstruction (METHODS.md §1.3).

Two copies of the pretrained encoder: one frozen, one trained with a tiny learning rate (its
BatchNorm keeps the ImageNet statistics). Their features go, stacked along the batch, through one
shared bottleneck and decoder with two sets of 1x1 output heads. The decoder output of the
trainable encoder's half (heads A) must rebuild the *frozen* features, and that of the frozen
half (heads B) the *trainable* ones, under a global cosine loss whose gradient is kept only at
the hardest positions (the share ramps from all to the hard tail over the first 10% of steps).
The anomaly map averages the six 1 - cos maps, smoothed by a 5x5 Gaussian (sigma 4); the image
score is the mean of the top 1% of the map.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...backbones import FeatureExtractor
from ...validation import Number, Optional
from .. import register
from ..hyperparameters import hyperparameter
from ..training import FrozenFeatures, Stage, TrainingImages, step_schedule
from .networks import cosine_distance_maps, hard_mined_cosine_loss
from .rd import CPU_STUDENT, PAPER_TEACHER, StudentDecoderDetector


@register
class ReContrast(StudentDecoderDetector):
    """ReContrast anomaly detector. Its defaults follow the ReContrast code: GELU decoder, mean
    of maps, 5x5 smoothing, top-1% score.

    Example:
        >>> detector = ReContrast.from_preset("cpu").fit(train_loader)
    """

    name = "recontrast"
    summary = "reverse distillation with a trainable encoder copy and cross reconstruction"
    # 30 epochs, as RD's: where the training loss changes by under 1 % per epoch (about two
    # minutes per epoch on two CPU cores: the encoder copy is trained).
    presets = {"cpu": CPU_STUDENT,
               "paper": dict(PAPER_TEACHER, max_steps=5000, batch_size=16)}
    tiny_params = dict(image_size=64, epochs=1)
    student_heads = 2

    decoder_activation = "gelu"
    epochs = 20
    lr = 2e-3
    betas = (0.9, 0.999)
    lr_milestones = (0.8,)
    map_reduction = "mean"
    smoothing_kernel = 5
    score_reduction = "top_mean"
    max_steps: int | None = hyperparameter(
        None, Optional(Number(int, 1)), "train for this many optimisation steps instead of "
        "epochs (the official schedule: 5000 steps of batch 16)")
    encoder_lr: float = hyperparameter(1e-5, Number(float, 0), "learning rate of the trainable "
                                       "encoder copy")
    weight_decay: float = hyperparameter(1e-5, Number(float, 0), "AdamW weight decay")
    alpha_start: float = hyperparameter(-3.0, Number(float), "hard-mining threshold mean + "
                                        "alpha * std: alpha at the start...")
    alpha_end: float = hyperparameter(1.0, Number(float), "... and at the end of its ramp")
    ramp_fraction: float = hyperparameter(0.1, Number(float, 0, 1), "share of the steps over "
                                          "which alpha ramps linearly")
    hard_factor: float = hyperparameter(0.0, Number(float, 0, 1), "gradient factor kept at "
                                        "easy positions (0 in the official code)")

    # -- networks -----------------------------------------------------------------------------
    def _create_networks(self, channels: list[int], strides: list[int]) -> None:
        self.encoder_ = FeatureExtractor(self.backbone, self.layers, self.backbone_weights,
                                         feature_location=self.feature_location,
                                         trainable=True).to(self.torch_device)
        super()._create_networks(channels, strides)

    def _trained_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder_, "student": self.student_}

    def _cross_reconstruction(self, frozen: list[torch.Tensor], trained: list[torch.Tensor]
                              ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Decoder outputs paired with (frozen, trained): heads A of the trainable half, heads B
        of the frozen half; and the frozen half's bottleneck embedding."""
        batch = frozen[0].shape[0]
        embedding = self.student_.bottleneck([torch.cat([t, f]) for t, f in zip(trained, frozen)])
        heads_a, heads_b = self.student_.decoder(
            embedding, head_rows=[slice(None, batch), slice(batch, None)])
        return heads_a, heads_b, embedding[batch:]

    def _reconstruction(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The six 1 - cos maps, and the bottleneck embedding of the frozen encoder's half
        (CADA's regressor input: the paper leaves the half open)."""
        frozen, trained = self.extractor(images), self.encoder_(images)
        rebuilt_frozen, rebuilt_trained, embedding = self._cross_reconstruction(frozen, trained)
        return (cosine_distance_maps(frozen, rebuilt_frozen)
                + cosine_distance_maps(trained, rebuilt_trained)), embedding

    # -- training -----------------------------------------------------------------------------
    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        groups = [{"params": list(self.student_.parameters()), "lr": self.lr},
                  {"params": list(self.encoder_.parameters()), "lr": self.encoder_lr}]
        return {"recontrast": torch.optim.AdamW(groups, betas=self.betas,
                                                weight_decay=self.weight_decay, eps=1e-10,
                                                amsgrad=True)}

    def _fit(self, train: Iterable[Any] | torch.Tensor, show_progress: bool,
             checkpoint_dir: str | Path | None) -> dict[str, Any]:
        data = TrainingImages.collect(train)
        self._build_networks()
        epochs, _, total_steps = step_schedule(len(data), self.batch_size, self.epochs,
                                               self.max_steps)
        frozen = None
        with self.training(checkpoint_dir, show_progress) as training:
            if not training.done("recontrast", epochs):
                frozen = FrozenFeatures(self.extractor, data, self.batch_size,
                                        self.torch_device, self.feature_cache_mb)
                training.run(Stage("recontrast", data, self._loss(data, frozen, total_steps),
                                   [training.optimizers["recontrast"]], [self.student_],
                                   self.epochs, self.batch_size, self.max_steps,
                                   **self._schedule_kwargs()))
        return self.fit_facts(data, training, steps=total_steps, frozen_features_cached=(
            frozen is not None and frozen.cached is not None))

    def _loss(self, data: TrainingImages, frozen_features: FrozenFeatures, total_steps: int
              ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """Both cross reconstructions' hard-mined cosine losses; alpha ramps with the step."""
        def loss(indices: torch.Tensor, step: int) -> torch.Tensor:
            ramp = step / max(1.0, total_steps * self.ramp_fraction)
            alpha = min(self.alpha_start + (self.alpha_end - self.alpha_start) * ramp,
                        self.alpha_end)
            frozen = frozen_features(indices)
            trained = self.encoder_(data.get(indices, self.torch_device))
            rebuilt_frozen, rebuilt_trained, _ = self._cross_reconstruction(frozen, trained)
            return (hard_mined_cosine_loss(frozen, rebuilt_frozen, alpha, self.hard_factor)
                    + hard_mined_cosine_loss(trained, rebuilt_trained, alpha,
                                             self.hard_factor)) / 2
        return loss
