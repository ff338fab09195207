"""EfficientAD: its detector and its networks (PDN, autoencoder)."""

from .efficientad import EfficientAD

__all__ = ["EfficientAD"]
