"""Output heads: tokens -> patches of output channels, one class per spec variant.

Every head is called as ``head(x, cond, shared)``: the last tokens ``(B, h, w, D)``, the
conditioning vector ``(B, cond_width)`` and the shared adaLN vectors ``(B, 6 D)`` (None unless
the blocks share one modulation network); each takes what it needs. The output Linear is
zero-initialised in every head."""

from __future__ import annotations

from typing import Literal, assert_never

import torch
from torch import nn

from ditkit import spec as S

from .norm import make_norm
from .transitions import ungroup


class Head(nn.Module):
    """``norm -> (modulation) -> Linear -> ungroup`` to ``(B, C_out, H, W)``; a subclass says
    where the modulation comes from (``forward``)."""

    def __init__(
        self,
        d_model: int,
        out_channels: int,
        patch: tuple[int, int],
        norm_kind: Literal["layer", "rms"],
        norm_eps: float,
        norm_affine: bool,
        bias: bool,
        cond_width: int = 0,
    ):
        super().__init__()
        self.patch = tuple(patch)
        self.norm = make_norm(norm_kind, d_model, norm_eps, norm_affine)
        self._make_modulation(cond_width, d_model)  # before proj: construction order is init order
        self.proj = nn.Linear(d_model, self.patch[0] * self.patch[1] * out_channels, bias=bias)

    def _make_modulation(self, cond_width: int, d_model: int) -> None:
        """Heads with a modulation network of their own create it here."""

    def init_special(self) -> None:
        nn.init.zeros_(self.proj.weight)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def _out(self, x: torch.Tensor) -> torch.Tensor:  # (B, h, w, D) -> (B, C_out, H, W)
        x = ungroup(self.proj(x), *self.patch)  # (B, H, W, C_out)
        return x.permute(0, 3, 1, 2)


class LinearHead(Head):
    """``head: linear`` (HDiT): an unmodulated norm."""

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, shared: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._out(self.norm(x))


class AdaLNHead(Head):
    """``head: ada_ln`` (DiT's FinalLayer): ``SiLU(cond) -> Linear -> (shift, scale)``,
    zero-initialised."""

    def _make_modulation(self, cond_width: int, d_model: int) -> None:
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_width, 2 * d_model))

    def init_special(self) -> None:
        super().init_special()
        # a Sequential's items are plain Modules to mypy (their attributes Tensor | Module)
        nn.init.zeros_(self.modulation[1].weight)  # type: ignore[arg-type]
        nn.init.zeros_(self.modulation[1].bias)  # type: ignore[arg-type]

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, shared: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.norm(x)  # (B, h, w, D)
        shift, scale = self.modulation(cond)[:, None, None, :].chunk(2, dim=-1)
        return self._out(x * (1 + scale) + shift)


class SharedAdaLNHead(Head):
    """``head: {kind: ada_ln, shared: true}`` (MPDiT's ``FinalLayer``): DiT's final layer with
    shift / scale taken from the shared modulation (chunks 3 and 4: the FFN's shift and
    scale); no modulation parameters of its own."""

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, shared: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.norm(x)  # (B, h, w, D)
        if shared is None:
            raise ValueError("the shared adaLN head needs the shared modulation")
        shift, scale = shared[:, None, None, :].chunk(6, dim=-1)[3:5]
        return self._out(x * (1 + scale) + shift)


def build_head(spec: S.ModelSpec) -> Head:
    """The module of the spec's ``head`` (on the outermost level's tokens)."""
    d0, cw, patch = spec.levels[0].d_model, spec.cond_width, S.pair(spec.patch.size)
    match spec.head:
        case S.AdaLNHead(shared=True) as h:
            return SharedAdaLNHead(
                d0, spec.out_channels, patch, h.norm.kind, h.norm.eps, h.norm.affine, h.bias
            )
        case S.AdaLNHead() as h:
            return AdaLNHead(
                d0, spec.out_channels, patch, h.norm.kind, h.norm.eps, h.norm.affine, h.bias, cw
            )
        case S.LinearHead() as h:
            return LinearHead(
                d0, spec.out_channels, patch, h.norm.kind, h.norm.eps, h.norm.affine, h.bias
            )
        case other:
            assert_never(other)
