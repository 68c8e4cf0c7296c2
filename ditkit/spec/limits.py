"""Size limits checked while a spec validates, before anything is built or allocated.

``validate`` must not accept a spec that ``build`` cannot build: ``d_model: 1000000000000``
or ``encoder: 1000000000`` would validate and then exhaust memory (or overflow a tensor size)
the moment something builds it. These checks estimate, from the spec's fields alone (no torch,
no building), the parameter count, the number of blocks and the token grids, and refuse a spec
beyond what any one machine can hold, naming the field that makes it so.

The estimates are deliberately rough (within a small factor of ``ditkit describe``, which
measures the built modules) and the limits generous; people who really have the memory turn the
check off with ``DITKIT_NO_SIZE_LIMITS=1`` (the ``--no-size-limits`` flag of the command line
sets it), or in Python with :func:`no_size_limits`.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Iterator

from ditkit.errors import UserError

if TYPE_CHECKING:
    from .model import Block, ModelSpec

MAX_PARAMS = 50e9
"""Parameters (~200 GB in fp32, more than one accelerator holds)."""
MAX_BLOCKS = 10_000
MAX_TOKENS = 2**24
"""Tokens in one level's grid (16.8 M: a 4096x4096 grid)."""
MAX_WIDTH = 2**20
"""Any single width (``d_model``, ``d_ff``, conditioning width, embedding rows)."""
ENV = "DITKIT_NO_SIZE_LIMITS"
OVERRIDE_HINT = f"if you really have the memory, set {ENV}=1 (or pass --no-size-limits)"


def limits_enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("1", "true", "yes", "on")


