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

from ...synthesis.draem import DraemSynthesizer
from ...synthesis.foreground import foreground_mask, rule_for
from ...validation import Check, Choice, Number, Optional, Text
from .. import register
from ..hyperparameters import hyperparameter
from ..training import Stage, Training, TrainingImages, epoch_seed
from .amplification import (
    ResidualAmplifier,
    amplification_loss,
    downsample_mask,
    gate_focal_loss,
)
from .rd import CPU_STUDENT, PAPER_TEACHER, ReverseDistillation

GATES = ("learned", "none")
SCORE_SOURCES = ("student", "gate")
FOREGROUND_KINDS = ("above", "at_most", "disc", "rectangle")


def _is_foreground_spec(spec: object) -> bool:
    return isinstance(spec, str) and bool(parse_foreground(spec, ""))


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

    Its ``epochs``, ``lr``, ``num_hard``... are the stage-2 student's (reverse distillation's).

    Example:
        >>> detector = AAND.from_preset("cpu", texture_dir="dtd/images").fit(train_loader)
    """

    name = "aand"
    summary = "anomaly-amplified teacher (synthetic defects), then hard-knowledge reverse distillation"
    # 30 distillation epochs, as RD's: where the training loss changes by under 1 % per epoch.
    presets = {
        "cpu": dict(CPU_STUDENT, amplify_epochs=2),
        "paper": dict(PAPER_TEACHER, amplify_epochs=100, epochs=120, batch_size=16, lr=0.005),
    }
    tiny_params = dict(image_size=64, epochs=1, amplify_epochs=1)

    num_hard = 10
    epochs = 120
    lr_milestones = (0.8, 0.9)
    amplify_epochs: int = hyperparameter(100, Number(int, 1), "stage-1 epochs (training the "
                                         "amplifiers)")
    texture_dir: str | None = hyperparameter(
        None, Optional(Text()), "folder of texture images for the synthetic anomalies (e.g. "
        "DTD's images/); null: procedural textures")
    anomaly_probability: float = hyperparameter(0.8, Number(float, 0, 1), "share of stage-1 "
                                                "images that get a synthetic anomaly")
    foreground: str = hyperparameter(
        "auto", Check(_is_foreground_spec, "'auto' (the category's rule from the official "
                      "code), 'all', or one of " + ", ".join(f"'{k}:<value>'" for k in
                                                             FOREGROUND_KINDS), ["above"]),
        "where anomalies may be placed")
    num_memory: int = hyperparameter(50, Number(int, 1), "L, normal and anomaly memory items "
                                     "per level")
    temperature: float = hyperparameter(0.2, Number(float, 0, low_open=True), "softmax "
                                        "temperature of the gate's memory matching")
    margin: float = hyperparameter(0.3, Number(float, 0), "alpha of the amplification loss's "
                                   "dynamic margin")
    amplify_weight: float = hyperparameter(0.1, Number(float, 0), "weight of the amplification "
                                           "loss against the focal loss (official code 0.1; "
                                           "the paper's Eq. 9 is 1.0)")
    focal_gamma: float = hyperparameter(2.0, Number(float, 0), "focal-loss gamma of the gate")
    focal_alpha: float = hyperparameter(0.8, Number(float, 0, 1), "focal-loss alpha of the gate")
    mask_threshold: float = hyperparameter(0.3, Number(float, 0, 1), "a downsampled mask "
                                           "position counts as anomalous above this")
    max_normal_patches: int = hyperparameter(5000, Number(int, 1), "normal patches of the "
                                             "amplification loss")
    max_anomalous_patches: int = hyperparameter(1000, Number(int, 1), "anomalous patches of "
                                                "the amplification loss")
    gate: str = hyperparameter("learned", Choice(*GATES), "'learned' (the matching-guided "
                               "gate) or 'none' (ablation b: residuals everywhere)")
    score_source: str = hyperparameter("student", Choice(*SCORE_SOURCES), "'student' "
                                       "(distillation error) or 'gate' (ablation a)")

    def _check_params(self) -> None:
        super()._check_params()
        if self.score_source == "gate" and self.gate == "none":
            raise self._refuse("score_source='gate' needs gate='learned'")

    def check_resources(self) -> None:
        super().check_resources()
        self._image_folder("texture_dir")

    # -- networks -----------------------------------------------------------------------------
    def _create_networks(self, channels: list[int], strides: list[int]) -> None:
        super()._create_networks(channels, strides)
        self.amplifiers_ = nn.ModuleList(
            ResidualAmplifier(c, self.num_memory, self.temperature) for c in channels)
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
            distances = [amplifier.gate(f)[:, 0]
                         for amplifier, f in zip(self.amplifiers_, self.extractor(images))]
        return distances, embedding

    # -- training -----------------------------------------------------------------------------
    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"amplify": torch.optim.Adam(self.amplifiers_.parameters(), lr=self.lr,
                                            betas=self.betas),
                **super()._make_optimizers()}

    def _train(self, data: TrainingImages, training: Training) -> dict[str, Any]:
        self._amplify(data, training)
        self.amplifiers_.eval()
        self.amplifiers_.requires_grad_(False)
        return self._distill(data, training)

    def _foreground_masks(self, data: TrainingImages) -> torch.Tensor:
        """(N, S, S) 0/1 foreground of every training image, computed once."""
        masks = torch.ones(data.images.shape[0], *data.images.shape[-2:])
        for index, category in enumerate(data.categories):
            rule = parse_foreground(self.foreground, category)
            if rule != ("all",):
                masks[index] = foreground_mask(data.images[index].float() / 255.0, rule)
        return masks

    def _amplify(self, data: TrainingImages, training: Training) -> None:
        """Stage 1: train the amplifiers on synthetic anomalies (teacher frozen)."""
        if training.done("amplify", self.amplify_epochs):
            return
        device, cpu = self.torch_device, torch.device("cpu")
        foregrounds = self._foreground_masks(data)
        synthesizer = DraemSynthesizer(self._image_folder("texture_dir"), self.anomaly_probability)
        draws: dict[str, torch.Generator] = {}

        def start_epoch(epoch: int) -> None:
            draws["synthesis"] = torch.Generator().manual_seed(
                epoch_seed(self.seed, "synthesis", epoch))

        def loss(indices: torch.Tensor, step: int) -> torch.Tensor:
            generator = draws["synthesis"]
            samples = [synthesizer(image, generator, foreground) for image, foreground
                       in zip(data.get(indices, cpu), foregrounds[indices])]
            images = torch.stack([s.image for s in samples]).to(device)
            masks = torch.stack([s.mask for s in samples]).to(device)
            return self._amplification_loss(self.extractor(images), masks,
                                            foregrounds[indices].to(device), generator)

        training.run(Stage("amplify", data, loss, [training.optimizers["amplify"]],
                           [self.amplifiers_], self.amplify_epochs, self.batch_size,
                           schedule_per_epoch=True, start_epoch=start_epoch,
                           **self._schedule_kwargs()))

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
