"""Patch embedding and the transitions between levels: ``merge`` / ``repatch`` on the way
down, ``split`` / ``upsample`` on the way up.

Grouping a ``f x f`` block of tokens orders the grouped channels ``(row, col, channel)`` --
k-diffusion's TokenMerge and DiT's unpatchify layout -- not pixel-unshuffle's
``(channel, row, col)``.

Every down transition is called as ``down(h, x_in)`` (this level's tokens and the model input,
``(B, H, W, C)`` each) and every up transition as ``up(h, prefix) -> (h, prefix)`` (class
prefix tokens ``(B, T, D)`` or None travel beside the grid), so the model calls them the same
way whatever the spec chose. Coarse-first models (MPDiT): ``repatch`` embeds the input afresh
for the next level and ``upsample`` brings tokens back to the fine grid, setting the prefix
tokens aside during the pixel shuffle and re-joining them for its norm and refining Linear."""

from __future__ import annotations

from typing import Literal, assert_never

import torch
import torch.nn.functional as F
from torch import nn

from ditkit import spec as S

from .norm import make_norm
from .position import build_position


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
    """Project and ungroup: the inverse of :class:`TokenMerge`."""

    def __init__(self, d_in: int, d_out: int, factor: tuple[int, int], bias: bool = False):
        super().__init__()
        self.factor = tuple(factor)
        self.proj = nn.Linear(d_in, d_out * self.factor[0] * self.factor[1], bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, h, w, D) -> (B, h*f, w*f, C)
        return ungroup(self.proj(x), *self.factor)


# --------------------------------------------------------------------------------------------
# down


class Merge(TokenMerge):
    """``down: merge``: this level's tokens, grouped and projected to the next width."""

    # a level's down also takes the model input (Repatch uses it); the weights are TokenMerge's
    def forward(self, x: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)  # (B, h/f, w/f, D_next)


class Repatch(nn.Module):
    """``down: repatch``: ``Linear(group(x_input, p)) (+ position)`` on the coarse grid; this
    level's tokens are not used (they become the skip)."""

    def __init__(
        self, in_channels: int, d_model: int, patch: int, bias: bool, position: nn.Module | None
    ):
        super().__init__()
        self.embed = TokenMerge(in_channels, d_model, (patch, patch), bias=bias)
        self.position = position

    def forward(self, x: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        h = self.embed(x_in)  # (B, H/p, W/p, D_next)
        return self.position(h) if self.position is not None else h


# --------------------------------------------------------------------------------------------
# up


class Split(TokenSplit):
    """``up: split``: project and ungroup; prefix tokens pass through."""

    # a level's up also carries the prefix tokens; the weights are TokenSplit's
    def forward(  # type: ignore[override]
        self, x: torch.Tensor, prefix: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return super().forward(x), prefix  # (B, h*f, w*f, D_i)


class Upsample(nn.Module):
    """``up: upsample``: ``proj (D -> f^2 D) -> ungroup (pixel shuffle, (row, col, channel)
    order) -> GELU`` on the grid, then ``norm -> refine`` over grid and prefix tokens, then
    ``+ position``."""

    def __init__(
        self,
        d_model: int,
        factor: int,
        bias: bool = True,
        approximate: str = "tanh",
        norm_kind: Literal["layer", "rms"] = "layer",
        norm_eps: float = 1e-6,
        norm_affine: bool = False,
        position: nn.Module | None = None,
    ):
        super().__init__()
        self.factor, self.approximate = factor, approximate
        self.proj = nn.Linear(d_model, d_model * factor * factor, bias=bias)
        self.norm = make_norm(norm_kind, d_model, norm_eps, norm_affine)
        self.refine = nn.Linear(d_model, d_model, bias=bias)
        self.position = position

    def forward(
        self,
        x: torch.Tensor,
        prefix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = ungroup(self.proj(x), self.factor, self.factor)  # (B, h*f, w*f, D)
        x = F.gelu(x, approximate=self.approximate)
        x = self.refine(self.norm(x))
        if prefix is not None:  # (B, T, D): same norm and refine, no shuffle
            prefix = self.refine(self.norm(prefix))
        if self.position is not None:
            x = self.position(x)
        return x, prefix


# --------------------------------------------------------------------------------------------
# spec -> module


def build_down(spec: S.ModelSpec, i: int) -> nn.Module:
    """Level ``i``'s down transition."""
    lvl, nxt, f = spec.levels[i], spec.levels[i + 1].d_model, spec.factors()[i]
    assert lvl.down is not None  # an outer level (the spec checks it has a down)
    match lvl.down:
        case S.Merge(bias=bias):
            return Merge(lvl.d_model, nxt, (f, f), bias=bias)
        case S.Repatch(patch_size=p, bias=bias, position=pos):
            coarse = spec.token_grids()[i + 1]
            return Repatch(spec.input.channels, nxt, p, bias, build_position(pos, coarse, nxt))
        case other:
            assert_never(other)


def build_up(spec: S.ModelSpec, i: int) -> nn.Module:
    """Level ``i``'s up transition (``up`` omitted: the split inverse to the merge)."""
    lvl, nxt, f = spec.levels[i], spec.levels[i + 1].d_model, spec.factors()[i]
    assert lvl.down is not None  # an outer level (the spec checks it has a down)
    match lvl.up:
        case None | S.Split():
            return Split(nxt, lvl.d_model, (f, f), bias=lvl.down.bias)
        case S.Upsample(bias=bias, approximate=ap, norm=n, position=pos):
            return Upsample(
                lvl.d_model,
                f,
                bias,
                ap,
                n.kind,
                n.eps,
                n.affine,
                build_position(pos, spec.token_grids()[i], lvl.d_model),
            )
        case other:
            assert_never(other)
