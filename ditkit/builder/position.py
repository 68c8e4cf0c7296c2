"""Positional encodings: absolute tables added after the patch embedding, and axial RoPE."""

from __future__ import annotations

import math
from typing import assert_never, cast

import torch
import torch.nn.functional as F
from torch import nn

from ditkit import spec as S


def sincos_table(
    h: int, w: int, dim: int, max_period: float = 10000.0, device=None
) -> torch.Tensor:
    """DiT's 2-D sin-cos table, ``(h, w, dim)``: the first half of the channels encodes the
    column index, the second half the row index, each as ``[sin(p w_k), cos(p w_k)]`` with
    ``w_k = max_period^(-k / (dim/4))``."""
    quarter = dim // 4
    omega = 1.0 / max_period ** (
        torch.arange(quarter, dtype=torch.float64, device=device) / quarter
    )

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
            self.table.copy_(
                sincos_table(*self.grid, self.table.shape[-1], self.max_period, self.table.device)
            )

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
            table = F.interpolate(
                table.permute(2, 0, 1)[None],
                size=(x.shape[1], x.shape[2]),
                mode="bicubic",
                align_corners=False,
            )[0].permute(1, 2, 0)
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


def random_positions(
    pos: torch.Tensor, draw: torch.Tensor, kind: str, max_scale: float, probability: float
) -> torch.Tensor:
    """Randomised training positions (:class:`ditkit.spec.RandomPositions`): the grid's
    ``(H, W, 2)`` positions ``pos`` -> ``(B, H, W, 2)``, one random stretched and shifted window
    per sample. ``draw`` ``(B, 5)`` holds uniforms in [0, 1): ``w, v_row, u_row, v_col,
    u_col``. Per sample and axis (``n`` tokens on the axis, ``s = max_scale``):
    ``a = 1 + v (s - 1)`` and ``p' = a p + u (s - a) n`` for ``integer`` positions (inside
    ``[0, s n)``), ``p' = a p + (2u - 1)(s - a)`` for ``normalized`` ones (inside
    ``(-s, s)``); a sample with ``w >= probability`` keeps ``p' = p``."""
    s = float(max_scale)
    draw = draw.to(pos.dtype)
    on = (draw[:, 0] < probability)[:, None]  # (B, 1)
    v, u = draw[:, 1::2], draw[:, 2::2]  # (B, 2) each: (row, col)
    a = torch.where(on, 1 + v * (s - 1), torch.ones_like(v))  # spacing
    if kind == "integer":
        n = pos.new_tensor([pos.shape[0], pos.shape[1]])
        b = u * (s - a) * n
    else:
        b = (2 * u - 1) * (s - a)
    b = torch.where(on, b, torch.zeros_like(b))  # offset
    return pos[None] * a[:, None, None, :] + b[:, None, None, :]  # (B, H, W, 2)


def batched_rope_angles(
    pos: torch.Tensor, freqs_row: torch.Tensor, freqs_col: torch.Tensor
) -> torch.Tensor:
    """Per-sample positions ``(B, H, W, 2)`` and (row, col) frequencies ``(heads, r/4)`` or
    ``(B, heads, r/4)`` -> angles ``(B, heads, H, W, r/2)`` (row angles then col)."""
    fr = freqs_row if freqs_row.ndim == 3 else freqs_row[None]
    fc = freqs_col if freqs_col.ndim == 3 else freqs_col[None]
    th = pos[:, None, :, :, 0:1] * fr[:, :, None, None, :]
    tw = pos[:, None, :, :, 1:2] * fc[:, :, None, None, :]
    return torch.cat([th, tw], dim=-1)


