"""PatchCore: its detector and its locally aware patch features."""

from .patchcore import PatchCore

__all__ = ["PatchCore"]
