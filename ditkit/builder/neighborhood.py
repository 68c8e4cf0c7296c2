"""Neighborhood-attention backends: the same numbers through five implementations.

Every function here takes ``q, k, v`` as ``(B, heads, H, W, D)`` and returns ``(B, heads, H, W,
D)``: each query attends to the ``kh x kw`` keys of its NATTEN neighborhood (see
``window_start_index``). Which one runs is chosen in ``kernels.py`` (``use_backend``); this file
only computes.

- ``gather``: gather each query's neighbours by index, O(n k^2) time and memory. Index arithmetic
  only (no Python branch on H or W), so it exports to ONNX with dynamic sizes.
- ``tiled``: split the queries into tiles of ``T x T`` (per dilation group) and attend each tile
  to the ``(T + k - 1)^2`` keys around it through ``scaled_dot_product_attention`` with a mask:
  ~4x the FLOPs of ``gather`` at k=7, T=8, but dense batched matmuls. Exports as well.
- ``flex``: PyTorch ``flex_attention`` with a block mask built here (cached per grid, kernel,
  dilation and device), compiled on CUDA; forward-only on CPU (PyTorch has no CPU backward).
- ``masked``: dense SDPA with an ``n x n`` boolean mask -- the O(n^2) reference for the tests.
- ``natten``: ``natten.na2d``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

#: query tile side of the ``tiled`` backend, per axis and per dilation group
TILE = 8


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


def check_grid(hh, ww, kernel_size, dilation) -> None:
    """NATTEN's constraint ``kernel * dilation <= size`` per axis (checked on concrete sizes)."""
    for axis, n, k, d in (("height", hh, kernel_size[0], dilation[0]),
                          ("width", ww, kernel_size[1], dilation[1])):
        if isinstance(n, int) and n < k * d:
            raise ValueError(
                f"neighborhood attention: token grid {axis} {n} is smaller than kernel {k} x "
                f"dilation {d} = {k * d}; use a larger input, a smaller kernel_size or dilation")


# --------------------------------------------------------------------------------------------
# gather


def gather(q, k, v, kernel_size, dilation, scale):
    """Gather each query's ``kh x kw`` keys/values by a flat index; O(n k^2) time and memory."""
    b, nh, hh, ww, d = q.shape
    ih = window_start_index(hh, kernel_size[0], dilation[0], q.device)  # (H, kh)
    iw = window_start_index(ww, kernel_size[1], dilation[1], q.device)  # (W, kw)
    idx = (ih[:, None, :, None] * ww + iw[None, :, None, :]).flatten()  # (H W kh kw,)
    kk = kernel_size[0] * kernel_size[1]
    k_nb = k.reshape(b, nh, hh * ww, d).index_select(2, idx).view(b, nh, hh, ww, kk, d)
    v_nb = v.reshape(b, nh, hh * ww, d).index_select(2, idx).view(b, nh, hh, ww, kk, d)
    logits = (q.unsqueeze(-2) @ k_nb.transpose(-1, -2)) * scale  # (B, heads, H, W, 1, kk)
    return (logits.softmax(-1) @ v_nb).squeeze(-2)  # (B, heads, H, W, D)


# --------------------------------------------------------------------------------------------
# tiled


