"""Patch embedding, token merge / split between levels, and skip merges.

Grouping a ``f x f`` block of tokens orders the grouped channels ``(row, col, channel)`` --
k-diffusion's TokenMerge and DiT's unpatchify layout -- not pixel-unshuffle's
``(channel, row, col)``."""

from __future__ import annotations

import torch
from torch import nn

from .tags import NO_DECAY, tag


def group(x: torch.Tensor, fh: int, fw: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, H/fh, W/fw, fh*fw*C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // fh, fh, w // fw, fw, c).transpose(2, 3)
    return x.reshape(b, h // fh, w // fw, fh * fw * c)


def ungroup(x: torch.Tensor, fh: int, fw: int) -> torch.Tensor:
    """(B, h, w, fh*fw*C) -> (B, h*fh, w*fw, C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, fh, fw, c // (fh * fw)).transpose(2, 3)
    return x.reshape(b, h * fh, w * fw, c // (fh * fw))


class TokenMerge(nn.Module):
    """Group ``fh x fw`` tokens (or pixels, for the patch embedding) and project."""

    def __init__(self, d_in: int, d_out: int, factor: tuple[int, int], bias: bool = False):
        super().__init__()
        self.factor = tuple(factor)
        self.proj = nn.Linear(d_in * self.factor[0] * self.factor[1], d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H/f, W/f, D)
        return self.proj(group(x, *self.factor))


class TokenSplit(nn.Module):
    """Project and ungroup: the inverse of :class:`TokenMerge` (``up`` between levels)."""

    def __init__(self, d_in: int, d_out: int, factor: tuple[int, int], bias: bool = False):
        super().__init__()
        self.factor = tuple(factor)
        self.proj = nn.Linear(d_in, d_out * self.factor[0] * self.factor[1], bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, h, w, D) -> (B, h*f, w*f, C)
        return ungroup(self.proj(x), *self.factor)


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


class NoSkip(nn.Module):
    """The skip is dropped."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return x
