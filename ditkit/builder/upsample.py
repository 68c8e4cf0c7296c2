"""Coarse-first transitions (MPDiT): a fresh large-patch embedding of the input feeds the next
level (``repatch``), the ``upsample`` block brings tokens back to the fine grid, and a
``linear`` skip adds a projection of the fine level's own stream.

Class prefix tokens (``conditioning.classes.inject: prefix``) travel beside the grid as a
``(B, T, C)`` tensor: ``Repatch`` leaves them alone, ``Upsample`` sets them aside during the
pixel shuffle and re-joins them for its norm and refining Linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditkit import spec as S

from .embed import TokenMerge, ungroup
from .norm import Norm


class Repatch(nn.Module):
    """``x_input (B, H, W, C_in) -> Linear(group(x, p)) (+ position)`` on the coarse grid."""

    def __init__(self, in_channels: int, d_model: int, patch: int, bias: bool,
                 position: nn.Module | None):
        super().__init__()
        self.embed = TokenMerge(in_channels, d_model, (patch, patch), bias=bias)
        self.position = position

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:  # (B, H, W, C_in) -> (B, h, w, D)
        h = self.embed(x_in)
        return self.position(h) if self.position is not None else h


class Upsample(nn.Module):
    """``proj (D -> f^2 D) -> ungroup (pixel shuffle, (row, col, channel) order) -> GELU`` on
    the grid, then ``norm -> refine`` over grid and prefix tokens, then ``+ position``."""

    def __init__(self, d_model: int, factor: int, bias: bool = True, approximate: str = "tanh",
                 norm_kind: str = "layer", norm_eps: float = 1e-6, norm_affine: bool = False,
                 position: nn.Module | None = None):
        super().__init__()
        self.factor, self.approximate = factor, approximate
        self.proj = nn.Linear(d_model, d_model * factor * factor, bias=bias)
        self.norm = Norm(d_model, norm_kind, norm_eps, norm_affine)
        self.refine = nn.Linear(d_model, d_model, bias=bias)
        self.position = position

    def forward(self, x: torch.Tensor,
                prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = ungroup(self.proj(x), self.factor, self.factor)  # (B, h*f, w*f, D)
        x = F.gelu(x, approximate=self.approximate)
        x = self.refine(self.norm(x))
        if prefix is not None:  # (B, T, D): same norm and refine, no shuffle
            prefix = self.refine(self.norm(prefix))
        if self.position is not None:
            x = self.position(x)
        return x, prefix


class LinearSkip(nn.Module):
    """``up + Linear(skip)``."""

    def __init__(self, d_model: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return x + self.proj(skip)


class ClassTokens(nn.Module):
    """``tokens`` learned tokens per class (a ``(classes + null, tokens * d)`` table, MPDiT's
    layout), looked up and viewed as ``(B, tokens, d)``."""

    def __init__(self, classes: S.Classes, d_model: int, std: float = 0.02):
        super().__init__()
        self.classes, self.null_class = classes.count, classes.null_class
        self.tokens, self.std = classes.tokens, std
        self.table = nn.Embedding(classes.rows, classes.tokens * d_model)

    def init_special(self) -> None:
        nn.init.normal_(self.table.weight, std=self.std)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, T, D)
        e = self.table(labels)
        return e.view(e.shape[0], self.tokens, -1)
