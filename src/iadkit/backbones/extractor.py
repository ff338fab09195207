"""Frozen multi-scale feature extractors on top of timm."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ConfigError
from ..nn.precision import Network
from .fold import fold_batchnorm
from .same_padding import without_padded_copies
from .weights import ResolvedWeights, build_with_weights

#: Pixel normalisation per backbone family; everything else uses ImageNet statistics.
#: The Lite weights expect (x * 255 - 127) / 128.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Short names accepted wherever a backbone is named.
ALIASES = {
    "lite0": "tf_efficientnet_lite0",
    "lite1": "tf_efficientnet_lite1",
    "lite2": "tf_efficientnet_lite2",
    "wrn50": "wide_resnet50_2",
    "wrn50_2": "wide_resnet50_2",
}


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def is_backbone_name(name: object) -> bool:
    """Whether ``name`` is an alias or a model timm can build."""
    from .._torchvision_compat import import_timm

    return isinstance(name, str) and import_timm().is_model(canonical_name(name))


def normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if "efficientnet_lite" in name:
        return LITE_MEAN, LITE_STD
    return IMAGENET_MEAN, IMAGENET_STD


class FeatureExtractor(Network):
    """A frozen timm network returning feature maps of chosen stages.

    Args:
        name: timm model name or alias (``lite0``, ``wrn50``...).
        layers: stage indices (timm ``out_indices``) or module names (``"layer2"``).
        weights: ``"pretrained"`` (offline-first resolution), a file path, or ``"random"``.
        fold_bn: fold BatchNorm into the preceding convolutions (same outputs, faster).
        feature_location: "" for the stages' outputs (timm's default), or "expansion" for the
            activated, expanded features inside the next block (EfficientNet/MobileNet only:
            their stage outputs are linear bottlenecks).
        trainable: leave the weights trainable and the forward pass differentiable (ReContrast's
            encoder copy); BatchNorm stays unfolded and in eval mode with its ImageNet
            statistics. Frozen (the default) is what every teacher and feature bank uses.

    Building draws random numbers (timm initialises before loading weights) from a generator of
    its own, seeded with 0: the caller's generators are untouched, and ``weights="random"``
    gives the same network every time.

    Example:
        >>> extractor = FeatureExtractor("lite0", layers=(1, 2, 3))
        >>> [f.shape for f in extractor(torch.rand(1, 3, 256, 256))]
        [(1, 24, 64, 64), (1, 40, 32, 32), (1, 112, 16, 16)]
    """

    def __init__(
        self,
        name: str = "tf_efficientnet_lite0",
        layers: Sequence[int | str] = (1, 2, 3),
        weights: str | Path = "pretrained",
        fold_bn: bool = True,
        feature_location: str = "",
        trainable: bool = False,
    ) -> None:
        super().__init__()
        self.name = canonical_name(name)
        indices = self._layer_indices(self.name, layers)
        location = {"feature_location": feature_location} if feature_location else {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                self.model, self.weights = build_with_weights(
                    self.name, weights, features_only=True, out_indices=indices, **location
                )
            except (IndexError, AssertionError, TypeError) as error:  # timm's answers
                raise ConfigError(f"backbone {self.name} cannot give the features of stages "
                                  f"{list(layers)}{' at ' + feature_location if feature_location else ''}"
                                  f" ({type(error).__name__}: {error})") from None
            if fold_bn and not trainable:
                self.model = fold_batchnorm(self.model, torch.rand(1, 3, 64, 64))
            if not trainable:
                example = torch.rand(1, 3, 64, 64)
                self.model = without_padded_copies(self.model, [example, example[..., 1:, 1:]])
        info = self.model.feature_info
        self.channels: list[int] = list(info.channels())
        self.strides: list[int] = list(info.reduction())
        mean, std = normalisation(self.name)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.trainable = trainable
        self.requires_grad_(trainable)
        # Channels-last halves the CPU time of these convolutions (depthwise ones especially).
        self.model.to(memory_format=torch.channels_last)
        self.eval()

    @staticmethod
    def _layer_indices(name: str, layers: Sequence[int | str]) -> tuple[int, ...]:
        if all(isinstance(layer, int) for layer in layers):
            return tuple(int(layer) for layer in layers)
        from .._torchvision_compat import import_timm

        probe = import_timm().create_model(name, pretrained=False, features_only=True)
        names = [probe.feature_info.module_name(i) for i in range(len(probe.feature_info))]
        indices = []
        for layer in layers:
            if isinstance(layer, int):
                indices.append(layer)
            elif layer in names:
                indices.append(names.index(layer))
            else:
                raise ConfigError(f"backbone {name} has no layer {layer!r}; layers: {names}")
        return tuple(indices)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always stays in eval mode: BatchNorm keeps its ImageNet running statistics."""
        return super().train(False)

    @property
    def resolved_weights(self) -> ResolvedWeights:
        return self.weights

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images in [0, 1], shape (B, 3, H, W) -> one feature map per requested layer."""
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            normalised = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            return [feature.contiguous() for feature in self.model(normalised)]