@contextlib.contextmanager
def no_size_limits() -> Iterator[None]:
    """Validate specs without the size limits inside this block."""
    before = os.environ.get(ENV)
    os.environ[ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def _stack_blocks(
    value: Any, level_fields: dict[str, Any], default_block: Block
) -> list[tuple[int, Any]]:
    """``[(count, ffn spec)]`` of one stack without expanding it into a list of blocks."""
    if value is None:
        return []
    base_ffn = level_fields.get("ffn") or default_block.ffn
    if isinstance(value, int):
        return [(value, base_ffn)]
    return [(o.repeat, o.ffn or base_ffn) for o in value]


def _ffn_width(ffn: Any, d: float) -> float:
    d_ff = getattr(ffn, "d_ff", None)
    return float(d_ff) if d_ff is not None else float(getattr(ffn, "ratio", 4.0)) * d


spec_estimates: dict[int, float] = {}


def estimated_params(spec: ModelSpec) -> float:
    """A rough parameter count from the spec's fields alone (no building): blocks (attention,
    FFN, modulation), class embeddings and the mapping network. For memory guards only;
    ``ditkit describe`` gives the measured count."""
    with _limits_on():
        size_issues(spec)
    return spec_estimates.pop(id(spec))


@contextlib.contextmanager
def _limits_on() -> Iterator[None]:
    before = os.environ.pop(ENV, None)
    try:
        yield
    finally:
        if before is not None:
            os.environ[ENV] = before


def activation_bytes_per_sample(
    spec: ModelSpec, resolution: tuple[int, int] | None = None
) -> float:
    """A lower bound of the activation memory one training sample needs: every block keeps at
    least its input and its output (fp32) for the backward pass."""
    grids = spec.token_grids(resolution)
    total = 0.0
    for i, lvl in enumerate(spec.levels):
        count = sum(
            c
            for which in ("encoder", "middle", "decoder")
            for c, _ in _stack_blocks(getattr(lvl, which), lvl.overrides(), spec.block)
        )
        total += count * grids[i][0] * grids[i][1] * lvl.d_model * 4 * 2
    return total


def size_issues(spec: ModelSpec) -> list[tuple[str, str]]:
    """``[(field, message)]`` for a spec too large to build (empty when the limits are off)."""
    if not limits_enabled():
        return []
    issues: list[tuple[str, str]] = []
    cond = spec.conditioning
    cw = float(cond.width or spec.levels[0].d_model)
    contributors: list[tuple[float, str]] = []

    def width(path: str, value: float) -> None:
        if value > MAX_WIDTH and path not in (p for p, _ in issues):
            issues.append(
                (
                    path,
                    f"{value:.4g} is larger than any model can hold (limit "
                    f"{MAX_WIDTH:,}); {OVERRIDE_HINT}",
                )
            )

    if cond.width is not None:
        width("conditioning.width", cond.width)
    blocks_total = 0
    for i, lvl in enumerate(spec.levels):
        d = float(lvl.d_model)
        width(f"levels[{i}].d_model", d)
        fields = lvl.overrides()
        for which in ("encoder", "middle", "decoder"):
            for count, ffn in _stack_blocks(getattr(lvl, which), fields, spec.block):
                blocks_total += count
                d_ff = _ffn_width(ffn, d)
                if d_ff > MAX_WIDTH and d <= MAX_WIDTH:
                    where = f"levels[{i}].ffn" if "ffn" in fields else "block.ffn"
                    width(f"{where}.ratio", d_ff)
                per_block = 4 * d * d + 3 * d * d_ff + 6 * d * cw
                contributors.append(
                    (
                        count * per_block,
                        f"levels[{i}].d_model" if d * d >= d * d_ff / 4 else f"levels[{i}].{which}",
                    )
                )
    if blocks_total > MAX_BLOCKS:
        issues.append(
            (
                "levels",
                f"{blocks_total:,} blocks in all (limit {MAX_BLOCKS:,}); "
                f"lower the encoder/middle/decoder counts; {OVERRIDE_HINT}",
            )
        )
    if cond.classes is not None:
        width("conditioning.classes.count", cond.classes.count)
        contributors.append((float(cond.classes.count) * cw, "conditioning.classes.count"))
    if cond.mapping is not None:
        m = cond.mapping
        contributors.append((m.depth * 3 * m.ratio * cw * cw, "conditioning.mapping.ratio"))
        width("conditioning.mapping.ratio", m.ratio * cw)
    total = sum(c for c, _ in contributors)
    spec_estimates[id(spec)] = total
    if total > MAX_PARAMS and not issues:
        field = max(contributors)[1]
        issues.append(
            (
                field,
                f"the model would have about {total:.3g} parameters (limit "
                f"{MAX_PARAMS:.3g}); make it smaller; {OVERRIDE_HINT}",
            )
        )
    h, w = spec.input.resolution
    ph, pw = (
        (spec.patch.size, spec.patch.size) if isinstance(spec.patch.size, int) else spec.patch.size
    )
    tokens = (h // ph) * (w // pw)
    if tokens > MAX_TOKENS:
        issues.append(
            (
                "input.resolution",
                f"{h}x{w} with patch {ph}x{pw} makes {tokens:,} "
                f"tokens (limit {MAX_TOKENS:,}); {OVERRIDE_HINT}",
            )
        )
    return issues


def resolution_issues(
    spec: ModelSpec, resolution: tuple[int, int], field: str
) -> list[tuple[str, str]]:
    """The token limit for a resolution asked for at run time (``--resolution``)."""
    if not limits_enabled():
        return []
    ph, pw = (
        (spec.patch.size, spec.patch.size) if isinstance(spec.patch.size, int) else spec.patch.size
    )
    tokens = (resolution[0] // ph) * (resolution[1] // pw)
    if tokens > MAX_TOKENS:
        return [
            (
                field,
                f"{resolution[0]}x{resolution[1]} makes {tokens:,} tokens at the "
                f"outer level (limit {MAX_TOKENS:,}); {OVERRIDE_HINT}",
            )
        ]
    return []


# ----------------------------------------------------------------------------- run-time sizes
# The spec limits above hold for what a spec can say; these hold for the sizes given at run
# time (--count, --cols, --resolution, --batch, a file's header). Each is checked against an
# estimate before anything is allocated, so "--count 1000000000" is one line, not a
# MemoryError after a minute of swapping.

MAX_RUN_BYTES = 8 * 2**30
"""Memory one run-time request may need (8 GiB); more is refused unless the limits are off."""


def gib(n: float) -> str:
    """``n`` bytes in words: ``"12.3 GiB"``, ``"512 MiB"``."""
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


class RunSizeError(UserError):
    """A size given at run time would need more memory than :data:`MAX_RUN_BYTES`."""


def check_run_bytes(estimate: float, field: str, what: str, limit: float = MAX_RUN_BYTES) -> None:
    """Raise :class:`RunSizeError` naming ``field`` (a flag, a file) when ``what`` would
    need about ``estimate`` bytes, more than ``limit`` (nothing when the limits are off)."""
    if limits_enabled() and estimate > limit:
        raise RunSizeError(
            f"{field}: {what} would need about {gib(estimate)} of memory "
            f"(limit {gib(limit)}); use a smaller value; {OVERRIDE_HINT}"
        )


def inference_bytes_per_sample(spec: ModelSpec, resolution: tuple[int, int] | None = None) -> float:
    """A rough lower bound of the memory one sample takes in one denoiser call (fp32): at
    the widest level, a block's input, output, attention projections and FFN hidden values,
    plus the sampler's copies of the image (x, noise, denoised, derivatives)."""
    grids = spec.token_grids(resolution)
    h, w = resolution or spec.input.resolution
    peak = 0.0
    for i, lvl in enumerate(spec.levels):
        d = float(lvl.d_model)
        stacks = [
            ffn
            for which in ("encoder", "middle", "decoder")
            for _, ffn in _stack_blocks(getattr(lvl, which), lvl.overrides(), spec.block)
        ]
        d_ff = max((_ffn_width(f, d) for f in stacks), default=4 * d)
        peak = max(peak, grids[i][0] * grids[i][1] * (6 * d + 2 * d_ff) * 4)
    return peak + 8 * spec.input.channels * h * w * 4


KEPT_PER_SAMPLE = 72
"""Bytes of bookkeeping per sample when samples stream to a file (its label as a Python int
and as int64, its share of the chunk list)."""


def sample_bytes(
    spec: ModelSpec,
    count: int,
    resolution: tuple[int, int] | None = None,
    batch: int | None = None,
    keep: bool = True,
) -> float:
    """Memory of drawing ``count`` samples in batches of ``batch`` (default: all at once),
    keeping every finished sample (fp32) and its label (``keep``), or streaming them to a
    file (``keep=False``: the labels and the chunk list only)."""
    h, w = resolution or spec.input.resolution
    at_once = min(count, batch or count)
    kept = spec.input.channels * h * w * 4 + 8 if keep else KEPT_PER_SAMPLE
    return at_once * inference_bytes_per_sample(spec, resolution) + count * kept


def check_sample_size(
    spec: ModelSpec,
    count: int,
    resolution: tuple[int, int] | None = None,
    batch: int | None = None,
    keep: bool = True,
) -> None:
    """:func:`check_run_bytes` for drawing ``count`` samples (see :func:`sample_bytes`); the
    message names ``--resolution`` when one batch alone is too much, else ``--count`` (or
    ``--batch``)."""
    if not limits_enabled():
        return
    h, w = resolution or spec.input.resolution
    at_once = min(count, batch or count)
    if sample_bytes(spec, 1, resolution) > MAX_RUN_BYTES:
        field = f"--resolution {h}x{w}"
    elif batch is not None and sample_bytes(spec, at_once, resolution, keep=False) > MAX_RUN_BYTES:
        field = f"--batch {batch}"
    else:
        field = f"--count {count}"
    check_run_bytes(
        sample_bytes(spec, count, resolution, batch, keep),
        field,
        f"{count:,} sample(s) at {h}x{w}"
        + (f" in batches of {batch}" if batch is not None else ""),
    )


def grid_bytes(count: int, cols: int, height: int, width: int) -> float:
    """Memory of a PNG grid of ``count`` images in ``cols`` columns (uint8 RGB, one pixel of
    padding, twice over for the encoder)."""
    rows = -(-count // max(cols, 1))
    return 2.0 * (rows * (height + 1) + 1) * (cols * (width + 1) + 1) * 3


__all__ = [
    "check_run_bytes",
    "check_sample_size",
    "sample_bytes",
    "grid_bytes",
    "inference_bytes_per_sample",
    "MAX_RUN_BYTES",
    "RunSizeError",
    "gib",
    "size_issues",
    "estimated_params",
    "activation_bytes_per_sample",
    "resolution_issues",
    "no_size_limits",
    "limits_enabled",
    "MAX_PARAMS",
    "MAX_BLOCKS",
    "MAX_TOKENS",
    "MAX_WIDTH",
    "ENV",
]
