"""Neighborhood-attention backends: the same numbers through five implementations.

Every function here takes ``q, k, v`` as ``(B, heads, H, W, D)`` and returns ``(B, heads, H, W,
D)``: each query attends to the ``kh x kw`` keys of its NATTEN neighborhood (see
``window_start_index``). Which one runs is chosen in ``kernels.py`` (``use_backend``); this file
only computes.

- ``gather``: gather each query's neighbours by index, O(n k^2) time. Eager calls run in
  cache-sized chunks with a recompute backward (``_GatherAttention``); traces get the one-pass
  ``gather_reference``: index arithmetic only (no Python branch on H or W), so it exports to
  ONNX with dynamic sizes.
- ``tiled``: split the queries into tiles of ``T x T`` (per dilation group) and attend each tile
  to the ``(T + k - 1)^2`` keys around it through ``scaled_dot_product_attention`` with a mask:
  ~4x the FLOPs of ``gather`` at k=7, T=8, but dense batched matmuls. Exports as well.
- ``flex``: PyTorch ``flex_attention`` with a block mask built here (cached per grid, kernel,
  dilation and device), compiled on CUDA; forward-only on CPU (PyTorch has no CPU backward).
- ``masked``: dense SDPA with an ``n x n`` boolean mask -- the O(n^2) reference for the tests.
- ``natten``: ``natten.na2d``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from ditkit.spec import neighborhood_misfits

#: query tile side of the ``tiled`` backend, per axis and per dilation group
TILE = 8
#: the tile side in ``torch.export`` traces (the ONNX form): onnxruntime runs each tile as one
#: small fused attention, and 4x4 tiles against their (4 + k - 1)^2 halo move ~2x fewer keys
#: per query than 8x8 ones at k = 7 (measured: 6-11 % faster at 256^2-512^2 pixels,
#: docs/measurements.md)
EXPORT_TILE = 4
#: the tile side of eager ``tiled`` calls without autograd (``tiled_inference``): the export's
#: 4x4 tiles, run in chunks of ~``TILE_CHUNK_BYTES`` of gathered halo keys and values (1 thread,
#: 128^2 tokens, k = 7: 4x4 / 6x6 / 8x8 tiles 36 / 35 / 40 ms, unchunked 8x8 80 ms, gather 77 ms)
INFERENCE_TILE = 4
TILE_CHUNK_BYTES = 2 << 20


def window_start_index(
    length: int | torch.SymInt, kernel: int, dilation: int, device: torch.device | None = None
) -> torch.Tensor:
    """``(length, kernel)`` indices of the keys each query position sees along one axis.

    NATTEN's rule: positions are split into ``dilation`` interleaved groups; within its group a
    query's window is centred on it and shifted inward at the borders, so it always holds
    exactly ``kernel`` keys. Pure tensor arithmetic (no Python branch on ``length``), so it
    traces with symbolic sizes."""
    # torch's stubs type arange's end and SymInt arithmetic without SymInt: both trace fine
    i = torch.arange(length, device=device)  # type: ignore[arg-type]
    group = i % dilation
    j = i // dilation
    group_len = (length - group + dilation - 1) // dilation  # type: ignore[operator]
    start = torch.minimum((j - kernel // 2).clamp(min=0), group_len - kernel)
    offsets = torch.arange(kernel, device=device)
    return group[:, None] + dilation * (start[:, None] + offsets[None, :])


def check_grid(hh, ww, kernel_size, dilation) -> None:
    """Raise on the first axis breaking NATTEN's ``kernel * dilation <= size``
    (:func:`ditkit.spec.neighborhood_misfits`; checked on concrete sizes)."""
    misfits = neighborhood_misfits((hh, ww), kernel_size, dilation)
    if misfits:
        axis, n, k, d = misfits[0]
        raise ValueError(
            f"neighborhood attention: token grid {axis} {n} is smaller than kernel {k} x "
            f"dilation {d} = {k * d}; use a larger input, a smaller kernel_size or dilation"
        )


# --------------------------------------------------------------------------------------------
# gather

#: working-set size of one chunk of the eager ``gather``/``tiled`` kernels (bytes of gathered
#: keys and values): large enough that each op runs long, small enough to stay in the last-level
#: cache and below the allocator's mmap threshold (no page faults on every call)
CHUNK_BYTES = 8 << 20
#: intra-op threads of those chunk loops on CPU (None: leave PyTorch's setting). Each op of a
#: chunk lasts ~0.1 ms: on an idle machine PyTorch's threads help (2 cores: 46 ms fwd / 115 ms
#: fwd+bwd at 128^2 against 66 / 232 ms on 1 thread), but on a machine shared with other busy
#: jobs each split op waits 1-8 ms for a descheduled thread; there, 1 restores the speed
LOOP_THREADS: int | None = None

_plans: "OrderedDict[tuple, object]" = OrderedDict()


def _cached(key, build):
    """Index plans of concrete grids, built once (eager calls only; traces build them inline)."""
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = build()
        while len(_plans) > 64:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


def _eager(*tensors) -> bool:
    """True outside traces (torch.export, torch.compile, TorchScript tracing) and fake/meta
    tensors: only then may a kernel loop over chunks in Python and cache plans by size."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    exporting = getattr(torch.compiler, "is_exporting", None)
    if exporting is not None and exporting():
        return False
    return all(t.device.type != "meta" and not isinstance(t, FakeTensor) for t in tensors)


