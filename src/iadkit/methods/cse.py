"""CSE (Thomine et al., 2024): a contrastively trained embedding of deep features, scored by the
cosine distance to a tiny bank of k-means centres (METHODS.md §5). Meant for surfaces.

Two frozen deep levels are fused and embedded by pointwise convolutions. Training sees pairs: a
normal image and a second training image that, half of the time, carries a synthetic defect
(structural, textural or blur; :class:`~iadkit.synthesis.CseDefectSynthesizer`). A contrastive
cosine loss pulls the embeddings of two normal images together and pushes a defective one away;
a frozen, randomly initialised decoder that must rebuild the backbone features from the normal
image's embedding keeps the embedding from collapsing to a constant. Part of the training
normals is held out, and the epoch with the lowest validation loss is kept.

After training, k-means over the training embeddings gives the bank (one cluster, the mean, by
default). A test image's score is its smallest mean per-position cosine distance to a centre;
the per-position distances to that centre, upsampled and smoothed, are the anomaly map.

Paper and official code differ in places (METHODS.md §7, items 16-19); the defaults follow the
code where the paper is silent or its equations are lost: the contrastive term carries the
weight 10 (``loss = 10 * contrastive + decoder``), cosines run along the embedding's width
axis, the one-cycle peak rate is 10x the base rate. The official code also leaves the embedder
in eval mode after the first validation pass (its BatchNorm then trains on running statistics);
iadkit trains in train mode.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.cse import (
    COSINE_AXES,
    FeatureDecoder,
    FusionEmbedder,
    PositionClassifier,
    cluster_distances,
    contrastive_cosine_loss,
    feature_reconstruction_loss,
)
from ..nn.kmeans import kmeans
from ..nn.smoothing import upsample_blur_operator
from ..synthesis.cse_defects import KINDS, CseDefectSynthesizer
from ..synthesis.textures import TextureSource
from . import register
from .base import Detector, Prediction
from .training import (
    TrainingCheckpoint,
    TrainingImages,
    cache_features,
    epoch_seed,
    load_module_states,
    module_state_tensors,
    one_cycle,
    run_stage,
)

#: How the decoder is set up (the paper's Table 5): frozen random weights (the method), no
#: decoder, trained on reconstruction before the embedder, or trained together with it.
DECODERS = ("random", "none", "before", "joint")
OBJECTIVES = ("contrastive", "classifier")
REPRESENTATIVES = ("centre", "nearest_sample")


@register
class CSE(Detector):
    """CSE anomaly detector.

    Args:
        backbone: timm name or alias of the frozen extractor.
        layers: the deep levels to fuse (EfficientNet-b3's last two: 136 @ 1/16, 384 @ 1/32).
        backbone_weights: "pretrained", a weight file, or "random" (shape tests only).
        image_size: images are resized to this square size (256).
        crop_size: centre crop after resizing (224).
        embed_dim: channels of the embedding (64).
        hidden_widths: widths of the embedder's first pointwise layers; None halves the fused
            width twice.
        embed_pool: side of the embedder's smoothing average pooling (2).
        decoder: "random" (frozen random weights), "none", "before" (trained on reconstruction
            first, with a throw-away embedder, then frozen) or "joint" (trained with the
            embedder); the paper's Table 5.
        decoder_batch_stats: the frozen decoder's BatchNorm normalises with batch statistics,
            as in the official code (which keeps it in train mode).
        objective: "contrastive" (the method) or "classifier" (the paper's Table 4 baseline: a
            binary normal/defective classifier on the same embedding, scored by its logit).
        contrastive_weight: weight of the contrastive (or classifier) term (10, official code).
        decoder_weight: weight of the decoder's reconstruction term (1).
        cosine_axis: slices of the contrastive cosine: "width" (code), "channel", "flatten".
        defect_probability: share of second views that carry a synthetic defect (0.5).
        defect_kinds: which synthetic defects to draw from (structural, textural, blur).
        texture_dir: texture images for the textural defects (e.g. DTD's ``images/``); None
            uses procedural textures.
        validation_fraction: share of the training normals held out to choose the epoch (paper
            0.3, code 0.2); 0 keeps the last epoch.
        epochs: training epochs (100).
        min_steps: train at least this many optimisation steps: a small training set gets more
            epochs than ``epochs`` (0 = exactly ``epochs``).
        batch_size: pairs per step (8).
        lr: Adam base learning rate (4e-4).
        max_lr_factor: the one-cycle peak rate is ``lr`` times this (10 in the official code;
            1 reads the paper literally).
        betas: Adam betas; the one-cycle schedule cycles the first between 0.85 and 0.95.
        weight_decay: Adam weight decay (1e-5).
        clusters: k of the k-means bank (1: the mean embedding).
        cluster_representative: "centre" (paper) or "nearest_sample" (official code: the
            training embedding nearest to each centre).
        smoothing_sigma: Gaussian sigma of the anomaly map (4).
        feature_cache_mb: keep the frozen features of the normal views in memory when they fit.
        checkpoint_every_s: seconds between training checkpoints (when fit gets a folder).
        device: "auto", "cpu", "cuda", ...
        seed: seeds the split, initialisation, pairing, synthesis and batch order.

    Example:
        >>> detector = CSE.from_preset("cpu", texture_dir="dtd/images").fit(train_loader)
        >>> detector.predict(images).scores
    """

    name = "cse"
    summary = "contrastively trained embedding of deep features, k-means bank (surfaces)"
    presets = {
        # Lite0's two deepest stages (112 @ 1/16, 320 @ 1/32) stand in for EfficientNet-b3's.
        # 15 epochs is about 1000 steps on 500 images; smaller sets train for 1000 steps.
        "cpu": dict(backbone="tf_efficientnet_lite0", layers=(3, 4), image_size=256,
                    crop_size=224, epochs=15, min_steps=1000),
        "paper": dict(backbone="efficientnet_b3", layers=(3, 4), image_size=256, crop_size=224,
                      epochs=100, batch_size=8, lr=4e-4),
    }

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: tuple[int | str, ...] = (3, 4),
        backbone_weights: str = "pretrained",
        image_size: int = 256,
        crop_size: int | None = 224,
        embed_dim: int = 64,
        hidden_widths: tuple[int, ...] | None = None,
        embed_pool: int = 2,
        decoder: str = "random",
        decoder_batch_stats: bool = True,
        objective: str = "contrastive",
        contrastive_weight: float = 10.0,
        decoder_weight: float = 1.0,
        cosine_axis: str = "width",
        defect_probability: float = 0.5,
        defect_kinds: tuple[str, ...] = KINDS,
        texture_dir: str | None = None,
        validation_fraction: float = 0.3,
        epochs: int = 100,
        min_steps: int = 0,
        batch_size: int = 8,
        lr: float = 4e-4,
        max_lr_factor: float = 10.0,
        betas: tuple[float, float] = (0.5, 0.999),
        weight_decay: float = 1e-5,
        clusters: int = 1,
        cluster_representative: str = "centre",
        smoothing_sigma: float = 4.0,
        feature_cache_mb: float = 4096,
        checkpoint_every_s: float = 60.0,
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        for value, allowed, what in ((decoder, DECODERS, "decoder"),
                                     (objective, OBJECTIVES, "objective"),
                                     (cosine_axis, COSINE_AXES, "cosine_axis"),
                                     (cluster_representative, REPRESENTATIVES,
                                      "cluster_representative")):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        if clusters < 1:
            raise ValueError(f"clusters must be at least 1, got {clusters}")
        if len(layers) < 1:
            raise ValueError("CSE needs at least one backbone level")
        CseDefectSynthesizer(kinds=tuple(defect_kinds))  # refuses unknown kinds now, not in fit
        self.backbone = backbone
        self.layers = tuple(layers)
        self.backbone_weights = backbone_weights
        self.image_size = image_size
        self.crop_size = crop_size
        self.embed_dim = embed_dim
        self.hidden_widths = None if hidden_widths is None else tuple(hidden_widths)
        self.embed_pool = embed_pool
        self.decoder = decoder
        self.decoder_batch_stats = decoder_batch_stats
        self.objective = objective
        self.contrastive_weight = contrastive_weight
        self.decoder_weight = decoder_weight
        self.cosine_axis = cosine_axis
        self.defect_probability = defect_probability
        self.defect_kinds = tuple(defect_kinds)
        self.texture_dir = texture_dir
        self.validation_fraction = validation_fraction
        self.epochs = epochs
        self.min_steps = min_steps
        self.batch_size = batch_size
        self.lr = lr
        self.max_lr_factor = max_lr_factor
        self.betas = tuple(betas)
        self.weight_decay = weight_decay
        self.clusters = clusters
        self.cluster_representative = cluster_representative
        self.smoothing_sigma = smoothing_sigma
        self.feature_cache_mb = feature_cache_mb
        self.checkpoint_every_s = checkpoint_every_s
        self.device = device
        self.seed = seed
        self._map_operators: dict[tuple, torch.Tensor] = {}

    # -- networks -----------------------------------------------------------------------------
    def _new_embedder(self) -> FusionEmbedder:
        return FusionEmbedder(self.extractor.channels, self.embed_dim, self.hidden_widths,
                              self.embed_pool).to(self.torch_device)

    def _build_networks(self) -> None:
        """The trained networks (embedder, classifier head) and, for training, the decoder."""
        channels = self.extractor.channels  # built first: building it draws random numbers
        torch.manual_seed(self.seed)
        self.network_ = nn.ModuleDict({"embedder": self._new_embedder()})
        if self.objective == "classifier":
            self.network_["head"] = PositionClassifier(self.embed_dim).to(self.torch_device)
        self.decoder_ = FeatureDecoder(self.embed_dim, channels).to(self.torch_device)
        self.decoder_.requires_grad_(self.decoder == "joint")

    def embed(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Images -> (frozen features, embedding z, smoothed embedding)."""
        with torch.no_grad():
            features = self.extractor(images)
        embedding, pooled = self.network_["embedder"](features)
        return features, embedding, pooled

    # -- training -----------------------------------------------------------------------------
    def _split(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(training indices, validation indices) of the normal images, seeded."""
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed))
        held_out = int(count * self.validation_fraction)
        if held_out and count - held_out < 2:
            raise ValueError(f"{count} training images are too few to hold out "
                             f"{self.validation_fraction:.0%} for validation")
        return order[held_out:].sort().values, order[:held_out].sort().values

    def _second_views(self, data: TrainingImages, indices: torch.Tensor,
                      synthesizer: CseDefectSynthesizer, generator: torch.Generator
                      ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The images at ``indices``, each given a synthetic defect with the set probability;
        returns (their frozen features, (B,) 1 where defective)."""
        samples = [synthesizer(image, generator) for image in data.get(indices, torch.device("cpu"))]
        images = torch.stack([s.image for s in samples]).to(self.torch_device)
        defective = torch.tensor([float(s.mask.sum() > 0) for s in samples],
                                 device=self.torch_device)
        with torch.no_grad():
            return self.extractor(images), defective

    def _pair_loss(self, normal_features: list[torch.Tensor], second_features: list[torch.Tensor],
                   defective: torch.Tensor) -> torch.Tensor:
        """The training objective of a batch of pairs (the two views' frozen features)."""
        embedder = self.network_["embedder"]
        embedding, normal_pooled = embedder(normal_features)
        _, second_pooled = embedder(second_features)
        if self.objective == "contrastive":
            pair = contrastive_cosine_loss(normal_pooled, second_pooled, defective,
                                           self.cosine_axis)
        else:
            head = self.network_["head"]
            logits = torch.cat([head(normal_pooled).mean(dim=(1, 2)),
                                head(second_pooled).mean(dim=(1, 2))])
            labels = torch.cat([torch.zeros_like(defective), defective])
            pair = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        loss = self.contrastive_weight * pair
        if self.decoder != "none":
            loss = loss + self.decoder_weight * feature_reconstruction_loss(
                self.decoder_(embedding, [f.shape[-2:] for f in normal_features]), normal_features)
        return loss

    def _fit(self, train: Iterable[Any] | torch.Tensor, show_progress: bool,
             checkpoint_dir: str | Path | None) -> dict[str, Any]:
        started = time.perf_counter()
        data = TrainingImages.collect(train)
        train_indices, validation_indices = self._split(len(data))
        train_data = data.subset(train_indices)
        self._build_networks()
        best = copy.deepcopy(self.network_)
        parameters = list(self.network_.parameters())
        if self.decoder == "joint":
            parameters += list(self.decoder_.parameters())
        optimizers = {"embed": torch.optim.Adam(parameters, lr=self.lr, betas=self.betas,
                                                weight_decay=self.weight_decay)}
        modules: dict[str, nn.Module] = {"network": self.network_, "best": best,
                                         "decoder": self.decoder_}
        if self.decoder == "before":
            warm_embedder = self._new_embedder()
            modules["warm_embedder"] = warm_embedder
            optimizers["decoder"] = torch.optim.Adam(
                [*warm_embedder.parameters(), *self.decoder_.parameters()], lr=self.lr,
                betas=self.betas, weight_decay=self.weight_decay)
        checkpoint = TrainingCheckpoint(checkpoint_dir, self.checkpoint_every_s)
        history = checkpoint.restore(modules, optimizers) or {}
        normal_features = None
        steps_per_epoch = -(-len(train_data) // self.batch_size)
        epochs = max(self.epochs, -(-self.min_steps // steps_per_epoch))
        total_steps = epochs * steps_per_epoch
        if len(history.get("embed", [])) < epochs:
            normal_features = cache_features(self.extractor, train_data, self.batch_size,
                                             self.torch_device, self.feature_cache_mb)
        synthesizer = CseDefectSynthesizer(TextureSource(self.texture_dir),
                                           self.defect_probability, kinds=self.defect_kinds)

        def normal_batch(indices: torch.Tensor) -> list[torch.Tensor]:
            if normal_features is not None:
                return [level[indices.to(level.device)] for level in normal_features]
            with torch.no_grad():
                return self.extractor(train_data.get(indices, self.torch_device))

        def set_rates(optimizer: torch.optim.Optimizer, step: int, total: int) -> None:
            factor, momentum = one_cycle(step, total)
            for group in optimizer.param_groups:
                group["lr"] = self.lr * self.max_lr_factor * factor
                group["betas"] = (momentum, self.betas[1])

        if self.decoder == "before":
            def pretrain_epoch(epoch: int) -> float:
                """Reconstruction only: a throw-away embedder and the decoder learn together."""
                optimizer = optimizers["decoder"]
                warm_embedder.train()
                self.decoder_.train()
                self.decoder_.requires_grad_(True)
                total = 0.0
                batches = train_data.epoch_batches(self.batch_size, self.seed, epoch)
                for offset, indices in enumerate(batches):
                    set_rates(optimizer, epoch * steps_per_epoch + offset, total_steps)
                    features = normal_batch(indices)
                    embedding, _ = warm_embedder(features)
                    rebuilt = self.decoder_(embedding, [f.shape[-2:] for f in features])
                    loss = feature_reconstruction_loss(rebuilt, features)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach())
                self.decoder_.requires_grad_(False)
                return total / len(train_data)

            run_stage("decoder", epochs, pretrain_epoch, history, self.seed, checkpoint,
                      modules, optimizers, show_progress)

        validation = self._validation_pairs(data.subset(validation_indices), synthesizer)

        def run_epoch(epoch: int) -> float:
            optimizer = optimizers["embed"]
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, "synthesis", epoch))
            # The second views: the same training images in another order (official code: two
            # independently shuffled loaders zipped together).
            partners = torch.randperm(len(train_data), generator=generator)
            total = 0.0
            self.network_.train()
            self.decoder_.train(self.decoder_batch_stats or self.decoder == "joint")
            batches = train_data.epoch_batches(self.batch_size, self.seed, epoch)
            for offset, indices in enumerate(batches):
                set_rates(optimizer, epoch * steps_per_epoch + offset, total_steps)
                second, defective = self._second_views(train_data, partners[indices],
                                                       synthesizer, generator)
                loss = self._pair_loss(normal_batch(indices), second, defective)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
            if validation is not None:
                losses = history.setdefault("validation", [])
                losses.append(round(self._validation_loss(validation), 6))
                if losses[-1] <= min(losses):
                    best.load_state_dict(self.network_.state_dict())
            return total / len(train_data)

        run_stage("embed", epochs, run_epoch, history, self.seed, checkpoint, modules,
                  optimizers, show_progress)
        if validation is not None:
            self.network_.load_state_dict(best.state_dict())
        self.network_.eval()
        checkpoint.clear()
        bank_started = time.perf_counter()
        self._build_bank(data)
        validation_losses = history.get("validation", [])
        return {
            "n_train_images": len(data),
            "n_epoch_selection_images": len(validation_indices),
            "chosen_epoch": (validation_losses.index(min(validation_losses)) + 1
                             if validation_losses else epochs),
            "epochs": epochs,
            "feature_channels": list(self.extractor.channels),
            "bank_shape": list(self.centres_.shape),
            "backbone_weights": vars(self.extractor.resolved_weights),
            "features_cached": normal_features is not None,
            "loss_history": history,
            "seconds_bank": round(time.perf_counter() - bank_started, 2),
            "seconds_training": round(time.perf_counter() - started, 2),
        }

    def _validation_pairs(self, validation: TrainingImages, synthesizer: CseDefectSynthesizer
                          ) -> list[tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] | None:
        """Fixed validation pairs (the same synthetic defects every epoch, so the loss compares
        epochs, not draws): (normal view's features, second view's features, defective flags)."""
        if len(validation) == 0:
            return None
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, "validation", 0))
        partners = torch.randperm(len(validation), generator=generator)
        pairs = []
        for indices in validation.in_order(self.batch_size):
            with torch.no_grad():
                features = self.extractor(validation.get(indices, self.torch_device))
            pairs.append((features, *self._second_views(validation, partners[indices],
                                                         synthesizer, generator)))
        return pairs

    @torch.no_grad()
    def _validation_loss(self, pairs: list[tuple[list[torch.Tensor], list[torch.Tensor],
                                                 torch.Tensor]]) -> float:
        self.network_.eval()
        self.decoder_.train(self.decoder_batch_stats)  # as in training, so the losses compare
        total, count = 0.0, 0
        for features, second, defective in pairs:
            total += float(self._pair_loss(features, second, defective))
            count += defective.shape[0]
        return total / count

    @torch.no_grad()
    def _build_bank(self, data: TrainingImages) -> None:
        """k-means over the smoothed embeddings of every training image."""
        if self.objective == "classifier":
            self.centres_ = torch.zeros(0, device=self.torch_device)
            return
        pooled = torch.cat([self.embed(data.get(chunk, self.torch_device))[2]
                            for chunk in data.in_order(self.batch_size)])
        if self.clusters > len(data):
            raise ValueError(f"clusters={self.clusters} exceeds the {len(data)} training images")
        flat = pooled.flatten(1)
        centres, _ = kmeans(flat, self.clusters, seed=self.seed)
        if self.cluster_representative == "nearest_sample":
            centres = flat[torch.cdist(centres, flat).argmin(dim=1)]
        self.centres_ = centres.reshape(-1, *pooled.shape[1:])

    # -- inference ----------------------------------------------------------------------------
    def _position_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
        """(per-position scores (B, h, w), image scores (B,), smoothed embedding)."""
        _, _, pooled = self.embed(images)
        if self.objective == "classifier":
            logits = self.network_["head"](pooled)
            return logits, logits.mean(dim=(1, 2)), pooled
        distances = cluster_distances(pooled, self.centres_)
        per_cluster = distances.mean(dim=(2, 3))
        scores, nearest = per_cluster.min(dim=1)
        height, width = distances.shape[-2:]
        positions = distances.gather(
            1, nearest.view(-1, 1, 1, 1).expand(-1, 1, height, width)).squeeze(1)
        return positions, scores, pooled

    def raw_maps_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unsmoothed maps at the input size and the smoothed embedding (B, E, h, w)."""
        positions, _, pooled = self._position_scores(images)
        maps = F.interpolate(positions.unsqueeze(1), size=images.shape[-2:], mode="bilinear",
                             align_corners=False)
        return maps.squeeze(1), pooled

    def _predict(self, images: torch.Tensor) -> Prediction:
        positions, scores, _ = self._position_scores(images)
        # Upsampling and smoothing as one precomputed linear map of the coarse grid: the same
        # maps as F.interpolate + gaussian_blur at a fraction of the cost, which keeps CSE's
        # inference close to its backbone's.
        key = (tuple(positions.shape[-2:]), tuple(images.shape[-2:]), positions.device)
        if key not in self._map_operators:
            self._map_operators[key] = upsample_blur_operator(
                key[0], key[1], self.smoothing_sigma, positions.device)
        maps = positions.flatten(1) @ self._map_operators[key]
        return Prediction(maps.reshape(-1, *images.shape[-2:]), scores)

    # -- persistence --------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {**module_state_tensors({"network": self.network_}), "centres": self.centres_}

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build_networks()
        load_module_states({"network": self.network_},
                           {k: v for k, v in tensors.items() if k != "centres"})
        self.centres_ = tensors["centres"]
