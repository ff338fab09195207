"""CSE: its detector, its embedder and decoder (:mod:`.networks`) and the k-means of its bank
(:mod:`.kmeans`)."""

from .cse import CSE

__all__ = ["CSE"]
