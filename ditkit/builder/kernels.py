"""Attention kernels and the backend switch.

The attention *modules* (``attention.py``) compute q, k, v, apply RoPE / cosine scaling / QK norm
and then call one of the kernels here. Which neighborhood kernel runs is a runtime choice
(``use_backend``), never part of a spec: every backend computes the same numbers.

Layouts: global kernels take ``(B, heads, N, D)``; local kernels take ``(B, heads, H, W, D)``.

Accounting: under ``count_attention()`` the kernels do not compute anything (the describe pass
runs on the meta device); they record the multiply-adds of QK^T and AV from the shapes they were
given -- global ``2 N^2 D`` per head, neighborhood ``2 N k^2 D``, shifted window ``2 N w^2 D`` --
whatever kernel would have run, under the scope ``attention_scope`` names (set from outside the
model's ``forward``: ``accounting.count_macs`` sets it from module hooks).

torch.compile: the switch is plain attributes of one process-wide object (``_state``), set when
a context is entered and restored when it exits. A kernel reads them as Python constants, so
Dynamo folds the choice into the graph and guards on it: the model compiles to one graph, and a
call under another backend (or export / counting mode) recompiles instead of running a stale
graph. The state is process-wide, not per thread (Dynamo cannot trace a ``ContextVar``).

Neighborhood backends (implemented in ``neighborhood.py``): ``gather``, ``tiled``, ``flex``,
``natten``, ``masked`` (tests only) and ``auto`` (natten on CUDA when installed, else flex on
CUDA; on CPU ``tiled``'s chunked inference path for eager calls without autograd, else
gather). Export code wraps its trace in ``exportable_backend()`` (or
``use_backend(name, export=True)``): ``auto`` then resolves to ``gather`` and a backend that
cannot be exported is a clear error; a ``torch.export`` trace is detected as well.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F

from ditkit.errors import UserError, missing_text

from . import neighborhood as _nb
from .neighborhood import neighborhood_mask, window_start_index

__all__ = [
    "NEIGHBORHOOD_BACKENDS",
    "EXPORTABLE_BACKENDS",
    "use_backend",
    "exportable_backend",
    "current_backend",
    "is_exporting",
    "is_tracing",
    "fast_inference",
    "natten_available",
    "resolve_backend",
    "count_attention",
    "attention_scope",
    "set_attention_scope",
    "global_attention",
    "neighborhood_attention",
    "neighborhood_mask",
    "window_start_index",
    "shifted_window_attention",
]

NEIGHBORHOOD_BACKENDS = ("auto", "gather", "tiled", "flex", "natten", "masked")
#: backends whose graph exports (torch.export -> ONNX) with dynamic H and W
EXPORTABLE_BACKENDS = ("gather", "tiled")


class _State:
    """The switch: backend name, export flag, the MAC counter of ``count_attention`` (or None)
    and the accounting scope. Read inside ``forward`` as constants (guarded by torch.compile),
    written only by the context managers below."""

    def __init__(self) -> None:
        self.backend = "auto"
        self.export = False
        self.counter: dict | None = None
        self.scope = ""


_state = _State()


@contextlib.contextmanager
def _set(**values) -> Iterator[None]:
    before = {k: getattr(_state, k) for k in values}
    for k, v in values.items():
        setattr(_state, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(_state, k, v)


class BackendError(UserError):
    """An attention backend name that does not exist, or cannot do what was asked."""


def _check_choice(name: str, export: bool) -> None:
    if name not in NEIGHBORHOOD_BACKENDS:
        raise BackendError(
            f"unknown attention backend {name!r}; choose one of {', '.join(NEIGHBORHOOD_BACKENDS)}"
        )
    if export and name not in EXPORTABLE_BACKENDS + ("auto",):
        raise BackendError(
            f"attention backend {name!r} cannot be exported (no ONNX graph with "
            f"dynamic sizes); for export use one of "
            f"{', '.join(EXPORTABLE_BACKENDS)} or 'auto'"
        )
    if name == "natten" and not natten_available():
        raise RuntimeError(
            missing_text("natten", "attention backend 'natten'") + "; or use backend 'gather'"
        )


@contextlib.contextmanager
def use_backend(name: str, *, export: bool = False) -> Iterator[None]:
    """Select the neighborhood-attention backend for the calls made inside the block.

    ``export=True`` marks the block as an export trace: ``auto`` then resolves to ``gather``
    and a backend that cannot be exported is refused here, with the list of those that can."""
    _check_choice(name, export)
    with _set(backend=name, export=export):
        if export and name == "tiled":
            # the tile count ceil(n / 8) may be 1; without size-oblivious reasoning torch.export
            # would specialise on "it is not 1" and refuse grids smaller than 9 tokens

            # torch's config modules gain .patch at import (install_config_module): no stub
            with fx_config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
                yield
        else:
            yield


def exportable_backend(name: str | None = None) -> contextlib.AbstractContextManager[None]:
    """Context for export code: ``name`` (default: the current choice if it exports, else
    ``auto``) with the export flag set. An explicit non-exportable ``name`` is a ValueError."""
    if name is None:
        current = _state.backend
        name = current if current in EXPORTABLE_BACKENDS else "auto"
    return use_backend(name, export=True)


def current_backend() -> str:
    """The backend name selected by the innermost ``use_backend`` (``auto`` by default)."""
    return _state.backend


def is_exporting() -> bool:
    """Inside ``use_backend(..., export=True)`` or a ``torch.export`` trace."""
    if _state.export:
        return True
    check = getattr(torch.compiler, "is_exporting", None)
    return bool(check and check())


def is_tracing() -> bool:
    """Inside an export (``is_exporting``), a ``torch.compile`` trace or a TorchScript trace:
    where the modules keep the op patterns the ONNX rewrites match (eager calls take fused
    forms, e.g. one ``rms_norm`` for cosine logits)."""
    return is_exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing()


def fast_inference() -> bool:
    """Eager calls without autograd (``torch.no_grad`` / ``inference_mode``, outside traces):
    where the modules take their fused forms (q and k shaped together, a ``vector_norm``
    RMSNorm, GEGLU from two weight halves). They compute the same function up to fp32 rounding;
    calls with autograd keep the traced forms' arithmetic exactly, so a training run follows the
    same trajectory as before (a few Adam steps from zero-initialised layers amplify rounding)."""
    return not torch.is_grad_enabled() and not is_tracing()


def natten_available() -> bool:
    try:
        import natten  # noqa: F401
    except ImportError:
        return False
    return hasattr(natten, "na2d")


def resolve_backend(device: torch.device) -> str:
    """The concrete backend that runs on ``device``: ``auto`` is natten on CUDA when installed,
    else flex on CUDA, else gather; under export it is always an exportable one."""
    name = _state.backend
    if is_exporting():
        if name == "auto":
            return "gather"
        if name not in EXPORTABLE_BACKENDS:
            raise ValueError(
                f"attention backend {name!r} cannot be exported; select one of "
                f"{', '.join(EXPORTABLE_BACKENDS)} (or 'auto') for export"
            )
        return name
    if name != "auto":
        return name
    if device.type == "cuda":
        return "natten" if natten_available() else "flex"
    return "gather"


def _auto_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """``auto`` on CPU: ``tiled`` (its chunked eager inference path) where no gradient is
    needed, ``gather`` (exact multiply-adds, recompute backward) where one is."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "gather"
    return "tiled"


