"""Synthetic anomalies for training and for pseudo-validation (METHODS.md §1.7-1.9, §5.3, §6.7).

Every generator takes a (3, H, W) image in [0, 1] and a seeded ``torch.Generator`` and returns a
:class:`SyntheticSample` (image, (H, W) mask of exact 0/1; an empty mask means "normal").

- :class:`DraemSynthesizer`: textures blended into Perlin regions (DRAEM, AAND).
- :class:`CutPasteSynthesizer`: CutPaste, Scar and 3-way.
- :class:`FragmentSynthesizer`: LafitE's shaped fragments from another normal image.
- :class:`CseDefectSynthesizer`: CSE's structural / textural / blur defects.
- :func:`foreground_mask`: keep defects on the object (per-category rules).
- :func:`build_pseudo_validation`: a labelled set from normal images, for hyperparameter choice.
"""

from .cse_defects import CseDefectSynthesizer, shuffle_grid
from .cutpaste import CutPasteSynthesizer, FragmentSynthesizer, paste_fragment, shape_mask
from .draem import DraemSynthesizer, SyntheticSample
from .foreground import FOREGROUND_RULES, foreground_mask, rule_for
from .perlin import perlin_mask, perlin_noise
from .pseudo_validation import (
    PSEUDO_VALIDATION_SYNTHESES,
    SYNTHESES,
    build_pseudo_validation,
    make_synthesizer,
    preview_grid,
)
from .textures import TEXTURE_OPERATIONS, TextureSource, augment_texture, procedural_texture

__all__ = [
    "FOREGROUND_RULES",
    "PSEUDO_VALIDATION_SYNTHESES",
    "SYNTHESES",
    "TEXTURE_OPERATIONS",
    "CseDefectSynthesizer",
    "CutPasteSynthesizer",
    "DraemSynthesizer",
    "FragmentSynthesizer",
    "SyntheticSample",
    "TextureSource",
    "augment_texture",
    "build_pseudo_validation",
    "foreground_mask",
    "make_synthesizer",
    "paste_fragment",
    "perlin_mask",
    "perlin_noise",
    "preview_grid",
    "procedural_texture",
    "rule_for",
    "shape_mask",
    "shuffle_grid",
]
