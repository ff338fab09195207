"""Denoising diffusion on feature maps: the cosine noise schedule, the epsilon-prediction loss,
DDIM reconstruction from a partially corrupted input, and the U-Net noise predictor
(METHODS.md §1.10, used by LafitE).

Timesteps are counted from 1 to T as in the papers; step 0 is the clean input (alpha_bar = 1).
Corrupting to a step tau and running DDIM back to 0 reconstructs an input without starting from
pure noise, so ``tau = 0`` returns the input unchanged.

Example:
    >>> schedule = CosineSchedule(1000)
    >>> unet = NoisePredictionUNet(in_channels=192, base_channels=64, channel_mults=(1, 2))
    >>> loss = schedule.training_loss(unet, torch.randn(4, 192, 16, 16))
    >>> rebuilt = schedule.reconstruct(unet, torch.randn(2, 192, 16, 16), tau=300, steps=10)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...nn.precision import Network


def cosine_alpha_bar(t: torch.Tensor, total_steps: int, offset: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's closed form f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2)."""
    def f(step: torch.Tensor) -> torch.Tensor:
        return torch.cos((step / total_steps + offset) / (1 + offset) * math.pi / 2) ** 2

    return f(t.double()) / f(torch.zeros((), dtype=torch.float64))


class CosineSchedule(nn.Module):
    """The cosine noise schedule with T steps, and what is computed from it.

    ``alpha_bar[t]`` for t = 0..T (t = 0: no noise) follows the closed form, with every beta
    clipped at ``max_beta`` (only the last few steps are affected).

    Args:
        total_steps: T (1000 in LafitE).
        offset: s of the closed form (0.008).
        max_beta: upper bound of each beta_t (0.999).
    """

    def __init__(self, total_steps: int = 1000, offset: float = 0.008,
                 max_beta: float = 0.999) -> None:
        super().__init__()
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        closed = cosine_alpha_bar(torch.arange(total_steps + 1), total_steps, offset)
        betas = (1 - closed[1:] / closed[:-1]).clamp(max=max_beta)
        alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alpha_bar", alpha_bar.float(), persistent=False)

    def corrupt(self, clean: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, one t per batch item."""
        alpha_bar = self.alpha_bar[t].view(-1, *([1] * (clean.ndim - 1)))
        return alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise

    def training_loss(self, model: nn.Module, clean: torch.Tensor) -> torch.Tensor:
        """The epsilon-prediction MSE with t drawn uniformly from 1..T (torch's global RNG)."""
        t = torch.randint(1, self.total_steps + 1, (clean.shape[0],), device=clean.device)
        noise = torch.randn_like(clean)
        return F.mse_loss(model(self.corrupt(clean, t, noise), t), noise)

    def sampling_steps(self, tau: int, steps: int) -> list[int]:
        """The descending timesteps of a DDIM pass from ``tau`` to 0 (about ``steps`` jumps)."""
        if not 0 <= tau <= self.total_steps:
            raise ValueError(f"tau must be in [0, {self.total_steps}], got {tau}")
        if tau == 0:
            return [0]
        points = torch.linspace(tau, 0, max(1, min(steps, tau)) + 1).round().long().tolist()
        return sorted(set(points), reverse=True)

    def reconstruct(self, model: nn.Module, start: torch.Tensor, tau: int, steps: int = 10,
                    noise: torch.Tensor | None = None, eta: float = 0.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Corrupt ``start`` to step ``tau`` and denoise it back to step 0 with DDIM.

        Args:
            model: epsilon predictor ``model(x_t, t)``.
            start: the tensor to corrupt (LafitE: the edited features).
            tau: the corruption step (0 returns ``start`` itself).
            steps: DDIM jumps between tau and 0.
            noise: the corruption noise (drawn from ``generator`` when None).
            eta: 0 = deterministic DDIM; 1 = DDPM-like stochastic steps.
            generator: random source of the corruption noise and of eta's noise.
        """
        timesteps = self.sampling_steps(tau, steps)
        if tau == 0:
            return start
        if noise is None:
            noise = torch.randn(start.shape, generator=generator, device=start.device)
        batch = start.shape[0]
        x = self.corrupt(start, torch.full((batch,), tau, device=start.device), noise)
        for t, t_next in itertools.pairwise(timesteps):
            alpha_bar, alpha_bar_next = self.alpha_bar[t], self.alpha_bar[t_next]
            predicted_noise = model(x, torch.full((batch,), t, device=start.device))
            clean = (x - (1 - alpha_bar).sqrt() * predicted_noise) / alpha_bar.sqrt()
            sigma = eta * ((1 - alpha_bar_next) / (1 - alpha_bar)).sqrt() \
                * (1 - alpha_bar / alpha_bar_next).sqrt()
            x = alpha_bar_next.sqrt() * clean \
                + (1 - alpha_bar_next - sigma ** 2).clamp(min=0).sqrt() * predicted_noise
            if eta > 0 and t_next > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        return x


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) sinusoidal embeddings (cosines then sines)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float().unsqueeze(1) * frequencies.unsqueeze(0)
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(embedding, (0, dim % 2))


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    """Zero a block's last layer so that each residual branch starts as the identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class TimeResidualBlock(nn.Module):
    """Two 3x3 convolutions with the timestep applied as a scale and shift of the second norm."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, dropout: float,
                 groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, 2 * out_channels)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.embedding(F.silu(embedding))[:, :, None, None].chunk(2, dim=1)
        hidden = self.norm2(hidden) * (1 + scale) + shift
        hidden = self.conv2(self.dropout(F.silu(hidden)))
        return self.skip(x) + hidden


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over the positions of a feature map, as a residual."""

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x).flatten(2))  # (B, 3C, N)
        q, k, v = qkv.reshape(batch, 3, self.num_heads, channels // self.num_heads, -1) \
            .permute(1, 0, 2, 4, 3).unbind(0)  # each (B, heads, N, C/heads)
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.permute(0, 1, 3, 2).reshape(batch, channels, -1)
        return x + self.out(attended).view(batch, channels, height, width)


class NoisePredictionUNet(Network):
    """The U-Net epsilon predictor of improved DDPM, for C-channel feature maps.

    Each level has ``num_res_blocks`` time-conditioned residual blocks (plus self-attention at
    the levels in ``attention_levels``, 0 = full resolution) and halves the resolution before the
    next level; the decoder mirrors it with skip connections. The grid side must be divisible by
    2 ** (len(channel_mults) - 1).

    Args:
        in_channels: feature channels (predicted noise has the same).
        base_channels: width of the first level (LafitE: 256).
        channel_mults: width multipliers per level (LafitE: (1, 2, 3, 4)).
        num_res_blocks: residual blocks per level (2).
        attention_levels: levels with self-attention ((1, 2): 16x16 and 8x8 on a 32 grid).
        num_heads: attention heads (4).
        dropout: dropout in the residual blocks (0.1).
        groups: GroupNorm groups (32, or the largest divisor of the width below it).
    """

    def __init__(self, in_channels: int, base_channels: int = 256,
                 channel_mults: Sequence[int] = (1, 2, 3, 4), num_res_blocks: int = 2,
                 attention_levels: Sequence[int] = (1, 2), num_heads: int = 4,
                 dropout: float = 0.1, groups: int = 32) -> None:
        super().__init__()
        self.base_channels = base_channels
        self.levels = len(channel_mults)
        embedding_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, embedding_dim), nn.SiLU(),
                                      nn.Linear(embedding_dim, embedding_dim))
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def block(cin: int, cout: int, level: int) -> nn.ModuleList:
            layers = nn.ModuleList([TimeResidualBlock(cin, cout, embedding_dim, dropout, groups)])
            if level in attention_levels:
                layers.append(SpatialSelfAttention(cout, num_heads, groups))
            return layers

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_channels, width = [base_channels], base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(block(width, base_channels * mult, level))
                width = base_channels * mult
                skip_channels.append(width)
            if level < self.levels - 1:
                self.downsample.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skip_channels.append(width)
        self.middle = nn.ModuleList([
            TimeResidualBlock(width, width, embedding_dim, dropout, groups),
            SpatialSelfAttention(width, num_heads, groups),
            TimeResidualBlock(width, width, embedding_dim, dropout, groups),
        ])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(self.levels)):
            for _ in range(num_res_blocks + 1):
                out = base_channels * channel_mults[level]
                self.up.append(block(width + skip_channels.pop(), out, level))
                width = out
            if level > 0:
                self.upsample.append(nn.Conv2d(width, width, 3, padding=1))
        self.head = nn.Sequential(_norm(width, groups), nn.SiLU(),
                                  _zero(nn.Conv2d(width, in_channels, 3, padding=1)))
        self.num_res_blocks = num_res_blocks

    @staticmethod
    def _run_block(layers: nn.ModuleList, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        x = layers[0](x, embedding)
        for layer in layers[1:]:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) noisy features and (B,) timesteps -> (B, C, H, W) predicted noise."""
        divisor = 2 ** (self.levels - 1)
        if x.shape[-1] % divisor or x.shape[-2] % divisor:
            raise ValueError(f"a {tuple(x.shape[-2:])} grid is not divisible by {divisor}, "
                             f"as {self.levels} U-Net levels need")
        embedding = self.time_mlp(timestep_embedding(t, self.base_channels))
        x = self.stem(x)
        skips = [x]
        blocks = iter(self.down)
        for level in range(self.levels):
            for _ in range(self.num_res_blocks):
                x = self._run_block(next(blocks), x, embedding)
                skips.append(x)
            if level < self.levels - 1:
                x = self.downsample[level](x)
                skips.append(x)
        x = self.middle[0](x, embedding)
        x = self.middle[2](self.middle[1](x), embedding)
        blocks = iter(self.up)
        for position, level in enumerate(reversed(range(self.levels))):
            for _ in range(self.num_res_blocks + 1):
                x = self._run_block(next(blocks), torch.cat([x, skips.pop()], dim=1), embedding)
            if level > 0:
                x = self.upsample[position](F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.head(x)
