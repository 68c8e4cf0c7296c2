"""Shared adaLN (MPDiT): one modulation network for the whole model.

DiT gives every block its own ``SiLU -> Linear(cond, 6 d)``; MPDiT computes the six
shift / scale / gate vectors once per forward and every block (and the final layer, which takes
the FFN's shift and scale) reuses them -- 6 d^2 parameters instead of 6 d^2 per block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embed import ungroup
from .head import Head


class SharedModulation(nn.Module):
    """``SiLU -> Linear(cond, 6 d_model)``, zero-initialised (adaLN-Zero)."""

    def __init__(self, cond_width: int, d_model: int):
        super().__init__()
        self.proj = nn.Linear(cond_width, 6 * d_model)

    def init_special(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:  # (B, cw) -> (B, 6 D)
        return self.proj(F.silu(cond))


class SharedAdaLNHead(Head):
    """DiT's final layer with shift / scale taken from the shared modulation (chunks 3 and 4:
    the FFN's shift and scale), MPDiT's ``FinalLayer``; no modulation parameters of its own."""

    def __init__(self, d_model: int, out_channels: int, patch: tuple[int, int], norm_kind: str,
                 norm_eps: float, norm_affine: bool, bias: bool):
        super().__init__("linear", d_model, d_model, out_channels, patch, norm_kind, norm_eps,
                         norm_affine, bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor,
                shared: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(x)  # (B, h, w, D)
        if shared is None:
            raise ValueError("the shared adaLN head needs the shared modulation")
        shift, scale = shared[:, None, None, :].chunk(6, dim=-1)[3:5]
        x = x * (1 + scale) + shift
        x = ungroup(self.proj(x), *self.patch)  # (B, H, W, C_out)
        return x.permute(0, 3, 1, 2)  # (B, C_out, H, W)