def rope_frequencies(
    n_heads: int, rotated: int, layout: str, freq_min: float, freq_max: float, base: float
) -> torch.Tensor:
    """``(n_heads, rotated // 4)`` frequencies per head and axis.

    ``log_spaced`` (HDiT): ``n_heads * rotated/4`` log-uniform values in [freq_min, freq_max)
    dealt out across heads (head ``h`` gets values ``h, h + n_heads, ...``).
    ``geometric``: ``base^(-j / (rotated/4))``, the same for every head."""
    per_axis = rotated // 4
    if layout == "log_spaced":
        freqs = torch.linspace(math.log(freq_min), math.log(freq_max), n_heads * per_axis + 1)[
            :-1
        ].exp()
        return freqs.view(per_axis, n_heads).T.contiguous()
    freqs = base ** (-torch.arange(per_axis, dtype=torch.float32) / per_axis)
    return freqs[None].expand(n_heads, per_axis).contiguous()


def rope_angles(
    freqs: torch.Tensor, pos: torch.Tensor, freqs_col: torch.Tensor | None = None
) -> torch.Tensor:
    """freqs (heads, r/4), pos (H, W, 2) -> angles (heads, H, W, r/2): row angles then col
    (``freqs_col``: other frequencies for the columns; default the same)."""
    th = pos[None, :, :, 0:1] * freqs[:, None, None, :]
    fc = freqs if freqs_col is None else freqs_col
    tw = pos[None, :, :, 1:2] * fc[:, None, None, :]
    return torch.cat([th, tw], dim=-1)


