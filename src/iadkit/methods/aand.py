"""AAND (Anomaly Amplification and Normality Distillation): reverse distillation from an
"advanced" teacher whose features of anomalous regions are amplified (METHODS.md §4).

Stage 1 trains residual anomaly amplification modules (:mod:`iadkit.nn.amplification`) on the
frozen teacher with DRAEM-style synthetic anomalies restricted to the object's foreground: the
gate learns where anomalies are (focal loss), the residual learns to push anomalous features away
from normal ones by a dynamic margin (the ground-truth mask gates it during training). Stage 2 is
reverse distillation from the frozen advanced teacher, with hard knowledge distillation.

Ablations of the paper's Table V: ``score_source="gate"`` (a, the gate map as anomaly map),
``gate="none"`` (b, residuals everywhere), ``num_hard=0`` (without HKD). "HKD only" (d) is
``rd`` with ``num_hard=10``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..nn.amplification import (
    ResidualAmplifier,
    amplification_loss,
    downsample_mask,
    gate_focal_loss,
)
from ..synthesis.draem import DraemSynthesizer
from ..synthesis.foreground import foreground_mask, rule_for
from ..synthesis.textures import TextureSource
from . import register
from .reverse_distillation import ReverseDistillation
from .training import (
    TrainingCheckpoint,
    TrainingImages,
    epoch_seed,
    run_stage,
    set_learning_rates,
    step_decay,
    with_base_rates,
)

GATES = ("learned", "none")
SCORE_SOURCES = ("student", "gate")
FOREGROUND_KINDS = ("above", "at_most", "disc", "rectangle")


def parse_foreground(spec: str, category: str) -> tuple:
    """``"auto"`` (the category's rule from AAND's table), ``"all"``, or ``"kind:value"`` with
    kind one of above, at_most (0..255 gray thresholds), disc, rectangle (fractions)."""
    if spec == "auto":
        return rule_for(category)
    if spec == "all":
        return ("all",)
    kind, _, value = spec.partition(":")
    if kind not in FOREGROUND_KINDS or not value:
        raise ValueError(f"foreground must be 'auto', 'all' or one of "
                         f"{[k + ':<value>' for k in FOREGROUND_KINDS]}, got {spec!r}")
    return (kind, float(value))


@register
class AAND(ReverseDistillation):
    """AAND anomaly detector: amplified teacher, then hard-knowledge reverse distillation.

    Takes every :class:`ReverseDistillation` argument (for the stage-2 student: ``epochs``,
    ``lr``, ``num_hard``...) plus:

    Args:
        amplify_epochs: stage-1 epochs (paper: 100).
        texture_dir: folder of texture images for the synthetic anomalies (e.g. DTD's
            ``images/``); None uses procedural textures.
        anomaly_probability: share of stage-1 images that get a synthetic anomaly (0.8).
        foreground: where anomalies may be placed: "auto" (the category's rule from the
            official code, whole image for unknown categories), "all", or e.g. "above:50".
        num_memory: L, normal and anomaly memory items per level (50).
        temperature: softmax temperature of the gate's memory matching (0.2).
        margin: alpha of the amplification loss's dynamic margin (0.3).
        amplify_weight: weight of the amplification loss against the focal loss (official
            code 0.1; the paper's Eq. 9 is 1.0).
        focal_gamma, focal_alpha: focal-loss parameters of the gate (2, 0.8).
        mask_threshold: a downsampled mask position counts as anomalous above this (0.3).
        max_normal_patches, max_anomalous_patches: patch subsets of the amplification loss.
        gate: "learned" (the matching-guided gate) or "none" (ablation b).
        score_source: "student" (distillation error) or "gate" (ablation a).

    Example:
        >>> detector = AAND.from_preset("cpu", texture_dir="dtd/images").fit(train_loader)
    """

    name = "aand"
    summary = "anomaly-amplified teacher (synthetic defects), then hard-knowledge reverse distillation"
    presets = {
        # EfficientNet's stage outputs are linear bottlenecks the student cannot rebuild from a
        # 1/32 embedding; its expanded, activated features can be rebuilt (and two levels and
        # narrower residual blocks keep an epoch near a minute on two CPU cores). 30
        # distillation epochs, as RD's: where the training loss changes by under 1 % per epoch.
        "cpu": dict(backbone="tf_efficientnet_lite0", feature_location="expansion", layers=(2, 3),
                    width_ratio=0.25, bottleneck_blocks=2, decoder_blocks=(2, 2), image_size=256,
                    amplify_epochs=2, epochs=30),
        "paper": dict(backbone="wide_resnet50_2", layers=("layer1", "layer2", "layer3"),
                      image_size=256, amplify_epochs=100, epochs=120, batch_size=16, lr=0.005),
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
        num_hard: int = 10,
        epochs: int = 120,
        batch_size: int = 16,
        lr: float = 0.005,
        betas: tuple[float, float] = (0.5, 0.999),
        lr_milestones: tuple[float, ...] = (0.8, 0.9),
        lr_gamma: float = 0.2,
        map_reduction: str = "sum",
        smoothing_sigma: float = 4.0,
        smoothing_kernel: int | None = None,
        score_reduction: str = "max",
        top_fraction: float = 0.01,
        feature_cache_mb: float = 4096,
        checkpoint_every_s: float = 60.0,
        amplify_epochs: int = 100,
        texture_dir: str | None = None,
        anomaly_probability: float = 0.8,
        foreground: str = "auto",
        num_memory: int = 50,
        temperature: float = 0.2,
        margin: float = 0.3,
        amplify_weight: float = 0.1,
        focal_gamma: float = 2.0,
        focal_alpha: float = 0.8,
        mask_threshold: float = 0.3,
        max_normal_patches: int = 5000,
        max_anomalous_patches: int = 1000,
        gate: str = "learned",
        score_source: str = "student",
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(
            backbone=backbone, layers=layers, backbone_weights=backbone_weights,
            feature_location=feature_location, image_size=image_size, crop_size=crop_size,
            embed_channels=embed_channels,
            bottleneck_blocks=bottleneck_blocks, decoder_blocks=decoder_blocks,
            width_ratio=width_ratio, decoder_activation=decoder_activation, loss=loss,
            num_hard=num_hard, epochs=epochs, batch_size=batch_size, lr=lr, betas=betas,
            lr_milestones=lr_milestones, lr_gamma=lr_gamma, map_reduction=map_reduction,
            smoothing_sigma=smoothing_sigma, smoothing_kernel=smoothing_kernel,
            score_reduction=score_reduction, top_fraction=top_fraction,
            feature_cache_mb=feature_cache_mb, checkpoint_every_s=checkpoint_every_s,
            device=device, seed=seed)
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if score_source not in SCORE_SOURCES:
            raise ValueError(f"score_source must be one of {SCORE_SOURCES}, got {score_source!r}")
        if score_source == "gate" and gate == "none":
            raise ValueError("score_source='gate' needs gate='learned'")
        parse_foreground(foreground, "")
        self.amplify_epochs = amplify_epochs
        self.texture_dir = texture_dir
        self.anomaly_probability = anomaly_probability
        self.foreground = foreground
        self.num_memory = num_memory
        self.temperature = temperature
        self.margin = margin
        self.amplify_weight = amplify_weight
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha
        self.mask_threshold = mask_threshold
        self.max_normal_patches = max_normal_patches
        self.max_anomalous_patches = max_anomalous_patches
        self.gate = gate
        self.score_source = score_source

    # -- networks -----------------------------------------------------------------------------
    def _build_networks(self) -> None:
        super()._build_networks()
        self.amplifiers_ = nn.ModuleList(
            ResidualAmplifier(c, self.num_memory, self.temperature) for c in self.extractor.channels)
        self.amplifiers_.to(self.torch_device)

    def _trained_modules(self) -> dict[str, nn.Module]:
        return {"amplifier": self.amplifiers_, "student": self.student_}

    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The advanced teacher: vanilla features plus their gated residuals."""
        features = self.extractor(images)
        if self.gate == "none":
            return [f + amplifier.residual(f) for amplifier, f in zip(self.amplifiers_, features)]
        return [amplifier(f)[0] for amplifier, f in zip(self.amplifiers_, features)]

    def _reconstruction(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        distances, embedding = super()._reconstruction(images)
        if self.score_source == "gate":
            distances = [amplifier.gate(f).squeeze(1)
                         for amplifier, f in zip(self.amplifiers_, self.extractor(images))]
        return distances, embedding

    # -- training -----------------------------------------------------------------------------
    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"amplify": with_base_rates(torch.optim.Adam(
                    self.amplifiers_.parameters(), lr=self.lr, betas=self.betas)),
                **super()._make_optimizers()}

    def _train(self, data: TrainingImages, optimizers: dict[str, torch.optim.Optimizer],
               history: dict[str, list[float]], checkpoint: TrainingCheckpoint,
               show_progress: bool) -> dict[str, Any]:
        self._amplify(data, optimizers, history, checkpoint, show_progress)
        self.amplifiers_.eval()
        self.amplifiers_.requires_grad_(False)
        return self._distill(data, optimizers, history, checkpoint, show_progress)

    def _foreground_masks(self, data: TrainingImages) -> torch.Tensor:
        """(N, S, S) 0/1 foreground of every training image, computed once."""
        masks = torch.ones(data.images.shape[0], *data.images.shape[-2:])
        for index, category in enumerate(data.categories):
            rule = parse_foreground(self.foreground, category)
            if rule != ("all",):
                masks[index] = foreground_mask(data.images[index].float() / 255.0, rule)
        return masks

    def _amplify(self, data: TrainingImages, optimizers: dict[str, torch.optim.Optimizer],
                 history: dict[str, list[float]], checkpoint: TrainingCheckpoint,
                 show_progress: bool) -> None:
        """Stage 1: train the amplifiers on synthetic anomalies (teacher frozen)."""
        if len(history.get("amplify", [])) >= self.amplify_epochs:
            return
        device = self.torch_device
        optimizer = optimizers["amplify"]
        foregrounds = self._foreground_masks(data)
        textures = TextureSource(self.texture_dir)
        synthesizer = DraemSynthesizer(textures, self.anomaly_probability)
        cpu = torch.device("cpu")

        def run_epoch(epoch: int) -> float:
            set_learning_rates(optimizer, step_decay(epoch / self.amplify_epochs,
                                                     self.lr_milestones, self.lr_gamma))
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, "synthesis", epoch))
            self.amplifiers_.train()
            total, count = 0.0, 0
            for indices in data.epoch_batches(self.batch_size, self.seed, epoch):
                samples = [synthesizer(image, generator, foreground) for image, foreground
                           in zip(data.get(indices, cpu), foregrounds[indices])]
                images = torch.stack([s.image for s in samples]).to(device)
                masks = torch.stack([s.mask for s in samples]).to(device)
                loss = self._amplification_loss(self.extractor(images), masks,
                                                foregrounds[indices].to(device), generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(indices)
                count += len(indices)
            return total / count

        run_stage("amplify", self.amplify_epochs, run_epoch, history, self.seed, checkpoint,
                  self._trained_modules(), optimizers, show_progress)

    def _amplification_loss(self, teacher: list[torch.Tensor], masks: torch.Tensor,
                            foregrounds: torch.Tensor, generator: torch.Generator
                            ) -> torch.Tensor:
        """Stage-1 loss: focal loss of the gates + weighted amplification loss, over levels."""
        focal = teacher[0].new_zeros(())
        amplify = teacher[0].new_zeros(())
        for amplifier, features in zip(self.amplifiers_, teacher):
            size = tuple(features.shape[-2:])
            anomalous = downsample_mask(masks, size, self.mask_threshold)
            foreground = downsample_mask(foregrounds, size, self.mask_threshold)
            if self.gate == "learned":
                focal = focal + gate_focal_loss(amplifier.gate(features), anomalous,
                                                self.focal_gamma, self.focal_alpha)
            amplified, _ = amplifier(features, gate=anomalous)  # ground-truth gating (Eq. 6)
            amplify = amplify + amplification_loss(
                amplified, features, anomalous, (1 - anomalous) * foreground, self.margin,
                self.max_normal_patches, self.max_anomalous_patches, generator)
        return focal + self.amplify_weight * amplify