def _tile_plan(n, kernel: int, dilation: int, tile: int, device):
    """Index plan of one axis for the ``tiled`` backend.

    The axis is rearranged into ``dilation`` groups (NATTEN's dilation is plain neighborhood
    attention within each group), each cut into ``nt`` tiles of ``T = tile`` queries (the last
    one padded). A tile's keys are the ``L = T + kernel - 1`` group positions starting at its
    first query's window start (moved left at the far border): every window of the tile lies
    inside them, since window starts grow by at most one per query. With ``R = dilation * nt``
    row tiles it returns

    - ``q_pos`` ``(R, T)``: source position of each tiled query (padding repeats the last one),
    - ``k_pos`` ``(R, L)``: source position of each tile's keys (out-of-range ones clamped and
      masked),
    - ``mask`` ``(R, T, L)``: key inside the query's window (never an empty row),
    - ``tile_of``, ``slot_of`` ``(n,)``: the row tile and the slot in it of each source position.

    Only tensor arithmetic on ``n`` and no reshape that splits a symbolic size, so it traces with
    symbolic sizes without guards."""
    d, k, t = dilation, kernel, tile
    span = t + k - 1
    m = (n + d - 1) // d  # padded group length
    nt = (m + t - 1) // t  # tiles per group
    # (R, T) slots, from an arange whose length is never 1 (a length that may be 1 would make
    # torch.export specialise on it)
    slots = torch.arange(d * nt * t, device=device).view(-1, t)
    r = slots[:, :1] // t  # (R, 1) row tile
    g = r // nt  # (R, 1) group
    j = (r - g * nt) * t + slots % t  # (R, T) query position in its group
    group_len = (n - g + d - 1) // d  # (R, 1)
    start = torch.minimum((j - k // 2).clamp(min=0), group_len - k)  # (R, T) window start
    first = start[:, :1].clamp(max=m - span).clamp(min=0)  # (R, 1)
    keys = first + torch.arange(span, device=device)  # (R, L) key position in its group
    mask = (keys[:, None, :] >= start[:, :, None]) & (keys[:, None, :] < start[:, :, None] + k)
    q_pos = (g + d * j).clamp(max=n - 1)
    k_pos = (g + d * keys).clamp(max=n - 1)
    p = torch.arange(n, device=device)
    tile_of = (p % d) * nt + (p // d) // t
    slot_of = (p // d) % t
    return q_pos, k_pos, mask, tile_of, slot_of


def tiled(q, k, v, kernel_size, dilation, scale, tile: int = TILE):
    """Exact neighborhood attention per query tile against the tile plus its halo (SDPA+mask).

    Tiles are the product of the row tiles of the two axes (``_tile_plan``); queries, keys and
    values are gathered per tile by one flat index, attended with one batched SDPA call, and
    scattered back by index."""
    b, nh, hh, ww, d = q.shape
    t = tile
    qh, kh_pos, mh, tile_h, slot_h = _tile_plan(hh, kernel_size[0], dilation[0], t, q.device)
    qw, kw_pos, mw, tile_w, slot_w = _tile_plan(ww, kernel_size[1], dilation[1], t, q.device)
    n_rw = qw.shape[0]
    tau = torch.arange(qh.shape[0] * n_rw * t, device=q.device)[::t] // t  # (tiles,)
    rows = tau // n_rw  # (tiles,) row tile of each axis
    cols = tau - rows * n_rw
    q_idx = qh[rows][:, :, None] * ww + qw[cols][:, None, :]  # (tiles, T, T) flat source index
    k_idx = kh_pos[rows][:, :, None] * ww + kw_pos[cols][:, None, :]  # (tiles, Lh, Lw)
    mask = mh[rows][:, :, None, :, None] & mw[cols][:, None, :, None, :]  # (tiles, T,T, Lh,Lw)
    span = k_idx.shape[1] * k_idx.shape[2]
    mask = mask.reshape(-1, t * t, span)

    def tiles(x, idx, length):  # (B, heads, H, W, D) -> (B heads, tiles, length, D)
        x = x.reshape(b * nh, hh * ww, d).index_select(1, idx.flatten())
        return x.view(b * nh, -1, length, d)  # 4-D: what ONNX's SDPA takes

    out = F.scaled_dot_product_attention(tiles(q, q_idx, t * t), tiles(k, k_idx, span),
                                         tiles(v, k_idx, span), attn_mask=mask, scale=scale)
    where = ((tile_h[:, None] * n_rw + tile_w[None, :]) * (t * t)
             + slot_h[:, None] * t + slot_w[None, :])  # (H, W) position among the tiled queries
    out = out.reshape(b * nh, -1, d).index_select(1, where.flatten())
    return out.view(b, nh, hh, ww, d)


# --------------------------------------------------------------------------------------------
# masked (reference)


def neighborhood_mask(hh: int, ww: int, kernel_size, dilation, device=None) -> torch.Tensor:
    """(H*W, H*W) boolean mask: True where query (row) may attend key (column)."""
    row_ok, col_ok = _axis_masks(hh, ww, kernel_size, dilation, device)
    return (row_ok[:, None, :, None] & col_ok[None, :, None, :]).reshape(hh * ww, hh * ww)


def _axis_masks(hh, ww, kernel_size, dilation, device):
    ih = window_start_index(hh, kernel_size[0], dilation[0], device)
    iw = window_start_index(ww, kernel_size[1], dilation[1], device)
    row_ok = torch.zeros(hh, hh, dtype=torch.bool, device=device).scatter_(1, ih, True)
    col_ok = torch.zeros(ww, ww, dtype=torch.bool, device=device).scatter_(1, iw, True)
    return row_ok, col_ok


def masked(q, k, v, kernel_size, dilation, scale):
    """O(n^2) reference: dense SDPA with the neighborhood as a boolean mask (tests only)."""
    b, nh, hh, ww, d = q.shape
    mask = neighborhood_mask(hh, ww, kernel_size, dilation, q.device)
    out = F.scaled_dot_product_attention(
        q.reshape(b, nh, hh * ww, d), k.reshape(b, nh, hh * ww, d),
        v.reshape(b, nh, hh * ww, d), attn_mask=mask, scale=scale)
    return out.view(b, nh, hh, ww, d)


# --------------------------------------------------------------------------------------------
# flex

_block_masks: dict[tuple, object] = {}
_flex_compiled = None


def block_mask(hh: int, ww: int, kernel_size, dilation, device: torch.device):
    """The flex ``BlockMask`` of a grid, built once per (grid, kernel, dilation, device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (hh, ww, tuple(kernel_size), tuple(dilation), str(device))
    if key not in _block_masks:
        row_ok, col_ok = _axis_masks(hh, ww, kernel_size, dilation, device)

        def mask_mod(b, h, q_idx, kv_idx):
            return row_ok[q_idx // ww, kv_idx // ww] & col_ok[q_idx % ww, kv_idx % ww]

        _block_masks[key] = create_block_mask(mask_mod, None, None, hh * ww, hh * ww,
                                              device=device)
    return _block_masks[key]


def flex(q, k, v, kernel_size, dilation, scale):
    """``flex_attention`` with ditkit's neighborhood block mask; compiled on CUDA."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    b, nh, hh, ww, d = q.shape
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v)):
        raise RuntimeError("attention backend 'flex' cannot backpropagate on CPU (PyTorch's "
                           "FlexAttention has no CPU backward); use 'gather' or 'tiled' to train "
                           "on CPU, or run under torch.no_grad()")
    mask = block_mask(int(hh), int(ww), kernel_size, dilation, q.device)
    args = [t.reshape(b, nh, hh * ww, d) for t in (q, k, v)]
    if q.device.type == "cuda":
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention, dynamic=False)
        out = _flex_compiled(*args, block_mask=mask, scale=scale)
    else:  # eager: correct but materialises the scores; fine for tests on CPU
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
            out = flex_attention(*args, block_mask=mask, scale=scale)
    return out.view(b, nh, hh, ww, d)


# --------------------------------------------------------------------------------------------
# natten


def natten_na2d(q, k, v, kernel_size, dilation, scale):
    """``natten.na2d`` (heads-last layout)."""
    import natten

    if q.device.type == "cpu" and torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v)):
        raise RuntimeError("attention backend 'natten' cannot backpropagate on CPU (natten runs "
                           "through FlexAttention there, which has no CPU backward); use 'gather' "
                           "or 'tiled' to train on CPU, or run under torch.no_grad()")
    to_heads_last = lambda t: t.permute(0, 2, 3, 1, 4)  # noqa: E731  (B, H, W, heads, D)
    out = natten.na2d(to_heads_last(q), to_heads_last(k), to_heads_last(v),
                      kernel_size=tuple(kernel_size), dilation=tuple(dilation), scale=scale)
    return out.permute(0, 3, 1, 2, 4)