def apply_rope(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * theta.shape[-1]`` channels of ``x`` (..., D): channel ``i`` pairs
    with ``i + r/2``; the rest pass through. Computed in fp32, returned in x's dtype."""
    d = theta.shape[-1]
    x1, x2, rest = x[..., :d], x[..., d : 2 * d], x[..., 2 * d :]
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = theta.to(dtype).cos(), theta.to(dtype).sin()
    x1f, x2f = x1.to(dtype), x2.to(dtype)
    y1 = (x1f * cos - x2f * sin).to(x.dtype)
    y2 = (x2f * cos + x1f * sin).to(x.dtype)
    return torch.cat([y1, y2, rest], dim=-1)


def apply_rope_(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` in place on an fp32 ``x`` (eager inference: no autograd): the rotated
    channels are overwritten, the rest is not copied. Other dtypes: :func:`apply_rope`."""
    if x.dtype != torch.float32:
        return apply_rope(x, theta)
    d = theta.shape[-1]
    cos, sin = theta.float().cos(), theta.float().sin()
    x1, x2 = x[..., :d], x[..., d : 2 * d]
    y1 = (x1 * cos).sub_(x2 * sin)
    x2.mul_(cos).add_(x1 * sin)
    x1.copy_(y1)
    return x


def scaled_rope_frequencies(freqs: torch.Tensor, scaling: S.RopeScaling) -> torch.Tensor:
    """``(2, heads, r/4)`` (row, col) frequencies of ``freqs`` ``(heads, r/4)`` under a RoPE
    ``scaling`` (formulas: :class:`ditkit.spec.NtkScaling`, :class:`ditkit.spec.YarnScaling`),
    computed in float64.

    NTK-aware: ``w' = w * s^(-g)``, ``g = (ln w_max - ln w) / (ln w_max - ln w_min)`` over the
    layer's frequencies (the highest kept, the lowest divided by ``s``; for the geometric layout
    ``base' = base * s^(m/(m-1))``, the per-axis form of ``base * s^(d/(d-2))``).
    YaRN: ``r = L w / 2 pi``; ``gamma = clamp((r - alpha) / (beta - alpha), 0, 1)``;
    ``w' = (1 - gamma) w / s + gamma w``."""
    w = freqs.to(torch.float64)
    axes = []
    match scaling:
        case S.NoRopeScaling():
            return torch.stack([freqs, freqs])
        case S.NtkScaling(scale=scale):
            assert scale is not None  # derived by the policies; AxialRope checks it is set
            lo, hi = w.min().log(), w.max().log()
            g = (hi - w.log()) / (hi - lo).clamp_min(1e-300)  # one frequency: g = 0, kept
            for s in scale:
                axes.append(w * float(s) ** -g)
        case S.YarnScaling(alpha=alpha, beta=beta, scale=scale, trained_length=length):
            # derived by the policies; AxialRope checks both are set
            assert scale is not None and length is not None
            for s, L in zip(scale, length):
                r = L * w / (2 * math.pi)
                gamma = ((r - alpha) / (beta - alpha)).clamp(0.0, 1.0)
                axes.append((1 - gamma) * w / s + gamma * w)
        case other:
            assert_never(other)
    return torch.stack(axes).to(freqs.dtype)


def yarn_logit_factor(scale: tuple[float, float]) -> float:
    """YaRN's attention temperature on the logits: ``1/t = (0.1 ln s + 1)^2`` (the paper's
    ``sqrt(1/t) = 0.1 ln s + 1`` on q and k each), ``s`` the geometric mean of the axes'
    scales; 1 for ``s <= 1``."""
    s = math.sqrt(scale[0] * scale[1])
    return (0.1 * math.log(s) + 1.0) ** 2 if s > 1.0 else 1.0


def ramp_weights(freqs: torch.Tensor, scaling: S.RopeScaling) -> torch.Tensor:
    """``(2, heads, r/4)`` per axis, how much of the rescaling each frequency takes, for the
    noise-dependent form (:func:`dynamic_rope_frequencies`): NTK's ``g`` (0 at the highest
    frequency, 1 at the lowest), YaRN's ``1 - gamma`` (1: interpolated, 0: kept)."""
    w = freqs.to(torch.float64)
    match scaling:
        case S.NtkScaling():
            lo, hi = w.min().log(), w.max().log()
            g = (hi - w.log()) / (hi - lo).clamp_min(1e-300)
            return torch.stack([g, g]).to(freqs.dtype)
        case S.YarnScaling(alpha=alpha, beta=beta, trained_length=length):
            assert length is not None  # derived by the policies; AxialRope checks it is set
            return torch.stack(
                [1 - ((L * w / (2 * math.pi) - alpha) / (beta - alpha)).clamp(0, 1) for L in length]
            ).to(freqs.dtype)
        case _:
            raise TypeError(f"no noise-dependent form of {scaling.kind}")


def dynamic_rope_frequencies(
    freqs: torch.Tensor, ramp: torch.Tensor, scaling: S.NtkScaling | S.YarnScaling, t: torch.Tensor
) -> torch.Tensor:
    """``(2, B, heads, r/4)`` row / column frequencies for noise fractions ``t`` ``(B,)``: the
    scale ``s(t) = s^(t^time_exponent)`` per sample (:class:`ditkit.spec.NtkScaling`).
    NTK: ``w' = w * s(t)^(-g)``; YaRN: ``w' = (1 - gamma) w / s(t) + gamma w``."""
    # noise-dependent scaling only (time_exponent set); scale: checked set by AxialRope
    assert scaling.time_exponent is not None and scaling.scale is not None
    kappa = t.float() ** scaling.time_exponent  # (B,); t in [0, 1] (Context.noise)
    out = []
    for axis, s in enumerate(scaling.scale):
        log_s = kappa[:, None, None] * math.log(s)  # (B, 1, 1): ln s(t)
        rw = ramp[axis][None]  # (1, heads, r/4)
        if isinstance(scaling, S.NtkScaling):
            out.append(freqs[None] * torch.exp(-rw * log_s))
        else:
            out.append(freqs[None] * (rw * torch.exp(-log_s) + (1 - rw)))
    return torch.stack(out)


def dynamic_yarn_temperature(scaling: S.YarnScaling, t: torch.Tensor) -> torch.Tensor:
    """``(B,)`` YaRN's temperature per sample as one factor on the logits (applied to q):
    ``(0.1 ln s(t) + 1)^2`` (the paper's ``sqrt(1/t)`` on q and on k), ``s`` the axes'
    geometric mean, ``s(t) = s^(t^time_exponent)``."""
    # noise-dependent scaling only (time_exponent set); scale: checked set by AxialRope
    assert scaling.time_exponent is not None and scaling.scale is not None
    s = math.sqrt(scaling.scale[0] * scaling.scale[1])
    kappa = t.float() ** scaling.time_exponent
    return (0.1 * kappa * math.log(max(s, 1.0)) + 1.0) ** 2
