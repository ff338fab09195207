"""UniAD (You et al., NeurIPS 2022): one transformer reconstructs the frozen features of many
categories (METHODS.md §1.4).

Frozen EfficientNet stages are resized to one grid (stride 16) and concatenated; a transformer
whose attentions may not look at a token's own 7x7 neighbourhood rebuilds them, trained with MSE
on normal images whose input features were jittered. The anomaly map is the L2 reconstruction
error per position, upsampled; the image score the maximum of its 16x16 average-pooled map.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...validation import Flag, Items, Number
from .. import register
from ..feature_reconstruction import FeatureReconstruction
from ..hyperparameters import hyperparameter
from ..training import FrozenFeatures, TrainingImages
from .networks import UniADTransformer, feature_jitter, mask_leaves_context


@register
class UniAD(FeatureReconstruction):
    """UniAD anomaly detector. With ``feature_editing`` it is "UniAD w/ F.E." (LafitE's Table 4):
    every test feature is edited before reconstruction (the error is still measured against the
    original features).

    Example:
        >>> detector = UniAD.from_preset("cpu", epochs=10).fit(train_loader)
        >>> detector.predict(images).scores
    """

    name = "uniad"
    summary = "transformer with neighbour-masked attention rebuilds frozen features (unified)"
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
    # 128 px: the attention window needs a token grid of a few positions.
    tiny_params = dict(image_size=128, epochs=1, hidden_dim=32, num_heads=2, ffn_dim=32)

    epochs = 1000
    feature_editing = False
    grad_clip = 0.1
    smoothing_sigma = 0.0
    align_corners = True
    feature_stride: int = hyperparameter(16, Number(int, 1), "the stride of the token grid "
                                         "every stage is resized to")
    hidden_dim: int = hyperparameter(256, Number(int, 1), "transformer width")
    num_heads: int = hyperparameter(8, Number(int, 1), "attention heads")
    ffn_dim: int = hyperparameter(1024, Number(int, 1), "feed-forward width")
    dropout: float = hyperparameter(0.1, Number(float, 0, 1, high_open=True), "transformer "
                                    "dropout")
    encoder_layers: int = hyperparameter(4, Number(int, 1), "encoder depth")
    decoder_layers: int = hyperparameter(4, Number(int, 1), "decoder depth")
    neighbourhood: int = hyperparameter(7, Number(int, 0), "side of the window each token may "
                                        "not attend to (0: no mask)")
    masked: tuple[bool, bool, bool] = hyperparameter(
        (True, True, True), Items(Flag(), length=3), "which attentions use the mask: encoder, "
        "decoder-to-memory, decoder-to-previous")
    jitter_scale: float = hyperparameter(20.0, Number(float, 0), "feature jitter strength "
                                         "(0: off)")
    jitter_prob: float = hyperparameter(1.0, Number(float, 0, 1), "probability that a training "
                                        "batch is jittered")
    feature_cache_mb: float = hyperparameter(4096.0, Number(float, 0), "keep the frozen "
                                             "training features in memory up to this many MB")

    def _check_params(self) -> None:
        super()._check_params()
        if self.hidden_dim % self.num_heads:
            raise self._refuse(f"hidden_dim={self.hidden_dim} must be a multiple of "
                               f"num_heads={self.num_heads}")
        if self.preprocess.output_size < self.feature_stride:
            raise self._refuse(f"images of {self.preprocess.output_size} px have no token grid "
                               f"at feature_stride={self.feature_stride}")
        if not mask_leaves_context(*self.feature_grid, self.neighbourhood):
            raise self._refuse(f"a neighbourhood of {self.neighbourhood} hides the whole "
                               f"{self.feature_grid[0]}x{self.feature_grid[1]} token grid (images of "
                               f"{self.preprocess.output_size} px at feature_stride="
                               f"{self.feature_stride}); use a smaller one or larger images")

    # -- features -----------------------------------------------------------------------------
    @property
    def feature_grid(self) -> tuple[int, int]:
        """The token grid: the input at ``feature_stride``."""
        side = self.preprocess.output_size // self.feature_stride
        return side, side

    def _build_networks(self) -> None:
        channels = sum(self.extractor.channels)
        with self.seeded():
            self.transformer_ = UniADTransformer(
                channels, self.feature_grid, self.hidden_dim, self.num_heads,
                self.ffn_dim, self.dropout, self.encoder_layers, self.decoder_layers,
                self.neighbourhood, self.masked).to(self.torch_device)

    def _trained_modules(self) -> dict[str, nn.Module]:
        return {"transformer": self.transformer_}

    def _reconstructor(self) -> nn.Module:
        return self.transformer_

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
        data = TrainingImages.collect(train)
        self._build_networks()
        aligned = FrozenFeatures(lambda x: [self.aligned_features(x)], data, self.batch_size,
                                 self.torch_device, self.feature_cache_mb)

        def loss(indices: torch.Tensor, step: int) -> torch.Tensor:
            features = aligned(indices)[0]
            rebuilt, _ = self.reconstruct(features,
                                          jitter=float(torch.rand(())) < self.jitter_prob)
            return F.mse_loss(rebuilt, features)

        with self.training(checkpoint_dir, show_progress) as training:
            facts = self._reconstruct("reconstruct", data, training, loss)
        self.bank_ = None
        if self.feature_editing:
            self.build_bank(torch.cat([aligned(indices)[0] for indices
                                       in data.in_order(self.batch_size)]), show_progress)
        return self.fit_facts(
            data, training, **facts, token_grid=list(self.feature_grid),
            feature_channels=sum(self.extractor.channels),
            features_cached=aligned.cached is not None,
            editing_bank_size=None if self.bank_ is None else int(self.bank_.vectors.shape[0]))

    # -- inference ----------------------------------------------------------------------------
    def raw_maps_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unsmoothed (B, S, S) maps and the encoder's (B, hidden_dim, H, W) output tokens."""
        self.transformer_.eval()
        aligned = self.aligned_features(images)
        rebuilt, memory = self.reconstruct(self.edited(aligned))
        errors = (rebuilt - aligned).pow(2).sum(dim=1).sqrt()
        return self.error_maps(errors, images.shape[-2:]), memory
