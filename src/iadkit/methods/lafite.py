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
import torch.nn.functional as F
from torch import nn

from ..nn.diffusion import CosineSchedule, NoisePredictionUNet
from ..nn.feature_editing import WEIGHT_NORMS, EditingBank
from ..nn.smoothing import gaussian_blur
from ..nn.uniad import align_features
from ..progress import progress
from . import register
from .base import Detector, Prediction
from .training import (
    TrainingCheckpoint,
    TrainingImages,
    load_module_states,
    module_state_tensors,
    run_stage,
    set_learning_rates,
    step_decay,
    step_schedule,
    with_base_rates,
)

FEATURE_NORMS = ("channel_standardize", "none")


@register
class LafitE(Detector):
    """LafitE anomaly detector.

    Args:
        backbone: timm name or alias of the frozen encoder.
        layers: stages whose features are resized to one grid and concatenated (the paper uses
            EfficientNet-b4's stages 1-4, leaving out the last).
        backbone_weights: "pretrained", a weight file, or "random" (shape tests only).
        image_size: images are resized to this square size (224).
        crop_size: optional centre crop after resizing.
        grid: side of the feature grid every stage is resized to (paper: 32).
        feature_norm: "channel_standardize" (each channel to zero mean and unit variance with
            training statistics, so that unit-variance noise suits every channel) or "none".
        base_channels: U-Net width (paper: 256).
        channel_mults: U-Net width multipliers per level (paper: (1, 2, 3, 4)).
        num_res_blocks: residual blocks per U-Net level (2).
        attention_levels: U-Net levels with self-attention (0 = full grid).
        num_heads: attention heads (4).
        dropout: U-Net dropout (0.1).
        diffusion_steps: T of the cosine schedule (1000).
        epochs: training epochs (ignored when ``max_steps`` is set).
        max_steps: train for this many optimisation steps instead.
        batch_size: training batch size (paper: 64).
        lr: AdamW learning rate (1e-4).
        weight_decay: AdamW weight decay (1e-4).
        lr_milestones: fractions of training after which the rate is multiplied by ``lr_gamma``
            (paper: 0.8, i.e. epoch 800 of 1000).
        lr_gamma: the decay factor (0.1).
        grad_clip: clip the gradients' global norm to this (0 = off; the paper does not say).
        coreset_ratio: share of training feature vectors kept in the editing bank (0.1).
        projection_dim: random-projection dimension of the coreset's distances.
        knn_backend: "auto", "torch" or "faiss" (see :mod:`iadkit.nn.knn`).
        feature_editing: edit the features before corruption (off = "LafitE w/o F.E.").
        k_neighbours: K of feature editing.
        weight_norm: "sum_to_one" (editing weights divided by K - 1) or "paper" (literal Eq. 10).
        tau: corruption step of the reconstruction, 0..T.
        ddim_steps: DDIM jumps from tau back to 0 (10).
        eta: DDIM stochasticity (0 = deterministic).
        noise_samples: reconstructions averaged per image, each from its own corruption noise.
        smoothing_sigma: Gaussian smoothing of the upsampled map (4).
        score_pool: side of the average pooling before the image score's maximum (16).
        checkpoint_every_s: seconds between training checkpoints (when fit gets a folder).
        device: "auto", "cpu", "cuda", ...
        seed: seeds initialisation, batch order, the coreset and the corruption noise.

    Example:
        >>> detector = LafitE.from_preset("cpu", epochs=20).fit(train_loader)
        >>> detector.set_inference_params(tau=300, k_neighbours=5)
        >>> detector.predict(images).scores
    """

    name = "lafite"
    summary = "diffusion model rebuilds frozen features from a memory-bank-edited, noised copy"
    inference_params = ("feature_editing", "k_neighbours", "weight_norm", "tau", "ddim_steps",
                        "eta", "noise_samples", "smoothing_sigma", "score_pool")
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

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: tuple[int | str, ...] = (0, 1, 2, 3),
        backbone_weights: str = "pretrained",
        image_size: int = 224,
        crop_size: int | None = None,
        grid: int = 32,
        feature_norm: str = "channel_standardize",
        base_channels: int = 256,
        channel_mults: tuple[int, ...] = (1, 2, 3, 4),
        num_res_blocks: int = 2,
        attention_levels: tuple[int, ...] = (1, 2),
        num_heads: int = 4,
        dropout: float = 0.1,
        diffusion_steps: int = 1000,
        epochs: int = 1000,
        max_steps: int | None = None,
        batch_size: int = 64,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        lr_milestones: tuple[float, ...] = (0.8,),
        lr_gamma: float = 0.1,
        grad_clip: float = 0.0,
        coreset_ratio: float = 0.1,
        projection_dim: int | None = 128,
        knn_backend: str = "auto",
        feature_editing: bool = True,
        k_neighbours: int = 3,
        weight_norm: str = "sum_to_one",
        tau: int = 500,
        ddim_steps: int = 10,
        eta: float = 0.0,
        noise_samples: int = 1,
        smoothing_sigma: float = 4.0,
        score_pool: int = 16,
        checkpoint_every_s: float = 60.0,
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
        if weight_norm not in WEIGHT_NORMS:
            raise ValueError(f"weight_norm must be one of {WEIGHT_NORMS}, got {weight_norm!r}")
        if grid % 2 ** (len(channel_mults) - 1):
            raise ValueError(f"grid {grid} must be divisible by 2 ** {len(channel_mults) - 1} "
                             f"for a U-Net with {len(channel_mults)} levels")
        self.backbone = backbone
        self.layers = tuple(layers)
        self.backbone_weights = backbone_weights
        self.image_size = image_size
        self.crop_size = crop_size
        self.grid = grid
        self.feature_norm = feature_norm
        self.base_channels = base_channels
        self.channel_mults = tuple(channel_mults)
        self.num_res_blocks = num_res_blocks
        self.attention_levels = tuple(attention_levels)
        self.num_heads = num_heads
        self.dropout = dropout
        self.diffusion_steps = diffusion_steps
        self.epochs = epochs
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_milestones = tuple(lr_milestones)
        self.lr_gamma = lr_gamma
        self.grad_clip = grad_clip
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.knn_backend = knn_backend
        self.feature_editing = feature_editing
        self.k_neighbours = k_neighbours
        self.weight_norm = weight_norm
        self.tau = tau
        self.ddim_steps = ddim_steps
        self.eta = eta
        self.noise_samples = noise_samples
        self.smoothing_sigma = smoothing_sigma
        self.score_pool = score_pool
        self.checkpoint_every_s = checkpoint_every_s
        self.device = device
        self.seed = seed
        self._check_inference_params()

    def _check_inference_params(self) -> None:
        if not 0 <= self.tau <= self.diffusion_steps:
            raise ValueError(f"tau must be in [0, {self.diffusion_steps}], got {self.tau}")
        if self.k_neighbours < 1 or self.ddim_steps < 1 or self.noise_samples < 1:
            raise ValueError("k_neighbours, ddim_steps and noise_samples must be >= 1")
        if self.weight_norm not in WEIGHT_NORMS:
            raise ValueError(f"weight_norm must be one of {WEIGHT_NORMS}, got {self.weight_norm!r}")

    # -- features -----------------------------------------------------------------------------
    def aligned_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, C, grid, grid) frozen multi-scale features, unnormalised."""
        with torch.no_grad():
            return align_features(self.extractor(images), (self.grid, self.grid))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The features the diffusion model works on (standardised when ``feature_norm`` says)."""
        return (self.aligned_features(images) - self.feature_mean_) / self.feature_std_

    def _build_networks(self, channels: int) -> None:
        torch.manual_seed(self.seed)
        self.unet_ = NoisePredictionUNet(
            channels, self.base_channels, self.channel_mults, self.num_res_blocks,
            self.attention_levels, self.num_heads, self.dropout).to(self.torch_device)
        self.schedule_ = CosineSchedule(self.diffusion_steps).to(self.torch_device)

    def _trained_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet_}

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
        self.bank_ = EditingBank.build(features, self.coreset_ratio, self.projection_dim,
                                       self.seed, self.knn_backend, show_progress)
        bank_built = time.perf_counter()

        self._build_networks(channels)
        optimizer = with_base_rates(torch.optim.AdamW(
            self.unet_.parameters(), lr=self.lr, weight_decay=self.weight_decay))
        optimizers = {"diffusion": optimizer}
        checkpoint = TrainingCheckpoint(checkpoint_dir, self.checkpoint_every_s)
        history = checkpoint.restore(self._trained_modules(), optimizers) or {}
        epochs, steps_per_epoch, total_steps = step_schedule(len(data), self.batch_size,
                                                             self.epochs, self.max_steps)

        def run_epoch(epoch: int) -> float:
            self.unet_.train()
            total, count = 0.0, 0
            for offset, indices in enumerate(data.epoch_batches(self.batch_size, self.seed, epoch)):
                step = epoch * steps_per_epoch + offset
                if step >= total_steps:
                    break
                set_learning_rates(optimizer, step_decay(step / total_steps, self.lr_milestones,
                                                         self.lr_gamma))
                loss = self.schedule_.training_loss(self.unet_,
                                                    features[indices.to(features.device)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.grad_clip > 0:
                    nn.utils.clip_grad_norm_(self.unet_.parameters(), self.grad_clip)
                optimizer.step()
                total += float(loss.detach()) * len(indices)
                count += len(indices)
            return total / max(count, 1)

        run_stage("diffusion", epochs, run_epoch, history, self.seed, checkpoint,
                  self._trained_modules(), optimizers, show_progress)
        self.unet_.eval()
        checkpoint.clear()
        return {
            "n_train_images": len(data),
            "steps": total_steps,
            "feature_grid": [self.grid, self.grid],
            "feature_channels": channels,
            "memory_bank_size": int(self.bank_.vectors.shape[0]),
            "unet_parameters": sum(p.numel() for p in self.unet_.parameters()),
            "backbone_weights": vars(self.extractor.resolved_weights),
            "loss_history": history,
            "seconds_features": round(extracted - started, 2),
            "seconds_coreset": round(bank_built - extracted, 2),
            "seconds_training": round(time.perf_counter() - bank_built, 2),
        }

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
        self._check_inference_params()
        self.unet_.eval()
        start = (self.bank_.edit(features, self.k_neighbours, self.weight_norm)
                 if self.feature_editing else features)
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
        maps = F.interpolate(errors.unsqueeze(1), size=images.shape[-2:], mode="bilinear",
                             align_corners=False).squeeze(1)
        return maps, features

    def _predict(self, images: torch.Tensor) -> Prediction:
        maps, _ = self.raw_maps_and_features(images)
        maps = gaussian_blur(maps, self.smoothing_sigma)
        pool = min(self.score_pool, maps.shape[-1])
        pooled = F.avg_pool2d(maps.unsqueeze(1), pool, stride=1)
        return Prediction(maps, pooled.flatten(1).amax(dim=1))

    # -- persistence --------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {**module_state_tensors(self._trained_modules()),
                "feature_mean": self.feature_mean_, "feature_std": self.feature_std_,
                "memory_bank": self.bank_.vectors}

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.feature_mean_ = tensors.pop("feature_mean")
        self.feature_std_ = tensors.pop("feature_std")
        self.bank_ = EditingBank(tensors.pop("memory_bank"), self.knn_backend)
        self._build_networks(self.feature_mean_.shape[1])
        load_module_states(self._trained_modules(), tensors)
