"""STFPM (Wang et al., BMVC 2021): student-teacher feature pyramid matching.

A student network of the teacher's architecture, initialised at random, learns on normal
images to give the frozen pretrained teacher's features at several levels. Features are L2
normalised over the channels; at each level and position the distance is half the squared
difference of the normalised vectors. Training minimises its mean over positions, summed over
the levels and over the batch's images (the official code's summed MSE; its SGD rate 0.4 is
tuned for that sum). At test time each level's distance map is upsampled bilinearly to the
image and the levels' maps are multiplied (the paper's product); the image score is the map's
maximum.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..._torchvision_compat import import_timm
from ...backbones import FeatureExtractor
from ...nn.anomaly_maps import gaussian_blur, image_scores, upsampled
from ...nn.precision import Network
from ...validation import Choice, Flag, Number
from .. import register
from ..base import Prediction
from ..hyperparameters import hyperparameter
from ..training import (
    FrozenFeatures,
    Stage,
    TrainedDetector,
    TrainingImages,
    recompute_batch_norm_statistics,
)

#: How the levels' distance maps become one map.
LEVEL_FUSIONS = ("product", "sum")


class PyramidStudent(Network):
    """The teacher's architecture up to its last used stage, with fresh random weights (drawn
    from torch's global generator) and trainable BatchNorm; it normalises its input images as
    the teacher does.

    Example:
        >>> student = PyramidStudent(teacher)
        >>> [f.shape for f in student(images)] == [f.shape for f in teacher(images)]
        True
    """

    def __init__(self, teacher: FeatureExtractor, feature_location: str = "") -> None:
        super().__init__()
        location = {"feature_location": feature_location} if feature_location else {}
        indices = tuple(teacher.model.feature_info.out_indices)
        self.model = import_timm().create_model(teacher.name, pretrained=False,
                                                features_only=True, out_indices=indices,
                                                **location)
        self.register_buffer("mean", teacher.mean.clone(), persistent=False)
        self.register_buffer("std", teacher.std.clone(), persistent=False)
        # Channels-last: the convolutions' backward pass is about 9 times faster on the CPU.
        self.model.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        normalised = ((images - self.mean) / self.std).contiguous(
            memory_format=torch.channels_last)
        return [level.contiguous() for level in self.model(normalised)]


def pyramid_distances(teacher: list[torch.Tensor], student: list[torch.Tensor]
                      ) -> list[torch.Tensor]:
    """Per level (B, h, w): half the squared distance of the channel-normalised features."""
    return [0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(dim=1)
            for t, s in zip(teacher, student)]


@register
class STFPM(TrainedDetector):
    """Student-teacher feature pyramid matching anomaly detector.

    Example:
        >>> detector = STFPM.from_preset("cpu", epochs=5).fit(train_loader)
        >>> detector.predict(images).scores
    """

    name = "stfpm"
    summary = "a student from scratch matches a frozen teacher's feature pyramid"
    presets = {
        # Lite0's stages 1-3 (strides 4, 8, 16), no centre crop. Training the student costs
        # about 0.1 s per image and epoch on two quiet CPU cores (its BatchNorm layers train;
        # 5-9 times more beside another busy process): 10 epochs of 16 images, a budget, not a
        # convergence point.
        "cpu": dict(backbone="tf_efficientnet_lite0", layers=(1, 2, 3), image_size=256,
                    crop_size=None, epochs=10, batch_size=16),
        # The paper: ResNet-18's conv2_x..conv4_x, 256 px, SGD 0.4, 100 epochs of 32 images.
        "paper": dict(backbone="resnet18", layers=("layer1", "layer2", "layer3"),
                      image_size=256, crop_size=None, epochs=100, batch_size=32,
                      recompute_statistics=False),
    }
    tiny_params = dict(image_size=64, epochs=1)

    layers = (1, 2, 3)
    batch_size = 32
    lr: float = hyperparameter(0.4, Number(float, 0, low_open=True), "SGD learning rate (of "
                               "the loss summed over a batch's images)")
    momentum: float = hyperparameter(0.9, Number(float, 0, 1, high_open=True), "SGD momentum")
    weight_decay: float = hyperparameter(1e-4, Number(float, 0), "SGD weight decay")
    level_fusion: str = hyperparameter("product", Choice(*LEVEL_FUSIONS), "how the levels' "
                                       "maps are combined (the paper: product)", inference=True)
    smoothing_sigma: float = hyperparameter(0.0, Number(float, 0), "Gaussian sigma of the map "
                                            "smoothing (0: off, as in the paper)",
                                            inference=True)
    recompute_statistics: bool = hyperparameter(
        True, Flag(), "after training, recompute the student's BatchNorm statistics over the "
        "training images with its final weights (at SGD 0.4 the running averages lag behind "
        "the weights; the paper keeps them)")
    feature_cache_mb: float = hyperparameter(4096.0, Number(float, 0), "keep the frozen "
                                             "teacher's training features in memory up to this "
                                             "many MB")

    # -- networks -----------------------------------------------------------------------------
    def _build_networks(self) -> None:
        teacher = self.extractor
        with self.seeded():
            self.student_ = PyramidStudent(teacher, self.feature_location).to(self.torch_device)

    def _trained_modules(self) -> dict[str, nn.Module]:
        return {"student": self.student_}

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"student": torch.optim.SGD(self.student_.parameters(), lr=self.lr,
                                           momentum=self.momentum,
                                           weight_decay=self.weight_decay)}

    # -- training -----------------------------------------------------------------------------
    def _fit(self, train: Iterable[Any] | torch.Tensor, show_progress: bool,
             checkpoint_dir: str | Path | None) -> dict[str, Any]:
        data = TrainingImages.collect(train)
        self._build_networks()
        teacher_cached = False
        with self.training(checkpoint_dir, show_progress) as training:
            if not training.done("match", self.epochs):
                teacher = FrozenFeatures(self.extractor, data, self.batch_size,
                                         self.torch_device, self.feature_cache_mb)
                teacher_cached = teacher.cached is not None

                def loss(indices: torch.Tensor, step: int) -> torch.Tensor:
                    student = self.student_(data.get(indices, self.torch_device))
                    return sum(level.mean(dim=(1, 2)).sum()
                               for level in pyramid_distances(teacher(indices), student))

                training.run(Stage("match", data, loss, [training.optimizers["student"]],
                                   [self.student_], self.epochs, self.batch_size,
                                   loss_is_sum=True))
        if self.recompute_statistics:
            recompute_batch_norm_statistics(self.student_, data, self.batch_size,
                                            self.torch_device)
        return self.fit_facts(data, training, teacher_features_cached=teacher_cached)

    # -- inference ----------------------------------------------------------------------------
    def _predict(self, images: torch.Tensor) -> Prediction:
        size = images.shape[-2:]
        distances = pyramid_distances(self.extractor(images), self.student_(images))
        level_maps = [upsampled(d, size) for d in distances]
        maps = level_maps[0]
        for level in level_maps[1:]:
            maps = maps * level if self.level_fusion == "product" else maps + level
        maps = gaussian_blur(maps, self.smoothing_sigma)
        return Prediction(maps, image_scores(maps))
