"""Skip merges: how the way up joins the stream a level kept on the way down.

Every skip is called as ``skip(up, kept)`` with two ``(B, H, W, C)`` grids."""

from __future__ import annotations

from typing import assert_never

import torch
from torch import nn

from ditkit import spec as S

from .tags import NO_DECAY, tag


class LerpSkip(nn.Module):
    """``torch.lerp(skip, up, f) = (1 - f) skip + f up`` with a learned scalar ``f``
    (k-diffusion's TokenSplit convention)."""

    def __init__(self, init: float = 0.5):
        super().__init__()
        self.init = init
        self.fac = nn.Parameter(torch.full((1,), init))
        tag(self, "fac", NO_DECAY)

    def init_special(self) -> None:
        nn.init.constant_(self.fac, self.init)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        return torch.lerp(skip, x, self.fac.to(x.dtype))


class AddSkip(nn.Module):
    """``up + skip``."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return x + skip


class ConcatSkip(nn.Module):
    """``Linear([up, skip])``."""

    def __init__(self, d_model: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(2 * d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([x, skip], dim=-1))  # (B, H, W, C)


class LinearSkip(nn.Module):
    """``up + Linear(skip)`` (MPDiT's ``linear_skip``)."""

    def __init__(self, d_model: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return x + self.proj(skip)


class NoSkip(nn.Module):
    """The skip is dropped."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return x


def build_skip(skip: S.Skip, d_model: int) -> nn.Module:
    """The module of a level's ``skip``."""
    match skip:
        case S.LerpSkip(init=fac):
            return LerpSkip(init=fac)
        case S.AddSkip():
            return AddSkip()
        case S.ConcatSkip(bias=bias):
            return ConcatSkip(d_model, bias=bias)
        case S.NoSkip():
            return NoSkip()
        case S.LinearSkip(bias=bias):
            return LinearSkip(d_model, bias=bias)
        case other:
            assert_never(other)
