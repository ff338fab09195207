"""What UniAD and LafitE (which builds on it) share: a network trained to rebuild the frozen
multi-scale features of normal images, aligned on one grid. The anomaly map is the
reconstruction error, upsampled and smoothed; the image score the maximum of its
average-pooled map. Both can first edit every feature vector with its nearest training feature
vectors (LafitE's feature editing, :mod:`iadkit.nn.feature_editing`; "UniAD w/ F.E." in
LafitE's Table 4).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from ..nn.anomaly_maps import gaussian_blur, pooled_max_scores, upsampled
from ..nn.feature_editing import WEIGHT_NORMS, EditingBank
from ..nn.knn import BACKEND_RULE
from ..nn.multiscale import align_features
from ..validation import Choice, Flag, Items, Number, Optional
from .base import Prediction
from .hyperparameters import hyperparameter
from .training import Stage, TrainedDetector, Training, TrainingImages, step_decay


class FeatureReconstruction(TrainedDetector):
    """The shared hyperparameters, schedule, editing bank and scoring of UniAD and LafitE."""

    layers = (0, 1, 2, 3)
    image_size = 224
    feature_editing: bool = hyperparameter(True, Flag(), "edit the features with their nearest "
                                           "training features first", inference=True)
    k_neighbours: int = hyperparameter(3, Number(int, 1), "K of feature editing",
                                       inference=True)
    weight_norm: str = hyperparameter("sum_to_one", Choice(*WEIGHT_NORMS), "editing weights "
                                      "(see iadkit.nn.feature_editing)", inference=True)
    coreset_ratio: float = hyperparameter(0.1, Number(float, 0, 1, low_open=True), "share of "
                                          "training feature vectors kept in the editing bank")
    projection_dim: int | None = hyperparameter(128, Optional(Number(int, 1)), "random-"
                                                "projection dimension of the coreset's "
                                                "distances (null: none)")
    knn_backend: str = hyperparameter("auto", BACKEND_RULE, "nearest-neighbour search (all "
                                      "exact)")
    max_steps: int | None = hyperparameter(None, Optional(Number(int, 1)), "train for this "
                                           "many optimisation steps instead of epochs")
    lr: float = hyperparameter(1e-4, Number(float, 0, low_open=True), "AdamW learning rate")
    weight_decay: float = hyperparameter(1e-4, Number(float, 0), "AdamW weight decay")
    lr_milestones: tuple[float, ...] = hyperparameter(
        (0.8,), Items(Number(float, 0, 1)), "fractions of training after which the rate is "
        "multiplied by lr_gamma")
    lr_gamma: float = hyperparameter(0.1, Number(float, 0, low_open=True), "the decay factor")
    grad_clip: float = hyperparameter(0.0, Number(float, 0), "clip the gradients' global norm "
                                      "to this (0: off)")
    score_pool: int = hyperparameter(16, Number(int, 1), "side of the average pooling before "
                                     "the image score's maximum", inference=True)
    smoothing_sigma: float = hyperparameter(4.0, Number(float, 0), "Gaussian sigma of the map "
                                            "smoothing (0: off)", inference=True)
    bank_: EditingBank | None = None
    #: Whether the token-grid errors are upsampled with aligned corners (UniAD's code upsamples
    #: with ``nn.UpsamplingBilinear2d``, which aligns them; LafitE here does not).
    align_corners: bool = False

    def _check_params(self) -> None:
        super()._check_params()
        if self.feature_editing and self.is_fitted and self.bank_ is None:
            raise self._refuse("feature_editing needs the bank built by a fit with "
                               "feature_editing=True")

    @property
    @abstractmethod
    def feature_grid(self) -> tuple[int, int]:
        """The grid every backbone stage is resized to."""

    @abstractmethod
    def _reconstructor(self) -> torch.nn.Module:
        """The trained network."""

    def aligned_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, C, H, W) frozen stage features on :attr:`feature_grid`."""
        with torch.no_grad():
            return align_features(self.extractor(images), self.feature_grid)

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"reconstruct": torch.optim.AdamW(self._reconstructor().parameters(), lr=self.lr,
                                                 weight_decay=self.weight_decay)}

    def _reconstruct(self, name: str, data: TrainingImages, training: Training,
                     loss: Callable[[torch.Tensor, int], torch.Tensor]) -> dict[str, Any]:
        """Run the training stage ``name``; its facts."""
        stage = Stage(name, data, loss, [training.optimizers["reconstruct"]],
                      [self._reconstructor()], self.epochs, self.batch_size, self.max_steps,
                      schedule=step_decay(self.lr_milestones, self.lr_gamma),
                      clip_norm=self.grad_clip)
        training.run(stage)
        return {"steps": stage.steps[2]}

    def build_bank(self, features: torch.Tensor, show_progress: bool) -> None:
        """The editing bank from (N, C, H, W) training features."""
        self.bank_ = EditingBank.build(features, self.coreset_ratio, self.projection_dim,
                                       self.seed, self.knn_backend, show_progress)

    def edited(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) features edited when ``feature_editing`` is on, else as they are."""
        if not self.feature_editing:
            return features
        assert self.bank_ is not None
        return self.bank_.edit(features, self.k_neighbours, self.weight_norm)

    def error_maps(self, errors: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, H, W) errors on the token grid -> the unsmoothed (B, *size) anomaly maps."""
        return upsampled(errors, size, self.align_corners)

    def scored(self, raw_maps: torch.Tensor) -> Prediction:
        """Unsmoothed (B, S, S) maps -> the smoothed maps and their image scores (the maximum
        of the average-pooled map)."""
        maps = gaussian_blur(raw_maps, self.smoothing_sigma)
        return Prediction(maps, pooled_max_scores(maps, self.score_pool))

    def _predict(self, images: torch.Tensor) -> Prediction:
        return self.scored(self.raw_maps_and_features(images)[0])

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super()._state_tensors()
        if self.bank_ is not None:
            tensors["editing_bank"] = self.bank_.vectors
        return tensors

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        bank = tensors.pop("editing_bank", None)
        self.bank_ = None if bank is None else EditingBank(bank, self.knn_backend)
        super()._load_state_tensors(tensors)
