"""The one interface every anomaly detector implements.

A detector declares its hyperparameters in its class body (:func:`hyperparameter`), learns in
:meth:`Detector.fit` from normal images only, and returns pixel anomaly maps and image scores
from :meth:`Detector.predict`. :meth:`Detector.save` writes a folder with ``detector.json``
(method, hyperparameters, fit facts, calibration) and ``weights.safetensors`` (the learned
tensors): no pickle anywhere.

As in scikit-learn, the constructor only stores (and validates) the hyperparameters; what is
learned is set by ``fit`` under names ending in ``_``. Building or loading a detector never
touches the caller's random number generators, and ``fit`` draws only from its own, seeded by
``seed``.

To add a method: subclass :class:`BackboneDetector` (or :class:`Detector`), give it ``name``,
``summary``, ``presets`` and ``tiny_params``, declare its hyperparameters, implement ``_fit``,
``_predict``, ``_state_tensors`` and ``_load_state_tensors``, and decorate it with
:func:`iadkit.methods.register` (docs/architecture.md walks through it).
"""

from __future__ import annotations

import functools
import json
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..backbones import FeatureExtractor, is_backbone_name
from ..calibration import Calibration
from ..data.preprocess import GEOMETRIES, Preprocess
from ..errors import CheckpointError, ConfigError, DatasetError, IadkitError, NotFittedError
from ..files import read_json_record
from ..nn.precision import PRECISIONS, bfloat16_problem, cpu_has_bfloat16, network_precision
from ..synthesis.textures import TextureSource
from ..validation import Check, Choice, Either, Items, Number, Optional, Text
from .hyperparameters import (
    Hyperparameter,
    collect_hyperparameters,
    constructor_signature,
    hyperparameter,
)

log = logging.getLogger(__name__)

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


def image_batches(data: Iterable[Any] | torch.Tensor, batch_size: int = 16) -> Iterator[torch.Tensor]:
    """Image tensors from a tensor (split into batches) or an iterable of batches or dicts."""
    for images, _ in indexed_image_batches(data, batch_size):
        yield images