def gather_index(hh, ww, kernel_size, dilation, device) -> torch.Tensor:
    """``(H W, kh kw)`` flat key index of each query's neighbourhood (row-major)."""
    ih = window_start_index(hh, kernel_size[0], dilation[0], device)  # (H, kh)
    iw = window_start_index(ww, kernel_size[1], dilation[1], device)  # (W, kw)
    idx = ih[:, None, :, None] * ww + iw[None, :, None, :]  # (H, W, kh, kw)
    return idx.reshape(hh * ww, kernel_size[0] * kernel_size[1])


def gather(q, k, v, kernel_size, dilation, scale):
    """Neighborhood attention by gathering each query's ``kh x kw`` keys/values; O(n k^2).

    Eager calls run ``_GatherAttention``: queries in chunks of ~``CHUNK_BYTES`` of gathered keys
    and values, and a backward that recomputes each chunk instead of storing the k^2 copies.
    Traces (export, compile) get ``gather_reference``: the same arithmetic in one pass, no Python
    branch on sizes."""
    if not _eager(q, k, v):
        return gather_reference(q, k, v, kernel_size, dilation, scale)
    b, nh, hh, ww, d = q.shape
    key = ("gather", hh, ww, tuple(kernel_size), tuple(dilation), str(q.device))
    idx = _cached(key, lambda: gather_index(hh, ww, kernel_size, dilation, q.device))
    return _GatherAttention.apply(q, k, v, idx, scale)


def gather_reference(q, k, v, kernel_size, dilation, scale):
    """One-pass ``gather`` (all k^2 neighbour copies at once): what traces and exports run."""
    b, nh, hh, ww, d = q.shape
    kk = kernel_size[0] * kernel_size[1]
    idx = gather_index(hh, ww, kernel_size, dilation, q.device).flatten()  # (H W kh kw,)
    k_nb = k.reshape(b, nh, hh * ww, d).index_select(2, idx).view(b, nh, hh, ww, kk, d)
    v_nb = v.reshape(b, nh, hh * ww, d).index_select(2, idx).view(b, nh, hh, ww, kk, d)
    logits = (q.unsqueeze(-2) @ k_nb.transpose(-1, -2)) * scale  # (B, heads, H, W, 1, kk)
    return (logits.softmax(-1) @ v_nb).squeeze(-2)  # (B, heads, H, W, D)


