"""Small helpers every synthesizer uses: seeded uniform draws, torchvision's image functions."""

from __future__ import annotations

from typing import Any

import torch

from .._torchvision_compat import import_torchvision


def uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    """One float drawn uniformly from [low, high) with ``generator``."""
    return low + (high - low) * float(torch.rand((), generator=generator))


def chance(generator: torch.Generator, probability: float) -> bool:
    """True with the given probability."""
    return float(torch.rand((), generator=generator)) < probability


def tv_functional() -> Any:
    """torchvision's tensor image functions (imported through the CPU-torch workaround)."""
    import_torchvision()
    from torchvision.transforms.v2 import functional

    return functional
