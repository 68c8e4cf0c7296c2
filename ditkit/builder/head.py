"""Output heads: tokens -> patches of output channels."""

from __future__ import annotations

import torch
from torch import nn

from .embed import ungroup
from .norm import Norm


class Head(nn.Module):
    """``norm -> (adaLN shift/scale) -> Linear -> ungroup`` to ``(B, C_out, H, W)``.

    ``ada_ln`` (DiT's FinalLayer): ``SiLU(cond) -> Linear -> (shift, scale)``, zero-init.
    ``linear`` (HDiT): unmodulated norm. The output Linear is zero-initialised in both."""

    def __init__(self, kind: str, d_model: int, cond_width: int, out_channels: int,
                 patch: tuple[int, int], norm_kind: str, norm_eps: float, norm_affine: bool,
                 bias: bool):
        super().__init__()
        self.kind, self.patch = kind, tuple(patch)
        self.norm = Norm(d_model, norm_kind, norm_eps, norm_affine)
        self.modulation = (nn.Sequential(nn.SiLU(), nn.Linear(cond_width, 2 * d_model))
                           if kind == "ada_ln" else None)
        self.proj = nn.Linear(d_model, self.patch[0] * self.patch[1] * out_channels, bias=bias)

    def init_special(self) -> None:
        nn.init.zeros_(self.proj.weight)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)
        if self.modulation is not None:
            nn.init.zeros_(self.modulation[1].weight)
            nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)  # (B, h, w, D)
        if self.modulation is not None:
            shift, scale = self.modulation(cond)[:, None, None, :].chunk(2, dim=-1)
            x = x * (1 + scale) + shift
        x = ungroup(self.proj(x), *self.patch)  # (B, H, W, C_out)
        return x.permute(0, 3, 1, 2)  # (B, C_out, H, W)
