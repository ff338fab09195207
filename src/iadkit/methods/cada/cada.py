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

import shutil
import time
import warnings
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ... import distributed
from ...backbones import FeatureExtractor
from ...data.preprocess import Preprocess
from ...errors import ConfigError, IadkitError
from ...nn.anomaly_maps import SCORE_REDUCTIONS, image_scores, smooth_maps
from ...validation import Check, Choice, Flag, Mapping, Number, Optional, Text
from .. import get_method, register
from ..base import CONFIG_FILE, Detector, Prediction
from ..hyperparameters import hyperparameter
from ..training import Stage, Training, TrainingImages, load_module_states, module_state_tensors
from .networks import SPREADS, StatisticsRegressor, align_maps, map_statistics

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


def _is_base_name(name: object) -> bool:
    """A method name other than CADA's (whether it is registered is checked with the base's
    hyperparameters, when the registry is complete)."""
    return isinstance(name, str) and name != "cada"


@register
class CADA(Detector):
    """A base detector with class-agnostic score alignment.

    Example:
        >>> detector = CADA.from_preset("cpu").fit(train_loader)   # trains RD, then CADA
        >>> calibrated = CADA(base_checkpoint="runs/rd/unified", iterations=2000).fit(images)
    """

    name = "cada"
    summary = "class-agnostic alignment of a base detector's scores across categories"
    presets = {
        # A 1x1 regressor convolution: at 3x3 the 1344x1344 kernel on RD-cpu's embedding costs
        # about 1.5 s per CPU step.
        # lr 0.01: at the paper's 0.05 the regressor learnt little on RD-cpu's features
        # (docs/unified.md, the wide real pool).
        "cpu": dict(base="rd", base_preset="cpu", kernel_size=1, iterations=1000, lr=0.01),
        "paper": dict(base="rd", base_preset="paper", iterations=5000),
    }
    tiny_params = dict(image_size=64, base_params={"epochs": 1}, iterations=10)

    base: str = hyperparameter("rd", Check(_is_base_name, "a registered method other than "
                                           "cada", ["cada"]),
                               "registered name of the base method ('rd', 'uniad', ...)")
    base_preset: str = hyperparameter("cpu", Text(), "the base's preset")
    base_params: dict[str, Any] = hyperparameter({}, Mapping(), "hyperparameters of the base "
                                                 "that override its preset (and the paper's "
                                                 "changes)")
    paper_base_changes: bool = hyperparameter(True, Flag(), "apply the paper's changes to the "
                                              "base (RD: GELU decoder, mean of the level maps)")
    base_checkpoint: str | None = hyperparameter(
        None, Optional(Text()), "a saved, fitted base detector to calibrate instead of training "
        "one (base, base_preset and base_params are then ignored)")
    image_size: int | None = hyperparameter(None, Optional(Number(int, 1)), "overrides the "
                                            "base's image size (null keeps it)")
    crop_size: int | None = hyperparameter(None, Optional(Number(int, 1)), "overrides the "
                                           "base's centre crop (null keeps it)")
    alignment: str = hyperparameter("image", Choice(*ALIGNMENTS), "'image' (CADA: statistics "
                                    "regressed per image), 'class' (CaDA-A: per-category "
                                    "statistics, category given at test) or 'classifier' "
                                    "(CaDA-B)")
    spread: str = hyperparameter("max", Choice(*SPREADS), "'max' for (u, gamma) or 'sigma' for "
                                 "the (u, sigma) variant, gamma = u + k sigma")
    sigma_factor: float = hyperparameter(3.0, Number(float, 0, low_open=True), "k of the "
                                         "(u, sigma) variant")
    hidden_dim: int = hyperparameter(256, Number(int, 1), "the regressor's hidden width")
    dropout: float = hyperparameter(0.25, Number(float, 0, 1, high_open=True), "dropout "
                                    "before each linear layer")
    conv_layers: int = hyperparameter(1, Number(int, 0), "convolution blocks of the regressor")
    kernel_size: int = hyperparameter(3, Number(int, 1), "their kernel size")
    loss_beta: float | None = hyperparameter(
        None, Optional(Number(float, 0, low_open=True)), "smooth-L1 threshold; null takes the "
        "paper's value for the base (10 for UniAD, whose errors are large; 0.1 for the others)")
    iterations: int = hyperparameter(5000, Number(int, 1), "regressor optimisation steps "
                                     "(paper: 5000; 20000 with UniAD)")
    batch_size: int = hyperparameter(16, Number(int, 1), "regressor batch size")
    lr: float = hyperparameter(0.05, Number(float, 0, low_open=True), "SGD learning rate")
    momentum: float = hyperparameter(0.9, Number(float, 0, 1, high_open=True), "SGD momentum")
    weight_decay: float = hyperparameter(1e-4, Number(float, 0), "SGD weight decay")
    smoothing_sigma: float = hyperparameter(4.0, Number(float, 0), "Gaussian sigma applied "
                                            "after alignment")
    smoothing_kernel: int | None = hyperparameter(5, Optional(Number(int, 1)), "its kernel "
                                                  "size (as in the ReContrast code; null: "
                                                  "scipy's support)")
    score_reduction: str = hyperparameter("top_mean", Choice(*SCORE_REDUCTIONS), "image score: "
                                          "mean of the top pixels (the paper) or the max")
    top_fraction: float = hyperparameter(0.01, Number(float, 0, 1, low_open=True), "share of "
                                         "the highest pixels averaged")
    feature_cache_mb: float = hyperparameter(4096.0, Number(float, 0), "most memory the base's "
                                             "training features may take")
    checkpoint_every_s: float = hyperparameter(60.0, Number(float, 0), "seconds between "
                                               "training checkpoints (when fit gets a folder)")
    _base: Detector | None = None

    def _check_params(self) -> None:
        super()._check_params()
        if self.base_checkpoint is None:
            try:
                self._new_base()
            except ConfigError as error:
                raise self._refuse(f"its base: {error}") from None

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
                self._base = self._new_base()
        return self._base

    def _new_base(self) -> Detector:
        """The unfitted base that fit trains."""
        overrides = {k: v for k, v in (("image_size", self.image_size),
                                       ("crop_size", self.crop_size)) if v is not None}
        changes = PAPER_BASE_CHANGES.get(self.base, {}) if self.paper_base_changes else {}
        return get_method(self.base).from_preset(
            self.base_preset, **{**changes, **self.base_params, **overrides,
                                 "device": self.device, "seed": self.seed,
                                 "precision": self.precision})

    def check_resources(self) -> None:
        super().check_resources()
        self.base_detector.check_resources()

    def _check_preprocess(self, base: Detector) -> None:
        given = replace(base.preprocess, image_size=self.image_size or base.preprocess.image_size,
                        crop_size=self.crop_size or base.preprocess.crop_size)
        if given != base.preprocess:
            raise IadkitError(f"{self.base_checkpoint}: the saved base uses {base.preprocess}; "
                              "leave image_size and crop_size unset to calibrate it")

    @property
    def preprocess(self) -> Preprocess:
        return self.base_detector.preprocess

    @property
    def extractor(self) -> FeatureExtractor:
        """The base's backbone."""
        return self.base_detector.extractor  # type: ignore[attr-defined]

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
        distributed.barrier()  # under torchrun rank 0 removes what every rank may read
        if checkpoint_dir is not None and distributed.is_main() and Path(checkpoint_dir).exists():
            shutil.rmtree(checkpoint_dir)
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
        if saved is not None and distributed.is_main():
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

        def loss(indices: torch.Tensor, step: int) -> torch.Tensor:
            output = self.network_(features[indices].to(device))
            if classify:
                return F.cross_entropy(output, labels[indices].to(device))
            return F.smooth_l1_loss(output, statistics[indices].to(device), beta=beta,
                                    reduction="none").mean(dim=0).sum()

        optimizer = torch.optim.SGD(self.network_.parameters(), lr=self.lr,
                                    momentum=self.momentum, weight_decay=self.weight_decay)
        folder = Path(checkpoint_dir) / REGRESSOR_TRAINING if checkpoint_dir else None
        with Training({"network": self.network_}, {"regressor": optimizer}, folder, self.seed,
                      self.checkpoint_every_s, show_progress) as training:
            stage = Stage("regressor", data, loss, [optimizer], [self.network_], 1,
                          self.batch_size, self.iterations)
            training.run(stage)
        info: dict[str, Any] = {"steps": stage.steps[2], "loss_beta": beta,
                                "loss_history": training.history}
        if not classify:
            info["regressed_std"], info["target_std"] = self._check_regressor(features,
                                                                              statistics)
        return info

    def _check_regressor(self, features: torch.Tensor, statistics: torch.Tensor
                         ) -> tuple[list[float], list[float]]:
        """The spread of the regressed statistics over the training images, and of the
        targets; a warning when the regressor has learnt (almost) none of it. A learning rate
        too large for the features switches off hidden ReLUs for good, leaving a regressor
        that predicts one constant, or keeps it from settling near more than the overall mean:
        the alignment then does little (the paper's 0.05 on RD over the wide real pool: the
        regressed upper level varied 0.22 times as much as the true one, DeepPCB's mean 22 %
        low; 0.01 learnt it, see docs/unified.md)."""
        with torch.no_grad():
            outputs = torch.cat([self.network_(chunk.to(self.torch_device)).cpu()
                                 for chunk in features.split(256)])
        if len(outputs) < 2:  # one image has no spread to check
            return [0.0, 0.0], [0.0, 0.0]
        spread, target_spread = outputs.std(dim=0), statistics.std(dim=0)
        if bool((spread <= 1e-6 * outputs.abs().mean(dim=0)).all()):
            warnings.warn(f"CADA's regressor predicts the same statistics for every training "
                          f"image (its hidden units are all inactive), so it aligns nothing; "
                          f"train it with a smaller lr than {self.lr:g} (e.g. 0.01)",
                          stacklevel=2)
        elif bool((spread < 0.3 * target_spread).any()):
            warnings.warn(f"CADA's regressor has learnt little of the training images' "
                          f"statistics: its predictions vary {spread.tolist()}, the targets "
                          f"{target_spread.tolist()} (centre, upper level), so it aligns "
                          f"little; train it longer (iterations={self.iterations}) or with a "
                          f"smaller lr than {self.lr:g}",
                          stacklevel=2)
        return ([round(float(v), 6) for v in spread],
                [round(float(v), 6) for v in target_spread])

    def _build_network(self, channels: int, outputs: int) -> None:
        with self.seeded():
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
