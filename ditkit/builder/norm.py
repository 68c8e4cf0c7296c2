"""Norms, one class per kind: LayerNorm and RMSNorm. Modulation (shift / scale / gate from the
conditioning) lives in the block."""

from __future__ import annotations

from typing import Literal, assert_never

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import fast_inference
from .tags import NO_DECAY, tag


class Norm(nn.Module):
    """The frame both kinds share: a norm over the last dim with an optional learned ``scale``
    (``affine``). Both run in at least fp32 (HDiT's ``rms_norm``), whatever the input dtype: an
    fp16 / bf16 input is cast in, normalised in fp32 and cast back (so fp16 / bf16 ONNX graphs
    compute norm statistics in fp32 too)."""

    kind = ""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = False):
        super().__init__()
        self.eps, self.dim = eps, dim
        self.scale = nn.Parameter(torch.ones(dim)) if affine else None
        tag(self, "scale", NO_DECAY)

    def init_special(self) -> None:
        if self.scale is not None:
            nn.init.ones_(self.scale)

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.dim}, eps={self.eps}, affine={self.scale is not None}"


class LayerNorm(Norm):
    """``F.layer_norm``; ``affine`` adds a bias beside the scale."""

    kind = "layer"

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = False):
        super().__init__(dim, eps, affine)
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None
        tag(self, "bias", NO_DECAY)

    def init_special(self) -> None:
        super().init_special()
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim)
        dtype = torch.promote_types(x.dtype, torch.float32)
        if dtype == x.dtype:
            return F.layer_norm(x, (self.dim,), self.scale, self.bias, self.eps)
        # fp16 / bf16: statistics (and the whole op) in fp32, as autocast does
        return F.layer_norm(
            x.to(dtype), (self.dim,), _to(self.scale, dtype), _to(self.bias, dtype), self.eps
        ).to(x.dtype)


class RMSNorm(Norm):
    """``x / sqrt(mean(x^2) + eps)`` (times ``scale``); no bias."""

    kind = "rms"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim)
        dtype = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dtype)
        if fast_inference():
            # eager inference: the mean square from one vector_norm pass (2 passes over x
            # instead of 5: 2x faster on a 1x128x128x128 grid, 1 CPU thread; the same value up
            # to rounding)
            ms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / self.dim
            y = xf * torch.rsqrt(ms + self.eps)
            return (y if self.scale is None else y * self.scale.to(dtype)).to(x.dtype)
        # traces: the op pattern onnxruntime's SimplifiedLayerNormFusion matches (ort_fusion)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.scale is not None:
            y = y * self.scale.to(dtype)
        return y.to(x.dtype)


def make_norm(
    kind: Literal["layer", "rms"], dim: int, eps: float = 1e-6, affine: bool = False
) -> Norm:
    """The norm class of a spec's ``norm.kind`` (chosen here, once, never in ``forward``)."""
    match kind:
        case "layer":
            return LayerNorm(dim, eps, affine)
        case "rms":
            return RMSNorm(dim, eps, affine)
        case other:
            assert_never(other)


def _to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)
