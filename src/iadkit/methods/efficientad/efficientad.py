"""EfficientAD (Batzner et al., WACV 2024): a fast student-teacher pair plus an autoencoder.

The teacher is a small patch description network (PDN) distilled from a pretrained backbone's
locally aware patch features (stage "distill"). A student PDN with twice the teacher's channels
then learns on normal images (stage "train"): its first half imitates the teacher, with the
hard-feature loss (only the 0.1 % largest squared errors count) and a penalty that keeps its
output small on other images, so it cannot imitate the teacher away from normal patches; its
second half imitates an autoencoder, which rebuilds the teacher's features from a 64-value code
of the whole (colour-augmented) image. At test time the student-teacher distance finds local
anomalies, the student-autoencoder distance logical ones. Each map is normalised by its 0.9
and 0.995 quantiles on held-out training normals (mapped to 0 and 0.1), the two are averaged
and upsampled; the image score is the map's maximum.

Deviations from the paper, all options: the teacher is distilled from any timm backbone
(WRN-101 in the paper) on the images of ``distillation_dir`` (ImageNet in the paper), or, when
none is given, on the training normals themselves (flipped, some grey); the penalty images come
from ``distillation_dir`` too, or are procedural textures. A distilled teacher can be reused by
another fit (``teacher_weights``: any fitted EfficientAD model's ``weights.safetensors``), as
the paper distils once for all categories. The quantiles come from a ``validation_fraction``
of the training images held out of the student's training, never from test images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...backbones.extractor import IMAGENET_MEAN, IMAGENET_STD
from ...errors import ConfigError, IadkitError
from ...nn.anomaly_maps import image_scores, upsampled
from ...synthesis.textures import TextureSource
from ...validation import Choice, Number, Optional, Text
from .. import register
from ..base import Prediction
from ..hyperparameters import hyperparameter
from ..patchcore.patch_features import LocalPatchFeatures
from ..training import (
    Stage,
    TrainedDetector,
    Training,
    TrainingImages,
    epoch_seed,
    step_decay,
    step_schedule,
)
from .networks import MODEL_SIZES, AutoEncoder, PatchDescriptionNetwork

#: The map quantiles (paper: q_a = 0.9 maps to 0, q_b = 0.995 to 0.1).
LOW_QUANTILE, HIGH_QUANTILE = 0.9, 0.995


def pdn_output_size(image_size: int) -> int:
    """The side of a PDN's output for a square input (64 for 256)."""
    side = image_size + 3  # 4x4 convolution, padding 3
    side = side // 2 + 1   # 2x2 average pooling, stride 2, padding 1
    side = side + 3
    side = side // 2 + 1
    return side - 3        # the last 4x4 convolution, no padding


def colour_jitter(images: torch.Tensor) -> torch.Tensor:
    """Each image's brightness, contrast or saturation (one, at random) scaled by a factor
    drawn from [0.8, 1.2]: the autoencoder's training augmentation."""
    factors = (0.8 + 0.4 * torch.rand(images.shape[0], 1, 1, 1, device=images.device))
    kinds = torch.randint(3, (images.shape[0],), device=images.device).view(-1, 1, 1, 1)
    grey = (0.299 * images[:, :1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3])
    brightness = images * factors
    contrast = (images - grey.mean(dim=(2, 3), keepdim=True)) * factors + grey.mean(
        dim=(2, 3), keepdim=True)
    saturation = grey + (images - grey) * factors
    jittered = torch.where(kinds == 0, brightness, torch.where(kinds == 1, contrast, saturation))
    return jittered.clamp(0, 1)


