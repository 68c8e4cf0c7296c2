"""MDiT's aggregate attention: self-attention on a ``factor x`` coarser grid inside a block.

The normed grid is grouped ``f x f`` (pixel unshuffle; channels ordered (row, col, channel) as
everywhere in ditkit), q / k / v come from non-square projections ``f^2 d_model -> n_heads
d_head``, global attention runs on the coarse grid (RoPE positions are the coarse grid's), and
the output projection ``n_heads d_head -> f^2 d_model`` is ungrouped back to the input grid.
The block's FFN stays at the input grid, so only attention pays for the wider view."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .embed import group, ungroup
from .init import zero_linear_
from .norm import Norm
from .position import apply_rope, grid_positions, rope_angles, rope_frequencies


class AggregateAttention(nn.Module):
    """``(B, H, W, C) -> (B, H, W, C)``: group by ``factor``, attend with ``n_heads`` heads of
    ``d_head`` on the coarse grid, project back and ungroup."""

    def __init__(self, d_model: int, d_head: int, n_heads: int, factor: int = 2, *,
                 qk_norm: str = "none", qk_norm_affine: bool = True, qk_norm_eps: float = 1e-6,
                 rope_fraction: float = 0.0, rope_positions: str = "integer",
                 rope_frequencies_layout: str = "geometric", rope_freq_min: float = 3.14159,
                 rope_freq_max: float = 31.4159, rope_base: float = 10000.0,
                 rope_position_scale: tuple[float, float] = (1.0, 1.0), bias: bool = False,
                 dropout: float = 0.0, zero_init_out: bool = False):
        super().__init__()
        self.factor, self.d_head, self.n_heads = factor, d_head, n_heads
        self.zero_init_out = zero_init_out
        d_in, inner = d_model * factor * factor, n_heads * d_head
        self.qkv = nn.Linear(d_in, 3 * inner, bias=bias)
        self.q_norm = self.k_norm = None
        if qk_norm != "none":
            self.q_norm = Norm(d_head, qk_norm, qk_norm_eps, qk_norm_affine)
            self.k_norm = Norm(d_head, qk_norm, qk_norm_eps, qk_norm_affine)
        self.rope_positions = rope_positions
        self.rope_position_scale = tuple(float(v) for v in rope_position_scale)
        rotated = int(round(rope_fraction * d_head))
        self._rope_args = (n_heads, rotated, rope_frequencies_layout, rope_freq_min,
                           rope_freq_max, rope_base)
        self.register_buffer("rope_freqs", rope_frequencies(*self._rope_args) if rotated else None,
                             persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(inner, d_in, bias=bias)

    def init_special(self) -> None:
        if self.rope_freqs is not None:
            self.rope_freqs = rope_frequencies(*self._rope_args).to(self.rope_freqs.device)
        if self.zero_init_out:
            zero_linear_(self.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        f = self.factor
        g = group(x, f, f)  # (B, H/f, W/f, f^2 C)
        b, hh, ww, _ = g.shape
        qkv = self.qkv(g).view(b, hh, ww, 3, self.n_heads, self.d_head)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # each (B, heads, h, w, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_freqs is not None:
            pos = grid_positions(hh, ww, self.rope_positions, x.device)
            if self.rope_position_scale != (1.0, 1.0):
                pos = pos * pos.new_tensor(self.rope_position_scale)
            theta = rope_angles(self.rope_freqs.float(), pos)
            q, k = apply_rope(q, theta), apply_rope(k, theta)
        o = kernels.global_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3),
                                     self.d_head ** -0.5)
        o = o.view(b, self.n_heads, hh, ww, self.d_head).permute(0, 2, 3, 1, 4)
        o = self.out(self.dropout(o.reshape(b, hh, ww, -1)))  # (B, h, w, f^2 C)
        return ungroup(o, f, f)  # (B, H, W, C)

    def extra_repr(self) -> str:
        return f"factor={self.factor}, heads={self.n_heads}, d_head={self.d_head}"
