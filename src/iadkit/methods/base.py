"""The one interface every anomaly detector implements.

A detector is built from its hyperparameters (scikit-learn style: everything in ``__init__``,
nothing learned there), learns in :meth:`Detector.fit` from normal images only, and returns
pixel anomaly maps and image scores from :meth:`Detector.predict`. :meth:`Detector.save` writes a
folder with ``detector.json`` (method, hyperparameters, fit metadata, calibration) and
``weights.safetensors`` (the learned tensors): no pickle anywhere.

To add a method: subclass :class:`Detector`, give it ``name`` and ``presets``, implement
``_fit``, ``_predict``, ``_state_tensors`` and ``_load_state_tensors``, and decorate it with
:func:`iadkit.methods.register`.
"""

from __future__ import annotations

import inspect
import json
import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..backbones import FeatureExtractor
from ..data.dataset import Preprocess
from ..errors import CheckpointError, IadkitError, NotFittedError

CHECKPOINT_FORMAT = "iadkit-detector"
CHECKPOINT_VERSION = 1
CONFIG_FILE = "detector.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class Prediction:
    """What a detector returns for a batch of images.

    Attributes:
        anomaly_maps: (B, H, W) float32, at the input images' resolution; higher = more anomalous.
        scores: (B,) float32 image anomaly scores.
    """

    anomaly_maps: torch.Tensor
    scores: torch.Tensor


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def image_batches(data: Iterable[Any] | torch.Tensor, batch_size: int = 16) -> Iterator[torch.Tensor]:
    """Image tensors from a tensor (split into batches) or an iterable of batches or dicts."""
    if isinstance(data, torch.Tensor):
        for start in range(0, data.shape[0], batch_size):
            yield data[start:start + batch_size]
        return
    for batch in data:
        yield batch["image"] if isinstance(batch, dict) else batch