@contextlib.contextmanager
def count_attention() -> Iterator[dict]:
    """Record attention multiply-adds per scope instead of computing attention."""
    counts: dict[str, float] = {}
    with _set(counter=counts, scope=""):
        yield counts


def attention_scope(name: str) -> contextlib.AbstractContextManager[None]:
    """Attribute the multiply-adds counted inside the block to ``name`` (e.g. ``levels.0``)."""
    return _set(scope=name)


def set_attention_scope(name: str) -> None:
    """Attribute the multiply-adds counted from now on to ``name`` (for module hooks, which
    cannot hold a ``with`` block open; ``count_attention`` restores the scope on exit)."""
    _state.scope = name


def _record(macs: int) -> bool:
    """Under ``count_attention``: add ``macs`` to the current scope and return True (the caller
    then computes nothing). Otherwise False, as a constant a compiled graph is guarded on."""
    counts = _state.counter
    if counts is None:
        return False
    counts[_state.scope] = counts.get(_state.scope, 0) + macs
    return True


# --------------------------------------------------------------------------------------------
# global


def global_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """(B, heads, N, D) -> (B, heads, N, D) through the fused SDPA kernel."""
    b, h, n, d = q.shape
    if _record(2 * b * h * n * k.shape[-2] * d):
        return torch.empty_like(q)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# --------------------------------------------------------------------------------------------
# neighborhood


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """(B, heads, H, W, D) -> same; each query attends to its NATTEN neighborhood, through the
    backend ``resolve_backend`` picks (all give the same numbers)."""
    b, nh, hh, ww, d = q.shape
    if _record(2 * b * nh * hh * ww * kernel_size[0] * kernel_size[1] * d):
        return torch.empty_like(q)
    _nb.check_grid(hh, ww, kernel_size, dilation)
    name = resolve_backend(q.device)
    if name == "gather" and _state.backend == "auto" and _nb._eager(q, k, v):
        name = _auto_cpu(q, k, v)  # eager CPU calls (traces keep gather): the faster exact form
    return _IMPLEMENTATIONS[name](q, k, v, kernel_size, dilation, scale)


_IMPLEMENTATIONS = {
    "gather": _nb.gather,
    "tiled": _nb.tiled,
    "flex": _nb.flex,
    "masked": _nb.masked,
    "natten": _nb.natten_na2d,
}


# --------------------------------------------------------------------------------------------
# shifted window


def shifted_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, shift: int, scale: float
) -> torch.Tensor:
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
        return t.reshape(b * nh, nwh * nww, window * window, d)  # 4-D: what ONNX's SDPA takes

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
            reg_w[..., :, None] == reg_w[..., None, :]
        )  # (nWh, nWw, w^2, w^2)
        mask = mask.reshape(nwh * nww, window * window, window * window)
    out = F.scaled_dot_product_attention(
        to_windows(q), to_windows(k), to_windows(v), attn_mask=mask, scale=scale
    )
    out = out.reshape(b, nh, nwh, nww, window, window, d).transpose(3, 4)
    out = out.reshape(b, nh, hh, ww, d)
    if shift:
        out = torch.roll(out, shifts=(-shift, -shift), dims=(2, 3))
    return out
