"""UniAD's blocks (You et al., NeurIPS 2022; METHODS.md §1.4): feature jitter, and a transformer with neighbour-masked attention and learned decoder queries.

The reconstruction must not be able to copy its input: every attention is forbidden to look at
the query's own neighbourhood (a k x k window), so each token is rebuilt from the context around
it, and jitter on the training features pushes the model to restore normal features rather than
reproduce whatever it is given.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ConfigError
from ...nn.precision import Network


def feature_jitter(tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """Add Gaussian noise with std ``scale * ||token|| / C`` to every (..., C) token."""
    if scale <= 0:
        return tokens
    norms = tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1]
    return tokens + torch.randn_like(tokens) * norms * scale


def mask_leaves_context(height: int, width: int, neighbourhood: int) -> bool:
    """Whether every token of a height x width grid keeps something to attend to."""
    return neighbourhood == 0 or neighbourhood // 2 < max(height, width) - 1


def neighbour_mask(height: int, width: int, neighbourhood: int) -> torch.Tensor:
    """(HW, HW) additive attention mask: -inf where the key lies in the query's window.

    The window is ``neighbourhood`` x ``neighbourhood`` centred on the query and clipped at the
    borders (the official ``generate_mask``); 0 masks nothing. A window that covers the whole
    grid from a corner would leave that token nothing to attend to, so it is refused.
    """
    half = neighbourhood // 2
    if not mask_leaves_context(height, width, neighbourhood):
        raise ConfigError(f"a {neighbourhood}x{neighbourhood} neighbour mask hides the whole "
                          f"{height}x{width} grid from its corner tokens; use a smaller "
                          "neighbourhood or larger images")
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    near = (((rows[:, None] - rows[None, :]).abs() <= half)
            & ((cols[:, None] - cols[None, :]).abs() <= half)) & (neighbourhood > 0)
    mask = torch.zeros(height * width, height * width)
    return mask.masked_fill(near, float("-inf"))


class LearnedPositions(nn.Module):
    """Learned 2-D positions: a row and a column embedding of half the width each (DETR's
    ``PositionEmbeddingLearned``, as UniAD uses)."""

    def __init__(self, height: int, width: int, dim: int) -> None:
        super().__init__()
        self.rows = nn.Parameter(torch.rand(height, dim // 2))
        self.cols = nn.Parameter(torch.rand(width, dim - dim // 2))

    def forward(self) -> torch.Tensor:
        """(HW, dim) position of every token, row-major."""
        height, width = self.rows.shape[0], self.cols.shape[0]
        return torch.cat([self.rows[:, None].expand(height, width, -1),
                          self.cols[None, :].expand(height, width, -1)], dim=-1).flatten(0, 1)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.net(x)))


class _Attention(nn.Module):
    """Post-norm residual attention; positions are added to queries and keys only."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        attended = self.attention(query + positions, context + positions, context,
                                  attn_mask=mask, need_weights=False)[0]
        return self.norm(query + self.dropout(attended))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.attention = _Attention(dim, heads, dropout)
        self.feed_forward = _FeedForward(dim, ffn_dim, dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None
                ) -> torch.Tensor:
        return self.feed_forward(self.attention(x, x, positions, mask))


class DecoderLayer(nn.Module):
    """A decoder layer that owns its query: one learned embedding per token attends to the
    encoder memory, then to the previous layer's output."""

    def __init__(self, num_tokens: int, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(num_tokens, dim))
        self.to_memory = _Attention(dim, heads, dropout)
        self.to_previous = _Attention(dim, heads, dropout)
        self.feed_forward = _FeedForward(dim, ffn_dim, dropout)

    def forward(self, previous: torch.Tensor, memory: torch.Tensor, positions: torch.Tensor,
                memory_mask: torch.Tensor | None, previous_mask: torch.Tensor | None
                ) -> torch.Tensor:
        query = self.query.unsqueeze(0).expand(memory.shape[0], -1, -1)
        x = self.to_memory(query, memory, positions, memory_mask)
        x = self.to_previous(x, previous, positions, previous_mask)
        return self.feed_forward(x)


class UniADTransformer(Network):
    """Tokens (B, HW, C) -> reconstructed tokens (B, HW, C), and the encoder's output.

    Args:
        in_channels: width of the aligned features.
        grid: (H, W) of the token grid.
        dim: transformer width (256).
        heads, ffn_dim, dropout: attention heads (8), feed-forward width (1024), dropout (0.1).
        encoder_layers, decoder_layers: depth of each side (4 and 4).
        neighbourhood: side of the masked window (7); 0 switches the mask off.
        masked: which attentions are masked: (encoder, decoder-to-memory, decoder-to-previous).
    """

    def __init__(self, in_channels: int, grid: tuple[int, int], dim: int = 256, heads: int = 8,
                 ffn_dim: int = 1024, dropout: float = 0.1, encoder_layers: int = 4,
                 decoder_layers: int = 4, neighbourhood: int = 7,
                 masked: tuple[bool, bool, bool] = (True, True, True)) -> None:
        super().__init__()
        height, width = grid
        self.input_projection = nn.Linear(in_channels, dim)
        self.positions = LearnedPositions(height, width, dim)
        self.encoder = nn.ModuleList(EncoderLayer(dim, heads, ffn_dim, dropout)
                                     for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(height * width, dim, heads, ffn_dim, dropout)
                                     for _ in range(decoder_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.output_projection = nn.Linear(dim, in_channels)
        self.register_buffer("mask", neighbour_mask(height, width, neighbourhood),
                             persistent=False)
        self.masked = tuple(bool(m) and neighbourhood > 0 for m in masked)
        for parameter in self.parameters():  # the official Xavier-uniform initialiser
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (reconstruction (B, HW, in_channels), encoder output (B, HW, dim))."""
        masks = [self.mask if m else None for m in self.masked]
        positions = self.positions().unsqueeze(0)
        x = self.input_projection(tokens)
        for layer in self.encoder:
            x = layer(x, positions, masks[0])
        memory, out = x, x
        for layer in self.decoder:
            out = layer(out, memory, positions, masks[1], masks[2])
        return self.output_projection(self.decoder_norm(out)), memory
