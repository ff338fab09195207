"""CADA's blocks (Guo et al., class-agnostic distribution alignment; METHODS.md §3.4).

Each category's normal images give anomaly maps on their own scale. CADA predicts, from an
image's features, where its normal scores sit (a centre ``u`` and an upper level ``gamma``) and
rescales the map so that normal scores of every category land near 0 (mean) and 1 (maximum).
"""

from __future__ import annotations

import torch
from torch import nn

from ...nn.precision import Network

SPREADS = ("max", "sigma")
#: The smallest span ``gamma - u`` a map is divided by.
MIN_SPAN = 1e-6


class StatisticsRegressor(Network):
    """Convolutions of the input's own width, global pooling, then two linear layers with
    dropout before each: (B, C, h, w) features -> (B, outputs).

    With two outputs it is CADA's regressor of (u, spread); with one output per class, the
    classifier of the class-aware reference CaDA-B (same structure, as in the paper).

    Args:
        channels: input (and convolution) width.
        outputs: output size.
        hidden: width of the hidden linear layer (256).
        dropout: dropout before both linear layers (0.25): the paper's noise injection.
        conv_layers: number of conv-BN-ReLU blocks (1; Table 3 of the paper).
        kernel_size: their kernel size (3).
    """

    def __init__(self, channels: int, outputs: int = 2, hidden: int = 256, dropout: float = 0.25,
                 conv_layers: int = 1, kernel_size: int = 3) -> None:
        super().__init__()
        convs: list[nn.Module] = []
        for _ in range(conv_layers):
            convs += [nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
                                bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, hidden),
                                  nn.ReLU(inplace=True), nn.Dropout(dropout),
                                  nn.Linear(hidden, outputs))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(features))

    def start_at(self, values: torch.Tensor) -> None:
        """Set the output bias (e.g. to the targets' mean): the regression then starts at the
        right scale, whatever the base model's score range."""
        with torch.no_grad():
            self.head[-1].bias.copy_(values)


def map_statistics(maps: torch.Tensor, spread: str = "max") -> torch.Tensor:
    """(B, H, W) maps -> (B, 2): each map's mean and its spread statistic, the maximum
    (CADA's (u, gamma)) or the standard deviation (the (u, sigma) variant)."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
    flat = maps.flatten(1)
    second = flat.amax(dim=1) if spread == "max" else flat.std(dim=1)
    return torch.stack([flat.mean(dim=1), second], dim=1)


def align_maps(maps: torch.Tensor, statistics: torch.Tensor, spread: str = "max",
               sigma_factor: float = 3.0) -> torch.Tensor:
    """Rescale (B, H, W) maps with per-image (B, 2) statistics so that the centre maps to 0
    and the upper level (gamma, or u + sigma_factor * sigma) to 1 (paper Eq. 1 and 5).

    The span is clamped to at least :data:`MIN_SPAN`, so that a regressor predicting an upper
    level at or below the centre cannot flip or blow up the map.
    """
    centre = statistics[:, 0]
    upper = statistics[:, 1] if spread == "max" else centre + sigma_factor * statistics[:, 1]
    span = (upper - centre).clamp_min(MIN_SPAN)
    return (maps - centre.view(-1, 1, 1)) / span.view(-1, 1, 1)
