"""Norms. Modulation (shift / scale / gate from the conditioning) lives in the block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .tags import NO_DECAY, tag


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dim. ``affine``: learned scale (+ bias for
    LayerNorm). Both run in at least fp32 (HDiT's ``rms_norm``), whatever the input dtype: an
    fp16 / bf16 input is cast in, normalised in fp32 and cast back (so fp16 / bf16 ONNX graphs
    compute norm statistics in fp32 too)."""

    def __init__(self, dim: int, kind: str = "layer", eps: float = 1e-6, affine: bool = False):
        super().__init__()
        self.kind, self.eps, self.dim = kind, eps, dim
        if affine:
            self.scale = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layer" else None
        else:
            self.scale = self.bias = None
        tag(self, "scale", NO_DECAY)
        tag(self, "bias", NO_DECAY)

    def init_special(self) -> None:
        if self.scale is not None:
            nn.init.ones_(self.scale)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        if self.kind == "layer":
            if dtype == x.dtype:
                return F.layer_norm(x, (self.dim,), self.scale, self.bias, self.eps)
            # fp16 / bf16: statistics (and the whole op) in fp32, as autocast does
            return F.layer_norm(x.to(dtype), (self.dim,), _to(self.scale, dtype),
                                _to(self.bias, dtype), self.eps).to(x.dtype)
        xf = x.to(dtype)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.scale is not None:
            y = y * self.scale.to(dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.dim}, eps={self.eps}, affine={self.scale is not None}"


def _to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)
