"""Multi-scale feature maps on one grid (UniAD's neck; LafitE's input)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def align_features(features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Resize every stage bilinearly (``align_corners=True``, as the official ``MFCN`` neck does)
    to ``size`` and concatenate them along the channels."""
    return torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=True)
                      if tuple(f.shape[-2:]) != tuple(size) else f for f in features], dim=1)
