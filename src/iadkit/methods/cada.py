"""CADA: class-agnostic distribution alignment (Guo et al.; METHODS.md §3), a plug-in that puts
the anomaly maps of every category on one scale.

A base detector trained on the normal images of many categories scores each category on its own
scale, so one threshold over all of them (the absolute-unified setting) fails. CADA freezes the
base, and trains a small regressor to predict from an image's base features the mean ``u`` and
the maximum ``gamma`` of that image's own (normal) anomaly map. At test time each map becomes
``(map - u_hat) / (gamma_hat - u_hat)``, then it is smoothed and the image score is the mean of
its top 1%. No class label is used.

Two class-aware references replace the regressor (``alignment``):

- ``"class"`` (CaDA-A): per-category mean statistics of the training maps; the category of every
  test image must be given (an upper reference, not a deployable model).
- ``"classifier"`` (CaDA-B): a classifier of the regressor's structure, trained with the training
  categories, picks the category whose statistics are used.

Any detector implementing :meth:`Detector.raw_maps_and_features` can be the base: reverse
distillation and AAND (bottleneck embedding), ReContrast (the frozen half's embedding), UniAD
(encoder tokens), PatchCore and SimpleNet (patch features).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..backbones import FeatureExtractor
from ..data.dataset import Preprocess
from ..errors import IadkitError
from ..nn.cada import SPREADS, StatisticsRegressor, align_maps, map_statistics
from ..nn.reverse_distillation import image_scores, smooth_maps
from . import get_method, register
from .base import CONFIG_FILE, Detector, Prediction
from .training import (
    TrainingCheckpoint,
    TrainingImages,
    load_module_states,
    module_state_tensors,
    run_stage,
    step_schedule,
)

ALIGNMENTS = ("image", "class", "classifier")
#: Subfolders of a fit's checkpoint folder: the base's training state, the trained base (kept
#: so that an interruption during the regressor's training loses nothing), the regressor's state.
BASE_TRAINING, BASE_FOLDER, REGRESSOR_TRAINING = "base", "base_detector", "regressor"
#: The paper's changes to a base ("GELU replaces ReLU in the decoder for better training
#: stability"; level maps averaged, as in the ReContrast code its evaluation comes from).
#: ReContrast's defaults already are these.
PAPER_BASE_CHANGES: dict[str, dict[str, Any]] = {
    "rd": {"decoder_activation": "gelu", "map_reduction": "mean"},
}
#: The paper's smooth-L1 threshold per base, "according to the scale of their anomaly scores".
PAPER_LOSS_BETA = {"uniad": 10.0}
DEFAULT_LOSS_BETA = 0.1


@register
class CADA(Detector):
    """A base detector with class-agnostic score alignment.

    Args:
        base: registered name of the base method ("rd", "recontrast", "uniad", ...).
        base_preset: the base's preset.
        base_params: hyperparameters of the base that override its preset (and the paper's
            changes).
        paper_base_changes: apply the paper's changes to the base (RD: GELU decoder, mean of
            the level maps; see :data:`PAPER_BASE_CHANGES`).
        base_checkpoint: a saved, fitted base detector to calibrate instead of training one
            (``base``, ``base_preset`` and ``base_params`` are then ignored).
        image_size: overrides the base's image size (None keeps it).
        crop_size: overrides the base's centre crop (None keeps it).
        alignment: "image" (CADA: statistics regressed per image), "class" (CaDA-A:
            per-category statistics, category given at test) or "classifier" (CaDA-B).
        spread: "max" for (u, gamma) or "sigma" for the (u, sigma) variant, gamma = u + k sigma.
        sigma_factor: k of the (u, sigma) variant (3).
        hidden_dim: the regressor's hidden width (256).
        dropout: dropout before each linear layer (0.25).
        conv_layers: convolution blocks of the regressor (1).
        kernel_size: their kernel size (3).
        loss_beta: smooth-L1 threshold; None takes the paper's value for the base (10 for
            UniAD, whose errors are large; 0.1 for the others).
        iterations: regressor optimisation steps (paper: 5000; 20000 with UniAD).
        batch_size: regressor batch size (16).
        lr: SGD learning rate (0.05).
        momentum: SGD momentum (0.9).
        weight_decay: SGD weight decay (1e-4).
        smoothing_sigma: Gaussian sigma applied after alignment (4).
        smoothing_kernel: its kernel size (5, as in the ReContrast code; None = scipy support).
        score_reduction: "top_mean" (the paper) or "max".
        top_fraction: share of the highest pixels averaged (0.01).
        feature_cache_mb: keep the base's training features in memory when they fit.
        checkpoint_every_s: seconds between training checkpoints (when fit gets a folder).
        device: "auto", "cpu", "cuda", ...
        seed: seeds the regressor's initialisation, dropout and batch order.

    Example:
        >>> detector = CADA.from_preset("cpu").fit(train_loader)   # trains RD, then CADA
        >>> calibrated = CADA(base_checkpoint="runs/rd/unified", iterations=2000).fit(images)
    """

    name = "cada"
    summary = "class-agnostic alignment of a base detector's scores across categories"
    presets = {
        # A 1x1 regressor convolution: at 3x3 the 1344x1344 kernel on RD-cpu's embedding costs
        # about 1.5 s per CPU step.
        "cpu": dict(base="rd", base_preset="cpu", kernel_size=1, iterations=1000),
        "paper": dict(base="rd", base_preset="paper", iterations=5000),
    }

    def __init__(
        self,
        base: str = "rd",
        base_preset: str = "cpu",
        base_params: dict[str, Any] | None = None,
        paper_base_changes: bool = True,
        base_checkpoint: str | None = None,
        image_size: int | None = None,
        crop_size: int | None = None,
        alignment: str = "image",
        spread: str = "max",
        sigma_factor: float = 3.0,
        hidden_dim: int = 256,
        dropout: float = 0.25,
        conv_layers: int = 1,
        kernel_size: int = 3,
        loss_beta: float | None = None,
        iterations: int = 5000,
        batch_size: int = 16,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        smoothing_sigma: float = 4.0,
        smoothing_kernel: int | None = 5,
        score_reduction: str = "top_mean",
        top_fraction: float = 0.01,
        feature_cache_mb: float = 4096,
        checkpoint_every_s: float = 60.0,
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
        if spread not in SPREADS:
            raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
        if base == self.name:
            raise ValueError("the base of CADA cannot be CADA")
        self.base = base
        self.base_preset = base_preset
        self.base_params = dict(base_params or {})
        self.paper_base_changes = paper_base_changes
        self.base_checkpoint = base_checkpoint
        self.image_size = image_size
        self.crop_size = crop_size
        self.alignment = alignment
        self.spread = spread
        self.sigma_factor = sigma_factor
        self.hidden_dim = hidden_dim
        self.dropout = dropout
        self.conv_layers = conv_layers
        self.kernel_size = kernel_size
        self.loss_beta = loss_beta
        self.iterations = iterations
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.smoothing_sigma = smoothing_sigma
        self.smoothing_kernel = smoothing_kernel
        self.score_reduction = score_reduction
        self.top_fraction = top_fraction
        self.feature_cache_mb = feature_cache_mb
        self.checkpoint_every_s = checkpoint_every_s
        self.device = device
        self.seed = seed
        self._base: Detector | None = None

    # -- the base -----------------------------------------------------------------------------
    @property
    def needs_categories(self) -> bool:  # type: ignore[override]
        return self.alignment == "class"

    @property
    def base_detector(self) -> Detector:
        """The base: fitted after :meth:`fit` or :meth:`load`; before, the unfitted one that
        fit will train (or the loaded ``base_checkpoint``)."""
        if self._base is None:
            if self.base_checkpoint is not None:
                self._base = Detector.load(self.base_checkpoint, device=self.device)
                self._check_preprocess(self._base)
            else:
                overrides = {k: v for k, v in (("image_size", self.image_size),
                                               ("crop_size", self.crop_size)) if v is not None}
                changes = PAPER_BASE_CHANGES.get(self.base, {}) if self.paper_base_changes else {}
                self._base = get_method(self.base).from_preset(
                    self.base_preset, **{**changes, **self.base_params, **overrides,
                                         "device": self.device, "seed": self.seed})
        return self._base

    def _check_preprocess(self, base: Detector) -> None:
        given = Preprocess(self.image_size or base.preprocess.image_size,
                           self.crop_size or base.preprocess.crop_size)
        if given != base.preprocess:
            raise IadkitError(f"{self.base_checkpoint}: the saved base uses {base.preprocess}; "
                              "leave image_size and crop_size unset to calibrate it")

    @property
    def preprocess(self) -> Preprocess:
        return self.base_detector.preprocess

    @property
    def extractor(self) -> FeatureExtractor:
        """The base's backbone."""
        return self.base_detector.extractor

    # -- training -----------------------------------------------------------------------------
    def _fit(self, train: Iterable[Any] | torch.Tensor, show_progress: bool,
             checkpoint_dir: str | Path | None) -> dict[str, Any]:
        started = time.perf_counter()
        data = TrainingImages.collect(train)
        base = self._fitted_base(data, show_progress, checkpoint_dir)
        base_seconds = time.perf_counter() - started
        features, statistics = self._base_outputs(base, data)
        classes = sorted(set(data.categories))
        labels = torch.tensor([classes.index(c) for c in data.categories])
        if self.alignment != "image" and (len(classes) < 2 or "" in classes):
            raise IadkitError(f"alignment={self.alignment!r} needs at least two named "
                              f"training categories; got {classes}")
        # Per-category statistics: the mean of the images' own statistics (CaDA-A and -B).
        self.class_statistics_ = torch.stack(
            [statistics[labels == k].mean(dim=0) for k in range(len(classes))])
        info: dict[str, Any] = {}
        if self.alignment != "class":
            info = self._train_network(data, features, statistics, labels, len(classes),
                                       show_progress, checkpoint_dir)
        TrainingCheckpoint(checkpoint_dir).clear()
        return {
            "n_train_images": len(data),
            "base": {"method": base.name, "preset": getattr(base, "preset", None),
                     "params": base.get_params(), "fit_info": base.fit_info_},
            "classes": classes,
            "feature_channels": int(features.shape[1]),
            "train_statistics_mean": [round(float(v), 6) for v in statistics.mean(dim=0)],
            "seconds_base": round(base_seconds, 2),
            **info,
            "seconds_training": round(time.perf_counter() - started, 2),
        }

    def _fitted_base(self, data: TrainingImages, show_progress: bool,
                     checkpoint_dir: str | Path | None) -> Detector:
        """The base, fitted (or loaded); frozen from here on."""
        if self.base_checkpoint is not None:
            return self.base_detector
        saved = Path(checkpoint_dir) / BASE_FOLDER if checkpoint_dir is not None else None
        if saved is not None and (saved / CONFIG_FILE).is_file():
            # An interrupted fit already trained the base: keep it.
            self._base = Detector.load(saved, device=self.device)
            return self._base
        base = self.base_detector
        base.fit(data.batches(self.batch_size), show_progress=show_progress,
                 checkpoint_dir=Path(checkpoint_dir) / BASE_TRAINING if checkpoint_dir else None)
        if saved is not None:
            base.save(saved)
        return base

    def _base_outputs(self, base: Detector, data: TrainingImages
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's features (kept on the CPU) and each image's map statistics."""
        device = self.torch_device
        features, statistics = [], []
        with torch.no_grad():
            for indices in data.in_order(self.batch_size):
                maps, feature = base.raw_maps_and_features(data.get(indices, device))
                features.append(feature.float().cpu())
                statistics.append(map_statistics(maps.float(), self.spread).cpu())
                if len(features) == 1:
                    per_image = feature[0].numel() * 4
                    if per_image * len(data) > self.feature_cache_mb * 2**20:
                        raise IadkitError(
                            f"the base's features of {len(data)} training images need "
                            f"{per_image * len(data) / 2**20:.0f} MB, over feature_cache_mb="
                            f"{self.feature_cache_mb}; raise it or train on fewer images")
        return torch.cat(features), torch.cat(statistics)

    def _train_network(self, data: TrainingImages, features: torch.Tensor,
                       statistics: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       show_progress: bool, checkpoint_dir: str | Path | None) -> dict[str, Any]:
        """SGD on the regressor (smooth L1 to the statistics) or the classifier (cross
        entropy to the categories)."""
        device = self.torch_device
        classify = self.alignment == "classifier"
        beta = self.loss_beta
        if beta is None:
            beta = PAPER_LOSS_BETA.get(self.base_detector.name, DEFAULT_LOSS_BETA)
        self._build_network(features.shape[1], num_classes if classify else 2)
        if not classify:
            self.network_.start_at(statistics.mean(dim=0).to(device))
        optimizer = torch.optim.SGD(self.network_.parameters(), lr=self.lr,
                                    momentum=self.momentum, weight_decay=self.weight_decay)
        optimizers = {"regressor": optimizer}
        folder = Path(checkpoint_dir) / REGRESSOR_TRAINING if checkpoint_dir else None
        checkpoint = TrainingCheckpoint(folder, self.checkpoint_every_s)
        history = checkpoint.restore({"network": self.network_}, optimizers) or {}
        epochs, steps_per_epoch, total_steps = step_schedule(len(data), self.batch_size, 1,
                                                             self.iterations)

        def run_epoch(epoch: int) -> float:
            self.network_.train()
            total, count = 0.0, 0
            for offset, indices in enumerate(data.epoch_batches(self.batch_size, self.seed, epoch)):
                if epoch * steps_per_epoch + offset >= total_steps:
                    break
                output = self.network_(features[indices].to(device))
                if classify:
                    loss = F.cross_entropy(output, labels[indices].to(device))
                else:
                    target = statistics[indices].to(device)
                    loss = F.smooth_l1_loss(output, target, beta=beta,
                                            reduction="none").mean(dim=0).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(indices)
                count += len(indices)
            return total / max(count, 1)

        run_stage("regressor", epochs, run_epoch, history, self.seed, checkpoint,
                  {"network": self.network_}, optimizers, show_progress)
        self.network_.eval()
        info: dict[str, Any] = {"steps": total_steps, "loss_beta": beta, "loss_history": history}
        if not classify:
            info["regressed_std"] = self._check_regressor(features)
        return info

    def _check_regressor(self, features: torch.Tensor) -> list[float]:
        """The spread of the regressed statistics over the training images; a warning when it
        is nil. A learning rate too large for the features can switch off every hidden ReLU
        for good, leaving a regressor that predicts one constant: the alignment then does
        nothing (seen with the paper's 0.05 on a few dozen images; 0.01 trained well)."""
        with torch.no_grad():
            outputs = torch.cat([self.network_(chunk.to(self.torch_device)).cpu()
                                 for chunk in features.split(256)])
        if len(outputs) < 2:  # one image has no spread to check
            return [0.0, 0.0]
        spread = outputs.std(dim=0)
        if bool((spread <= 1e-6 * outputs.abs().mean(dim=0)).all()):
            warnings.warn(f"CADA's regressor predicts the same statistics for every training "
                          f"image (its hidden units are all inactive), so it aligns nothing; "
                          f"train it with a smaller lr than {self.lr:g} (e.g. 0.01)",
                          stacklevel=2)
        return [round(float(v), 6) for v in spread]

    def _build_network(self, channels: int, outputs: int) -> None:
        torch.manual_seed(self.seed)
        self.network_ = StatisticsRegressor(channels, outputs, self.hidden_dim, self.dropout,
                                            self.conv_layers, self.kernel_size)
        self.network_.to(self.torch_device)

    # -- inference ----------------------------------------------------------------------------
    def image_statistics(self, features: torch.Tensor,
                         categories: list[str] | None = None) -> torch.Tensor:
        """(B, 2) statistics each image's map is aligned with: regressed (CADA), of the
        given category (CaDA-A) or of the classified one (CaDA-B)."""
        if self.alignment == "image":
            return self.network_(features)
        if self.alignment == "classifier":
            return self.class_statistics_[self.network_(features).argmax(dim=1)]
        classes = self.fit_info_["classes"]
        unknown = sorted(set(categories or []) - set(classes))
        if unknown:
            raise IadkitError(f"categories {unknown} were not in training; known: {classes}")
        return self.class_statistics_[[classes.index(c) for c in categories or []]]

    def _predict(self, images: torch.Tensor, categories: list[str] | None = None) -> Prediction:
        if self.alignment != "class":
            self.network_.eval()
        maps, features = self.base_detector.raw_maps_and_features(images)
        statistics = self.image_statistics(features, categories)
        aligned = align_maps(maps, statistics, self.spread, self.sigma_factor)
        aligned = smooth_maps(aligned, self.smoothing_sigma, self.smoothing_kernel)
        return Prediction(aligned, image_scores(aligned, self.score_reduction, self.top_fraction))

    # -- persistence --------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"base.{k}": v for k, v in self.base_detector._state_tensors().items()}
        tensors["class_statistics"] = self.class_statistics_
        if self.alignment != "class":
            tensors.update(module_state_tensors({"network": self.network_}))
        return tensors

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        saved = self.fit_info_["base"]
        base = get_method(saved["method"])(**{**saved["params"], "device": self.device})
        base.preset = saved["preset"]
        base._load_state_tensors({k[len("base."):]: v for k, v in tensors.items()
                                  if k.startswith("base.")})
        base.fit_info_ = saved["fit_info"]
        self._base = base
        self.class_statistics_ = tensors["class_statistics"]
        if self.alignment != "class":
            outputs = len(self.fit_info_["classes"]) if self.alignment == "classifier" else 2
            self._build_network(self.fit_info_["feature_channels"], outputs)
            load_module_states({"network": self.network_}, tensors)
