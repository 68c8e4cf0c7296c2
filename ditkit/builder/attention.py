"""Self-attention over a token grid: projections, QK norm, cosine logits, RoPE, then a kernel.

Everything that shapes q and k (QK norm, cosine scaling, RoPE) happens here, before the kernel,
so every kernel / backend in ``kernels.py`` sees the same q, k, v and gives the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .init import zero_linear_
from .norm import Norm
from .position import apply_rope, grid_positions, rope_angles, rope_frequencies
from .tags import NO_DECAY, tag


class Attention(nn.Module):
    """Multi-head self-attention on ``(B, H, W, C)`` grids; a subclass per pattern of the spec
    (global, neighborhood, shifted window) makes the kernel call (``attend``). ``logits``: ``dot``
    (``q.k / sqrt(d_head)``) or ``cosine`` (HDiT: ``scale_h * cos(q, k)`` with a learned
    per-head ``scale`` initialised to ``scale_init``). The qkv channel layout is
    ``(3, heads, d_head)``, as in DiT (timm) and k-diffusion."""

    def __init__(self, d_model: int, d_head: int, *, logits: str = "dot",
                 scale_init: float = 10.0, cosine_eps: float = 1e-6, qk_norm: str = "none",
                 qk_norm_affine: bool = True, qk_norm_eps: float = 1e-6,
                 rope_fraction: float = 0.0, rope_positions: str = "normalized",
                 rope_frequencies_layout: str = "log_spaced", rope_freq_min: float = 3.14159,
                 rope_freq_max: float = 31.4159, rope_base: float = 10000.0,
                 rope_position_scale: tuple[float, float] = (1.0, 1.0), bias: bool = True,
                 dropout: float = 0.0, zero_init_out: bool = False):
        super().__init__()
        self.d_head, self.n_heads = d_head, d_model // d_head
        self.logits, self.cosine_eps, self.scale_init = logits, cosine_eps, scale_init
        self.zero_init_out = zero_init_out
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.q_norm = self.k_norm = None
        if qk_norm != "none":
            self.q_norm = Norm(d_head, qk_norm, qk_norm_eps, qk_norm_affine)
            self.k_norm = Norm(d_head, qk_norm, qk_norm_eps, qk_norm_affine)
        self.scale = nn.Parameter(torch.full((self.n_heads,), scale_init)) if logits == "cosine" else None
        tag(self, "scale", NO_DECAY)
        self.rope_positions = rope_positions
        self.rope_position_scale = tuple(float(v) for v in rope_position_scale)
        rotated = int(round(rope_fraction * d_head))
        self.register_buffer(
            "rope_freqs",
            rope_frequencies(self.n_heads, rotated, rope_frequencies_layout, rope_freq_min,
                             rope_freq_max, rope_base) if rotated else None,
            persistent=False)  # derived from the spec, so not part of a checkpoint
        self._rope_args = (self.n_heads, rotated, rope_frequencies_layout, rope_freq_min,
                           rope_freq_max, rope_base)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def init_special(self) -> None:
        if self.scale is not None:
            nn.init.constant_(self.scale, self.scale_init)
        if self.rope_freqs is not None:
            self.rope_freqs = rope_frequencies(*self._rope_args).to(self.rope_freqs.device)
        if self.zero_init_out:
            zero_linear_(self.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        b, hh, ww, c = x.shape
        qkv = self.qkv(x).view(b, hh, ww, 3, self.n_heads, self.d_head)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # each (B, heads, H, W, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.scale is not None:
            q, k = self._cosine(q, k)
            scale = 1.0
        else:
            scale = self.d_head ** -0.5
        if self.rope_freqs is not None:
            pos = grid_positions(hh, ww, self.rope_positions, x.device)
            if self.rope_position_scale != (1.0, 1.0):
                pos = pos * pos.new_tensor(self.rope_position_scale)
            theta = rope_angles(self.rope_freqs.float(), pos)  # (heads, H, W, r/2)
            q, k = apply_rope(q, theta), apply_rope(k, theta)

        o = self.attend(q, k, v, scale)  # (B, heads, H, W, D)
        o = o.permute(0, 2, 3, 1, 4).reshape(b, hh, ww, c)  # (B, H, W, C)
        return self.out(self.dropout(o))

    def _cosine(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale q and k to norm sqrt(scale) each (in fp32), so q.k = scale * cos(q, k)."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        s = self.scale.to(dtype).sqrt()[:, None, None, None]  # (heads, 1, 1, 1)
        qf, kf = q.to(dtype), k.to(dtype)
        qf = qf * (s * torch.rsqrt(qf.pow(2).sum(-1, keepdim=True) + self.cosine_eps))
        kf = kf * (s * torch.rsqrt(kf.pow(2).sum(-1, keepdim=True) + self.cosine_eps))
        return qf.to(q.dtype), kf.to(k.dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor:
        """The kernel call of the pattern: ``(B, heads, H, W, D)`` q, k, v -> same."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, d_head={self.d_head}, logits={self.logits}"


class GlobalAttention(Attention):
    """Every token attends to every token of the grid (fused SDPA)."""

    def attend(self, q, k, v, scale):
        b, nh, hh, ww, d = q.shape
        o = kernels.global_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), scale)
        return o.view(b, nh, hh, ww, d)


class NeighborhoodAttention(Attention):
    """Each token attends to its ``kernel_size`` NATTEN neighborhood (with ``dilation``),
    through the backend ``kernels.use_backend`` selects."""

    def __init__(self, d_model: int, d_head: int, kernel_size: tuple[int, int],
                 dilation: tuple[int, int] = (1, 1), **kwargs):
        super().__init__(d_model, d_head, **kwargs)
        self.kernel_size, self.dilation = tuple(kernel_size), tuple(dilation)

    def attend(self, q, k, v, scale):
        return kernels.neighborhood_attention(q, k, v, self.kernel_size, self.dilation, scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel_size}, dilation={self.dilation}"


class ShiftedWindowAttention(Attention):
    """Swin-style windows of ``window_size``, rolled by ``window_shift`` (0: unshifted)."""

    def __init__(self, d_model: int, d_head: int, window_size: int, window_shift: int = 0,
                 **kwargs):
        super().__init__(d_model, d_head, **kwargs)
        self.window_size, self.window_shift = window_size, window_shift

    def attend(self, q, k, v, scale):
        return kernels.shifted_window_attention(q, k, v, self.window_size, self.window_shift,
                                                scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window_size}, shift={self.window_shift}"