class _GatherAttention(torch.autograd.Function):
    """Chunked eager ``gather``. Queries of all batch entries and heads are one flat axis; a
    chunk gathers its queries' keys and values into two buffers reused by every chunk (so the
    working set stays in cache and no call page-faults fresh memory). Saves only q, k, v (and
    the index): the backward regathers and recomputes the softmax per chunk and scatters the
    key/value gradients with ``index_add_``."""

    @staticmethod
    def forward(ctx, q, k, v, idx, scale):
        b, nh, hh, ww, d = q.shape
        n, kk = idx.shape
        qs = (q * scale).reshape(-1, d)  # (B heads n, D), scaled once
        kf, vf = k.reshape(-1, d), v.reshape(-1, d)
        flat = idx.flatten()
        out = torch.empty_like(qs)
        total = qs.shape[0]
        # the attention weights (kk numbers a query, fewer bytes than q) when a backward follows
        probs = qs.new_empty(total, 1, kk) if any(ctx.needs_input_grad) else None
        m = _chunk_queries(2 * kk * d * qs.element_size(), total)
        kbuf, vbuf = qs.new_empty(m * kk, d), qs.new_empty(m * kk, d)
        with _loop_threads(qs.device):
            for a, e, base, rows in _chunks(flat, kk, b * nh, m):
                kn = torch.index_select(kf[base:], 0, rows, out=kbuf[: (e - a) * kk])
                vn = torch.index_select(vf[base:], 0, rows, out=vbuf[: (e - a) * kk])
                kn, vn = kn.view(e - a, kk, d), vn.view(e - a, kk, d)
                p = torch.bmm(qs[a:e].unsqueeze(1), kn.transpose(1, 2)).softmax(-1)  # (m, 1, kk)
                if probs is not None:
                    probs[a:e] = p
                torch.bmm(p, vn, out=out[a:e].unsqueeze(1))
        ctx.save_for_backward(qs, kf, vf, flat, probs)
        ctx.scale, ctx.kk, ctx.groups = scale, kk, b * nh
        return out.view_as(q)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        qs, kf, vf, flat, probs = ctx.saved_tensors  # flat: (n kk,) key rows of one grid
        kk, d = ctx.kk, qs.shape[-1]
        shape = grad_out.shape
        go = grad_out.reshape(-1, d).contiguous()  # (an expanded ones tensor after .sum())
        dq = torch.empty_like(qs)
        dkv = qs.new_zeros(qs.shape[0], 2 * d)  # gradients of k and v side by side: one scatter
        total = qs.shape[0]
        m = _chunk_queries(4 * kk * d * qs.element_size(), total)
        kbuf, vbuf = qs.new_empty(m * kk, d), qs.new_empty(m * kk, d)
        gbuf = qs.new_empty(m, kk, 2 * d)
        with _loop_threads(qs.device):
            for a, e, base, rows in _chunks(flat, kk, ctx.groups, m):
                kn = torch.index_select(kf[base:], 0, rows, out=kbuf[: (e - a) * kk])
                vn = torch.index_select(vf[base:], 0, rows, out=vbuf[: (e - a) * kk])
                kn, vn = kn.view(e - a, kk, d), vn.view(e - a, kk, d)
                q1, g1, p = qs[a:e].unsqueeze(1), go[a:e].unsqueeze(1), probs[a:e]
                dp = torch.bmm(g1, vn.transpose(1, 2))  # (m, 1, kk)
                ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)
                dq[a:e] = torch.bmm(ds, kn).view(e - a, d)
                g = gbuf[: e - a]
                torch.mul(ds.view(e - a, kk, 1), q1, out=g[..., :d])  # d logits/d k (q scaled)
                torch.mul(p.view(e - a, kk, 1), g1, out=g[..., d:])  # d out / d v
                dkv[base:].index_add_(0, rows, g.view(-1, 2 * d))
        dq.mul_(ctx.scale)
        dk, dv = dkv.view(*shape[:-1], 2 * d).split(d, -1)
        return dq.view(shape), dk, dv, None, None


