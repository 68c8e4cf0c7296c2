"""Attention kernels and the backend switch.

The attention *modules* (``attention.py``) compute q, k, v, apply RoPE / cosine scaling / QK norm
and then call one of the kernels here. Which neighborhood kernel runs is a runtime choice
(``use_backend``), never part of a spec: every backend computes the same numbers.

Layouts: global kernels take ``(B, heads, N, D)``; local kernels take ``(B, heads, H, W, D)``.

Accounting: under ``count_attention()`` the kernels do not compute anything (the describe pass
runs on the meta device); they record the multiply-adds of QK^T and AV from the shapes they were
given -- global ``2 N^2 D`` per head, neighborhood ``2 N k^2 D``, shifted window ``2 N w^2 D`` --
whatever kernel would have run.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

import torch
import torch.nn.functional as F

NEIGHBORHOOD_BACKENDS = ("auto", "gather", "masked", "natten")

_backend: ContextVar[str] = ContextVar("ditkit_neighborhood_backend", default="auto")
_counter: ContextVar[dict | None] = ContextVar("ditkit_attention_counter", default=None)
_scope: ContextVar[str] = ContextVar("ditkit_attention_scope", default="")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select the neighborhood-attention backend for the calls made inside the block."""
    if name not in NEIGHBORHOOD_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of "
                         f"{', '.join(NEIGHBORHOOD_BACKENDS)}")
    if name == "natten" and not natten_available():
        raise RuntimeError("attention backend 'natten' requested but natten is not installed; "
                           "`pip install natten --no-build-isolation` or use backend 'gather'")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def natten_available() -> bool:
    try:
        import natten  # noqa: F401
    except ImportError:
        return False
    return hasattr(natten, "na2d")


def resolve_backend(device: torch.device) -> str:
    name = _backend.get()
    if name != "auto":
        return name
    if device.type == "cuda" and natten_available():
        return "natten"
    return "gather"


@contextlib.contextmanager
def count_attention() -> Iterator[dict]:
    """Record attention multiply-adds per scope instead of computing attention."""
    counts: dict[str, float] = {}
    token = _counter.set(counts)
    try:
        yield counts
    finally:
        _counter.reset(token)


@contextlib.contextmanager
def attention_scope(name: str) -> Iterator[None]:
    token = _scope.set(name)
    try:
        yield
    finally:
        _scope.reset(token)


def _record(macs: int) -> bool:
    counts = _counter.get()
    if counts is None:
        return False
    key = _scope.get()
    counts[key] = counts.get(key, 0) + macs
    return True


# --------------------------------------------------------------------------------------------
# global


def global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, heads, N, D) -> (B, heads, N, D) through the fused SDPA kernel."""
    b, h, n, d = q.shape
    if _record(2 * b * h * n * k.shape[-2] * d):
        return torch.empty_like(q)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# --------------------------------------------------------------------------------------------
# neighborhood


def window_start_index(length: int | torch.SymInt, kernel: int, dilation: int,
                       device: torch.device | None = None) -> torch.Tensor:
    """``(length, kernel)`` indices of the keys each query position sees along one axis.

    NATTEN's rule: positions are split into ``dilation`` interleaved groups; within its group a
    query's window is centred on it and shifted inward at the borders, so it always holds
    exactly ``kernel`` keys. Pure tensor arithmetic (no Python branch on ``length``), so it
    traces with symbolic sizes."""
    i = torch.arange(length, device=device)
    group = i % dilation
    j = i // dilation
    group_len = (length - group + dilation - 1) // dilation
    start = torch.minimum((j - kernel // 2).clamp(min=0), group_len - kernel)
    offsets = torch.arange(kernel, device=device)
    return group[:, None] + dilation * (start[:, None] + offsets[None, :])


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           kernel_size: tuple[int, int], dilation: tuple[int, int],
                           scale: float) -> torch.Tensor:
    """(B, heads, H, W, D) -> same; each query attends to its NATTEN neighborhood."""
    b, nh, hh, ww, d = q.shape
    if _record(2 * b * nh * hh * ww * kernel_size[0] * kernel_size[1] * d):
        return torch.empty_like(q)
    backend = resolve_backend(q.device)
    if backend == "natten":
        return _neighborhood_natten(q, k, v, kernel_size, dilation, scale)
    if backend == "masked":
        return _neighborhood_masked(q, k, v, kernel_size, dilation, scale)
    return _neighborhood_gather(q, k, v, kernel_size, dilation, scale)


def _neighborhood_gather(q, k, v, kernel_size, dilation, scale):
    """Reference: gather each query's kh x kw keys/values by index, O(n k^2) time and memory."""
    hh, ww = q.shape[-3], q.shape[-2]
    ih = window_start_index(hh, kernel_size[0], dilation[0], q.device)  # (H, kh)
    iw = window_start_index(ww, kernel_size[1], dilation[1], q.device)  # (W, kw)
    rows, cols = ih[:, None, :, None], iw[None, :, None, :]  # broadcast to (H, W, kh, kw)
    k_nb = k[:, :, rows, cols]  # (B, heads, H, W, kh, kw, D)
    v_nb = v[:, :, rows, cols]
    logits = torch.einsum("bnhwd,bnhwijd->bnhwij", q, k_nb) * scale
    probs = logits.flatten(-2).softmax(-1).view_as(logits)
    return torch.einsum("bnhwij,bnhwijd->bnhwd", probs, v_nb)