def indexed_image_batches(data: Iterable[Any] | torch.Tensor, batch_size: int = 16
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`image_batches` with each input's training index: a dict batch's ``index`` (the
    tiles of one image share their image's), else the input's position in the order given."""
    position = 0
    if isinstance(data, torch.Tensor):
        data = data.split(batch_size)
    for batch in data:
        images = batch["image"] if isinstance(batch, dict) else batch
        given = batch.get("index") if isinstance(batch, dict) else None
        indices = (torch.as_tensor(given).long() if given is not None
                   else torch.arange(position, position + images.shape[0]))
        position += images.shape[0]
        yield images, indices


@contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block with torch's (CPU and CUDA), NumPy's and Python's global generators seeded
    by ``seed``, and give them back to the caller as they were afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _is_device(value: Any) -> bool:
    return isinstance(value, str) and (value == "auto" or bool(torch.device(value).type))


class Detector(ABC):
    """Base class of all detectors. See the module docstring for the contract."""

    name: ClassVar[str]
    #: One line for ``iadkit methods``.
    summary: ClassVar[str] = ""
    #: Preset name -> hyperparameters. Every method has "cpu" and "paper".
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Hyperparameters (over the cpu preset) that fit a few 64-pixel images in seconds; the
    #: contract tests (tests/test_contract.py) run every registered method with them.
    tiny_params: ClassVar[dict[str, Any]] = {}
    #: Whether :meth:`predict` needs each image's category (class-aware references only).
    needs_categories: bool = False
    #: Whether :meth:`predict` needs :meth:`adapt_to_references` first: statistics of a few
    #: normal images of the subclass under test (Adapted-MoE with tta_statistics="reference").
    needs_references: bool = False
    #: Whether :meth:`predict_left_out` can score a training image as if the detector had been
    #: fitted without it (memory banks: leave its own entries out), which gives calibration
    #: scores for every training normal instead of a held-out share.
    supports_leave_one_out: ClassVar[bool] = False
    #: The method's own search procedure (``--search default``): stages of ``{"param": name,
    #: "values": [...], "fixed": {other: value}, "metric": key}`` (see iadkit.engine.search).
    default_search: ClassVar[tuple[dict[str, Any], ...]] = ()
    #: The synthetic anomalies of the pseudo-validation set a search runs on (a kind of
    #: :func:`iadkit.synthesis.build_pseudo_validation`).
    search_synthesis: ClassVar[str] = "fragments"
    #: All declared hyperparameters by name (parents' first), and those of them that only
    #: change inference; both are derived from the declarations.
    hyperparameters: ClassVar[dict[str, Hyperparameter]]
    inference_params: ClassVar[tuple[str, ...]]

    #: The preset the detector was built from (None when built from hyperparameters alone).
    preset: str | None = None
    #: The decision threshold, fitted by the engine on held-out normal images; saved with the
    #: detector and used wherever a score becomes a decision.
    calibration: Calibration | None = None
    #: Facts about the fit (JSON-friendly); None until fitted.
    fit_info_: dict[str, Any] | None = None

    device: str = hyperparameter("auto", Check(_is_device, "'auto', 'cpu', 'cuda', 'cuda:1' or "
                                               "another torch device", ["gpu0"]),
                                 "where the networks run")
    seed: int = hyperparameter(0, Number(int, 0), "seeds initialisation, batch order and every "
                               "random draw of fit")
    precision: str = hyperparameter(
        "f32", Choice(*PRECISIONS), "what the networks compute in: 'f32', or 'bf16' (bfloat16 "
        "autocast; the arithmetic on their outputs stays float32; see docs/performance.md)",
        inference=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.hyperparameters = collect_hyperparameters(cls)
        cls.inference_params = tuple(name for name, declared in cls.hyperparameters.items()
                                     if declared.inference)
        cls.__signature__ = constructor_signature(cls.hyperparameters)  # type: ignore[attr-defined]

    def __init__(self, **params: Any) -> None:
        """Store the hyperparameters (keyword arguments; the others keep their defaults).

        Raises:
            ConfigError: an unknown name, or a value its declaration does not allow.
        """
        unknown = sorted(set(params) - set(self.hyperparameters))
        if unknown:
            raise ConfigError(f"{self._label}: no hyperparameter {unknown}; it has: "
                              f"{list(self.hyperparameters)}")
        for name, declared in self.hyperparameters.items():
            setattr(self, name, self._checked(name, params.get(name, declared.default)))
        self._check_params()

    @property
    def _label(self) -> str:
        return getattr(self, "name", type(self).__name__)

    def _checked(self, name: str, value: Any) -> Any:
        try:
            return self.hyperparameters[name].rule.check(name, value)
        except ConfigError as error:
            raise ConfigError(f"{self._label}: {error}") from None

    def _check_params(self) -> None:
        """Raise :class:`ConfigError` when hyperparameters that are each allowed do not go
        together (override, calling ``super()``)."""

    def check_resources(self) -> None:
        """Check what a fit will need beyond the hyperparameters' values (backbone weights and
        stages, folders it reads), so that a bad run stops before any work; raises an
        :class:`IadkitError` naming the problem (override, calling ``super()``)."""
        self._check_precision()

    def _refuse(self, message: str) -> ConfigError:
        """A :class:`ConfigError` for this method: ``raise self._refuse("...")``."""
        return ConfigError(f"{self._label}: {message}")

    def _image_folder(self, option: str) -> TextureSource:
        """The images of the folder named by hyperparameter ``option`` (procedural textures
        when it is null); a missing or empty folder is refused naming the option."""
        try:
            return TextureSource(getattr(self, option))
        except DatasetError as error:
            raise self._refuse(f"{option}: {error}") from None

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str = "cpu", **overrides: Any) -> Detector:
        """Build from a named preset, with some hyperparameters overridden.

        A preset's centre crop is a proportion of its image size: overriding ``image_size``
        alone scales ``crop_size`` with it (256 -> 224 becomes 64 -> 56); choosing the
        ``letterbox`` or ``tile`` geometry drops it. A dict-valued
        hyperparameter (e.g. CADA's ``base_params``) is updated with the override's keys.
        """
        if preset not in cls.presets:
            raise ConfigError(f"{cls.name} has no preset {preset!r}; presets: "
                              f"{sorted(cls.presets)}")
        base = cls.presets[preset]
        params = {**base, **overrides}
        for key, value in overrides.items():  # a dict hyperparameter is updated, not replaced
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                params[key] = {**base[key], **value}
        if ("image_size" in overrides and "crop_size" not in overrides and base.get("crop_size")
                and isinstance(overrides["image_size"], int)):
            params["crop_size"] = round(overrides["image_size"] * base["crop_size"]
                                        / base["image_size"])
        if overrides.get("geometry", "resize") != "resize" and "crop_size" not in overrides:
            params.pop("crop_size", None)  # a letterboxed or tiled image is never cropped
        detector = cls(**params)
        detector.preset = preset
        return detector

    def get_params(self) -> dict[str, Any]:
        """The hyperparameters (JSON-friendly), as in scikit-learn."""
        return {name: _jsonable(getattr(self, name)) for name in self.hyperparameters}

    def set_inference_params(self, **values: Any) -> Detector:
        """Change hyperparameters that only change inference (:attr:`inference_params`), also
        after fit; nothing changes when one of them is refused.

        Example:
            >>> detector.set_inference_params(tau=300, k_neighbours=5)
        """
        unknown = sorted(set(values) - set(self.inference_params))
        if unknown:
            raise ConfigError(f"{self._label}: {unknown} cannot change after fit; inference "
                              f"parameters: {list(self.inference_params) or 'none'}")
        checked = {name: self._checked(name, value) for name, value in values.items()}
        before = {name: getattr(self, name) for name in values}
        for name, value in checked.items():
            setattr(self, name, value)
        try:
            self._check_params()
        except ConfigError:
            for name, value in before.items():
                setattr(self, name, value)
            raise
        return self

    def seeded(self) -> AbstractContextManager[None]:
        """A block whose random draws (network initialisation) come from ``seed`` alone and
        leave the caller's generators as they were."""
        return isolated_rng(self.seed)

    @property
    @abstractmethod
    def preprocess(self) -> Preprocess:
        """How images must be resized and cropped before :meth:`predict`."""

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def networks_in_precision(self) -> AbstractContextManager[None]:
        """A block in which this detector's networks compute in ``precision`` (see
        :mod:`iadkit.nn.precision`); :meth:`fit` and :meth:`predict` run in one.

        Raises:
            ConfigError: bfloat16 on a device that has none.
        """
        self._check_precision()
        return network_precision(self.precision, self.torch_device)

    def _check_precision(self) -> None:
        if self.precision != "bf16":
            return
        device = self.torch_device
        problem = bfloat16_problem(device)
        if problem is not None:
            raise self._refuse(f"precision='bf16': {problem}")
        if device.type == "cpu" and not cpu_has_bfloat16():
            _warn_slow_bfloat16()

    @property
    def is_fitted(self) -> bool:
        return self.fit_info_ is not None

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
        self.fit_info_ = None
        self.check_resources()
        with isolated_rng(self.seed), self.networks_in_precision():
            self.fit_info_ = self._fit(train, show_progress, checkpoint_dir) or {}
        return self

    @torch.no_grad()
    def predict(self, images: torch.Tensor | np.ndarray, categories: Sequence[str] | None = None
                ) -> Prediction:
        """Anomaly maps and scores for a batch of preprocessed images (B, 3, S, S) in [0, 1].

        ``categories`` (one per image) is used only by detectors that need it
        (:attr:`needs_categories`); the others ignore it.
        """
        if not self.is_fitted:
            raise NotFittedError(f"{self._label}: call fit() or load() before predict()")
        images = torch.as_tensor(images)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if self.torch_device.type == "cuda" and images.device.type == "cpu":
            images = images.pin_memory()  # the copy then runs while the host queues the work
        images = images.to(self.torch_device, torch.float32, non_blocking=True)
        with self.networks_in_precision():
            if self.needs_categories:
                if categories is None or len(categories) != images.shape[0]:
                    raise IadkitError(f"{self._label}: this configuration needs the category of "
                                      "every image at prediction time")
                prediction = self._predict(images, categories=list(categories))
            else:
                prediction = self._predict(images)
        if not torch.isfinite(prediction.scores).all() or not torch.isfinite(prediction.anomaly_maps).all():
            raise IadkitError(f"{self._label}: the model produced NaN or infinite scores")
        return Prediction(prediction.anomaly_maps.float().cpu(), prediction.scores.float().cpu())

    def adapt_to_references(self, references: Iterable[dict[str, torch.Tensor]]) -> Detector:
        """Adapt to the subclass about to be tested from batches of a few of its normal images
        (only detectors with :attr:`needs_references`)."""
        raise IadkitError(f"{self._label}: this detector does not adapt to reference images")

    @torch.no_grad()
    def predict_left_out(self, images: torch.Tensor | np.ndarray,
                         train_indices: Sequence[int] | torch.Tensor) -> Prediction:
        """Predictions for training images, each as if the detector had been fitted without it
        (out-of-sample normal scores for calibration; see :attr:`supports_leave_one_out`).

        Args:
            images: (B, 3, S, S) training images, preprocessed as for :meth:`predict`.
            train_indices: each image's training index: its batch's ``index`` in the data
                :meth:`fit` was given (the tiles of one image share it), or its position in
                the order it came when the data had none.
        """
        if not self.supports_leave_one_out:
            raise IadkitError(f"{self._label} cannot leave a training image out after fit; "
                              "calibrate on held-out normals instead")
        if not self.is_fitted:
            raise NotFittedError(f"{self._label}: call fit() or load() before predict_left_out()")
        images = torch.as_tensor(images).to(self.torch_device, torch.float32)
        with self.networks_in_precision():
            prediction = self._predict_left_out(images, torch.as_tensor(train_indices).long())
        return Prediction(prediction.anomaly_maps.float().cpu(), prediction.scores.float().cpu())

    def _predict_left_out(self, images: torch.Tensor, train_indices: torch.Tensor) -> Prediction:
        raise NotImplementedError

    def raw_maps_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unsmoothed anomaly maps (B, S, S) of images already on the device, and a feature
        map (B, C, h, w) of the same images that score calibrators (CADA) regress from.

        Methods that can serve as a calibrated base override this; the choice of features is
        documented with each method.
        """
        raise IadkitError(f"{self._label} does not expose raw maps and features, so it cannot "
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
        """Restore what :meth:`_state_tensors` returned (the detector is freshly constructed,
        its ``fit_info_`` already read)."""

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the detector to the folder ``path`` (created if needed)."""
        from safetensors.torch import save_file

        if not self.is_fitted:
            raise NotFittedError(f"{self._label}: nothing to save before fit()")
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._state_tensors().items()}
        save_file(tensors, str(folder / WEIGHTS_FILE))
        config = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "method": self.name,
            "preset": self.preset,
            "params": self.get_params(),
            "fit_info": self.fit_info_,
            "calibration": self.calibration.to_dict() if self.calibration else None,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return folder

    @staticmethod
    def load(path: str | Path, device: str | None = None,
             accept_backbone_change: bool = False, precision: str | None = None) -> Detector:
        """Load any saved detector; ``device`` and ``precision`` override the saved ones (e.g.
        "cpu", "bf16").

        The backbone weights found now must be the file the detector was fitted with (their
        SHA-256 is compared with the one recorded at fit); ``accept_backbone_change`` loads
        anyway, for a user who knows the new file is equivalent.

        Raises:
            CheckpointError: a missing, unreadable or damaged file (the file and the field
                named), a saved hyperparameter this version does not allow, or tensors that do
                not fit the model (checked by predicting one grey image).
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from . import get_method

        folder = Path(path)
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for needed in (config_path, weights_path):
            if not needed.is_file():
                raise CheckpointError(f"{needed}: missing; {folder} is not a saved detector")
        config = read_json_record(config_path, {"method": str, "params": dict})
        if config.get("format") != CHECKPOINT_FORMAT or config.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"{config_path}: not an iadkit detector of format version {CHECKPOINT_VERSION}"
            )
        params = dict(config["params"])
        if device is not None:
            params["device"] = device
        if precision is not None:  # an override is the caller's, not the file's, mistake
            params["precision"] = Detector.hyperparameters["precision"].rule.check("precision",
                                                                                   precision)
        try:
            detector = get_method(config["method"])(**params)
        except ConfigError as error:
            raise CheckpointError(f"{config_path}: damaged or from another version, field "
                                  f"'params': {error}") from None
        detector.preset = config.get("preset")
        try:
            detector.calibration = Calibration.from_dict(config.get("calibration"))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(f"{config_path}: damaged, field 'calibration': "
                                  f"{type(error).__name__} {error}") from None
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{weights_path}: unreadable weights ({error})") from None
        # Detectors that wrap another one read how to rebuild it from their fit facts.
        detector.fit_info_ = config.get("fit_info") or {}
        try:
            detector._load_state_tensors({k: v.to(detector.torch_device)
                                          for k, v in tensors.items()})
            detector._probe()
        # (faiss checks a query's width with an assert)
        except (KeyError, RuntimeError, ValueError, IndexError, AssertionError) as error:
            raise CheckpointError(f"{weights_path}: the saved tensors do not fit the "
                                  f"{detector.name} model of {config_path.name} "
                                  f"({type(error).__name__}: {error})") from None
        if not accept_backbone_change:
            detector._check_backbone(config_path)
        return detector

    def _check_backbone(self, config_path: Path) -> None:
        """Raise :class:`CheckpointError` when the backbone weights in use are not the ones
        recorded at fit (detectors with a backbone override this)."""

    def _probe(self) -> None:
        """Predict one plain grey image, so that weights that do not fit the model (a tensor
        missing or of the wrong shape) fail at load, not at the first real prediction."""
        if self.needs_categories:
            return
        size = self.preprocess.output_size
        self.predict(torch.full((1, 3, size, size), 0.5))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


Detector.hyperparameters = collect_hyperparameters(Detector)
Detector.inference_params = tuple(name for name, declared in Detector.hyperparameters.items()
                                  if declared.inference)


@functools.cache
def _warn_slow_bfloat16() -> None:
    """Say once that this CPU computes bfloat16 without matrix instructions for it."""
    log.warning("precision='bf16' on a CPU without bfloat16 instructions (AVX512-BF16 or AMX): "
                "the networks will run slower than in float32")


#: A backbone stage: a timm ``out_indices`` index or a module name ("layer2").
LAYER = Either(Number(int, 0), Text())


class BackboneDetector(Detector):
    """A detector on the features of a frozen pretrained backbone (every method but CADA)."""

    backbone: str = hyperparameter(
        "tf_efficientnet_lite0",
        Check(is_backbone_name, "a timm model name or an alias such as 'lite0' or 'wrn50'",
              ["no_such_network"]),
        "timm name or alias of the frozen feature extractor")
    layers: tuple[int | str, ...] = hyperparameter(
        (1, 2, 3), Items(LAYER, min_length=1), "backbone stages used, fine to coarse (timm "
        "out_indices or module names)")
    backbone_weights: str = hyperparameter(
        "pretrained", Text(), "'pretrained', a weight file, or 'random' (shape tests only)")
    feature_location: str = hyperparameter(
        "", Choice("", "expansion"), "'' for the stages' outputs, 'expansion' for "
        "EfficientNet's activated inner features (see FeatureExtractor)")
    image_size: int = hyperparameter(256, Number(int, 1), "images are resized to this square")
    crop_size: int | None = hyperparameter(None, Optional(Number(int, 1)),
                                           "centre crop after resizing (null: none)")
    geometry: str = hyperparameter(
        "resize", Choice(*GEOMETRIES), "how an image becomes the network's square input: "
        "'resize' (squash), 'letterbox' (keep the aspect ratio, pad), 'tile' (overlapping tiles "
        "at native resolution, maps stitched); see docs/usage.md")
    tile_size: int | None = hyperparameter(
        None, Optional(Number(int, 8)), "tile side in the image's own pixels, each tile resized "
        "to image_size (null: image_size, native scale; smaller magnifies)")
    tile_overlap: float = hyperparameter(
        0.25, Number(float, 0.0, 1.0, high_open=True), "fraction of a tile shared with its neighbour")
    max_map_side: int = hyperparameter(
        1024, Number(int, 8), "a tiled image's anomaly map (and evaluation) is at most this "
        "many pixels on its longer side", inference=True)
    _extractor: FeatureExtractor | None = None

    def _check_params(self) -> None:
        super()._check_params()
        if self.crop_size is not None and self.crop_size > self.image_size:
            raise self._refuse(f"crop_size={self.crop_size} is larger than image_size="
                               f"{self.image_size}")
        try:
            self.preprocess  # noqa: B018 (building it checks the geometry's options together)
        except ValueError as error:
            raise self._refuse(str(error)) from None

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.image_size, self.crop_size, self.geometry, self.tile_size,
                          self.tile_overlap, self.max_map_side)

    def check_resources(self) -> None:
        super().check_resources()
        self.extractor  # noqa: B018 (building it resolves the weights and checks the stages)

    @property
    def extractor(self) -> FeatureExtractor:
        """The frozen backbone, built and its weights resolved on first use."""
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.backbone, self.layers, self.backbone_weights,
                                               feature_location=self.feature_location)
            self._extractor.to(self.torch_device)
        return self._extractor

    def backbone_facts(self) -> dict[str, Any]:
        """Where the backbone's weights came from (for the fit facts)."""
        return {"backbone_weights": vars(self.extractor.resolved_weights)}

    def _check_backbone(self, config_path: Path) -> None:
        recorded = (self.fit_info_ or {}).get("backbone_weights") or {}
        expected, found = recorded.get("sha256"), self.extractor.resolved_weights.sha256
        if expected and found and expected != found:
            raise CheckpointError(
                f"{config_path}: this detector was fitted with backbone weights of SHA-256 "
                f"{expected[:12]}..., but {self.extractor.resolved_weights.location} has "
                f"{found[:12]}...; its scores and threshold would not hold. Use the original "
                "weights, or accept the change explicitly (--accept-backbone-change)")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
