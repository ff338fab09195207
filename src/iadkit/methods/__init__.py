"""The detector registry: every method registers here under its name.

Example:
    >>> from iadkit.methods import create_detector, available_methods
    >>> detector = create_detector("patchcore", preset="cpu", coreset_ratio=0.02)
"""

from __future__ import annotations

from typing import Any

from ..errors import IadkitError
from .base import Detector, Prediction

_REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator adding a detector to the registry under ``cls.name``."""
    missing = {"cpu", "paper"} - set(cls.presets)
    if missing:
        raise TypeError(f"{cls.__name__} must define the presets {sorted(missing)}")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Detector]:
    if name not in _REGISTRY:
        raise IadkitError(f"unknown method {name!r}; available: {available_methods()}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def create_detector(name: str, preset: str = "cpu", **overrides: Any) -> Detector:
    """Build a registered detector from a preset, with hyperparameters overridden."""
    return get_method(name).from_preset(preset, **overrides)


# Importing the method modules registers them.
from . import (  # noqa: F401
    aand,
    adapted_moe,
    cada,
    cse,
    lafite,
    patchcore,
    recontrast,
    reverse_distillation,
    simplenet,
    uniad,
)

__all__ = ["Detector", "Prediction", "available_methods", "create_detector", "get_method", "register"]