def channel_statistics(feature_maps: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (C,) over every image and position of a stream
    of (B, C, h, w) maps, accumulated in float64."""
    totals = [(values.sum(dim=(0, 2, 3)), values.pow(2).sum(dim=(0, 2, 3)),
               values.shape[0] * values.shape[2] * values.shape[3])
              for values in (maps.detach().double() for maps in feature_maps)]
    if not totals:
        raise ValueError("no feature maps to take statistics of")
    sums, squares = (torch.stack(column).sum(dim=0) for column in list(zip(*totals))[:2])
    count = sum(total[2] for total in totals)
    mean = sums / count
    return mean.float(), (squares / count - mean**2).clamp_min(1e-12).sqrt().float()


def sample_images(source: TextureSource, count: int, size: int, seed: int) -> torch.Tensor:
    """``count`` random (3, size, size) images of ``source``, drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([source.sample(size, generator) for _ in range(count)])


def hard_feature_loss(distances: torch.Tensor, quantile: float) -> torch.Tensor:
    """The mean of the squared errors at or above their ``quantile`` (the largest ones)."""
    flat = distances.flatten()
    count = max(1, math.ceil((1.0 - quantile) * flat.numel()))
    return flat.topk(count).values.mean()


@register
class EfficientAD(TrainedDetector):
    """EfficientAD anomaly detector.

    Example:
        >>> detector = EfficientAD.from_preset("cpu", texture_dir="dtd/images")
        >>> detector.fit(train_loader).predict(images).anomaly_maps.shape
    """

    name = "efficientad"
    summary = "a distilled PDN teacher, a student with hard-feature loss, and an autoencoder"
    presets = {
        # Lite0's expanded stage 2-3 features (240 + 672 channels at strides 8 and 16, on the
        # image at twice the size: the PDN's 1/4 grid) pooled to 384. The step counts are a
        # CPU budget of about an hour on two cores (at 256 px one training step runs the
        # student three times: seconds), far below the paper's: use a GPU for EfficientAD.
        "cpu": dict(backbone="tf_efficientnet_lite0", feature_location="expansion",
                    layers=(2, 3), image_size=256, crop_size=None, distillation_steps=100,
                    distillation_batch_size=8, max_steps=300),
        # The paper: WRN-101 layer 2-3 features, 60 000 distillation steps of 16 ImageNet
        # images, 70 000 training steps of one image.
        "paper": dict(backbone="wide_resnet101_2", layers=("layer2", "layer3"),
                      image_size=256, crop_size=None, distillation_steps=60_000,
                      distillation_batch_size=16, max_steps=70_000),
    }
    tiny_params = dict(image_size=64, distillation_steps=2, distillation_batch_size=2,
                       max_steps=2)

    layers = (2, 3)
    batch_size = 1
    model_size: str = hyperparameter("small", Choice(*MODEL_SIZES), "PDN size: 'small' "
                                     "(EfficientAD-S) or 'medium' (EfficientAD-M)")
    channels: int = hyperparameter(384, Number(int, 1), "the teacher's output channels (the "
                                   "backbone's patch features pooled to this many)")
    max_steps: int | None = hyperparameter(
        70_000, Optional(Number(int, 1)), "training steps of the student and autoencoder "
        "(null: ``epochs`` passes)")
    lr: float = hyperparameter(1e-4, Number(float, 0, low_open=True), "Adam learning rate "
                               "(both stages)")
    weight_decay: float = hyperparameter(1e-5, Number(float, 0), "Adam weight decay")
    hard_quantile: float = hyperparameter(0.999, Number(float, 0, 1, high_open=True),
                                          "the hard-feature loss keeps the squared errors "
                                          "above this quantile")
    validation_fraction: float = hyperparameter(
        0.1, Number(float, 0, 1, low_open=True, high_open=True), "training images held out "
        "of training for the maps' quantile normalisation")
    teacher_weights: str | None = hyperparameter(
        None, Optional(Text()), "a distilled teacher to reuse: a fitted EfficientAD model's "
        "weights.safetensors (null: distil one in this fit)")
    distillation_dir: str | None = hyperparameter(
        None, Optional(Text()), "images to distil the teacher on and for the student's "
        "penalty (ImageNet in the paper; e.g. DTD's images/); null: the training normals, "
        "and procedural textures for the penalty")
    distillation_steps: int = hyperparameter(60_000, Number(int, 1), "teacher distillation "
                                             "steps")
    distillation_batch_size: int = hyperparameter(16, Number(int, 1), "images per "
                                                  "distillation step")

    def _check_params(self) -> None:
        super()._check_params()
        if self.output_size < 64:
            raise self._refuse(f"image_size={self.image_size} (after the crop) is too small; "
                               "EfficientAD needs at least 64 pixels")

    @property
    def output_size(self) -> int:
        return self.preprocess.output_size

    def check_resources(self) -> None:
        super().check_resources()
        if self.teacher_weights is not None:
            self._read_teacher(self.teacher_weights)
        elif self.distillation_dir is not None:
            self._image_folder("distillation_dir")

    def _read_teacher(self, path: str) -> dict[str, torch.Tensor]:
        """The teacher's tensors of a saved EfficientAD model (``teacher.*`` keys)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise ConfigError(f"{self._label}: teacher_weights={path!r}: no such file")
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as error:
            raise ConfigError(f"{self._label}: teacher_weights={path!r}: unreadable "
                              f"({error})") from None
        teacher = {k.removeprefix("teacher."): v for k, v in tensors.items()
                   if k.startswith("teacher.")}
        probe = PatchDescriptionNetwork(self.channels, self.model_size)
        try:
            probe.load_state_dict(teacher)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0]
            raise ConfigError(f"{self._label}: teacher_weights={path!r} holds no "
                              f"{self.model_size} teacher of {self.channels} channels "
                              f"({first})") from None
        return teacher

    # -- networks -----------------------------------------------------------------------------
    def _build_networks(self) -> None:
        grid = pdn_output_size(self.output_size)
        with self.seeded():
            self.teacher_ = PatchDescriptionNetwork(self.channels, self.model_size)
            self.student_ = PatchDescriptionNetwork(2 * self.channels, self.model_size)
            self.autoencoder_ = AutoEncoder(self.channels, self.output_size, grid)
        for module in (self.teacher_, self.student_, self.autoencoder_):
            module.to(self.torch_device)
        self.register_normalisation(torch.zeros(self.channels), torch.ones(self.channels),
                                    torch.tensor([0.0, 1.0, 0.0, 1.0]))

    def register_normalisation(self, mean: torch.Tensor, std: torch.Tensor,
                               quantiles: torch.Tensor) -> None:
        """The teacher's channel statistics on the training normals, and the maps' quantiles
        (student-teacher low, high; autoencoder low, high)."""
        device = self.torch_device
        self.teacher_mean_ = mean.to(device).view(1, -1, 1, 1)
        self.teacher_std_ = std.to(device).view(1, -1, 1, 1)
        self.quantiles_ = quantiles.to(device)

    def _trained_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher_, "student": self.student_,
                "autoencoder": self.autoencoder_}

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        students = [*self.student_.parameters(), *self.autoencoder_.parameters()]
        return {"distill": torch.optim.Adam(self.teacher_.parameters(), lr=self.lr,
                                            weight_decay=self.weight_decay),
                "train": torch.optim.Adam(students, lr=self.lr, weight_decay=self.weight_decay)}

    @staticmethod
    def _pdn_input(images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    # -- stage 1: the teacher -----------------------------------------------------------------
    def backbone_targets(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's locally aware patch features of images at twice their size, on the
        PDN's grid, pooled to ``channels``: what the teacher is distilled to give."""
        doubled = F.interpolate(images, scale_factor=2, mode="bilinear", align_corners=False)
        with torch.no_grad():
            features = LocalPatchFeatures(3)(self.extractor(doubled))
        grid = pdn_output_size(images.shape[-1])
        if features.shape[-1] != grid:
            features = F.interpolate(features, size=(grid, grid), mode="bilinear",
                                     align_corners=False)
        batch, backbone_channels = features.shape[:2]
        flat = features.permute(0, 2, 3, 1).reshape(-1, 1, backbone_channels)
        flat = F.adaptive_avg_pool1d(flat, self.channels)
        return flat.view(batch, grid, grid, self.channels).permute(0, 3, 1, 2)

    def _distillation_batches(self, data: TrainingImages
                              ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """(a step's indices of ``data``, a seed) -> the images the teacher distils on: those
        training images, or as many random images of ``distillation_dir`` (decoded as needed,
        so the folder may be as large as ImageNet)."""
        if self.distillation_dir is None:
            return lambda indices, _: data.get(indices, self.torch_device)
        source = self._image_folder("distillation_dir")

        return lambda indices, seed: sample_images(source, len(indices), self.output_size,
                                                   seed).to(self.torch_device)

    def _distill(self, data: TrainingImages, training: Training) -> None:
        """Stage 1: the teacher learns the backbone's channel-normalised patch features. Its
        steps are counted over the training images; with ``distillation_dir`` each step draws
        its images from the folder instead."""
        epochs, _, _ = step_schedule(len(data), self.distillation_batch_size, 1,
                                     self.distillation_steps)
        if training.done("distill", epochs):
            return
        images_of = self._distillation_batches(data)
        batches = list(data.in_order(self.distillation_batch_size))[:64]
        targets = (self.backbone_targets(images_of(
            indices, epoch_seed(self.seed, "distillation statistics", number)))
            for number, indices in enumerate(batches))
        mean, std = (statistic.view(1, -1, 1, 1) for statistic in channel_statistics(targets))

        def loss(indices: torch.Tensor, step: int) -> torch.Tensor:
            batch = images_of(indices, epoch_seed(self.seed, "distillation images", step))
            flip = torch.rand(batch.shape[0], 1, 1, 1, device=batch.device) < 0.5
            batch = torch.where(flip, batch.flip(-1), batch)
            grey = torch.rand(batch.shape[0], 1, 1, 1, device=batch.device) < 0.1
            batch = torch.where(grey, batch.mean(dim=1, keepdim=True).expand_as(batch), batch)
            targets = (self.backbone_targets(batch) - mean) / std
            return F.mse_loss(self.teacher_(self._pdn_input(batch)), targets)

        training.run(Stage("distill", data, loss, [training.optimizers["distill"]],
                           [self.teacher_], 1, self.distillation_batch_size,
                           max_steps=self.distillation_steps))

    # -- stage 2: the student and the autoencoder ---------------------------------------------
    def _teacher_output(self, pdn_input: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (self.teacher_(pdn_input) - self.teacher_mean_) / self.teacher_std_

    def _train_students(self, data: TrainingImages, training: Training) -> None:
        penalty = self._image_folder("distillation_dir")
        channels = self.channels

        def loss(indices: torch.Tensor, step: int) -> torch.Tensor:
            images = data.get(indices, self.torch_device)
            inputs = self._pdn_input(images)
            teacher = self._teacher_output(inputs)
            student = self.student_(inputs)[:, :channels]
            hard = hard_feature_loss((teacher - student) ** 2, self.hard_quantile)
            others = sample_images(penalty, images.shape[0], self.output_size,
                                   epoch_seed(self.seed, "penalty", step)).to(self.torch_device)
            penalised = self.student_(self._pdn_input(others))[:, :channels].pow(2).mean()
            jittered = self._pdn_input(colour_jitter(images))
            target = self._teacher_output(jittered)
            rebuilt = self.autoencoder_(jittered)
            student_of_rebuilt = self.student_(jittered)[:, channels:]
            return (hard + penalised + F.mse_loss(rebuilt, target)
                    + F.mse_loss(student_of_rebuilt, rebuilt))

        training.run(Stage("train", data, loss, [training.optimizers["train"]],
                           [self.student_, self.autoencoder_], self.epochs, self.batch_size,
                           max_steps=self.max_steps, schedule=step_decay((0.95,), 0.1)))

    def _fit(self, train: Iterable[Any] | torch.Tensor, show_progress: bool,
             checkpoint_dir: str | Path | None) -> dict[str, Any]:
        everything = TrainingImages.collect(train)
        if len(everything) < 2:
            raise IadkitError("efficientad: needs at least two training images (one is held "
                              "out for the maps' normalisation)")
        order = torch.randperm(len(everything))
        n_validation = max(1, round(self.validation_fraction * len(everything)))
        validation, data = everything.subset(order[:n_validation]), everything.subset(
            order[n_validation:])
        self._build_networks()
        with self.training(checkpoint_dir, show_progress) as training:
            if self.teacher_weights is not None:
                self.teacher_.load_state_dict(self._read_teacher(self.teacher_weights))
            else:
                self._distill(data, training)
            self.teacher_.eval()
            mean, std = self._teacher_statistics(data)
            self.register_normalisation(mean, std, self.quantiles_)
            self._train_students(data, training)
        self.quantiles_ = self._map_quantiles(validation)
        return self.fit_facts(data, training, n_validation_images=len(validation),
                              teacher="reused from " + self.teacher_weights
                              if self.teacher_weights else "distilled from " + self.backbone
                              + " on " + (self.distillation_dir or "the training normals"),
                              map_quantiles=[round(float(q), 6) for q in self.quantiles_])

    def _teacher_statistics(self, data: TrainingImages) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return channel_statistics(
                self.teacher_(self._pdn_input(data.get(indices, self.torch_device)))
                for indices in data.in_order(16))

    def _map_quantiles(self, validation: TrainingImages) -> torch.Tensor:
        student_teacher, autoencoder = [], []
        with torch.no_grad():
            for indices in validation.in_order(16):
                local, logical = self._distance_maps(validation.get(indices, self.torch_device))
                student_teacher.append(local.flatten().cpu().numpy())
                autoencoder.append(logical.flatten().cpu().numpy())
        values = []
        for maps in (np.concatenate(student_teacher), np.concatenate(autoencoder)):
            values += list(np.quantile(maps, [LOW_QUANTILE, HIGH_QUANTILE]))
        return torch.tensor(values, dtype=torch.float32, device=self.torch_device)

    # -- inference ----------------------------------------------------------------------------
    def _distance_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h, w) student-teacher and student-autoencoder squared distances on the PDN
        grid, channel means."""
        inputs = self._pdn_input(images)
        teacher = self._teacher_output(inputs)
        student = self.student_(inputs)
        rebuilt = self.autoencoder_(inputs)
        local = (teacher - student[:, :self.channels]).pow(2).mean(dim=1)
        logical = (rebuilt - student[:, self.channels:]).pow(2).mean(dim=1)
        return local, logical

    def _predict(self, images: torch.Tensor) -> Prediction:
        local, logical = self._distance_maps(images)
        low_local, high_local, low_logical, high_logical = self.quantiles_.unbind()
        combined = (0.05 * (local - low_local) / (high_local - low_local)
                    + 0.05 * (logical - low_logical) / (high_logical - low_logical))
        maps = upsampled(combined, images.shape[-2:])
        return Prediction(maps, image_scores(maps))

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {**super()._state_tensors(), "teacher_mean": self.teacher_mean_.flatten(),
                "teacher_std": self.teacher_std_.flatten(), "map_quantiles": self.quantiles_}

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super()._load_state_tensors(tensors)
        self.register_normalisation(tensors["teacher_mean"], tensors["teacher_std"],
                                    tensors["map_quantiles"])
