"""LafitE: its detector and its feature diffusion model (:mod:`.diffusion`)."""

from .lafite import LafitE

__all__ = ["LafitE"]
