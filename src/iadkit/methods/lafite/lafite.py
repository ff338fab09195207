"""LafitE (Yin et al., 2023): a latent diffusion model reconstructs frozen CNN features, started
from a partially corrupted, memory-bank-edited copy of them (METHODS.md §6).

Training learns only the U-Net noise predictor, on the aligned multi-scale features of the normal
images of every category together (model-unified). At inference each feature vector is first
replaced by a weighted combination of its K nearest normal features in a coreset bank (feature
editing), corrupted to step tau, and denoised with DDIM; the anomaly map is the squared L2
distance between the reconstruction and the *original* features, upsampled and smoothed.

tau and K are inference-time settings: :func:`iadkit.engine.search_inference_params` picks them on
a pseudo-validation set of synthetic fragments (``default_search`` is the paper's procedure: tau
with editing off, then K with editing on), never on the test set.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...progress import progress
from ...validation import Choice, Items, Number
from .. import register
from ..feature_reconstruction import FeatureReconstruction
from ..hyperparameters import hyperparameter
from ..training import TrainingImages
from .diffusion import CosineSchedule, NoisePredictionUNet

FEATURE_NORMS = ("channel_standardize", "none")


@register
class LafitE(FeatureReconstruction):
    """LafitE anomaly detector.

    Example:
        >>> detector = LafitE.from_preset("cpu", epochs=20).fit(train_loader)
        >>> detector.set_inference_params(tau=300, k_neighbours=5)
        >>> detector.predict(images).scores
    """

    name = "lafite"
    summary = "diffusion model rebuilds frozen features from a memory-bank-edited, noised copy"
    # The paper's §3.4: tau with LafitE w/o F.E., then K with editing, on pseudo-validation.
    default_search = (
        {"param": "tau", "values": [100, 200, 300, 400, 500, 600, 700, 800, 900, 950, 970],
         "fixed": {"feature_editing": False}},
        {"param": "k_neighbours", "values": [2, 3, 5, 10, 20]},
    )
    presets = {
        # Lite0's four first stages (16+24+40+112 = 192 channels) on a 16x16 grid, and a
        # 64-wide, three-level U-Net: a training step of 16 images costs about 0.1 s here.
        "cpu": dict(backbone="tf_efficientnet_lite0", layers=(0, 1, 2, 3), image_size=224,
                    grid=16, base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=1,
                    attention_levels=(2,), epochs=60, batch_size=16, lr=4e-4),
        "paper": dict(backbone="efficientnet_b4", layers=(0, 1, 2, 3), image_size=224, grid=32,
                      base_channels=256, channel_mults=(1, 2, 3, 4), num_res_blocks=2,
                      attention_levels=(1, 2), epochs=1000, batch_size=64, lr=1e-4),
    }
    # The DDIM loop unrolls into an exported graph: few steps keep the test's export short.
    tiny_params = dict(image_size=64, epochs=1, grid=8, base_channels=16, channel_mults=(1, 2),
                       attention_levels=(1,), tau=100, ddim_steps=4)

    epochs = 1000
    batch_size = 64
    grid: int = hyperparameter(32, Number(int, 1), "side of the feature grid every stage is "
                               "resized to")
    feature_norm: str = hyperparameter(
        "channel_standardize", Choice(*FEATURE_NORMS), "'channel_standardize' (each channel to "
        "zero mean and unit variance with training statistics, so that unit-variance noise "
        "suits every channel) or 'none'")
    base_channels: int = hyperparameter(256, Number(int, 1), "U-Net width")
    channel_mults: tuple[int, ...] = hyperparameter(
        (1, 2, 3, 4), Items(Number(int, 1), min_length=1), "U-Net width multipliers per level")
    num_res_blocks: int = hyperparameter(2, Number(int, 1), "residual blocks per U-Net level")
    attention_levels: tuple[int, ...] = hyperparameter(
        (1, 2), Items(Number(int, 0)), "U-Net levels with self-attention (0 = full grid)")
    num_heads: int = hyperparameter(4, Number(int, 1), "attention heads")
    dropout: float = hyperparameter(0.1, Number(float, 0, 1, high_open=True), "U-Net dropout")
    diffusion_steps: int = hyperparameter(1000, Number(int, 1), "T of the cosine schedule")
    tau: int = hyperparameter(500, Number(int, 0), "corruption step of the reconstruction, "
                              "0..T", inference=True)
    ddim_steps: int = hyperparameter(10, Number(int, 1), "DDIM jumps from tau back to 0",
                                     inference=True)
    eta: float = hyperparameter(0.0, Number(float, 0), "DDIM stochasticity (0: deterministic)",
                                inference=True)
    noise_samples: int = hyperparameter(1, Number(int, 1), "reconstructions averaged per "
                                        "image, each from its own corruption noise",
                                        inference=True)

    def _check_params(self) -> None:
        super()._check_params()
        if self.tau > self.diffusion_steps:
            raise self._refuse(f"tau={self.tau} must be in [0, diffusion_steps="
                               f"{self.diffusion_steps}]")
        if self.grid % 2 ** (len(self.channel_mults) - 1):
            raise self._refuse(f"grid={self.grid} must be divisible by 2 ** "
                               f"{len(self.channel_mults) - 1} for a U-Net with "
                               f"{len(self.channel_mults)} levels")

    @property
    def feature_grid(self) -> tuple[int, int]:
        return self.grid, self.grid

    # -- features -----------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The features the diffusion model works on (standardised when ``feature_norm`` says)."""
        return (self.aligned_features(images) - self.feature_mean_) / self.feature_std_

    def _build_networks(self) -> None:
        channels = sum(self.extractor.channels)
        with self.seeded():
            self.unet_ = NoisePredictionUNet(
                channels, self.base_channels, self.channel_mults, self.num_res_blocks,
                self.attention_levels, self.num_heads, self.dropout).to(self.torch_device)
        self.schedule_ = CosineSchedule(self.diffusion_steps).to(self.torch_device)

    def _trained_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet_}

    def _reconstructor(self) -> nn.Module:
        return self.unet_

    # -- training -----------------------------------------------------------------------------
    def _fit(self, train: Iterable[Any] | torch.Tensor, show_progress: bool,
             checkpoint_dir: str | Path | None) -> dict[str, Any]:
        started = time.perf_counter()
        data = TrainingImages.collect(train)
        device = self.torch_device
        # Every training feature map is needed twice (statistics and bank, then every epoch):
        # extract them once. At the paper's size (3,629 MVTec images, 272 x 32 x 32) that is 4 GB.
        aligned = torch.cat([self.aligned_features(data.get(indices, device))
                             for indices in progress(data.in_order(self.batch_size),
                                                     "features", show_progress)])
        channels = aligned.shape[1]
        if self.feature_norm == "channel_standardize":
            self.feature_mean_ = aligned.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
            self.feature_std_ = aligned.std(dim=(0, 2, 3)).clamp(min=1e-6).view(1, -1, 1, 1)
        else:
            self.feature_mean_ = torch.zeros(1, channels, 1, 1, device=device)
            self.feature_std_ = torch.ones(1, channels, 1, 1, device=device)
        features = (aligned - self.feature_mean_) / self.feature_std_
        del aligned
        extracted = time.perf_counter()
        self.build_bank(features, show_progress)
        bank_built = time.perf_counter()

        def loss(indices: torch.Tensor, step: int) -> torch.Tensor:
            return self.schedule_.training_loss(self.unet_, features[indices.to(features.device)])

        self._build_networks()
        with self.training(checkpoint_dir, show_progress) as training:
            facts = self._reconstruct("diffusion", data, training, loss)
        assert self.bank_ is not None
        return self.fit_facts(
            data, training, **facts, feature_grid=[self.grid, self.grid],
            feature_channels=channels, memory_bank_size=int(self.bank_.vectors.shape[0]),
            unet_parameters=sum(p.numel() for p in self.unet_.parameters()),
            seconds_features=round(extracted - started, 2),
            seconds_coreset=round(bank_built - extracted, 2))

    # -- inference ----------------------------------------------------------------------------
    def corruption_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(noise_samples, C, h, w) corruption noise, fixed by the seed: every image gets the
        same draws, so a score does not depend on the batch it was scored in."""
        cached = getattr(self, "_noise", None)
        if cached is None or tuple(cached.shape) != (self.noise_samples, *shape):
            generator = torch.Generator().manual_seed(self.seed)
            self._noise = torch.randn((self.noise_samples, *shape), generator=generator) \
                .to(self.torch_device)
        return self._noise

    def reconstruction_errors(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) standardised features -> (B, h, w) squared L2 error of their
        reconstruction, averaged over ``noise_samples`` corruptions."""
        self.unet_.eval()
        start = self.edited(features)
        generator = torch.Generator(device=features.device).manual_seed(self.seed)
        noise = self.corruption_noise(tuple(features.shape[1:]))
        errors = torch.zeros_like(features[:, 0])
        for draw in noise:
            rebuilt = self.schedule_.reconstruct(
                self.unet_, start, self.tau, self.ddim_steps,
                noise=draw.unsqueeze(0).expand_as(start), eta=self.eta, generator=generator)
            errors += (rebuilt - features).pow(2).sum(dim=1)
        return errors / noise.shape[0]

    def raw_maps_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unsmoothed (B, S, S) maps and the standardised (B, C, grid, grid) input features."""
        features = self.features(images)
        errors = self.reconstruction_errors(features)
        return self.error_maps(errors, images.shape[-2:]), features

    # -- persistence --------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {**super()._state_tensors(), "feature_mean": self.feature_mean_,
                "feature_std": self.feature_std_}

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.feature_mean_ = tensors.pop("feature_mean")
        self.feature_std_ = tensors.pop("feature_std")
        super()._load_state_tensors(tensors)
