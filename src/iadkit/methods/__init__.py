"""The detector registry: every method registers here under its name.

Example:
    >>> from iadkit.methods import available_methods, create_detector
    >>> "patchcore" in available_methods()
    True
    >>> create_detector("patchcore", preset="cpu", coreset_ratio=0.02).coreset_ratio
    0.02
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import BackboneDetector, Detector, Prediction

_REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator adding a detector to the registry under ``cls.name``.

    Raises:
        TypeError: the class does not define ``name`` itself (a subclass would otherwise take
            its parent's place), the name is taken, or the class lacks a "cpu" or "paper"
            preset, ``summary`` or ``tiny_params``, or a preset names an unknown hyperparameter.
    """
    if "name" not in vars(cls):
        raise TypeError(f"{cls.__name__} must define its own registry name (class attribute "
                        "'name'); it would take the place of the method it inherits from")
    if cls.name in _REGISTRY:
        raise TypeError(f"the method name {cls.name!r} is taken by "
                        f"{_REGISTRY[cls.name].__module__}.{_REGISTRY[cls.name].__name__}")
    missing = {"cpu", "paper"} - set(cls.presets)
    if missing:
        raise TypeError(f"{cls.__name__} must define the presets {sorted(missing)}")
    if not cls.summary or not cls.tiny_params:
        raise TypeError(f"{cls.__name__} must define 'summary' and 'tiny_params'")
    for preset, params in {**cls.presets, "tiny_params": cls.tiny_params}.items():
        unknown = sorted(set(params) - set(cls.hyperparameters))
        if unknown:
            raise TypeError(f"{cls.__name__}: {preset} names unknown hyperparameters {unknown}")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Detector]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available: {available_methods()}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def create_detector(name: str, preset: str = "cpu", **overrides: Any) -> Detector:
    """Build a registered detector from a preset, with hyperparameters overridden."""
    return get_method(name).from_preset(preset, **overrides)


# Importing the method packages registers them.
from . import (  # noqa: F401
    cada,
    cse,
    efficientad,
    lafite,
    padim,
    patchcore,
    reverse_distillation,
    simplenet,
    stfpm,
    uniad,
)

__all__ = ["BackboneDetector", "Detector", "Prediction", "available_methods",
           "create_detector", "get_method", "register"]
