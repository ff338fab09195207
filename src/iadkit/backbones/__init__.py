"""Frozen pretrained feature extractors and offline weight resolution."""

from .extractor import (
    ALIASES,
    FeatureExtractor,
    canonical_name,
    is_backbone_name,
    normalisation,
)
from .weights import ResolvedWeights, build_with_weights, missing_weights_message

__all__ = [
    "ALIASES",
    "FeatureExtractor",
    "ResolvedWeights",
    "build_with_weights",
    "canonical_name",
    "is_backbone_name",
    "missing_weights_message",
    "normalisation",
]