def neighborhood_mask(hh: int, ww: int, kernel_size, dilation, device=None) -> torch.Tensor:
    """(H*W, H*W) boolean mask: True where query (row) may attend key (column)."""
    ih = window_start_index(hh, kernel_size[0], dilation[0], device)
    iw = window_start_index(ww, kernel_size[1], dilation[1], device)
    row_ok = torch.zeros(hh, hh, dtype=torch.bool, device=device).scatter_(1, ih, True)
    col_ok = torch.zeros(ww, ww, dtype=torch.bool, device=device).scatter_(1, iw, True)
    return (row_ok[:, None, :, None] & col_ok[None, :, None, :]).reshape(hh * ww, hh * ww)


def _neighborhood_masked(q, k, v, kernel_size, dilation, scale):
    """O(n^2) reference: dense SDPA with the neighborhood as a boolean mask (tests only)."""
    b, nh, hh, ww, d = q.shape
    mask = neighborhood_mask(hh, ww, kernel_size, dilation, q.device)
    out = F.scaled_dot_product_attention(
        q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), attn_mask=mask, scale=scale)
    return out.view(b, nh, hh, ww, d)


def _neighborhood_natten(q, k, v, kernel_size, dilation, scale):
    import natten

    to_heads_last = lambda t: t.permute(0, 2, 3, 1, 4)  # noqa: E731  (B, H, W, heads, D)
    out = natten.na2d(to_heads_last(q), to_heads_last(k), to_heads_last(v),
                      kernel_size=tuple(kernel_size), dilation=tuple(dilation), scale=scale)
    return out.permute(0, 3, 1, 2, 4)


# --------------------------------------------------------------------------------------------
# shifted window


def shifted_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             window: int, shift: int, scale: float) -> torch.Tensor:
    """(B, heads, H, W, D) -> same. Windows are folded into the batch, so it exports.

    k-diffusion's convention: the grid is rolled by ``+shift`` on both axes, so the wrapped rows
    and columns land in the top / left windows, where a mask keeps wrapped and unwrapped tokens
    apart; the result is rolled back."""
    b, nh, hh, ww, d = q.shape
    if _record(2 * b * nh * hh * ww * window * window * d):
        return torch.empty_like(q)
    nwh, nww = hh // window, ww // window

    def to_windows(t: torch.Tensor) -> torch.Tensor:
        if shift:
            t = torch.roll(t, shifts=(shift, shift), dims=(2, 3))
        t = t.reshape(b, nh, nwh, window, nww, window, d).transpose(3, 4)
        return t.reshape(b, nh, nwh, nww, window * window, d)

    mask = None
    if shift:
        r = torch.arange(window, device=q.device)
        wrapped_row = (torch.arange(nwh, device=q.device)[:, None] == 0) & (r[None, :] < shift)
        wrapped_col = (torch.arange(nww, device=q.device)[:, None] == 0) & (r[None, :] < shift)
        # region id per (window row, window col, row in window, col in window)
        reg_h = wrapped_row[:, None, :, None].expand(nwh, nww, window, window)
        reg_w = wrapped_col[None, :, None, :].expand(nwh, nww, window, window)
        reg_h, reg_w = reg_h.reshape(nwh, nww, -1), reg_w.reshape(nwh, nww, -1)
        mask = (reg_h[..., :, None] == reg_h[..., None, :]) & (
            reg_w[..., :, None] == reg_w[..., None, :])  # (nWh, nWw, w^2, w^2)
    out = F.scaled_dot_product_attention(to_windows(q), to_windows(k), to_windows(v),
                                         attn_mask=mask, scale=scale)
    out = out.reshape(b, nh, nwh, nww, window, window, d).transpose(3, 4)
    out = out.reshape(b, nh, hh, ww, d)
    if shift:
        out = torch.roll(out, shifts=(-shift, -shift), dims=(2, 3))
    return out
