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

from typing import Any

import torch
from torch import nn

from ..backbones import FeatureExtractor
from ..nn.reverse_distillation import cosine_distance_maps, hard_mined_cosine_loss
from . import register
from .reverse_distillation import ReverseDistillation
from .training import (
    TrainingCheckpoint,
    TrainingImages,
    cache_features,
    run_stage,
    set_learning_rates,
    step_decay,
    step_schedule,
    with_base_rates,
)


@register
class ReContrast(ReverseDistillation):
    """ReContrast anomaly detector.

    Takes the :class:`ReverseDistillation` arguments except ``loss`` and ``num_hard`` (its
    defaults follow the ReContrast code: GELU decoder, mean of maps, 5x5 smoothing, top-1% score),
    plus:

    Args:
        encoder_lr: learning rate of the trainable encoder copy (1e-5).
        weight_decay: AdamW weight decay (1e-5).
        max_steps: train for this many optimisation steps instead of ``epochs`` (the official
            schedule is 5000 steps of batch 16).
        alpha_start, alpha_end, ramp_fraction: the hard-mining threshold mean + alpha * std
            ramps linearly from ``alpha_start`` to ``alpha_end`` over this share of the steps.
        hard_factor: gradient factor kept at easy positions (0 in the official code).

    Example:
        >>> detector = ReContrast.from_preset("cpu").fit(train_loader)
    """

    name = "recontrast"
    summary = "reverse distillation with a trainable encoder copy and cross reconstruction"
    presets = {
        # EfficientNet's stage outputs are linear bottlenecks the student cannot rebuild from a
        # 1/32 embedding; its expanded, activated features can be rebuilt (and two levels and
        # narrower residual blocks keep an epoch near two minutes on two CPU cores). 30
        # epochs, as RD's: where the training loss changes by under 1 % per epoch.
        "cpu": dict(backbone="tf_efficientnet_lite0", feature_location="expansion", layers=(2, 3),
                    width_ratio=0.25, bottleneck_blocks=2, decoder_blocks=(2, 2), image_size=256,
                    epochs=30),
        "paper": dict(backbone="wide_resnet50_2", layers=("layer1", "layer2", "layer3"),
                      image_size=256, max_steps=5000, batch_size=16),
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
        decoder_activation: str = "gelu",
        epochs: int = 20,
        max_steps: int | None = None,
        batch_size: int = 16,
        lr: float = 2e-3,
        encoder_lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-5,
        lr_milestones: tuple[float, ...] = (0.8,),
        lr_gamma: float = 0.2,
        alpha_start: float = -3.0,
        alpha_end: float = 1.0,
        ramp_fraction: float = 0.1,
        hard_factor: float = 0.0,
        map_reduction: str = "mean",
        smoothing_sigma: float = 4.0,
        smoothing_kernel: int | None = 5,
        score_reduction: str = "top_mean",
        top_fraction: float = 0.01,
        feature_cache_mb: float = 4096,
        checkpoint_every_s: float = 60.0,
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(
            backbone=backbone, layers=layers, backbone_weights=backbone_weights,
            feature_location=feature_location, image_size=image_size, crop_size=crop_size,
            embed_channels=embed_channels,
            bottleneck_blocks=bottleneck_blocks, decoder_blocks=decoder_blocks,
            width_ratio=width_ratio, decoder_activation=decoder_activation, epochs=epochs,
            batch_size=batch_size, lr=lr, betas=betas, lr_milestones=lr_milestones,
            lr_gamma=lr_gamma, map_reduction=map_reduction, smoothing_sigma=smoothing_sigma,
            smoothing_kernel=smoothing_kernel, score_reduction=score_reduction,
            top_fraction=top_fraction, feature_cache_mb=feature_cache_mb,
            checkpoint_every_s=checkpoint_every_s, device=device, seed=seed)
        self.max_steps = max_steps
        self.encoder_lr = encoder_lr
        self.weight_decay = weight_decay
        self.alpha_start = alpha_start
        self.alpha_end = alpha_end
        self.ramp_fraction = ramp_fraction
        self.hard_factor = hard_factor

    # -- networks -----------------------------------------------------------------------------
    def _build_networks(self) -> None:
        frozen = self.extractor  # built first: building it draws random numbers
        torch.manual_seed(self.seed)
        self.encoder_ = FeatureExtractor(self.backbone, self.layers, self.backbone_weights,
                                         feature_location=self.feature_location,
                                         trainable=True).to(self.torch_device)
        self.student_ = self._make_student(frozen.channels, frozen.strides, num_heads=2)
        self.student_.to(self.torch_device)

    def _trained_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder_, "student": self.student_}

    def _cross_reconstruction(self, frozen: list[torch.Tensor], trained: list[torch.Tensor]
                              ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Decoder outputs paired with (frozen, trained): heads A of the trainable half, heads B
        of the frozen half; and the frozen half's bottleneck embedding."""
        batch = frozen[0].shape[0]
        embedding = self.student_.bottleneck([torch.cat([t, f]) for t, f in zip(trained, frozen)])
        heads_a, heads_b = self.student_.decoder(embedding)
        return [h[:batch] for h in heads_a], [h[batch:] for h in heads_b], embedding[batch:]

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
        return {"recontrast": with_base_rates(torch.optim.AdamW(
            groups, betas=self.betas, weight_decay=self.weight_decay, eps=1e-10, amsgrad=True))}

    def _train(self, data: TrainingImages, optimizers: dict[str, torch.optim.Optimizer],
               history: dict[str, list[float]], checkpoint: TrainingCheckpoint,
               show_progress: bool) -> dict[str, Any]:
        device = self.torch_device
        optimizer = optimizers["recontrast"]
        epochs, steps_per_epoch, total_steps = step_schedule(len(data), self.batch_size,
                                                             self.epochs, self.max_steps)
        cached = None
        if len(history.get("recontrast", [])) < epochs:
            cached = cache_features(self.extractor, data, self.batch_size, device,
                                    self.feature_cache_mb)

        def run_epoch(epoch: int) -> float:
            self.student_.train()
            total, count = 0.0, 0
            batches = data.epoch_batches(self.batch_size, self.seed, epoch)
            for offset, indices in enumerate(batches):
                step = epoch * steps_per_epoch + offset
                if step >= total_steps:
                    break
                set_learning_rates(optimizer, step_decay(step / total_steps, self.lr_milestones,
                                                         self.lr_gamma))
                ramp = step / max(1.0, total_steps * self.ramp_fraction)
                alpha = min(self.alpha_start + (self.alpha_end - self.alpha_start) * ramp,
                            self.alpha_end)
                images = data.get(indices, device)
                if cached is not None:
                    frozen = [level[indices.to(level.device)] for level in cached]
                else:
                    frozen = self.extractor(images)
                trained = self.encoder_(images)
                rebuilt_frozen, rebuilt_trained, _ = self._cross_reconstruction(frozen,
                                                                                trained)
                loss = (hard_mined_cosine_loss(frozen, rebuilt_frozen, alpha, self.hard_factor)
                        + hard_mined_cosine_loss(trained, rebuilt_trained, alpha,
                                                 self.hard_factor)) / 2
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(indices)
                count += len(indices)
            return total / max(count, 1)

        run_stage("recontrast", epochs, run_epoch, history, self.seed, checkpoint,
                  self._trained_modules(), optimizers, show_progress)
        self.student_.eval()
        return {"steps": total_steps, "frozen_features_cached": cached is not None}
