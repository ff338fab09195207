"""Reverse distillation (RD4AD, Deng & Li, CVPR 2022), the base of AAND, ReContrast and CADA.

A frozen teacher encoder gives multi-scale features; a trainable one-class bottleneck (OCBE)
squeezes them into one embedding and a student decoder reconstructs the teacher's features from
it, trained on normal images only. At test time the student reconstructs normal regions well and
anomalies badly: the anomaly map is the sum over levels of the upsampled 1 - cos maps, Gaussian
smoothed (sigma 4), and the image score its maximum (METHODS.md §1.2).

:class:`StudentDecoderDetector` holds what RD, AAND and ReContrast share (the student, the map,
the schedule); :class:`ReverseDistillation` adds its loss and training. Subclasses change one
piece at a time: :meth:`ReverseDistillation.teacher_features` (AAND's amplified teacher),
:meth:`ReverseDistillation._distillation_loss`, or the whole training (ReContrast).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...nn.anomaly_maps import (
    MAP_REDUCTIONS,
    SCORE_REDUCTIONS,
    fuse_maps,
    image_scores,
    smooth_maps,
)
from ...nn.precision import Network
from ...validation import Choice, Items, Number, Optional
from .. import register
from ..base import Prediction
from ..hyperparameters import hyperparameter
from ..training import (
    FrozenFeatures,
    Stage,
    TrainedDetector,
    Training,
    TrainingImages,
    step_decay,
)
from .networks import (
    ACTIVATIONS,
    LOSSES,
    OneClassBottleneck,
    ReverseDecoder,
    check_pyramid,
    cosine_distance_maps,
    flattened_cosine_loss,
    hard_patch_loss,
    pixel_cosine_loss,
)

#: EfficientNet's stage outputs are linear bottlenecks the student cannot rebuild from a 1/32
#: embedding; its expanded, activated features can be rebuilt (and two levels and narrower
#: residual blocks keep an epoch near half a minute on two CPU cores for RD). 30 epochs: on 700
#: Magnetic Tile images RD's training loss changes by under 1 % per epoch by then.
CPU_STUDENT = dict(backbone="tf_efficientnet_lite0", feature_location="expansion", layers=(2, 3),
                   width_ratio=0.25, bottleneck_blocks=2, decoder_blocks=(2, 2), image_size=256,
                   epochs=30)
PAPER_TEACHER = dict(backbone="wide_resnet50_2", layers=("layer1", "layer2", "layer3"),
                     image_size=256)


class ReverseStudent(Network):
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


class StudentDecoderDetector(TrainedDetector):
    """What RD, AAND and ReContrast share: a student (OCBE + decoder) on teacher levels, the
    1 - cos anomaly map and its smoothing, the Adam schedule."""

    layers = (1, 2, 3)
    epochs = 200
    embed_channels: int | None = hyperparameter(
        None, Optional(Number(int, 1)), "bottleneck embedding width (null: twice the coarsest "
        "teacher width)")
    bottleneck_blocks: int = hyperparameter(3, Number(int, 1), "residual blocks of the "
                                            "one-class embedding")
    decoder_blocks: tuple[int, ...] = hyperparameter(
        (3, 4, 6), Items(Number(int, 1), min_length=1), "residual blocks per decoder stage, "
        "coarse to fine (at least one per layer)")
    width_ratio: float = hyperparameter(0.5, Number(float, 0, low_open=True), "inner width of "
                                        "the residual blocks relative to their output")
    decoder_activation: str = hyperparameter("relu", Choice(*ACTIVATIONS), "the decoder's "
                                             "activation ('gelu' as in ReContrast and CADA)")
    lr: float = hyperparameter(0.005, Number(float, 0, low_open=True), "Adam learning rate")
    betas: tuple[float, float] = hyperparameter(
        (0.5, 0.999), Items(Number(float, 0, 1, high_open=True), length=2), "Adam betas")
    lr_milestones: tuple[float, ...] = hyperparameter(
        (), Items(Number(float, 0, 1)), "fractions of training after which the learning rate "
        "is multiplied by lr_gamma")
    lr_gamma: float = hyperparameter(0.2, Number(float, 0, low_open=True), "the decay factor")
    map_reduction: str = hyperparameter("sum", Choice(*MAP_REDUCTIONS), "how the levels' maps "
                                        "are combined")
    smoothing_sigma: float = hyperparameter(4.0, Number(float, 0), "Gaussian sigma of the map "
                                            "smoothing (0: off)")
    smoothing_kernel: int | None = hyperparameter(
        None, Optional(Number(int, 1)), "null for scipy's support (4 sigma), or an odd kernel "
        "size (e.g. 5)")
    score_reduction: str = hyperparameter("max", Choice(*SCORE_REDUCTIONS), "image score: the "
                                          "map's max, or the mean of its top pixels")
    top_fraction: float = hyperparameter(0.01, Number(float, 0, 1, low_open=True),
                                         "share of pixels averaged by 'top_mean'")
    feature_cache_mb: float = hyperparameter(4096.0, Number(float, 0), "keep the frozen "
                                             "teacher's training features in memory up to this "
                                             "many MB")
    #: Output head sets of the decoder (ReContrast: 2).
    student_heads = 0

    def _check_params(self) -> None:
        super()._check_params()
        if len(self.decoder_blocks) < len(self.layers):
            raise self._refuse(f"decoder_blocks={list(self.decoder_blocks)} needs one entry per "
                               f"layer ({len(self.layers)})")

    def check_resources(self) -> None:
        super().check_resources()
        check_pyramid(self.extractor.channels, self.extractor.strides)

    # -- networks -----------------------------------------------------------------------------
    def _build_networks(self) -> None:
        extractor = self.extractor
        with self.seeded():
            self._create_networks(extractor.channels, extractor.strides)

    def _create_networks(self, channels: list[int], strides: list[int]) -> None:
        """The trained networks, in the order their weights are drawn."""
        self.student_ = ReverseStudent(
            channels, strides, self.embed_channels, self.bottleneck_blocks, self.decoder_blocks,
            self.width_ratio, self.decoder_activation, self.student_heads,
            linear_outputs=self._teacher_has_negative_features()).to(self.torch_device)

    def _teacher_has_negative_features(self) -> bool:
        """Whether the teacher's features can be negative (then the decoder must end linear)."""
        with torch.no_grad():
            probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
            return any(bool((f < 0).any()) for f in self.extractor(probe.to(self.torch_device)))

    def _trained_modules(self) -> dict[str, nn.Module]:
        return {"student": self.student_}

    def _schedule_kwargs(self) -> dict[str, Any]:
        """The learning-rate decay every stage of these methods follows."""
        return {"schedule": step_decay(self.lr_milestones, self.lr_gamma)}

    # -- inference ----------------------------------------------------------------------------
    def _reconstruction(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per level (B, h, w) 1 - cos between teacher and student, and the bottleneck's
        embedding."""
        teacher = self.teacher_features(images)
        embedding = self.student_.bottleneck(teacher)
        return cosine_distance_maps(teacher, self.student_.decoder(embedding)), embedding

    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The features the student learns to rebuild (here: the frozen backbone's)."""
        return self.extractor(images)

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


@register
class ReverseDistillation(StudentDecoderDetector):
    """Reverse distillation anomaly detector (RD4AD).

    Example:
        >>> detector = ReverseDistillation.from_preset("cpu", epochs=5).fit(train_loader)
        >>> detector.predict(images).scores
    """

    name = "rd"
    summary = "reverse distillation: a student decoder rebuilds frozen teacher features"
    presets = {"cpu": CPU_STUDENT,
               "paper": dict(PAPER_TEACHER, epochs=200, batch_size=16, lr=0.005)}
    tiny_params = dict(image_size=64, epochs=1)

    loss: str = hyperparameter("flattened", Choice(*LOSSES), "'flattened' (official code: "
                               "cosine of whole flattened maps) or 'pixel' (the paper: per "
                               "position)")
    num_hard: int = hyperparameter(0, Number(int, 0), "add the mean distance of the N hardest "
                                   "positions per image and level (AAND's hard knowledge "
                                   "distillation); 0: off")

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"distill": torch.optim.Adam(self.student_.parameters(), lr=self.lr,
                                            betas=self.betas)}

    def _fit(self, train: Iterable[Any] | torch.Tensor, show_progress: bool,
             checkpoint_dir: str | Path | None) -> dict[str, Any]:
        data = TrainingImages.collect(train)
        self._build_networks()
        with self.training(checkpoint_dir, show_progress) as training:
            facts = self._train(data, training)
        return self.fit_facts(data, training, **facts)

    def _train(self, data: TrainingImages, training: Training) -> dict[str, Any]:
        return self._distill(data, training)

    def _distill(self, data: TrainingImages, training: Training) -> dict[str, Any]:
        """Train the student to rebuild the (frozen) teacher features of normal images."""
        if training.done("distill", self.epochs):
            return {"teacher_features_cached": False}
        teacher = FrozenFeatures(self.teacher_features, data, self.batch_size,
                                 self.torch_device, self.feature_cache_mb)

        def loss(indices: torch.Tensor, step: int) -> torch.Tensor:
            features = teacher(indices)
            return self._distillation_loss(features, self.student_(features))

        training.run(Stage("distill", data, loss, [training.optimizers["distill"]],
                           [self.student_], self.epochs, self.batch_size,
                           schedule_per_epoch=True, **self._schedule_kwargs()))
        return {"teacher_features_cached": teacher.cached is not None}

    def _distillation_loss(self, teacher: list[torch.Tensor], student: list[torch.Tensor]
                           ) -> torch.Tensor:
        base = flattened_cosine_loss if self.loss == "flattened" else pixel_cosine_loss
        loss = base(teacher, student)
        if self.num_hard > 0:
            loss = loss + hard_patch_loss(teacher, student, self.num_hard)
        return loss
