"""CADA: the score-alignment plug-in over any base detector, and its regressor
(:mod:`.networks`)."""

from .cada import CADA

__all__ = ["CADA"]
