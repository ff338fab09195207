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
import functools
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import IadkitError
from ...nn.anomaly_maps import UpsampleBlur, upsampled
from ...synthesis.cse_defects import KINDS, CseDefectSynthesizer
from ...validation import Choice, Flag, Items, Number, Optional, Text
from .. import register
from ..base import Prediction
from ..hyperparameters import hyperparameter
from ..training import (
    FrozenFeatures,
    Stage,
    TrainedDetector,
    TrainingImages,
    epoch_seed,
    one_cycle,
    step_schedule,
)
from .kmeans import kmeans
from .networks import (
    COSINE_AXES,
    FeatureDecoder,
    FusionEmbedder,
    PositionClassifier,
    cluster_distances,
    contrastive_cosine_loss,
    feature_reconstruction_loss,
)

#: How the decoder is set up (the paper's Table 5): frozen random weights (the method), no
#: decoder, trained on reconstruction before the embedder, or trained together with it.
DECODERS = ("random", "none", "before", "joint")
OBJECTIVES = ("contrastive", "classifier")
REPRESENTATIVES = ("centre", "nearest_sample")


@register
class CSE(TrainedDetector):
    """CSE anomaly detector.

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
    # 128 px: the deepest level needs a grid of a few positions.
    tiny_params = dict(image_size=128, epochs=1, min_steps=0)

    layers = (3, 4)
    crop_size = 224
    epochs = 100
    batch_size = 8
    embed_dim: int = hyperparameter(64, Number(int, 1), "channels of the embedding")
    hidden_widths: tuple[int, ...] | None = hyperparameter(
        None, Optional(Items(Number(int, 1), min_length=1)), "widths of the embedder's first "
        "pointwise layers (null halves the fused width twice)")
    embed_pool: int = hyperparameter(2, Number(int, 1), "side of the embedder's smoothing "
                                     "average pooling")
    decoder: str = hyperparameter("random", Choice(*DECODERS), "'random' (frozen random "
                                  "weights), 'none', 'before' (trained on reconstruction "
                                  "first, with a throw-away embedder, then frozen) or 'joint' "
                                  "(trained with the embedder); the paper's Table 5")
    decoder_batch_stats: bool = hyperparameter(True, Flag(), "the frozen decoder's BatchNorm "
                                               "normalises with batch statistics, as in the "
                                               "official code")
    objective: str = hyperparameter("contrastive", Choice(*OBJECTIVES), "'contrastive' (the "
                                    "method) or 'classifier' (the paper's Table 4 baseline)")
    contrastive_weight: float = hyperparameter(10.0, Number(float, 0), "weight of the "
                                               "contrastive (or classifier) term")
    decoder_weight: float = hyperparameter(1.0, Number(float, 0), "weight of the decoder's "
                                           "reconstruction term")
    cosine_axis: str = hyperparameter("width", Choice(*COSINE_AXES), "slices of the "
                                      "contrastive cosine ('width' in the code)")
    defect_probability: float = hyperparameter(0.5, Number(float, 0, 1), "share of second "
                                               "views that carry a synthetic defect")
    defect_kinds: tuple[str, ...] = hyperparameter(
        KINDS, Items(Choice(*KINDS), min_length=1), "synthetic defects drawn from")
    texture_dir: str | None = hyperparameter(
        None, Optional(Text()), "texture images for the textural defects (e.g. DTD's "
        "images/); null: procedural textures")
    validation_fraction: float = hyperparameter(0.3, Number(float, 0, 1, high_open=True),
                                                "share of the training normals held out to "
                                                "choose the epoch (paper 0.3, code 0.2); 0 "
                                                "keeps the last epoch")
    min_steps: int = hyperparameter(0, Number(int, 0), "train at least this many steps: a "
                                    "small training set gets more epochs (0: exactly epochs)")
    lr: float = hyperparameter(4e-4, Number(float, 0, low_open=True), "Adam base learning rate")
    max_lr_factor: float = hyperparameter(10.0, Number(float, 0, low_open=True), "the "
                                          "one-cycle peak rate is lr times this (10 in the "
                                          "official code; 1 reads the paper literally)")
    betas: tuple[float, float] = hyperparameter(
        (0.5, 0.999), Items(Number(float, 0, 1, high_open=True), length=2), "Adam betas (the "
        "one-cycle schedule cycles the first between 0.85 and 0.95)")
    weight_decay: float = hyperparameter(1e-5, Number(float, 0), "Adam weight decay")
    clusters: int = hyperparameter(1, Number(int, 1), "k of the k-means bank (1: the mean "
                                   "embedding)")
    cluster_representative: str = hyperparameter(
        "centre", Choice(*REPRESENTATIVES), "'centre' (paper) or 'nearest_sample' (official "
        "code: the training embedding nearest to each centre)")
    smoothing_sigma: float = hyperparameter(4.0, Number(float, 0), "Gaussian sigma of the "
                                            "anomaly map")
    feature_cache_mb: float = hyperparameter(4096.0, Number(float, 0), "keep the frozen "
                                             "features of the normal views in memory up to "
                                             "this many MB")

    def check_resources(self) -> None:
        super().check_resources()
        self._image_folder("texture_dir")

    @functools.cached_property
    def _to_maps(self) -> UpsampleBlur:
        return UpsampleBlur()

    # -- networks -----------------------------------------------------------------------------
    def _new_embedder(self) -> FusionEmbedder:
        return FusionEmbedder(self.extractor.channels, self.embed_dim, self.hidden_widths,
                              self.embed_pool).to(self.torch_device)

    def _build_networks(self) -> None:
        with self.seeded():
            self._create_networks()

    def _create_networks(self) -> FusionEmbedder | None:
        """The trained networks (embedder, classifier head), the decoder and, with
        ``decoder="before"``, the throw-away embedder it trains with (returned)."""
        self.network_ = nn.ModuleDict({"embedder": self._new_embedder()})
        if self.objective == "classifier":
            self.network_["head"] = PositionClassifier(self.embed_dim).to(self.torch_device)
        self.decoder_ = FeatureDecoder(self.embed_dim, self.extractor.channels)
        self.decoder_.to(self.torch_device).requires_grad_(self.decoder == "joint")
        return self._new_embedder() if self.decoder == "before" else None

    def _trained_modules(self) -> dict[str, nn.Module]:
        return {"network": self.network_}

    def _adam(self, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam at the one-cycle schedule's peak rate (the schedule scales it)."""
        return torch.optim.Adam(parameters, lr=self.lr * self.max_lr_factor, betas=self.betas,
                                weight_decay=self.weight_decay)

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        parameters = list(self.network_.parameters())
        if self.decoder == "joint":
            parameters += list(self.decoder_.parameters())
        return {"embed": self._adam(parameters)}

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
            raise IadkitError(f"{count} training images are too few to hold out "
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
        data = TrainingImages.collect(train)
        train_indices, validation_indices = self._split(len(data))
        train_data = data.subset(train_indices)
        with self.seeded():
            warm_embedder = self._create_networks()
        best = copy.deepcopy(self.network_)
        modules: dict[str, nn.Module] = {"network": self.network_, "best": best,
                                         "decoder": self.decoder_}
        optimizers = self._make_optimizers()
        if warm_embedder is not None:
            modules["warm_embedder"] = warm_embedder
            optimizers["decoder"] = self._adam([*warm_embedder.parameters(),
                                                *self.decoder_.parameters()])
        _, steps_per_epoch, _ = step_schedule(len(train_data), self.batch_size, 1)
        epochs = max(self.epochs, -(-self.min_steps // steps_per_epoch))
        synthesizer = CseDefectSynthesizer(self._image_folder("texture_dir"),
                                           self.defect_probability, kinds=self.defect_kinds)
        normal_features: FrozenFeatures | None = None
        with self.training(checkpoint_dir, show_progress, modules, optimizers) as training:
            if not training.done("embed", epochs):
                normal_features = FrozenFeatures(self.extractor, train_data, self.batch_size,
                                                 self.torch_device, self.feature_cache_mb)
                if warm_embedder is not None:
                    training.run(self._decoder_stage(train_data, normal_features, warm_embedder,
                                                     optimizers["decoder"], epochs))
                validation = self._validation_pairs(data.subset(validation_indices),
                                                    synthesizer)
                training.run(self._embed_stage(train_data, normal_features, synthesizer,
                                               validation, best, optimizers["embed"], epochs,
                                               training.history))
        if len(validation_indices):
            self.network_.load_state_dict(best.state_dict())
        self.network_.eval()
        bank_started = time.perf_counter()
        self._build_bank(data)
        validation_losses = training.history.get("validation", [])
        return self.fit_facts(
            data, training, n_epoch_selection_images=len(validation_indices),
            chosen_epoch=(validation_losses.index(min(validation_losses)) + 1
                          if validation_losses else epochs),
            epochs=epochs, feature_channels=list(self.extractor.channels),
            bank_shape=list(self.centres_.shape),
            features_cached=normal_features is not None and normal_features.cached is not None,
            seconds_bank=round(time.perf_counter() - bank_started, 2))

    def _decoder_stage(self, train_data: TrainingImages, normal_features: FrozenFeatures,
                       warm_embedder: FusionEmbedder, optimizer: torch.optim.Optimizer,
                       epochs: int) -> Stage:
        """Reconstruction only: a throw-away embedder and the decoder learn together."""
        def loss(indices: torch.Tensor, step: int) -> torch.Tensor:
            features = normal_features(indices)
            embedding, _ = warm_embedder(features)
            rebuilt = self.decoder_(embedding, [f.shape[-2:] for f in features])
            return feature_reconstruction_loss(rebuilt, features)

        return Stage("decoder", train_data, loss, [optimizer], [warm_embedder, self.decoder_],
                     epochs, self.batch_size, schedule=one_cycle(), loss_is_sum=True,
                     start_epoch=lambda epoch: self.decoder_.requires_grad_(True),
                     end_epoch=lambda epoch: self.decoder_.requires_grad_(False))

    def _embed_stage(self, train_data: TrainingImages, normal_features: FrozenFeatures,
                     synthesizer: CseDefectSynthesizer,
                     validation: list[tuple[list[torch.Tensor], list[torch.Tensor],
                                            torch.Tensor]] | None,
                     best: nn.Module, optimizer: torch.optim.Optimizer, epochs: int,
                     history: dict[str, list[float]]) -> Stage:
        """The contrastive training of the embedder; after each epoch, the validation loss
        keeps the best weights in ``best``."""
        draws: dict[str, Any] = {}

        def start_epoch(epoch: int) -> None:
            draws["generator"] = generator = torch.Generator().manual_seed(
                epoch_seed(self.seed, "synthesis", epoch))
            # The second views: the same training images in another order (official code: two
            # independently shuffled loaders zipped together).
            draws["partners"] = torch.randperm(len(train_data), generator=generator)
            self.decoder_.train(self.decoder_batch_stats or self.decoder == "joint")

        def loss(indices: torch.Tensor, step: int) -> torch.Tensor:
            second, defective = self._second_views(train_data, draws["partners"][indices],
                                                   synthesizer, draws["generator"])
            return self._pair_loss(normal_features(indices), second, defective)

        def end_epoch(epoch: int) -> None:
            if validation is not None:
                losses = history.setdefault("validation", [])
                losses.append(round(self._validation_loss(validation), 6))
                if losses[-1] <= min(losses):
                    best.load_state_dict(self.network_.state_dict())

        return Stage("embed", train_data, loss, [optimizer], [self.network_], epochs,
                     self.batch_size, schedule=one_cycle(), loss_is_sum=True,
                     start_epoch=start_epoch, end_epoch=end_epoch)

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
            raise IadkitError(f"clusters={self.clusters} exceeds the {len(data)} training images")
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
            1, nearest.view(-1, 1, 1, 1).expand(-1, 1, height, width))[:, 0]
        return positions, scores, pooled

    def raw_maps_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unsmoothed maps at the input size and the smoothed embedding (B, E, h, w)."""
        positions, _, pooled = self._position_scores(images)
        return upsampled(positions, images.shape[-2:]), pooled

    def _predict(self, images: torch.Tensor) -> Prediction:
        positions, scores, _ = self._position_scores(images)
        # Upsampling and smoothing as precomputed linear maps of the coarse grid: the same maps
        # as F.interpolate + gaussian_blur at a fraction of the cost, which keeps CSE's
        # inference close to its backbone's.
        maps = self._to_maps(positions, tuple(images.shape[-2:]), self.smoothing_sigma)
        return Prediction(maps, scores)

    # -- persistence --------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {**super()._state_tensors(), "centres": self.centres_}

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.centres_ = tensors.pop("centres")
        super()._load_state_tensors(tensors)
