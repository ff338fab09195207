"""PaDiM: its detector and its per-position Gaussians."""

from .padim import PaDiM

__all__ = ["PaDiM"]
