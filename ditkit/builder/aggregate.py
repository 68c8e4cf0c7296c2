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
from .attention import AttentionConfig, QKRope
from .embed import group, ungroup
from .init import zero_linear_


class AggregateAttention(QKRope):
    """``(B, H, W, C) -> (B, H, W, C)``: group by ``factor``, attend with ``n_heads`` heads of
    ``cfg.d_head`` on the coarse grid, project back and ungroup. Logits are dot-product
    (``cfg.logits`` is not used)."""

    def __init__(self, cfg: AttentionConfig, n_heads: int, factor: int = 2):
        super().__init__()
        d_head = cfg.d_head
        self.factor, self.d_head, self.n_heads = factor, d_head, n_heads
        self.zero_init_out = cfg.zero_init_out
        d_in, inner = cfg.d_model * factor * factor, n_heads * d_head
        self.qkv = nn.Linear(d_in, 3 * inner, bias=cfg.bias)
        self._setup_qk(cfg, n_heads)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(inner, d_in, bias=cfg.bias)

    def init_special(self) -> None:
        self._init_rope()
        if self.zero_init_out:
            zero_linear_(self.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        f = self.factor
        g = group(x, f, f)  # (B, H/f, W/f, f^2 C)
        b, hh, ww, _ = g.shape
        qkv = self.qkv(g).view(b, hh, ww, 3, self.n_heads, self.d_head)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # each (B, heads, h, w, D)
        q, k = self._rope(*self._norm_qk(q, k), hh, ww)
        o = kernels.global_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3),
                                     self.d_head ** -0.5)
        o = o.view(b, self.n_heads, hh, ww, self.d_head).permute(0, 2, 3, 1, 4)
        o = self.out(self.dropout(o.reshape(b, hh, ww, -1)))  # (B, h, w, f^2 C)
        return ungroup(o, f, f)  # (B, H, W, C)

    def extra_repr(self) -> str:
        return f"factor={self.factor}, heads={self.n_heads}, d_head={self.d_head}"
