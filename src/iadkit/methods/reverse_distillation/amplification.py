"""AAND's residual anomaly amplification (RAA) and its stage-1 losses (METHODS.md §4.2-4.3).

One :class:`ResidualAmplifier` sits on each teacher level, in parallel (the next teacher stage
still sees the vanilla features). It adds a gated residual to the teacher's features:

    F_A = F_T + w * Delta,   Delta = tanh(MLP_2(F_T)) * F_T          (attribute-scaling residual)
    w   = sum of the softmax weights of the L anomaly memory items     (matching-guided gate)

where the softmax (temperature 0.2) runs over the cosine similarities between the query
``MLP_1(F_T + position encoding)`` and L normal plus L anomaly learnable memory items.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...nn.precision import Network, network_method


def position_encoding(channels: int, height: int, width: int,
                      device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2-D sinusoidal encoding (C, H, W), CFlow style: the first half of the channels
    encodes x (sin on even, cos on odd channels), the second half y."""
    encoding = torch.zeros(channels, height, width, device=device)
    half = channels // 2
    for start, size, positions, axis in ((0, half, width, 2), (half, channels - half, height, 1)):
        pairs = (size + 1) // 2
        frequencies = torch.exp(torch.arange(pairs, device=device, dtype=torch.float32)
                                * (-2.0 * math.log(1e4) / max(size, 1)))
        angles = torch.arange(positions, device=device, dtype=torch.float32)[:, None] * frequencies
        waves = torch.stack([angles.sin(), angles.cos()], dim=2).flatten(1)[:, :size]  # (P, size)
        shape = (size, 1, width) if axis == 2 else (size, height, 1)
        encoding[start:start + size] = waves.t().reshape(shape)
    return encoding


def _pointwise_mlp(channels: int, hidden: int) -> nn.Sequential:
    """C -> hidden -> hidden -> C with ReLUs, applied at every position (1x1 convolutions)."""
    return nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(),
                         nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                         nn.Conv2d(hidden, channels, 1))


class ResidualAmplifier(Network):
    """RAA for one teacher level: matching-guided residual gate + attribute-scaling residual.

    Args:
        channels: the level's channel width.
        num_memory: L, the number of normal and of anomaly memory items (50).
        temperature: softmax temperature of the memory matching (0.2).
        hidden: MLP hidden width (default ``min(2 * channels, 1024)``).

    Example:
        >>> amplifier = ResidualAmplifier(256)
        >>> amplified, gate = amplifier(features)  # gate (B, 1, H, W) in [0, 1]
    """

    def __init__(self, channels: int, num_memory: int = 50, temperature: float = 0.2,
                 hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or min(2 * channels, 1024)
        self.num_memory = num_memory
        self.temperature = temperature
        self.query = _pointwise_mlp(channels, hidden)
        self.attributes = _pointwise_mlp(channels, hidden)
        # First L rows: normal items; last L rows: anomaly items.
        self.memory = nn.Parameter(torch.randn(2 * num_memory, channels))

    @network_method
    def gate(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1, H, W): the summed softmax weight of the anomaly items."""
        channels, height, width = features.shape[1:]
        position = position_encoding(channels, height, width, features.device)
        query = F.normalize(self.query(features + position), dim=1)
        memory = F.normalize(self.memory, dim=1)
        similarity = torch.einsum("bchw,mc->bmhw", query, memory)
        weights = torch.softmax(similarity / self.temperature, dim=1)
        return weights[:, self.num_memory:].sum(dim=1, keepdim=True)

    @network_method
    def residual(self, features: torch.Tensor) -> torch.Tensor:
        """The attribute-scaling residual tanh(MLP(F)) * F."""
        return torch.tanh(self.attributes(features)) * features

    def forward(self, features: torch.Tensor, gate: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplified features and the gate used; pass ``gate`` to override the predicted one
        (the ground-truth mask during stage-1 training, ones for the "no gate" ablation)."""
        if gate is None:
            gate = self.gate(features)
        return features + gate * self.residual(features), gate


def downsample_mask(mask: torch.Tensor, size: tuple[int, int], threshold: float = 0.3
                    ) -> torch.Tensor:
    """(B, H, W) 0/1 mask -> (B, 1, h, w) 0/1: adaptive average pooling, then ``> threshold``."""
    pooled = F.adaptive_avg_pool2d(mask.unsqueeze(1).float(), size)
    return (pooled > threshold).float()


def gate_focal_loss(gate: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
                    alpha: float = 0.8, eps: float = 1e-6) -> torch.Tensor:
    """Binary focal loss of the gate against the downsampled anomaly mask (mean over positions);
    ``alpha`` weighs the anomaly class."""
    p = gate.clamp(eps, 1 - eps)
    loss = (-alpha * (1 - p) ** gamma * target * torch.log(p)
            - (1 - alpha) * p ** gamma * (1 - target) * torch.log(1 - p))
    return loss.mean()


def amplification_loss(amplified: torch.Tensor, teacher: torch.Tensor, anomalous: torch.Tensor,
                       normal: torch.Tensor, margin: float = 0.3, max_normal: int = 5000,
                       max_anomalous: int = 1000, generator: torch.Generator | None = None
                       ) -> torch.Tensor:
    """AAND Eq. 7-8 with the dynamic margin: push amplified anomalous patches away from the
    batch's normal patches until their cosine similarity is ``margin`` below the vanilla one.

    Args:
        amplified: (B, C, H, W) amplified features (ground-truth gated).
        teacher: (B, C, H, W) vanilla teacher features.
        anomalous: (B, 1, H, W) 0/1 positions of synthetic anomalies.
        normal: (B, 1, H, W) 0/1 positions used as normal references (normal and foreground).
        margin: alpha, the required drop in similarity.
        max_normal, max_anomalous: random subsets of at most this many patches (official code).
        generator: for the subsets.

    Returns:
        mean over anomalous x normal pairs of ReLU(s(F_A^a, F_T^n) - (s(F_T^a, F_T^n) - margin));
        zero when the batch has no anomalous or no normal patch.
    """
    channels = teacher.shape[1]
    flat_teacher = teacher.permute(0, 2, 3, 1).reshape(-1, channels)
    flat_amplified = amplified.permute(0, 2, 3, 1).reshape(-1, channels)
    anomalous_rows = anomalous.flatten().nonzero().squeeze(1)
    normal_rows = normal.flatten().nonzero().squeeze(1)
    if anomalous_rows.numel() == 0 or normal_rows.numel() == 0:
        return amplified.sum() * 0.0
    anomalous_rows = _subset(anomalous_rows, max_anomalous, generator)
    normal_rows = _subset(normal_rows, max_normal, generator)
    references = F.normalize(flat_teacher[normal_rows], dim=1).detach()
    vanilla = F.normalize(flat_teacher[anomalous_rows], dim=1) @ references.t()
    pushed = F.normalize(flat_amplified[anomalous_rows], dim=1) @ references.t()
    return F.relu(pushed - (vanilla.detach() - margin)).mean()


def _subset(rows: torch.Tensor, limit: int, generator: torch.Generator | None) -> torch.Tensor:
    if rows.numel() <= limit:
        return rows
    choice = torch.randperm(rows.numel(), generator=generator)[:limit].to(rows.device)
    return rows[choice]
