"""Positional encodings: absolute tables added after the patch embedding, and axial RoPE."""

from __future__ import annotations

import math
from typing import assert_never, cast

import torch
import torch.nn.functional as F
from torch import nn

from ditkit import spec as S


def sincos_table(h: int, w: int, dim: int, max_period: float = 10000.0,
                 device=None) -> torch.Tensor:
    """DiT's 2-D sin-cos table, ``(h, w, dim)``: the first half of the channels encodes the
    column index, the second half the row index, each as ``[sin(p w_k), cos(p w_k)]`` with
    ``w_k = max_period^(-k / (dim/4))``."""
    quarter = dim // 4
    omega = 1.0 / max_period ** (
        torch.arange(quarter, dtype=torch.float64, device=device) / quarter)

    def axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.to(torch.float64)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=-1)  # (L, dim/2)

    cols = axis(torch.arange(w, device=device))[None, :, :].expand(h, w, -1)
    rows = axis(torch.arange(h, device=device))[:, None, :].expand(h, w, -1)
    return torch.cat([cols, rows], dim=-1).float()


class SincosPosition(nn.Module):
    """Fixed table stored as a frozen parameter at the training grid (DiT keeps it in its state
    dict and counts it among the parameters); other grids get a freshly computed table."""

    def __init__(self, grid: tuple[int, int], dim: int, max_period: float = 10000.0):
        super().__init__()
        self.grid, self.max_period = cast(tuple[int, int], tuple(grid)), max_period
        self.table = nn.Parameter(sincos_table(*grid, dim, max_period), requires_grad=False)

    def init_special(self) -> None:
        with torch.no_grad():
            self.table.copy_(sincos_table(*self.grid, self.table.shape[-1], self.max_period,
                                          self.table.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        h, w = x.shape[1], x.shape[2]
        # under torch.export the grid is symbolic: always compute (the same numbers as the
        # stored table), so the exported graph does not specialise on the training grid
        if not torch.compiler.is_exporting() and (h, w) == self.grid:
            return x + self.table.to(x.dtype)
        return x + sincos_table(h, w, x.shape[-1], self.max_period, x.device).to(x.dtype)


class LearnedPosition(nn.Module):
    """Learned table at the training grid; bicubically resized for other grids."""

    def __init__(self, grid: tuple[int, int], dim: int, init_std: float = 0.02):
        super().__init__()
        self.grid, self.init_std = tuple(grid), init_std
        self.table = nn.Parameter(torch.zeros(*grid, dim))

    def init_special(self) -> None:
        nn.init.trunc_normal_(self.table, std=self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        table: torch.Tensor = self.table
        if (x.shape[1], x.shape[2]) != self.grid:
            table = F.interpolate(table.permute(2, 0, 1)[None], size=(x.shape[1], x.shape[2]),
                                  mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
        return x + table.to(x.dtype)


def build_position(pos: S.Position, grid: tuple[int, int], d_model: int) -> nn.Module | None:
    """The absolute position table of a spec's ``position`` on ``grid`` (None: no table)."""
    match pos:
        case S.NoPosition():
            return None
        case S.SincosPosition(max_period=mp):
            return SincosPosition(grid, d_model, mp)
        case S.LearnedPosition(init_std=std):
            return LearnedPosition(grid, d_model, std)
        case other:
            assert_never(other)


# --------------------------------------------------------------------------------------------
# axial RoPE


def grid_positions(h, w, kind: str, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(h, w, 2)`` (row, col) positions: ``normalized`` = HDiT's cell centres in [-1, 1] per
    axis; ``integer`` = indices from the upper-left token."""
    def axis(n):
        i = torch.arange(n, device=device, dtype=dtype)
        return (2 * i + 1) / n - 1 if kind == "normalized" else i

    rows, cols = axis(h), axis(w)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)


def rope_frequencies(n_heads: int, rotated: int, layout: str, freq_min: float,
                     freq_max: float, base: float) -> torch.Tensor:
    """``(n_heads, rotated // 4)`` frequencies per head and axis.

    ``log_spaced`` (HDiT): ``n_heads * rotated/4`` log-uniform values in [freq_min, freq_max)
    dealt out across heads (head ``h`` gets values ``h, h + n_heads, ...``).
    ``geometric``: ``base^(-j / (rotated/4))``, the same for every head."""
    per_axis = rotated // 4
    if layout == "log_spaced":
        freqs = torch.linspace(math.log(freq_min), math.log(freq_max),
                               n_heads * per_axis + 1)[:-1].exp()
        return freqs.view(per_axis, n_heads).T.contiguous()
    freqs = base ** (-torch.arange(per_axis, dtype=torch.float32) / per_axis)
    return freqs[None].expand(n_heads, per_axis).contiguous()


def rope_angles(freqs: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """freqs (heads, r/4), pos (H, W, 2) -> angles (heads, H, W, r/2): row angles then col."""
    th = pos[None, :, :, 0:1] * freqs[:, None, None, :]
    tw = pos[None, :, :, 1:2] * freqs[:, None, None, :]
    return torch.cat([th, tw], dim=-1)


def apply_rope(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * theta.shape[-1]`` channels of ``x`` (..., D): channel ``i`` pairs
    with ``i + r/2``; the rest pass through. Computed in fp32, returned in x's dtype."""
    d = theta.shape[-1]
    x1, x2, rest = x[..., :d], x[..., d:2 * d], x[..., 2 * d:]
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = theta.to(dtype).cos(), theta.to(dtype).sin()
    x1f, x2f = x1.to(dtype), x2.to(dtype)
    y1 = (x1f * cos - x2f * sin).to(x.dtype)
    y2 = (x2f * cos + x1f * sin).to(x.dtype)
    return torch.cat([y1, y2, rest], dim=-1)
