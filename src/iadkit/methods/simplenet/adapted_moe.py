"""Adapted-MoE (METHODS.md §2): SimpleNet experts per subclass, a routing network with subclass
centres, and test-time adaption (TTA) toward the chosen experts.

Training needs the subclass of every normal training image (a ``subclasses.csv`` column, or
the category when several are mixed; see :mod:`iadkit.data.settings`). Each subclass gets its
own SimpleNet head, trained on its own images; a routing network learns an L2-normalised image
embedding with centre loss + cross-entropy over the subclass labels. At test time an image is
routed to the k experts whose centres are most similar, its patch features are re-styled toward
each expert's training statistics, and the experts' score maps are averaged with the routing
weights.

Design decisions the paper leaves open (all options, defaults from METHODS.md):

- TTA acts on every patch feature with per-channel statistics over the test image's positions
  (AdaIN-style), mapped to the per-channel mean and std of the expert's training patches.
- TTA is a test-time step, as the paper describes it: experts train on their features as they
  are (L2-normalised with ``use_norm``). ``tta_in_training=True`` re-styles the training
  features the same way as the test ones; on unseen ELPV mono cells that made a discriminator
  whose ranking of test images turned over (docs/simplenet.md, "Why test-time
  adaption failed on unseen mono cells").
- Eq. 6's L2 normalisation of adapted features rescales them to the norm of the expert's
  training features, so SimpleNet's noise keeps its size relative to them.
- Centres start at the subclass means of the untrained router's embeddings, then follow the
  centre-loss update (rate 0.5) after every step.
- ``expert_choice="references"`` (our addition, not the paper's): for a subclass the router
  never saw, the one expert that scores a few of its normal images lowest takes every image
  of it (:meth:`AdaptedMoE.adapt_to_references`). On real unseen subclasses the routing's
  mixture scored below SimpleNet; the expert so chosen is above it in mean image AUROC, not in
  pixel AUROC (docs/simplenet.md, items 6 and 7).

With ``use_moe=False`` and ``use_tta=False`` the detector is exactly SimpleNet.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ...errors import IadkitError, NotFittedError
from ...validation import Choice, Flag, Number
from .. import register
from ..hyperparameters import hyperparameter
from ..training import FrozenFeatures, TrainingImages, load_module_states
from .mixture import (
    ROUTING_SCORES,
    TTA_STATISTICS,
    RoutingNetwork,
    adapt_statistics,
    rescale_to_expert_norm,
    top_k_weights,
)
from .simplenet import SimpleNet

ROUTING_LOSSES = ("center", "softmax")
ASSIGNMENTS = ("label", "routed")
EXPERT_CHOICES = ("routing", "references")


class ExpertStatistics(nn.Module):
    """Per-channel mean and std of each expert's training patch features (buffers)."""

    def __init__(self, num_experts: int, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_experts, channels))
        self.register_buffer("std", torch.ones(num_experts, channels))

    @torch.no_grad()
    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """From (features (B, C, h, w), expert labels (B,)) batches, in float64 sums."""
        count = torch.zeros(self.mean.shape[0], dtype=torch.float64, device=self.mean.device)
        total = torch.zeros_like(self.mean, dtype=torch.float64)
        squares = torch.zeros_like(total)
        for features, labels in batches:
            values = features.double()
            positions = values.shape[2] * values.shape[3]
            count.index_add_(0, labels, torch.full_like(labels, positions, dtype=torch.float64))
            total.index_add_(0, labels, values.sum(dim=(2, 3)))
            squares.index_add_(0, labels, values.pow(2).sum(dim=(2, 3)))
        mean = total / count[:, None]
        variance = (squares - count[:, None] * mean.pow(2)) / (count[:, None] - 1).clamp_min(1)
        self.mean.copy_(mean.float())
        self.std.copy_(variance.clamp_min(0).sqrt().float())


