"""STFPM: its detector and its student network."""

from .stfpm import STFPM

__all__ = ["STFPM"]
