"""Feed-forward networks, one class per spec variant: GELU MLP, GEGLU, SwiGLU.

All three are ``up -> activation -> dropout -> down`` with the same parameter names; gated
kinds put ``2 d_ff`` outputs on ``up`` (value half first, then gate), as k-diffusion's
``LinearGEGLU`` does."""

from __future__ import annotations

from typing import Any, assert_never

import torch
import torch.nn.functional as F
from torch import nn

from ditkit import spec as S

from .init import zero_linear_
from .kernels import fast_inference


class FeedForward(nn.Module):
    """The shared frame; a subclass says how the hidden units are activated (``activate``)."""

    gated = False

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        bias: bool = True,
        dropout: float = 0.0,
        zero_init_out: bool = False,
    ):
        super().__init__()
        self.zero_init_out = zero_init_out
        self.up = nn.Linear(d_model, d_ff * (2 if self.gated else 1), bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def init_special(self) -> None:
        if self.zero_init_out:
            zero_linear_(self.down)

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        return self.down(self.dropout(self.activate(self.up(x))))  # (B, H, W, C)


class GeluMLP(FeedForward):
    """``GELU(up x)`` (DiT: the tanh approximation)."""

    def __init__(self, d_model: int, d_ff: int, approximate: str = "tanh", **kwargs):
        super().__init__(d_model, d_ff, **kwargs)
        self.approximate = approximate

    def activate(self, h: torch.Tensor) -> torch.Tensor:  # (..., d_ff)
        return F.gelu(h, approximate=self.approximate)


class GEGLU(FeedForward):
    """``value * GELU(gate)`` (HDiT)."""

    gated = True

    def activate(self, h: torch.Tensor) -> torch.Tensor:  # (..., 2 d_ff) -> (..., d_ff)
        value, gate = h.chunk(2, dim=-1)
        return value * F.gelu(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        if not fast_inference():  # traces (the form ort_fusion rewrites) and autograd
            return super().forward(x)
        # eager inference: value and gate from the two halves of ``up``'s weight, each a contiguous
        # tensor (the same products; GELU on the strided half of one output ran 2x slower)
        d_ff = self.down.in_features
        w, b = self.up.weight, self.up.bias
        value = F.linear(x, w[:d_ff], None if b is None else b[:d_ff])
        gate = F.linear(x, w[d_ff:], None if b is None else b[d_ff:])
        h = torch.ops.aten.gelu_(gate).mul_(value)  # in place: no autograd here
        return self.down(self.dropout(h))  # (B, H, W, C)


class SwiGLU(FeedForward):
    """``value * SiLU(gate)``."""

    gated = True

    def activate(self, h: torch.Tensor) -> torch.Tensor:  # (..., 2 d_ff) -> (..., d_ff)
        value, gate = h.chunk(2, dim=-1)
        return value * F.silu(gate)


def build_ffn(blk: S.Block, d_model: int) -> FeedForward:
    """The module of a block's ``ffn`` (dropout and zero-init from the block)."""
    args: dict[str, Any] = {
        "bias": blk.ffn.bias,
        "dropout": blk.dropout,
        "zero_init_out": blk.zero_init_out,
    }
    d_ff = blk.ffn.hidden(d_model)
    match blk.ffn:
        case S.GeluMLP(approximate=ap):
            return GeluMLP(d_model, d_ff, ap, **args)
        case S.GEGLU():
            return GEGLU(d_model, d_ff, **args)
        case S.SwiGLU():
            return SwiGLU(d_model, d_ff, **args)
        case other:
            assert_never(other)