@contextlib.contextmanager
def _loop_threads(device):
    """Run a chunk loop's ops on ``LOOP_THREADS`` intra-op threads on CPU (restored after)."""
    before = torch.get_num_threads()
    if device.type != "cpu" or LOOP_THREADS is None or LOOP_THREADS >= before:
        yield
        return
    torch.set_num_threads(LOOP_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _chunks(flat, kk, groups, m):
    """Chunks ``(start, end, base, rows)`` of at most ``m`` queries over ``groups`` (batch x
    heads) grids of ``n`` queries: queries ``start:end`` of the flat axis read the key rows
    ``base + rows`` (``rows`` indexes the table sliced at ``base``). A chunk stays within one
    grid, or holds whole grids when a grid is smaller than ``m``."""
    n = flat.shape[0] // kk
    if m < n:
        for g in range(groups):
            for a in range(0, n, m):
                e = min(n, a + m)
                yield g * n + a, g * n + e, g * n, flat[a * kk : e * kk]
        return
    per = m // n  # whole grids a chunk
    rows = (torch.arange(per, device=flat.device)[:, None] * n + flat[None, :]).flatten()
    for g in range(0, groups, per):
        h = min(groups, g + per)
        yield g * n, h * n, g * n, rows[: (h - g) * n * kk]


def _chunk_queries(bytes_per_query: int, total: int) -> int:
    return max(1, min(total, CHUNK_BYTES // max(1, bytes_per_query)))


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


def tiled_plan(hh, ww, kernel_size, dilation, tile, device):
    """Flat indices of the ``tiled`` backend: ``q_idx`` ``(tiles T T,)`` and ``k_idx``
    ``(tiles Lh Lw,)`` source positions of each tile's queries and keys, ``mask`` ``(tiles, T T,
    Lh Lw)`` and ``where`` ``(H W,)``, the position of each source query among the tiled ones."""
    t = tile
    qh, kh_pos, mh, tile_h, slot_h = _tile_plan(hh, kernel_size[0], dilation[0], t, device)
    qw, kw_pos, mw, tile_w, slot_w = _tile_plan(ww, kernel_size[1], dilation[1], t, device)
    n_rw = qw.shape[0]
    tau = torch.arange(qh.shape[0] * n_rw * t, device=device)[::t] // t  # (tiles,)
    rows = tau // n_rw  # (tiles,) row tile of each axis
    cols = tau - rows * n_rw
    q_idx = qh[rows][:, :, None] * ww + qw[cols][:, None, :]  # (tiles, T, T) flat source index
    k_idx = kh_pos[rows][:, :, None] * ww + kw_pos[cols][:, None, :]  # (tiles, Lh, Lw)
    mask = mh[rows][:, :, None, :, None] & mw[cols][:, None, :, None, :]  # (tiles, T,T, Lh,Lw)
    span = k_idx.shape[1] * k_idx.shape[2]
    mask = mask.reshape(-1, t * t, span)
    where = (
        (tile_h[:, None] * n_rw + tile_w[None, :]) * (t * t) + slot_h[:, None] * t + slot_w[None, :]
    )  # (H, W) position among the tiled queries
    return q_idx.flatten(), k_idx.flatten(), mask, where.flatten()


def _additive(plan, dtype):
    """The plan with its boolean mask as an additive ``0 / -inf`` one (faster SDPA backward)."""
    q_idx, k_idx, mask, where = plan
    return (
        q_idx,
        k_idx,
        torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf")),
        where,
    )


def _exporting() -> bool:
    check = getattr(torch.compiler, "is_exporting", None)
    return bool(check and check())


def tiled(q, k, v, kernel_size, dilation, scale, tile: int | None = None):
    """Exact neighborhood attention per query tile against the tile plus its halo (SDPA+mask).

    Tiles are the product of the row tiles of the two axes (``_tile_plan``); queries, keys and
    values are gathered per tile by one flat index, attended with one batched SDPA call, and
    scattered back by index. Eager calls reuse the index plan of a grid (``_cached``); traces
    build it inline from the symbolic sizes. Eager CPU calls that need no gradient run
    ``tiled_inference`` (the same tiles, in cache-sized chunks)."""
    b, nh, hh, ww, d = q.shape
    if tile is None and q.device.type == "cpu" and _eager(q, k, v) and not _needs_grad(q, k, v):
        return tiled_inference(q, k, v, kernel_size, dilation, scale)
    if tile is None:
        tile = EXPORT_TILE if _exporting() else TILE
    if _eager(q, k, v):
        key = ("tiled", hh, ww, tuple(kernel_size), tuple(dilation), tile, str(q.device), q.dtype)
        q_idx, k_idx, mask, where = _cached(
            key,
            lambda: _additive(tiled_plan(hh, ww, kernel_size, dilation, tile, q.device), q.dtype),
        )
    else:
        q_idx, k_idx, mask, where = tiled_plan(hh, ww, kernel_size, dilation, tile, q.device)
    tq, span = mask.shape[1], mask.shape[2]
    # a 4-D mask lets PyTorch's fused CPU (flash) SDPA kernel run (a 3-D one falls back to the
    # unfused math path: ~2x slower forward)
    mask = mask.unsqueeze(0)

    def tiles(x, idx, length):  # (B, heads, H, W, D) -> (B heads, tiles, length, D)
        x = x.reshape(b * nh, hh * ww, d).index_select(1, idx)
        return x.view(b * nh, -1, length, d)  # 4-D: what ONNX's SDPA takes

    out = F.scaled_dot_product_attention(
        tiles(q, q_idx, tq),
        tiles(k, k_idx, span),
        tiles(v, k_idx, span),
        attn_mask=mask,
        scale=scale,
    )
    out = out.reshape(b * nh, -1, d).index_select(1, where)
    return out.view(b, nh, hh, ww, d)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def tiled_inference(q, k, v, kernel_size, dilation, scale, tile: int = INFERENCE_TILE):
    """The ``tiled`` arithmetic for eager calls without autograd, in cache-sized chunks.

    Per grid of one batch entry and head, ``TILE_CHUNK_BYTES`` worth of tiles at a time: gather
    the chunk's queries and halo keys / values (reading ``q``, ``k``, ``v`` as they are, strided
    views of the qkv projection included: no copy of the whole tensor), logits plus the additive
    mask in one ``baddbmm``, softmax, one ``bmm``, and write the result into a ``(B, H, W,
    heads, D)`` buffer (returned as its ``(B, heads, H, W, D)`` view, so the caller's merge of
    the heads is free). ``T x T`` tiles against their ``(T + k - 1)^2`` halo are ~2x the
    multiply-adds of ``gather`` at T = 4, k = 7 but run as small dense GEMMs with ~8x fewer
    bytes gathered: 2x faster than ``gather`` on one CPU core at 64^2-128^2 tokens
    (docs/measurements.md)."""
    b, nh, hh, ww, d = q.shape
    key = ("tiled", hh, ww, tuple(kernel_size), tuple(dilation), tile, str(q.device), q.dtype)
    q_idx, k_idx, mask, where = _cached(
        key,
        lambda: _additive(tiled_plan(hh, ww, kernel_size, dilation, tile, q.device), q.dtype),
    )
    n_tiles, tq, span = mask.shape
    step = max(1, TILE_CHUNK_BYTES // (2 * span * d * q.element_size()))  # tiles a chunk
    if step >= 2 * n_tiles:  # small grids: whole grids a chunk, as gather's chunks do
        return _tiled_inference_grids(q, k, v, (q_idx, k_idx, mask, where), scale, step // n_tiles)
    step = min(n_tiles, step)
    q_idx, k_idx = q_idx.view(n_tiles, tq), k_idx.view(n_tiles, span)
    out = q.new_empty(b, hh, ww, nh, d)
    tiles_out = q.new_empty(n_tiles * tq, d)  # one grid's tiled queries, reused
    for bi in range(b):
        for hi in range(nh):
            qg, kg, vg = (t[bi, hi].reshape(hh * ww, d) for t in (q, k, v))  # views if strided
            for a in range(0, n_tiles, step):
                e = min(n_tiles, a + step)
                qt = qg.index_select(0, q_idx[a:e].flatten()).view(e - a, tq, d)
                kt = kg.index_select(0, k_idx[a:e].flatten()).view(e - a, span, d)
                vt = vg.index_select(0, k_idx[a:e].flatten()).view(e - a, span, d)
                p = torch.baddbmm(mask[a:e], qt, kt.transpose(1, 2), alpha=scale).softmax(-1)
                torch.bmm(p, vt, out=tiles_out[a * tq : e * tq].view(e - a, tq, d))
            out[bi, :, :, hi].copy_(tiles_out.index_select(0, where).view(hh, ww, d))
    return out.permute(0, 3, 1, 2, 4)  # (B, heads, H, W, D)


def _tiled_inference_grids(q, k, v, plan, scale, per: int):
    """``tiled_inference`` for grids smaller than a chunk: ``per`` whole (batch entry, head)
    grids a chunk, so that a batch of small grids is a few large products, not many tiny ones."""
    b, nh, hh, ww, d = q.shape
    q_idx, k_idx, mask, where = plan
    n_tiles, tq, span = mask.shape
    n, groups = hh * ww, b * nh
    qf, kf, vf = (t.reshape(groups * n, d) for t in (q, k, v))  # copies if strided: small
    out = q.new_empty(groups, n_tiles * tq, d)
    for g in range(0, groups, per):
        e = min(groups, g + per)
        base = torch.arange(g, e, device=q.device)[:, None] * n  # (grids, 1) first row
        qt = qf.index_select(0, (base + q_idx[None]).flatten()).view(-1, tq, d)
        kt = kf.index_select(0, (base + k_idx[None]).flatten()).view(-1, span, d)
        vt = vf.index_select(0, (base + k_idx[None]).flatten()).view(-1, span, d)
        m = mask.repeat(e - g, 1, 1)  # (grids tiles, T T, L)
        p = torch.baddbmm(m, qt, kt.transpose(1, 2), alpha=scale).softmax(-1)
        torch.bmm(p, vt, out=out[g:e].view(-1, tq, d))
    return out.index_select(1, where).view(b, nh, hh, ww, d)


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
        q.reshape(b, nh, hh * ww, d),
        k.reshape(b, nh, hh * ww, d),
        v.reshape(b, nh, hh * ww, d),
        attn_mask=mask,
        scale=scale,
    )
    return out.view(b, nh, hh, ww, d)


# --------------------------------------------------------------------------------------------
# flex

_block_masks: dict[tuple, object] = {}
_flex_compiled = None


def block_mask(hh: int, ww: int, kernel_size, dilation, device: torch.device):
    """The flex ``BlockMask`` of a grid, built once per (grid, kernel, dilation, device)."""

    key = (hh, ww, tuple(kernel_size), tuple(dilation), str(device))
    if key not in _block_masks:
        row_ok, col_ok = _axis_masks(hh, ww, kernel_size, dilation, device)

        def mask_mod(b, h, q_idx, kv_idx):
            return row_ok[q_idx // ww, kv_idx // ww] & col_ok[q_idx % ww, kv_idx % ww]

        _block_masks[key] = create_block_mask(mask_mod, None, None, hh * ww, hh * ww, device=device)
    return _block_masks[key]


def flex(q, k, v, kernel_size, dilation, scale):
    """``flex_attention`` with ditkit's neighborhood block mask; compiled on CUDA."""
    global _flex_compiled

    b, nh, hh, ww, d = q.shape
    if (
        q.device.type == "cpu"
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (q, k, v))
    ):
        raise RuntimeError(
            "attention backend 'flex' cannot backpropagate on CPU (PyTorch's "
            "FlexAttention has no CPU backward); use 'gather' or 'tiled' to train "
            "on CPU, or run under torch.no_grad()"
        )
    mask = block_mask(int(hh), int(ww), kernel_size, dilation, q.device)
    args = [t.reshape(b, nh, hh * ww, d) for t in (q, k, v)]
    if q.device.type == "cuda":
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention, dynamic=False)
        out = _flex_compiled(*args, block_mask=mask, scale=scale)
    else:  # eager: correct but materialises the scores; fine for tests on CPU
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*flex_attention called without torch.compile"
            )
            out = flex_attention(*args, block_mask=mask, scale=scale)
    return out.view(b, nh, hh, ww, d)


# --------------------------------------------------------------------------------------------
# natten


def natten_na2d(q, k, v, kernel_size, dilation, scale):
    """``natten.na2d`` (heads-last layout)."""
    import natten

    if (
        q.device.type == "cpu"
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (q, k, v))
    ):
        raise RuntimeError(
            "attention backend 'natten' cannot backpropagate on CPU (natten runs "
            "through FlexAttention there, which has no CPU backward); use 'gather' "
            "or 'tiled' to train on CPU, or run under torch.no_grad()"
        )
    to_heads_last = lambda t: t.permute(0, 2, 3, 1, 4)  # noqa: E731  (B, H, W, heads, D)
    out = natten.na2d(
        to_heads_last(q),
        to_heads_last(k),
        to_heads_last(v),
        kernel_size=tuple(kernel_size),
        dilation=tuple(dilation),
        scale=scale,
    )
    return out.permute(0, 3, 1, 2, 4)