class Detector(ABC):
    """Base class of all detectors. See the module docstring for the contract.

    Subclasses must accept at least ``image_size``, ``crop_size``, ``device``, ``seed``,
    ``backbone``, ``layers`` and ``backbone_weights`` in their constructor and store every
    constructor argument under the same attribute name.
    """

    name: ClassVar[str]
    #: Preset name -> constructor arguments. Every method has "cpu" and "paper".
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: One line for ``iadkit methods``.
    summary: ClassVar[str] = ""

    image_size: int
    crop_size: int | None
    device: str
    seed: int
    backbone: str
    layers: tuple[int | str, ...]
    backbone_weights: str
    #: Where the backbone's features are taken ("" = stage outputs); a constructor argument of
    #: the methods that expose it.
    feature_location: str = ""
    #: Whether :meth:`predict` needs each image's category (class-aware references only).
    needs_categories: bool = False
    #: Hyperparameters that only change inference: :meth:`set_inference_params` may change them
    #: on a fitted detector, and :func:`iadkit.engine.search_inference_params` searches them.
    inference_params: ClassVar[tuple[str, ...]] = ()
    #: The method's own search procedure, used by ``RunConfig(search="default")``: stages of
    #: ``{"param": name, "values": [...], "fixed": {other: value}}`` (see the engine).
    default_search: ClassVar[tuple[dict[str, Any], ...]] = ()
    #: The synthetic anomalies of the pseudo-validation set that search runs on
    #: (:func:`iadkit.synthesis.build_pseudo_validation`'s ``kind``).
    search_synthesis: ClassVar[str] = "fragments"
    _extractor: FeatureExtractor | None = None

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str = "cpu", **overrides: Any) -> Detector:
        """Build from a named preset, with some hyperparameters overridden.

        A preset's centre crop is a proportion of its image size: overriding ``image_size``
        alone scales ``crop_size`` with it (256 -> 224 becomes 64 -> 56). A dict-valued
        hyperparameter (e.g. CADA's ``base_params``) is updated with the override's keys.
        """
        if preset not in cls.presets:
            raise IadkitError(f"{cls.name} has no preset {preset!r}; presets: {sorted(cls.presets)}")
        base = cls.presets[preset]
        params = {**base, **overrides}
        for key, value in overrides.items():  # a dict hyperparameter is updated, not replaced
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                params[key] = {**base[key], **value}
        if "image_size" in overrides and "crop_size" not in overrides and base.get("crop_size"):
            params["crop_size"] = round(overrides["image_size"] * base["crop_size"]
                                        / base["image_size"])
        unknown = sorted(set(params) - set(cls.param_names()))
        if unknown:
            raise IadkitError(f"{cls.name} has no hyperparameter {unknown}; "
                              f"it has: {cls.param_names()}")
        try:
            detector = cls(**params)
        except (ValueError, TypeError) as error:  # a hyperparameter's value is refused
            raise IadkitError(f"{cls.name}: {error}") from None
        detector.preset = preset
        return detector

    @classmethod
    def param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [p for p in signature.parameters if p != "self"]

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments (JSON-friendly), as in scikit-learn."""
        return {name: _jsonable(getattr(self, name)) for name in self.param_names()}

    def set_inference_params(self, **values: Any) -> Detector:
        """Change inference-only hyperparameters (:attr:`inference_params`), also after fit.

        Example:
            >>> detector.set_inference_params(tau=300, k_neighbours=5)
        """
        unknown = sorted(set(values) - set(self.inference_params))
        if unknown:
            raise IadkitError(f"{self.name}: {unknown} cannot change after fit; inference "
                              f"parameters: {list(self.inference_params) or 'none'}")
        before = {name: getattr(self, name) for name in values}
        for name, value in values.items():
            setattr(self, name, value)
        try:
            self._check_inference_params()
        except ValueError as error:
            for name, value in before.items():
                setattr(self, name, value)
            raise IadkitError(f"{self.name}: {error}") from None
        return self

    def _check_inference_params(self) -> None:
        """Raise ValueError when the inference parameters are inconsistent (override)."""

    @property
    def preprocess(self) -> Preprocess:
        """How images must be resized/cropped before :meth:`predict`."""
        return Preprocess(self.image_size, self.crop_size)

    @property
    def extractor(self) -> FeatureExtractor:
        """The frozen backbone (``backbone``, ``layers``, ``backbone_weights``), built and its
        weights resolved on first use."""
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.backbone, self.layers, self.backbone_weights,
                                               feature_location=self.feature_location)
            self._extractor.to(self.torch_device)
        return self._extractor

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def is_fitted(self) -> bool:
        return getattr(self, "fit_info_", None) is not None

    # -- learning and inference ---------------------------------------------------------
    def fit(self, train: Iterable[Any] | torch.Tensor, show_progress: bool = False,
            checkpoint_dir: str | Path | None = None) -> Detector:
        """Learn from normal training images.

        Args:
            train: a tensor (N, 3, S, S) of images in [0, 1], or an iterable of batches
                (DataLoader of dicts with "image", and "category" where known, as made by
                :func:`iadkit.data.make_loader`).
            show_progress: show progress bars.
            checkpoint_dir: where methods that train for many epochs keep their training state;
                a fit interrupted and started again with the same folder resumes there, and
                gives the same model as an uninterrupted fit. The folder is removed at the end.
        """
        seed_everything(self.seed)
        self.fit_info_: dict[str, Any] | None = None
        self.fit_info_ = self._fit(train, show_progress, checkpoint_dir) or {}
        return self

    @torch.no_grad()
    def predict(self, images: torch.Tensor, categories: Sequence[str] | None = None
                ) -> Prediction:
        """Anomaly maps and scores for a batch of preprocessed images (B, 3, S, S) in [0, 1].

        ``categories`` (one per image) is used only by detectors that need it
        (:attr:`needs_categories`); the others ignore it.
        """
        if not self.is_fitted:
            raise NotFittedError(f"{self.name}: call fit() or load() before predict()")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        images = images.to(self.torch_device, torch.float32)
        if self.needs_categories:
            if categories is None or len(categories) != images.shape[0]:
                raise IadkitError(f"{self.name}: this configuration needs the category of "
                                  "every image at prediction time")
            prediction = self._predict(images, categories=list(categories))
        else:
            prediction = self._predict(images)
        if not torch.isfinite(prediction.scores).all() or not torch.isfinite(prediction.anomaly_maps).all():
            raise IadkitError(f"{self.name}: the model produced NaN or infinite scores")
        return Prediction(prediction.anomaly_maps.float().cpu(), prediction.scores.float().cpu())

    def raw_maps_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unsmoothed anomaly maps (B, S, S) of images already on the device, and a feature
        map (B, C, h, w) of the same images that score calibrators (CADA) regress from.

        Methods that can serve as a calibrated base override this; the choice of features is
        documented with each method.
        """
        raise IadkitError(f"{self.name} does not expose raw maps and features, so it cannot "
                          "be the base of a score calibrator")

    @abstractmethod
    def _fit(self, train: Iterable[Any] | torch.Tensor, show_progress: bool,
             checkpoint_dir: str | Path | None) -> dict[str, Any] | None:
        """Learn; return JSON-friendly facts about the fit (stored in the checkpoint)."""

    @abstractmethod
    def _predict(self, images: torch.Tensor) -> Prediction:
        """Maps and scores for images already on the detector's device."""

    @abstractmethod
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """The learned tensors to save."""

    @abstractmethod
    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`_state_tensors` returned (the detector is freshly constructed)."""

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the detector to the folder ``path`` (created if needed)."""
        from safetensors.torch import save_file

        if not self.is_fitted:
            raise NotFittedError(f"{self.name}: nothing to save before fit()")
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._state_tensors().items()}
        save_file(tensors, str(folder / WEIGHTS_FILE))
        config = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "method": self.name,
            "preset": getattr(self, "preset", None),
            "params": self.get_params(),
            "fit_info": self.fit_info_,
            "calibration": getattr(self, "calibration", None),
        }
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return folder

    @staticmethod
    def load(path: str | Path, device: str | None = None) -> Detector:
        """Load any saved detector; ``device`` overrides the saved one (e.g. "cpu")."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from . import get_method

        folder = Path(path)
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for needed in (config_path, weights_path):
            if not needed.is_file():
                raise CheckpointError(f"{needed}: missing; {folder} is not a saved detector")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{config_path}: not valid JSON ({error})") from None
        if config.get("format") != CHECKPOINT_FORMAT or config.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"{config_path}: not an iadkit detector of format version {CHECKPOINT_VERSION}"
            )
        params = dict(config["params"])
        if device is not None:
            params["device"] = device
        detector = get_method(config["method"])(**params)
        detector.preset = config.get("preset")
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{weights_path}: unreadable weights ({error})") from None
        # Detectors that wrap another one read how to rebuild it from their fit facts.
        detector.fit_info_ = config.get("fit_info") or {}
        detector._load_state_tensors({k: v.to(detector.torch_device) for k, v in tensors.items()})
        detector.calibration = config.get("calibration")
        return detector

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
