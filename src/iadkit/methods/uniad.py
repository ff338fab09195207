"""UniAD (You et al., NeurIPS 2022): one transformer reconstructs the frozen features of many
categories (METHODS.md §1.4).

Frozen EfficientNet stages are resized to one grid (stride 16) and concatenated; a transformer
whose attentions may not look at a token's own 7x7 neighbourhood rebuilds them, trained with MSE
on normal images whose input features were jittered. The anomaly map is the L2 reconstruction
error per position, upsampled; the image score the maximum of its 16x16 average-pooled map.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.feature_editing import WEIGHT_NORMS, EditingBank
from ..nn.smoothing import gaussian_blur
from ..nn.uniad import UniADTransformer, align_features, feature_jitter
from . import register
from .base import Detector, Prediction
from .training import (
    TrainingCheckpoint,
    TrainingImages,
    cache_features,
    load_module_states,
    module_state_tensors,
    run_stage,
    set_learning_rates,
    step_decay,
    step_schedule,
    with_base_rates,
)


@register
class UniAD(Detector):
    """UniAD anomaly detector.

    Args:
        backbone: timm name or alias of the frozen encoder.
        layers: encoder stages whose features are aligned and concatenated.
        backbone_weights: "pretrained", a weight file, or "random" (shape tests only).
        image_size: images are resized to this square size.
        crop_size: optional centre crop after resizing.
        feature_stride: the stride of the token grid every stage is resized to (16).
        hidden_dim: transformer width (256).
        num_heads: attention heads (8).
        ffn_dim: feed-forward width (1024).
        dropout: transformer dropout (0.1).
        encoder_layers: encoder depth (4).
        decoder_layers: decoder depth (4).
        neighbourhood: side of the window each token may not attend to (7; 0 = no mask).
        masked: which attentions use the mask: encoder, decoder-to-memory, decoder-to-previous.
        jitter_scale: feature jitter strength (20); 0 switches it off.
        jitter_prob: probability that a training batch is jittered (1.0).
        epochs: training epochs (ignored when ``max_steps`` is set).
        max_steps: train for this many optimisation steps instead.
        batch_size: training batch size.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_milestones: fractions of training after which the rate is multiplied by ``lr_gamma``.
        lr_gamma: the decay factor.
        grad_clip: clip the gradients' global norm to this (0 = off).
        score_pool: side of the average pooling before the image score's maximum (16).
        smoothing_sigma: Gaussian smoothing of the map (0: none, as in the official evaluation).
        feature_editing: LafitE's feature editing in front of the transformer ("UniAD w/ F.E.",
            LafitE's Table 4): a coreset bank of training features is built at fit, and every
            test feature is replaced by a combination of its nearest bank features before
            reconstruction (the error is still measured against the original features).
        k_neighbours: K of feature editing.
        weight_norm: editing weights, "sum_to_one" or "paper" (see :mod:`iadkit.nn.feature_editing`).
        coreset_ratio: share of training feature vectors kept in the editing bank.
        projection_dim: random-projection dimension of the coreset's distances.
        knn_backend: "auto", "torch" or "faiss".
        feature_cache_mb: keep the frozen training features in memory when they fit.
        checkpoint_every_s: seconds between training checkpoints (when fit gets a folder).
        device: "auto", "cpu", "cuda", ...
        seed: seeds initialisation, jitter and batch order.

    Example:
        >>> detector = UniAD.from_preset("cpu", epochs=10).fit(train_loader)
        >>> detector.predict(images).scores
    """

    name = "uniad"
    summary = "transformer with neighbour-masked attention rebuilds frozen features (unified)"
    inference_params = ("feature_editing", "k_neighbours", "weight_norm", "score_pool",
                        "smoothing_sigma")
    presets = {
        # Lite0's four first stages (16+24+40+112 channels) stand in for EfficientNet-b4's
        # (24+32+56+160); a 2+2-layer, 128-wide transformer keeps a CPU epoch short (the
        # paper's 4+4 layers, 256 wide, cost about 3 GFLOP per training image).
        "cpu": dict(backbone="tf_efficientnet_lite0", layers=(0, 1, 2, 3), image_size=224,
                    encoder_layers=2, decoder_layers=2, hidden_dim=128, num_heads=4,
                    ffn_dim=256, epochs=40, batch_size=16, lr=4e-4),
        # The official MVTec configuration (1000 epochs, batch 8 per GPU on 8 GPUs).
        "paper": dict(backbone="efficientnet_b4", layers=(0, 1, 2, 3), image_size=224,
                      epochs=1000, batch_size=64, lr=1e-4, lr_milestones=(0.8,)),
    }

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: tuple[int | str, ...] = (0, 1, 2, 3),
        backbone_weights: str = "pretrained",
        image_size: int = 224,
        crop_size: int | None = None,
        feature_stride: int = 16,
        hidden_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        neighbourhood: int = 7,
        masked: tuple[bool, bool, bool] = (True, True, True),
        jitter_scale: float = 20.0,
        jitter_prob: float = 1.0,
        epochs: int = 1000,
        max_steps: int | None = None,
        batch_size: int = 16,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        lr_milestones: tuple[float, ...] = (0.8,),
        lr_gamma: float = 0.1,
        grad_clip: float = 0.1,
        score_pool: int = 16,
        smoothing_sigma: float = 0.0,
        feature_editing: bool = False,
        k_neighbours: int = 3,
        weight_norm: str = "sum_to_one",
        coreset_ratio: float = 0.1,
        projection_dim: int | None = 128,
        knn_backend: str = "auto",
        feature_cache_mb: float = 4096,
        checkpoint_every_s: float = 60.0,
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} must be a multiple of num_heads {num_heads}")
        self.backbone = backbone
        self.layers = tuple(layers)
        self.backbone_weights = backbone_weights
        self.image_size = image_size
        self.crop_size = crop_size
        self.feature_stride = feature_stride
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.ffn_dim = ffn_dim
        self.dropout = dropout
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.neighbourhood = neighbourhood
        self.masked = tuple(masked)
        self.jitter_scale = jitter_scale
        self.jitter_prob = jitter_prob
        self.epochs = epochs
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_milestones = tuple(lr_milestones)
        self.lr_gamma = lr_gamma
        self.grad_clip = grad_clip
        self.score_pool = score_pool
        self.smoothing_sigma = smoothing_sigma
        self.feature_editing = feature_editing
        self.k_neighbours = k_neighbours
        self.weight_norm = weight_norm
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.knn_backend = knn_backend
        self.feature_cache_mb = feature_cache_mb
        self.checkpoint_every_s = checkpoint_every_s
        self.device = device
        self.seed = seed
        self._check_inference_params()

    def _check_inference_params(self) -> None:
        if self.k_neighbours < 1:
            raise ValueError(f"k_neighbours must be >= 1, got {self.k_neighbours}")
        if self.weight_norm not in WEIGHT_NORMS:
            raise ValueError(f"weight_norm must be one of {WEIGHT_NORMS}, got {self.weight_norm!r}")
        if self.feature_editing and self.is_fitted and getattr(self, "bank_", None) is None:
            raise ValueError("feature_editing needs the bank built by a fit with "
                             "feature_editing=True")

    # -- features -----------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        side = self.preprocess.output_size // self.feature_stride
        if side < 1:
            raise ValueError(f"images of {self.preprocess.output_size} px have no token grid at "
                             f"stride {self.feature_stride}")
        return side, side

    def aligned_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, C, H, W) frozen stage features on the token grid."""
        with torch.no_grad():
            return align_features(self.extractor(images), self.grid)

    def _build_networks(self) -> None:
        channels = sum(self.extractor.channels)  # built first: building it draws random numbers
        torch.manual_seed(self.seed)
        self.transformer_ = UniADTransformer(
            channels, self.grid, self.hidden_dim, self.num_heads,
            self.ffn_dim, self.dropout, self.encoder_layers, self.decoder_layers,
            self.neighbourhood, self.masked).to(self.torch_device)

    def _trained_modules(self) -> dict[str, nn.Module]:
        return {"transformer": self.transformer_}

    def reconstruct(self, aligned: torch.Tensor, jitter: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) aligned features -> (reconstruction (B, C, H, W), encoder output
        (B, hidden_dim, H, W))."""
        batch, channels, height, width = aligned.shape
        tokens = aligned.flatten(2).transpose(1, 2)
        if jitter:
            tokens = feature_jitter(tokens, self.jitter_scale)
        rebuilt, memory = self.transformer_(tokens)
        return (rebuilt.transpose(1, 2).reshape(batch, channels, height, width),
                memory.transpose(1, 2).reshape(batch, -1, height, width))

    # -- training -----------------------------------------------------------------------------
    def _fit(self, train: Iterable[Any] | torch.Tensor, show_progress: bool,
             checkpoint_dir: str | Path | None) -> dict[str, Any]:
        started = time.perf_counter()
        data = TrainingImages.collect(train)
        device = self.torch_device
        self._build_networks()
        optimizer = with_base_rates(torch.optim.AdamW(
            self.transformer_.parameters(), lr=self.lr, weight_decay=self.weight_decay))
        optimizers = {"reconstruct": optimizer}
        checkpoint = TrainingCheckpoint(checkpoint_dir, self.checkpoint_every_s)
        history = checkpoint.restore(self._trained_modules(), optimizers) or {}
        epochs, steps_per_epoch, total_steps = step_schedule(len(data), self.batch_size,
                                                             self.epochs, self.max_steps)
        cached = None
        if len(history.get("reconstruct", [])) < epochs:
            cached = cache_features(lambda x: [self.aligned_features(x)], data, self.batch_size,
                                    device, self.feature_cache_mb)

        def run_epoch(epoch: int) -> float:
            self.transformer_.train()
            total, count = 0.0, 0
            for offset, indices in enumerate(data.epoch_batches(self.batch_size, self.seed, epoch)):
                step = epoch * steps_per_epoch + offset
                if step >= total_steps:
                    break
                set_learning_rates(optimizer, step_decay(step / total_steps, self.lr_milestones,
                                                         self.lr_gamma))
                if cached is not None:
                    aligned = cached[0][indices.to(cached[0].device)]
                else:
                    aligned = self.aligned_features(data.get(indices, device))
                jitter = float(torch.rand(())) < self.jitter_prob
                rebuilt, _ = self.reconstruct(aligned, jitter=jitter)
                loss = F.mse_loss(rebuilt, aligned)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.grad_clip > 0:
                    nn.utils.clip_grad_norm_(self.transformer_.parameters(), self.grad_clip)
                optimizer.step()
                total += float(loss.detach()) * len(indices)
                count += len(indices)
            return total / max(count, 1)

        run_stage("reconstruct", epochs, run_epoch, history, self.seed, checkpoint,
                  self._trained_modules(), optimizers, show_progress)
        self.transformer_.eval()
        checkpoint.clear()
        self.bank_ = None
        if self.feature_editing:
            features = cached[0] if cached is not None else torch.cat(
                [self.aligned_features(data.get(indices, device))
                 for indices in data.in_order(self.batch_size)])
            self.bank_ = EditingBank.build(features, self.coreset_ratio, self.projection_dim,
                                           self.seed, self.knn_backend, show_progress)
        return {
            "n_train_images": len(data),
            "steps": total_steps,
            "token_grid": list(self.grid),
            "feature_channels": sum(self.extractor.channels),
            "backbone_weights": vars(self.extractor.resolved_weights),
            "features_cached": cached is not None,
            "editing_bank_size": None if self.bank_ is None else int(self.bank_.vectors.shape[0]),
            "loss_history": history,
            "seconds_training": round(time.perf_counter() - started, 2),
        }

    # -- inference ----------------------------------------------------------------------------
    def raw_maps_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unsmoothed (B, S, S) maps and the encoder's (B, hidden_dim, H, W) output tokens."""
        self.transformer_.eval()
        aligned = self.aligned_features(images)
        start = (self.bank_.edit(aligned, self.k_neighbours, self.weight_norm)
                 if self.feature_editing else aligned)
        rebuilt, memory = self.reconstruct(start)
        errors = (rebuilt - aligned).pow(2).sum(dim=1, keepdim=True).sqrt()
        maps = F.interpolate(errors, size=images.shape[-2:], mode="bilinear", align_corners=True)
        return maps.squeeze(1), memory

    def _predict(self, images: torch.Tensor) -> Prediction:
        maps, _ = self.raw_maps_and_features(images)
        maps = gaussian_blur(maps, self.smoothing_sigma)
        pool = min(self.score_pool, maps.shape[-1])
        pooled = F.avg_pool2d(maps.unsqueeze(1), pool, stride=1)
        return Prediction(maps, pooled.flatten(1).amax(dim=1))

    # -- persistence --------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = module_state_tensors(self._trained_modules())
        if self.bank_ is not None:
            tensors["editing_bank"] = self.bank_.vectors
        return tensors

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        bank = tensors.pop("editing_bank", None)
        self.bank_ = None if bank is None else EditingBank(bank, self.knn_backend)
        self._build_networks()
        load_module_states(self._trained_modules(), tensors)
