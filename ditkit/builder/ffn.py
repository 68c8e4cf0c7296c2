"""Feed-forward networks: GELU MLP, GEGLU, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """``up -> activation (gated: value * act(gate)) -> dropout -> down``.

    Gated kinds put ``2 d_ff`` outputs on ``up`` (value half first, then gate), as
    k-diffusion's ``LinearGEGLU`` does."""

    def __init__(self, d_model: int, d_ff: int, kind: str = "gelu_mlp", bias: bool = True,
                 approximate: str = "tanh", dropout: float = 0.0, zero_init_out: bool = False):
        super().__init__()
        self.kind, self.approximate, self.zero_init_out = kind, approximate, zero_init_out
        gated = kind in ("geglu", "swiglu")
        self.up = nn.Linear(d_model, d_ff * (2 if gated else 1), bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def init_special(self) -> None:
        if self.zero_init_out:
            nn.init.zeros_(self.down.weight)
            if self.down.bias is not None:
                nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        h = self.up(x)
        if self.kind == "gelu_mlp":
            h = F.gelu(h, approximate=self.approximate)
        else:
            value, gate = h.chunk(2, dim=-1)
            h = value * (F.gelu(gate) if self.kind == "geglu" else F.silu(gate))
        return self.down(self.dropout(h))