class ReferenceScores(nn.Module):
    """Each expert's mean image score over a few normal images of the subclass under test
    (a buffer); the lowest one's expert takes the subclass (``expert_choice="references"``)."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.register_buffer("scores", torch.zeros(num_experts))

    @property
    def chosen(self) -> int:
        """The index of the expert that finds the references most normal."""
        return int(self.scores.argmin())


@register
class AdaptedMoE(SimpleNet):
    """Adapted-MoE anomaly detector (SimpleNet experts, routing, test-time adaption).

    Example:
        >>> detector = AdaptedMoE.from_preset("cpu").fit(loader_with_subclasses)
        >>> detector.routing_weights(images)  # (B, n_subclasses)
    """

    name = "adapted_moe"
    summary = "SimpleNet experts per subclass, centre-loss routing, test-time adaption"
    presets = SimpleNet.presets
    tiny_params = SimpleNet.tiny_params

    use_moe: bool = hyperparameter(True, Flag(), "one expert per training subclass with "
                                   "routing (false: one expert for all)")
    use_tta: bool = hyperparameter(True, Flag(), "re-style test (and training) features toward "
                                   "the expert's statistics")
    use_norm: bool = hyperparameter(True, Flag(), "L2-normalise the routing embedding and the "
                                    "adapted features (Eq. 6)")
    top_k: int = hyperparameter(4, Number(int, 1), "experts fused per image (capped at the "
                                "number of experts)")
    routing_loss: str = hyperparameter("center", Choice(*ROUTING_LOSSES), "'center' (centre "
                                       "loss + cross-entropy) or 'softmax' (cross-entropy only)")
    center_weight: float = hyperparameter(0.5, Number(float, 0), "alpha of the routing loss")
    center_rate: float = hyperparameter(0.5, Number(float, 0, 1), "centre update rate alpha_c")
    routing_lr: float = hyperparameter(1e-4, Number(float, 0), "AdamW learning rate of the "
                                       "routing network")
    routing_scores: str = hyperparameter("centre", Choice(*ROUTING_SCORES), "'centre' (cosine "
                                         "to the subclass centres) or 'classifier' (logits)")
    routing_temperature: float = hyperparameter(1.0, Number(float, 0, low_open=True),
                                                "softmax temperature of the routing weights")
    tta_statistics: str = hyperparameter("channel", Choice(*TTA_STATISTICS), "see "
                                         "adapt_statistics; 'reference': from a few normal "
                                         "images of the subclass under test "
                                         "(adapt_to_references)")
    tta_in_training: bool = hyperparameter(False, Flag(), "also re-style the experts' "
                                           "training features (false: test time only, as "
                                           "in the paper)")
    expert_assignment: str = hyperparameter("label", Choice(*ASSIGNMENTS), "train each image's "
                                            "expert by its 'label' or by 'routed' (nearest "
                                            "centre)")
    expert_choice: str = hyperparameter("routing", Choice(*EXPERT_CHOICES), "'routing' (top-k "
                                        "per image, the paper) or 'references': the one expert "
                                        "scoring a few normal images of the subclass under "
                                        "test lowest (adapt_to_references)")

    def _check_params(self) -> None:
        super()._check_params()
        if self.expert_choice == "references" and not self.use_moe:
            raise self._refuse("expert_choice='references' chooses among the experts of "
                               "use_moe=True; with use_moe=False there is one")

    # -- experts ------------------------------------------------------------------------------
    def _expert_names(self, data: TrainingImages) -> list[str]:
        if not self.use_moe:
            return ["all"] * len(data)
        names = [sub or category for sub, category in zip(data.subclasses, data.categories)]
        if any(not name for name in names):
            raise IadkitError("adapted_moe: training images need a subclass (a subclasses.csv "
                              "column, or several categories) when use_moe=True")
        return names

    def _create_networks(self, num_experts: int) -> None:
        super()._create_networks(num_experts)
        self.statistics_ = ExpertStatistics(num_experts, self.feature_dim).to(self.torch_device)
        self.reference_: ExpertStatistics | None = None
        self.reference_scores_: ReferenceScores | None = None
        if self.use_moe:
            self.router_ = RoutingNetwork(self.feature_dim, num_experts, self.use_norm)
            self.router_.to(self.torch_device)

    def _trained_modules(self) -> dict[str, nn.Module]:
        modules = {**super()._trained_modules(), "statistics": self.statistics_}
        if self.use_moe:
            modules["router"] = self.router_
        if self.reference_ is not None:
            modules["reference"] = self.reference_
        if self.reference_scores_ is not None:
            modules["reference_scores"] = self.reference_scores_
        return modules

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        optimizers = super()._make_optimizers()
        if self.use_moe:
            optimizers["router"] = torch.optim.AdamW(self.router_.parameters(),
                                                     lr=self.routing_lr)
        return optimizers

    def _training_batches(self, features: FrozenFeatures, data: TrainingImages,
                          labels: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features, labels) of the whole training set in order, on the device."""
        for indices in data.in_order(self.batch_size):
            yield features(indices)[0], labels[indices].to(self.torch_device)

    @torch.no_grad()
    def _prepare_experts(self, features: FrozenFeatures, data: TrainingImages,
                         labels: torch.Tensor) -> None:
        """Expert statistics for TTA; routing centres from the untrained router's embeddings."""
        self.statistics_.fit(self._training_batches(features, data, labels))
        if not self.use_moe:
            return
        sums = torch.zeros_like(self.router_.centres)
        counts = torch.zeros(sums.shape[0], device=sums.device)
        for batch, batch_labels in self._training_batches(features, data, labels):
            sums.index_add_(0, batch_labels, self.router_(batch))
            counts.index_add_(0, batch_labels, torch.ones_like(batch_labels, dtype=sums.dtype))
        self.router_.centres.copy_(sums / counts.clamp_min(1)[:, None])

    def _expert_inputs(self, features: torch.Tensor, expert: int) -> torch.Tensor:
        if not self.use_tta:
            return features
        reference = None
        if self.tta_statistics == "reference":
            if self.reference_ is None:
                raise self._not_adapted("tta_statistics='reference' re-styles from")
            reference = (self.reference_.mean[0], self.reference_.std[0])
        return adapt_statistics(features, self.statistics_.mean[expert],
                                self.statistics_.std[expert], self.tta_statistics,
                                normalize=self.use_norm, reference=reference)

    def _expert_training_inputs(self, features: torch.Tensor, expert: int) -> torch.Tensor:
        mean, std = self.statistics_.mean[expert], self.statistics_.std[expert]
        if not self.use_tta:
            return features
        if not self.tta_in_training:
            return rescale_to_expert_norm(features, mean, std) if self.use_norm else features
        if self._restyles_from_references:
            # A training image belongs to its expert's subclass, whose statistics are the
            # expert's own.
            return adapt_statistics(features, mean, std, "reference", normalize=self.use_norm,
                                    reference=(mean, std))
        return self._expert_inputs(features, expert)

    def _batch_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.use_moe:
            return super()._batch_loss(features, labels)
        embeddings = self.router_(features)
        alpha = self.center_weight if self.routing_loss == "center" else 0.0
        routing = self.router_.loss(embeddings, labels, alpha)
        if self.expert_assignment == "routed":
            labels = self.router_.routing_scores(embeddings.detach(), "centre").argmax(dim=1)
        self._last_embeddings = embeddings.detach()
        return routing + super()._batch_loss(features, labels)

    def _after_step(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if self.use_moe and self.routing_loss == "center":
            self.router_.update_centres(self._last_embeddings, labels, self.center_rate)

    # -- test-time references -----------------------------------------------------------------
    @property
    def needs_references(self) -> bool:  # type: ignore[override]
        """Whether a few normal images of the subclass under test choose the expert
        (``expert_choice="references"``) or give TTA its statistics (``use_tta`` with
        ``tta_statistics="reference"``): :meth:`adapt_to_references` comes before predict."""
        return self.expert_choice == "references" or self._restyles_from_references

    @property
    def _restyles_from_references(self) -> bool:
        return self.use_tta and self.tta_statistics == "reference"

    def _not_adapted(self, what_it_does: str) -> IadkitError:
        return IadkitError(f"{self._label}: {what_it_does} normal images of the subclass under "
                           "test: call adapt_to_references first (the run setting "
                           "reference_normals does it)")

    @torch.no_grad()
    def adapt_to_references(self, references: Iterable[dict[str, torch.Tensor]]
                            ) -> AdaptedMoE:
        """Adapt to the subclass about to be tested from a few of its normal images.

        With ``tta_statistics="reference"``, the per-channel mean and std of their patch
        features stand in for each test image's own in TTA (which include its defect;
        docs/simplenet.md, "Why test-time adaption failed on unseen mono cells": one to
        sixteen images sufficed there). With ``expert_choice="references"``, every expert
        scores them (after its TTA, if any) and the one with the lowest mean image score takes
        every image from then on: each discriminator is trained to the same margin, so a
        lower score says that expert finds the new subclass more normal. Both are saved with
        the detector, so a model adapted once to a new product variant can be deployed as it
        is.

        Args:
            references: batches (``make_loader`` dicts with an ``"image"`` entry) of
                preprocessed normal images of one subclass; a few, they are held in memory.

        Example:
            >>> detector.adapt_to_references(make_loader(variant_normals, detector.preprocess))
        """
        if not self.is_fitted:
            raise NotFittedError(f"{self._label}: call fit() or load() before "
                                 "adapt_to_references()")
        if not self.needs_references:
            raise IadkitError(f"{self._label}: adapt_to_references needs "
                              "expert_choice='references', or use_tta=True and "
                              "tta_statistics='reference'")
        with self.networks_in_precision():
            features = [self.patch_features(batch["image"].to(self.torch_device))
                        for batch in references]
            if not features:
                raise IadkitError(f"{self._label}: adapt_to_references was given no images")
            if self._restyles_from_references:
                statistics = ExpertStatistics(1, self.feature_dim).to(self.torch_device)
                statistics.fit((batch, torch.zeros(len(batch), dtype=torch.long,
                                                   device=batch.device)) for batch in features)
                self.reference_ = statistics
            if self.expert_choice == "references":
                for module in self._trained_modules().values():
                    module.eval()
                choice = ReferenceScores(len(self.experts_)).to(self.torch_device)
                count = sum(len(batch) for batch in features)
                for expert in range(len(self.experts_)):
                    total = sum(float(self._expert_patch_scores(batch, expert).flatten(1).amax(1)
                                      .sum()) for batch in features)
                    choice.scores[expert] = total / count
                self.reference_scores_ = choice
        return self

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super()._load_state_tensors(tensors)
        if any(key.startswith("reference.") for key in tensors):
            self.reference_ = ExpertStatistics(1, self.feature_dim).to(self.torch_device)
            load_module_states({"reference": self.reference_}, tensors)
        if any(key.startswith("reference_scores.") for key in tensors):
            self.reference_scores_ = ReferenceScores(len(self.experts_)).to(self.torch_device)
            load_module_states({"reference_scores": self.reference_scores_}, tensors)

    def _probe(self) -> None:
        # A model still waiting for its references has weights to check all the same: probe
        # with the first expert's own statistics as the reference, and the first expert.
        waiting_statistics = self._restyles_from_references and self.reference_ is None
        waiting_choice = self.expert_choice == "references" and self.reference_scores_ is None
        if waiting_statistics:
            self.reference_ = self.statistics_
        if waiting_choice:
            self.reference_scores_ = ReferenceScores(len(self.experts_)).to(self.torch_device)
        try:
            super()._probe()
        finally:
            if waiting_statistics:
                self.reference_ = None
            if waiting_choice:
                self.reference_scores_ = None

    # -- inference ----------------------------------------------------------------------------
    def _expert_weights(self, features: torch.Tensor) -> torch.Tensor:
        if not self.use_moe:
            return super()._expert_weights(features)
        if self.expert_choice == "references":
            if self.reference_scores_ is None:
                raise self._not_adapted("expert_choice='references' takes the expert from")
            weights = features.new_zeros(features.shape[0], len(self.experts_))
            weights[:, self.reference_scores_.chosen] = 1.0
            return weights
        scores = self.router_.routing_scores(self.router_(features), self.routing_scores)
        return top_k_weights(scores, self.top_k, self.routing_temperature)

    @torch.no_grad()
    def routing_weights(self, images: torch.Tensor) -> torch.Tensor:
        """(B, n_experts) fusion weights of preprocessed images; columns follow
        :attr:`expert_names`. Each row sums to 1 (one-hot on the chosen expert with
        ``expert_choice="references"``)."""
        for module in self._trained_modules().values():
            module.eval()
        return self._expert_weights(self.patch_features(images.to(self.torch_device))).cpu()
