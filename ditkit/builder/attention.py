"""Self-attention over a token grid, one class per attention kind of the spec: projections,
QK norm, cosine logits, RoPE, then a kernel.

Everything that shapes q and k (QK norm, cosine scaling, RoPE) happens here, before the kernel,
so every kernel / backend in ``kernels.py`` sees the same q, k, v and gives the same numbers.
:func:`build_attention` is the one place a spec's ``attention`` picks its class (adding an
attention kind: ``docs/guides/add-an-attention-kind.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import assert_never

import torch
from torch import nn

from ditkit import spec as S
from ditkit.errors import UserError

from . import kernels
from .init import zero_linear_
from .norm import Norm, make_norm
from .position import (
    apply_rope,
    apply_rope_,
    batched_rope_angles,
    dynamic_rope_frequencies,
    dynamic_yarn_temperature,
    grid_positions,
    ramp_weights,
    random_positions,
    rope_angles,
    rope_frequencies,
    scaled_rope_frequencies,
)
from .tags import NO_DECAY, tag
from .transitions import group, ungroup


@dataclass(frozen=True)
class AttentionConfig:
    """What every attention module of a block shares, built once by ``build()``'s ``_block``:
    widths, QK norm, logits, RoPE (the spec's own ``QKNorm`` / ``Logits`` / ``Rope`` values),
    projection bias, output dropout and zero-initialised output projection."""

    d_model: int
    d_head: int
    qk_norm: S.QKNorm = S.QKNorm()
    logits: S.DotLogits | S.CosineLogits = S.DotLogits()
    rope: S.NoRope | S.AxialRope = S.NoRope()
    bias: bool = True
    dropout: float = 0.0
    zero_init_out: bool = False


class QKRope(nn.Module):
    """The q / k shaping every attention module shares: per-head QK norm (``q_norm``,
    ``k_norm``) and axial RoPE on a ``(H, W)`` grid (``rope_freqs``, derived from the spec and
    so kept out of checkpoints). Mixed into :class:`Attention` and the aggregate attention;
    ``_setup_qk`` registers the same parameter names either way."""

    # buffers (registered in _setup_qk), typed here: nn.Module's __getattr__ is untyped
    rope_freqs: torch.Tensor | None
    rope_freqs_scaled: torch.Tensor | None

    def _setup_qk(self, cfg: AttentionConfig, n_heads: int, *, rope: bool = True) -> None:
        """QK norms, then (``rope``) the RoPE frequencies for ``n_heads`` heads."""
        self.q_norm: Norm | None = None
        self.k_norm: Norm | None = None
        n = cfg.qk_norm
        if n.kind != "none":
            self.q_norm = make_norm(n.kind, cfg.d_head, n.eps, n.affine)
            self.k_norm = make_norm(n.kind, cfg.d_head, n.eps, n.affine)
        if not rope:
            return
        r = cfg.rope
        rotated = int(round(r.fraction * cfg.d_head)) if isinstance(r, S.AxialRope) else 0
        ax = r if isinstance(r, S.AxialRope) and rotated else None  # None: no rotated channels
        self._rope_args: tuple[int, int, str, float, float, float] | None = (
            (n_heads, rotated, ax.frequencies, ax.freq_min, ax.freq_max, ax.base)
            if ax is not None
            else None
        )
        self.rope_positions = ax.positions if ax is not None else "normalized"
        self.rope_position_scale = (
            tuple(float(v) for v in ax.position_scale) if ax is not None else (1.0, 1.0)
        )
        self.rope_scaling: S.NtkScaling | S.YarnScaling | None = (
            ax.scaling if ax is not None and not isinstance(ax.scaling, S.NoRopeScaling) else None
        )
        self.rope_dynamic = (
            self.rope_scaling is not None and self.rope_scaling.time_exponent is not None
        )
        tp = ax.train_positions if ax is not None else None
        # (max_scale, probability) of randomised training positions; None: the grid's
        self.rope_random: tuple[float, float] | None = (
            (tp.max_scale, tp.probability) if isinstance(tp, S.RandomPositions) else None
        )
        self.register_buffer(
            "rope_freqs",
            rope_frequencies(*self._rope_args) if self._rope_args is not None else None,
            persistent=False,
        )
        # (2, heads, r/4) row and column frequencies under the policy's rescaling (NTK / YaRN)
        self.register_buffer("rope_freqs_scaled", self._scaled(self.rope_freqs), persistent=False)

    def _scaled(self, freqs: torch.Tensor | None) -> torch.Tensor | None:
        """Static scaling: the rescaled (row, col) frequencies; noise-dependent: the per
        frequency ramp weights the forward combines with each sample's scale."""
        if freqs is None or self.rope_scaling is None:
            return None
        if self.rope_dynamic:
            return ramp_weights(freqs, self.rope_scaling)
        return scaled_rope_frequencies(freqs, self.rope_scaling)

    def _init_rope(self) -> None:
        if self.rope_freqs is not None:
            assert self._rope_args is not None  # rope_freqs exists exactly when they do
            self.rope_freqs = rope_frequencies(*self._rope_args).to(self.rope_freqs.device)
            self.rope_freqs_scaled = self._scaled(self.rope_freqs)

    def _norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_norm is not None:
            assert self.k_norm is not None  # set together in _setup_qk
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k

    def _rope(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        hh: int,
        ww: int,
        noise: torch.Tensor | None = None,
        draw: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on ``(B, heads, H, W, D)`` q and k (identity without RoPE); ``noise``: the
        samples' noise fractions ``(B,)``, read by noise-dependent scaling only; ``draw``:
        the forward's ``(B, 5)`` uniforms for randomised training positions (``None`` outside
        training), read only when this module's RoPE has ``train_positions: random``."""
        if self.rope_freqs is None:
            return q, k
        pos = grid_positions(hh, ww, self.rope_positions, q.device)
        if draw is not None and self.rope_random is not None:
            return self._random_rope(q, k, pos, noise, draw)
        if self.rope_position_scale != (1.0, 1.0):
            pos = pos * pos.new_tensor(self.rope_position_scale)
        if self.rope_dynamic:
            rows, cols, temp = self._dynamic_frequencies(noise)
            th = pos[None, None, :, :, 0:1] * rows[:, :, None, None, :]
            tw = pos[None, None, :, :, 1:2] * cols[:, :, None, None, :]
            theta = torch.cat([th, tw], dim=-1)  # (B, heads, H, W, r/2)
            q, k = apply_rope(q, theta), apply_rope(k, theta)
            if temp is not None:  # YaRN's temperature, on the logits
                q = q * temp.to(q.dtype)[:, None, None, None, None]
            return q, k
        angles = self._theta(hh, ww, q.device)
        assert angles is not None  # rope_freqs is set
        return apply_rope(q, angles), apply_rope(k, angles)

    def _dynamic_frequencies(
        self, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Noise-dependent scaling (a scaling with ``time_exponent``, its ramp weights in
        ``rope_freqs_scaled``): each sample's row and column frequencies ``(B, heads, r/4)``,
        and YaRN's per-sample logit temperature ``(B,)`` (``None`` without one)."""
        if noise is None:
            raise UserError(
                "noise-dependent RoPE scaling (time_exponent) needs the noise "
                "level: a sigma (noise: fourier) or flow-time (noise: fno) "
                "input; drop time_exponent for this model"
            )
        assert self.rope_freqs is not None  # a dynamic scaling has frequencies
        assert self.rope_scaling is not None and self.rope_freqs_scaled is not None
        fr = dynamic_rope_frequencies(
            self.rope_freqs.float(), self.rope_freqs_scaled.float(), self.rope_scaling, noise
        )  # (2, B, heads, r/4)
        temp = None
        if isinstance(self.rope_scaling, S.YarnScaling) and self.rope_scaling.temperature:
            temp = dynamic_yarn_temperature(self.rope_scaling, noise)
        return fr[0], fr[1], temp

    def _theta(self, hh: int, ww: int, device: torch.device) -> torch.Tensor | None:
        """Static RoPE angles ``(heads, H, W, r/2)`` of an ``H x W`` grid (None: no RoPE)."""
        if self.rope_freqs is None:
            return None
        pos = grid_positions(hh, ww, self.rope_positions, device)
        if self.rope_position_scale != (1.0, 1.0):
            pos = pos * pos.new_tensor(self.rope_position_scale)
        if self.rope_freqs_scaled is not None:
            return rope_angles(
                self.rope_freqs_scaled[0].float(), pos, self.rope_freqs_scaled[1].float()
            )
        return rope_angles(self.rope_freqs.float(), pos)

    def _random_rope(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        pos: torch.Tensor,
        noise: torch.Tensor | None,
        draw: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE with randomised per-sample positions (training only): the same frequencies as
        :meth:`_rope`, on :func:`random_positions` of the grid's ``pos``."""
        assert self.rope_freqs is not None and self.rope_random is not None  # checked by _rope
        pos = random_positions(pos, draw, self.rope_positions, *self.rope_random)  # (B, H, W, 2)
        if self.rope_position_scale != (1.0, 1.0):
            pos = pos * pos.new_tensor(self.rope_position_scale)
        freqs = self.rope_freqs.float()
        rows, cols = freqs, freqs
        temp = None
        if self.rope_dynamic:
            rows, cols, temp = self._dynamic_frequencies(noise)
        elif self.rope_freqs_scaled is not None:
            rows, cols = self.rope_freqs_scaled[0].float(), self.rope_freqs_scaled[1].float()
        theta = batched_rope_angles(pos, rows, cols)  # (B, heads, H, W, r/2)
        q, k = apply_rope(q, theta), apply_rope(k, theta)
        if temp is not None:
            q = q * temp.to(q.dtype)[:, None, None, None, None]
        return q, k


def _rope_inputs(ctx) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(noise, draw)`` of a forward's :class:`~ditkit.builder.model.Context` (or none)."""
    if ctx is None:
        return None, None
    return ctx.noise, ctx.rope_draw


class DotLogits(nn.Module):
    """``logits: dot``: ``q . k / sqrt(d_head)``."""

    def __init__(self, d_head: int, factor: float = 1.0):
        super().__init__()
        self.factor = d_head**-0.5 * factor

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        gain: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        return q, k, self.factor

    def joint(self, qk: torch.Tensor, gain: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """``forward`` on q and k stacked in one ``(..., 2, heads, D)`` tensor."""
        return qk, self.factor


class CosineLogits(nn.Module):
    """``logits: cosine`` (HDiT): ``gain_h * cos(q, k)``. q and k are scaled to norm
    ``sqrt(gain)`` each (in fp32), so ``q . k = gain * cos(q, k)`` and the kernel's scale is 1.
    ``gain`` is the attention module's learned per-head ``scale``; ``factor`` (1 as trained) is
    the kernel's scale, a constant a resolution policy may set."""

    def __init__(self, eps: float = 1e-6, factor: float = 1.0):
        super().__init__()
        self.eps, self.factor = eps, factor

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        gain: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:  # (B, heads, H, W, D) each
        dtype = torch.promote_types(q.dtype, torch.float32)
        s = gain.to(dtype).sqrt()[:, None, None, None]  # (heads, 1, 1, 1)
        qf, kf = q.to(dtype), k.to(dtype)
        qf = qf * (s * torch.rsqrt(qf.pow(2).sum(-1, keepdim=True) + self.eps))
        kf = kf * (s * torch.rsqrt(kf.pow(2).sum(-1, keepdim=True) + self.eps))
        return qf.to(q.dtype), kf.to(k.dtype), self.factor

    def joint(self, qk: torch.Tensor, gain: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """``forward`` on q and k stacked in one ``(..., 2, heads, D)`` tensor (eager): the sum
        of squares from one ``vector_norm`` pass, then one multiply."""
        assert gain is not None  # the attention module's learned scale, made with cosine logits
        dtype = torch.promote_types(qk.dtype, torch.float32)
        qkf = qk.to(dtype)
        s = gain.to(dtype).sqrt()[:, None]  # (heads, 1)
        n2 = torch.linalg.vector_norm(qkf, dim=-1, keepdim=True).square()  # (..., 2, heads, 1)
        return (qkf * (s * torch.rsqrt(n2 + self.eps))).to(qk.dtype), self.factor

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class Attention(QKRope):
    """Multi-head self-attention on ``(B, H, W, C)`` grids; a subclass per pattern of the spec
    (global, neighborhood, shifted window) makes the kernel call (``attend``). ``logits``:
    :class:`DotLogits` or :class:`CosineLogits` (HDiT: ``scale_h * cos(q, k)`` with a learned
    per-head ``scale`` initialised to ``scale_init``, held here so checkpoints keep
    ``attn.scale``). The qkv channel layout is
    ``(3, heads, d_head)``, as in DiT (timm) and k-diffusion."""

    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        d_model, d_head = cfg.d_model, cfg.d_head
        self.d_head, self.n_heads = d_head, d_model // d_head
        lg = cfg.logits
        cosine = isinstance(lg, S.CosineLogits)
        self.logits = (
            CosineLogits(lg.eps, lg.factor)
            if isinstance(lg, S.CosineLogits)
            else DotLogits(d_head, lg.factor)
        )
        self.scale_init = lg.scale_init if isinstance(lg, S.CosineLogits) else 10.0
        self.zero_init_out = cfg.zero_init_out
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=cfg.bias)
        self._setup_qk(cfg, self.n_heads)
        self.scale = nn.Parameter(torch.full((self.n_heads,), self.scale_init)) if cosine else None
        tag(self, "scale", NO_DECAY)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(d_model, d_model, bias=cfg.bias)

    def init_special(self) -> None:
        if self.scale is not None:
            nn.init.constant_(self.scale, self.scale_init)
        self._init_rope()
        if self.zero_init_out:
            zero_linear_(self.out)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:  # (B, H, W, C)
        b, hh, ww, c = x.shape
        qkv = self.qkv(x).view(b, hh, ww, 3, self.n_heads, self.d_head)
        draw = ctx.rope_draw if ctx is not None else None
        if (
            self.q_norm is None
            and not self.rope_dynamic
            and draw is None
            and kernels.fast_inference()
        ):
            # eager inference: q and k shaped together where the projection wrote them, one
            # pass of each op for both; the kernels read the strided views (no layout copies)
            qk, scale = self.logits.joint(qkv[:, :, :, :2], self.scale)  # (B, H, W, 2, heads, D)
            theta = self._theta(hh, ww, x.device)  # (heads, H, W, r/2)
            if theta is not None:  # in place: qk is the cosine output or qkv's own slice
                qk = apply_rope_(qk, theta.permute(1, 2, 0, 3).unsqueeze(2))
            q, k = qk.permute(3, 0, 4, 1, 2, 5).unbind(0)  # each (B, heads, H, W, D)
            v = qkv[:, :, :, 2].permute(0, 3, 1, 2, 4)
        else:  # traces (the form ditkit/deploy/ort_fusion.py rewrites) and autograd
            q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # each (B, heads, H, W, D)
            q, k = self._norm_qk(q, k)
            q, k, scale = self.logits(q, k, self.scale)  # scale: the kernel's logit factor
            q, k = self._rope(q, k, hh, ww, *_rope_inputs(ctx))

        o = self.attend(q, k, v, scale)  # (B, heads, H, W, D)
        o = o.permute(0, 2, 3, 1, 4).reshape(b, hh, ww, c)  # (B, H, W, C)
        return self.out(self.dropout(o))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """The kernel call of the pattern: ``(B, heads, H, W, D)`` q, k, v -> same."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, d_head={self.d_head}"


class GlobalAttention(Attention):
    """Every token attends to every token of the grid (fused SDPA)."""

    def attend(self, q, k, v, scale):
        b, nh, hh, ww, d = q.shape
        o = kernels.global_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), scale)
        return o.view(b, nh, hh, ww, d)


class NeighborhoodAttention(Attention):
    """Each token attends to its ``kernel_size`` NATTEN neighborhood (with ``dilation``),
    through the backend ``kernels.use_backend`` selects."""

    def __init__(
        self, cfg: AttentionConfig, kernel_size: tuple[int, int], dilation: tuple[int, int] = (1, 1)
    ):
        super().__init__(cfg)
        self.kernel_size, self.dilation = tuple(kernel_size), tuple(dilation)

    def attend(self, q, k, v, scale):
        return kernels.neighborhood_attention(q, k, v, self.kernel_size, self.dilation, scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel_size}, dilation={self.dilation}"


class ShiftedWindowAttention(Attention):
    """Swin-style windows of ``window_size``, rolled by ``window_shift`` (0: unshifted)."""

    def __init__(self, cfg: AttentionConfig, window_size: int, window_shift: int = 0):
        super().__init__(cfg)
        self.window_size, self.window_shift = window_size, window_shift

    def attend(self, q, k, v, scale):
        return kernels.shifted_window_attention(q, k, v, self.window_size, self.window_shift, scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window_size}, shift={self.window_shift}"


class AggregateAttention(QKRope):
    """MDiT's aggregate attention: self-attention on a ``factor x`` coarser grid inside a block.

    ``(B, H, W, C) -> (B, H, W, C)``: the normed grid is grouped ``f x f`` (pixel unshuffle;
    channels ordered (row, col, channel) as everywhere in ditkit), q / k / v come from
    non-square projections ``f^2 d_model -> n_heads d_head``, global attention runs on the
    coarse grid (RoPE positions are the coarse grid's), and the output projection
    ``n_heads d_head -> f^2 d_model`` is ungrouped back to the input grid. The block's FFN stays
    at the input grid, so only attention pays for the wider view. Logits are dot-product
    (of ``cfg.logits`` only the policies' constant ``factor`` is used)."""

    def __init__(self, cfg: AttentionConfig, n_heads: int, factor: int = 2):
        super().__init__()
        d_head = cfg.d_head
        self.factor, self.d_head, self.n_heads = factor, d_head, n_heads
        self.zero_init_out = cfg.zero_init_out
        d_in, inner = cfg.d_model * factor * factor, n_heads * d_head
        self.qkv = nn.Linear(d_in, 3 * inner, bias=cfg.bias)
        self._setup_qk(cfg, n_heads)
        self.logit_factor = cfg.logits.factor  # 1 as trained; set by resolution policies
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(inner, d_in, bias=cfg.bias)

    def init_special(self) -> None:
        self._init_rope()
        if self.zero_init_out:
            zero_linear_(self.out)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:  # (B, H, W, C)
        f = self.factor
        g = group(x, f, f)  # (B, H/f, W/f, f^2 C)
        b, hh, ww, _ = g.shape
        qkv = self.qkv(g).view(b, hh, ww, 3, self.n_heads, self.d_head)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # each (B, heads, h, w, D)
        q, k = self._rope(*self._norm_qk(q, k), hh, ww, *_rope_inputs(ctx))
        o = kernels.global_attention(
            q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), self.d_head**-0.5 * self.logit_factor
        )
        o = o.view(b, self.n_heads, hh, ww, self.d_head).permute(0, 2, 3, 1, 4)
        o = self.out(self.dropout(o.reshape(b, hh, ww, -1)))  # (B, h, w, f^2 C)
        return ungroup(o, f, f)  # (B, H, W, C)

    def extra_repr(self) -> str:
        return f"factor={self.factor}, heads={self.n_heads}, d_head={self.d_head}"


def build_attention(attention: S.Attention, cfg: AttentionConfig, index: int) -> nn.Module | None:
    """The module of a block's ``attention`` (None: the block has no attention sub-layer).
    ``index``: the block's position in its level (shifted windows alternate with it)."""
    match attention:
        case S.NoAttention():
            return None
        case S.AggregateAttention(factor=fac, n_heads=nh):
            return AggregateAttention(cfg, nh, fac)
        case S.GlobalAttention():
            return GlobalAttention(cfg)
        case S.NeighborhoodAttention(kernel_size=k, dilation=d):
            return NeighborhoodAttention(cfg, S.pair(k), S.pair(d))
        case S.ShiftedWindowAttention(window_size=w, shift=shift):
            return ShiftedWindowAttention(
                cfg, w, w // 2 if shift == "alternate" and index % 2 else 0
            )
        case other:
            assert_never(other)
