"""Synthetic anomalies for training and for pseudo-validation (METHODS.md §1.7-1.9).

So far: Perlin masks, texture sources with DRAEM's augmentations, and the DRAEM synthesizer.
"""

from .draem import DraemSynthesizer, SyntheticSample
from .perlin import perlin_mask, perlin_noise
from .textures import TEXTURE_OPERATIONS, TextureSource, augment_texture, procedural_texture

__all__ = [
    "DraemSynthesizer", "SyntheticSample", "TEXTURE_OPERATIONS", "TextureSource",
    "augment_texture", "perlin_mask", "perlin_noise", "procedural_texture",
]
