"""The root ``ModelSpec``: input, patch embedding, levels of blocks, conditioning, head.

A model is a path through levels of token grids (outer -> inner). Each level but the innermost
has ``encoder`` blocks, a ``down`` transition to the next level, ``decoder`` blocks and a
``skip`` merge; the innermost level has ``middle`` blocks. Model-wide ``block`` defaults can be
overridden per level (any block field set on the level) and per block (a list of overrides).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Annotated, Any, Iterator, Literal, assert_never

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from .components import (
    FFN,
    AdaLNHead,
    AdaLNZero,
    AggregateAttention,
    Attention,
    AxialRope,
    Conditioning,
    CrossAttention,
    DotLogits,
    Down,
    FNONoise,
    FourierNoise,
    GeluMLP,
    GlobalAttention,
    Head,
    Init,
    Input,
    LinearHead,
    Logits,
    MemoryCrossAttention,
    Merge,
    Modulation,
    NeighborhoodAttention,
    NoCrossAttention,
    NoPosition,
    Norm,
    NoRope,
    Patch,
    Position,
    QKNorm,
    Repatch,
    Rope,
    SharedAdaLNZero,
    ShiftedWindowAttention,
    SinusoidalNoise,
    Skip,
    Spec,
    Up,
    Upsample,
    neighborhood_misfits,
    pair,
)
from .limits import resolution_issues, size_issues
from .objective import DDPMObjective, EDMObjective, FlowObjective, ObjectiveSpec

SPEC_VERSION: Literal[1] = 1

Dropout = Annotated[float, Field(ge=0.0, lt=1.0)]


class Block(Spec):
    """One transformer block: (modulated) pre-norm attention, then (modulated) pre-norm FFN."""

    attention: Attention = Field(default_factory=GlobalAttention)
    """Which tokens a query sees (global, neighborhood, shifted window, aggregate, none)."""
    d_head: PositiveInt = 64
    """Width of one attention head; the head count is derived: ``d_model / d_head``."""
    logits: Logits = Field(default_factory=DotLogits)
    """How attention logits are formed: scaled dot product or cosine similarity."""
    qk_norm: QKNorm = Field(default_factory=QKNorm)
    """A norm on queries and keys before the logits (MDiT's QK LayerNorm)."""
    rope: Rope = Field(default_factory=NoRope)
    """Rotary position encoding on part of each head."""
    attention_bias: bool = True
    """Biases on the q/k/v and output projections."""
    norm: Norm = Field(default_factory=Norm)
    """The pre-norm of each sub-layer."""
    modulation: Modulation = Field(default_factory=AdaLNZero)
    """How the conditioning vector enters the block (adaLN-Zero, AdaRMSNorm scale, none)."""
    ffn: FFN = Field(default_factory=GeluMLP)
    """The feed-forward sub-layer."""
    dropout: Dropout = 0.0
    """Dropout rate in attention and FFN (training only)."""
    zero_init_out: bool = False
    """Zero-initialise the attention and FFN output projections (HDiT; DiT gates instead)."""
    cross_attention: CrossAttention = Field(default_factory=NoCrossAttention)
    """A cross-attention sub-layer between attention and FFN (MDiT's core blocks)."""


class _BlockFields(Spec):
    """Block fields that may be overridden; ``None`` means "inherit"."""

    attention: Attention | None = None
    d_head: PositiveInt | None = None
    logits: Logits | None = None
    qk_norm: QKNorm | None = None
    rope: Rope | None = None
    attention_bias: bool | None = None
    norm: Norm | None = None
    modulation: Modulation | None = None
    ffn: FFN | None = None
    dropout: Dropout | None = None
    zero_init_out: bool | None = None
    cross_attention: CrossAttention | None = None

    def overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in Block.model_fields if getattr(self, k) is not None}


class BlockOverride(_BlockFields):
    """A run of ``repeat`` blocks that override some block fields."""

    repeat: PositiveInt = 1
    """How many consecutive blocks this entry stands for."""


Stack = NonNegativeInt | tuple[BlockOverride, ...]
"""A stack of blocks: a count (all default blocks) or a list of overrides."""


class Level(_BlockFields):
    """One level of the hierarchy. Block fields set here apply to all of its blocks."""

    d_model: PositiveInt
    """Token width at this level."""
    encoder: Stack | None = None
    """Blocks on the way in (outer levels): a count or a list of block overrides."""
    decoder: Stack | None = None
    """Blocks on the way back out (outer levels), separate from the encoder's."""
    middle: Stack | None = None
    """Blocks of the innermost level: a count or a list of block overrides."""
    down: Down | None = None
    """How tokens go to the next (inner) level: ``merge`` or ``repatch``."""
    up: Up | None = None
    """How the inner level's tokens come back (default: ``split``, the inverse of ``merge``)."""
    skip: Skip | None = None
    """How the encoder's output is merged with what comes back up (lerp, add, concat, ...)."""


class ModelSpec(Spec):
    """A diffusion transformer, as data."""

    spec_version: Literal[1] = SPEC_VERSION
    """The version of the spec language; older versions are migrated on load."""
    name: Annotated[str, Field(min_length=1)] = "model"
    description: str = ""
    input: Input = Field(default_factory=Input)
    """What the model is fed: channels, pixel or latent space, training resolution."""
    patch: Patch = Field(default_factory=Patch)
    """The outer patch embedding."""
    position: Position = Field(default_factory=NoPosition)
    """An absolute position encoding added once, after the patch embedding."""
    conditioning: Conditioning = Field(default_factory=Conditioning)
    """Noise level, classes and auxiliary inputs, and the mapping network that mixes them."""
    block: Block = Field(default_factory=Block)
    """Defaults for every block; levels and block overrides change them."""
    levels: Annotated[tuple[Level, ...], Field(min_length=1)]
    """The levels of token grids, outer to inner."""
    head: Head = Field(default_factory=LinearHead)
    """The output layer."""
    init: Init = Field(default_factory=Init)
    """Weight initialisation."""

    # ---------------------------------------------------------------- derived quantities

    @property
    def cond_width(self) -> int:
        return self.conditioning.width or self.levels[0].d_model

    @property
    def out_channels(self) -> int:
        return self.input.channels * (2 if self.head.learned_sigma else 1)

    @property
    def default_objective(self) -> "ObjectiveSpec":
        """The objective a model of this spec is assumed to have when nothing says otherwise
        (a checkpoint that records none, a spec sampled or exported with random weights): the
        one its noise embedding is made for. ``fourier`` embeds ``ln(sigma)`` -> ``edm``;
        ``fno`` takes a flow time in [0, 1] -> ``flow`` (MPDiT); ``sinusoidal`` takes a
        timestep -> ``ddpm_eps`` (DiT), with a learned variance exactly when the head has one.
        The one place this is decided: the command line and the tests ask here."""
        match self.conditioning.noise:
            case FourierNoise():
                return EDMObjective()
            case FNONoise():
                return FlowObjective()
            case SinusoidalNoise():
                return DDPMObjective(learned_sigma=self.head.learned_sigma)
            case other:
                assert_never(other)

    @property
    def null_label(self) -> int | None:
        """The unconditional class label (classifier-free guidance), or None when the model has
        no class conditioning or no null class."""
        classes = self.conditioning.classes
        return classes.null_label if classes is not None else None

    def factors(self) -> list[int]:
        """Down factor between level i and i+1 (a ``repatch`` down's factor is its patch size
        over the level's cumulative patch)."""
        out: list[int] = []
        cum = pair(self.patch.size)[0]
        for lvl in self.levels[:-1]:
            match lvl.down:
                case Merge(factor=f):
                    out.append(f)
                case Repatch(patch_size=p):
                    out.append(max(1, p // cum))
                case None:
                    continue
            cum *= out[-1]
        return out

    def resolution_multiple(self) -> tuple[int, int]:
        """Input height/width must be multiples of this (patch x all merges)."""
        ph, pw = pair(self.patch.size)
        f = math.prod(self.factors())
        return ph * f, pw * f

    def token_grids(self, resolution: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """Token grid (h, w) of every level at ``resolution`` (default: the training one)."""
        h, w = resolution or self.input.resolution
        ph, pw = pair(self.patch.size)
        grids = [(h // ph, w // pw)]
        for f in self.factors():
            grids.append((grids[-1][0] // f, grids[-1][1] // f))
        return grids

    def stack(self, level: int, which: Literal["encoder", "decoder", "middle"]) -> list[Block]:
        """Resolved blocks of one stack: defaults <- level overrides <- block overrides."""
        lvl = self.levels[level]
        base = self.block.model_copy(update=lvl.overrides())
        value = getattr(lvl, which)
        if value is None:
            return []
        if isinstance(value, int):
            return [base] * value
        blocks: list[Block] = []
        for o in value:
            blocks.extend([base.model_copy(update=o.overrides())] * o.repeat)
        return blocks

    def blocks(self) -> Iterator[tuple[int, str, int, Block]]:
        """``(level, stack, index in stack, block)`` for every block, in forward order."""
        for i in range(len(self.levels)):
            for which in ("encoder", "middle", "decoder"):
                for j, blk in enumerate(self.stack(i, which)):
                    yield i, which, j, blk

    def origin(self, level: int, which: str, j: int, field: str) -> str:
        """The spec path where block ``j`` of a stack gets ``field`` from (for error messages):
        a block override, the level, or the model-wide ``block`` defaults."""
        lvl = self.levels[level]
        value = getattr(lvl, which)
        if isinstance(value, tuple):
            start = 0
            for k, o in enumerate(value):
                if start <= j < start + o.repeat:
                    if getattr(o, field) is not None:
                        return f"levels[{level}].{which}[{k}].{field}"
                    break
                start += o.repeat
        if getattr(lvl, field) is not None:
            return f"levels[{level}].{field}"
        return f"block.{field}"

    def check_resolution(
        self, resolution: tuple[int, int], field: str = "resolution"
    ) -> list[tuple[str, str]]:
        """Problems running this spec at ``resolution``: ``[(field path, message)]``."""

        hw = (int(resolution[0]), int(resolution[1]))
        return resolution_issues(self, hw, field) or _resolution_issues(self, hw, field)

    # ---------------------------------------------------------------- validation

    @model_validator(mode="after")
    def _validate(self) -> "ModelSpec":

        issues = size_issues(self)  # first: the other checks expand the stacks of blocks
        if issues:
            raise ValueError("\n".join(f"{path}: {msg}" for path, msg in issues))
        issues = _structure_issues(self)
        issues += _resolution_issues(self, self.input.resolution, "input.resolution")
        if issues:
            raise ValueError("\n".join(f"{path}: {msg}" for path, msg in issues))
        return self


def _nearest_valid(n: int, m: int) -> str:
    lo = max(m, (n // m) * m)
    hi = lo + m if lo < n or lo == n else lo
    options = sorted({lo, hi} - {n}) if n % m else [n]
    return " or ".join(str(o) for o in options)


def _structure_issues(spec: ModelSpec) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    last = len(spec.levels) - 1
    for i, lvl in enumerate(spec.levels):
        p = f"levels[{i}]"
        if i == last:
            if lvl.middle is None:
                out.append(
                    (f"{p}.middle", "the innermost level needs `middle` blocks (e.g. `middle: 11`)")
                )
            for name in ("encoder", "decoder", "down", "skip"):
                if getattr(lvl, name) is not None:
                    out.append(
                        (
                            f"{p}.{name}",
                            f"the innermost level has no `{name}`; move these "
                            f"blocks to `middle` or add an inner level",
                        )
                    )
        else:
            if lvl.middle is not None:
                out.append(
                    (
                        f"{p}.middle",
                        "only the innermost level has `middle` blocks; use "
                        "`encoder` and `decoder` on outer levels",
                    )
                )
            if lvl.down is None:
                out.append(
                    (
                        f"{p}.down",
                        "an outer level needs a transition to the next level, "
                        "e.g. `down: {kind: merge, factor: 2}`",
                    )
                )
            if lvl.skip is None:
                out.append(
                    (
                        f"{p}.skip",
                        "an outer level needs a skip merge, e.g. "
                        "`skip: {kind: lerp}` (or `{kind: none}`)",
                    )
                )

    out += _family_issues(spec)
    for i, which, j, blk in spec.blocks():
        where = partial(spec.origin, i, which, j)
        d_model = spec.levels[i].d_model
        if isinstance(blk.attention, AggregateAttention):
            if not isinstance(blk.logits, DotLogits):
                out.append(
                    (
                        where("logits"),
                        "aggregate attention supports `logits: {kind: "
                        "dot}` only (use qk_norm for stability)",
                    )
                )
            if isinstance(blk.rope, AxialRope):
                r = blk.rope.fraction * blk.d_head
                if r != int(r) or int(r) % 4:
                    out.append(
                        (
                            where("rope") + ".fraction",
                            f"fraction {blk.rope.fraction} of "
                            f"d_head {blk.d_head} rotates {r:g} channels; it must be a whole "
                            "multiple of 4 (two axes x channel pairs)",
                        )
                    )
        elif blk.attention.kind != "none":
            if d_model % blk.d_head:
                out.append(
                    (
                        where("d_head"),
                        f"d_head {blk.d_head} does not divide d_model "
                        f"{d_model} of levels[{i}]; pick a divisor such as "
                        f"{_divisors_near(d_model, blk.d_head)}",
                    )
                )
            if isinstance(blk.rope, AxialRope):
                r = blk.rope.fraction * blk.d_head
                if r != int(r) or int(r) % 4:
                    out.append(
                        (
                            where("rope") + ".fraction",
                            f"fraction {blk.rope.fraction} of "
                            f"d_head {blk.d_head} rotates {r:g} channels; it must be a whole "
                            "multiple of 4 (two axes x channel pairs)",
                        )
                    )
            if isinstance(blk.attention, NeighborhoodAttention):
                for k in pair(blk.attention.kernel_size):
                    if k % 2 == 0:
                        out.append(
                            (
                                where("attention") + ".kernel_size",
                                f"kernel {k} is even; "
                                f"neighborhood kernels must be odd (use {k - 1} or {k + 1})",
                            )
                        )
    return _dedupe(out)


def _family_issues(spec: ModelSpec) -> list[tuple[str, str]]:
    """Rules of the component kinds that span levels: repatch / upsample, shared adaLN,
    class prefix tokens and cross-attention memory."""
    out: list[tuple[str, str]] = []
    cond = spec.conditioning
    cum = pair(spec.patch.size)
    for i, lvl in enumerate(spec.levels[:-1]):
        p = f"levels[{i}]"
        nxt = spec.levels[i + 1].d_model
        if isinstance(lvl.down, Repatch):
            if cum[0] != cum[1]:
                out.append(
                    (
                        f"{p}.down",
                        f"repatch needs a square patch; this level's patch is {cum[0]}x{cum[1]}",
                    )
                )
            elif lvl.down.patch_size % cum[0] or lvl.down.patch_size <= cum[0]:
                out.append(
                    (
                        f"{p}.down.patch_size",
                        f"patch_size {lvl.down.patch_size} must be a "
                        f"multiple (> 1x) of this level's patch {cum[0]}, e.g. "
                        f"{2 * cum[0]}",
                    )
                )
        if isinstance(lvl.up, Upsample) and lvl.d_model != nxt:
            out.append(
                (
                    f"{p}.up",
                    f"upsample keeps the width: levels[{i}].d_model "
                    f"{lvl.d_model} != levels[{i + 1}].d_model {nxt}; use `up: {{kind: "
                    "split}` or equal widths",
                )
            )
        if isinstance(lvl.down, Merge):
            f = lvl.down.factor
            cum = (cum[0] * f, cum[1] * f)
        elif isinstance(lvl.down, Repatch):
            cum = (lvl.down.patch_size, lvl.down.patch_size)
    blocks = list(spec.blocks())
    shared = [(i, w, j, b) for i, w, j, b in blocks if isinstance(b.modulation, SharedAdaLNZero)]
    widths = {spec.levels[i].d_model for i, _, _, _ in shared}
    if len(widths) > 1:
        i, w, j, _ = shared[0]
        out.append(
            (
                spec.origin(i, w, j, "modulation"),
                "shared_ada_ln_zero blocks share one "
                f"modulation network, so they need one d_model; found {sorted(widths)}",
            )
        )
    if isinstance(spec.head, AdaLNHead) and spec.head.shared:
        if not shared:
            out.append(
                (
                    "head.shared",
                    "a shared adaLN head needs blocks with `modulation: "
                    "{kind: shared_ada_ln_zero}` (or set `shared: false`)",
                )
            )
        elif spec.levels[0].d_model not in widths:
            out.append(("head.shared", "the head's width must equal the shared adaLN width"))
    if isinstance(cond.noise, FNONoise) and cond.noise.modes > cond.noise.points // 2 + 1:
        out.append(
            (
                "conditioning.noise.modes",
                f"{cond.noise.modes} modes exceed the "
                f"{cond.noise.points // 2 + 1} Fourier modes of {cond.noise.points} points",
            )
        )
    for k, a in enumerate(cond.aux):
        if a.embed == "sinusoidal" and not isinstance(cond.noise, SinusoidalNoise):
            out.append(
                (
                    f"conditioning.aux[{k}].embed",
                    "sinusoidal auxiliary features are "
                    "concatenated to the sinusoidal noise features; use `noise: {kind: "
                    "sinusoidal}` or `embed: fourier`",
                )
            )
        if a.embed == "sinusoidal" and a.freq_min > a.freq_max:
            out.append(
                (
                    f"conditioning.aux[{k}].freq_min",
                    f"freq_min {a.freq_min} exceeds freq_max {a.freq_max}",
                )
            )
    classes = cond.classes
    if classes is not None and classes.inject == "prefix":
        widths = {lvl.d_model for lvl in spec.levels}
        if len(widths) > 1:
            out.append(
                (
                    "conditioning.classes.inject",
                    "class prefix tokens run through every "
                    f"level, so all levels need one d_model; found {sorted(widths)}",
                )
            )
        for i, lvl in enumerate(spec.levels[:-1]):
            if lvl.up is None or not isinstance(lvl.up, Upsample):
                out.append(
                    (
                        f"levels[{i}].up",
                        "with class prefix tokens the way up must be "
                        "`up: {kind: upsample}` (it sets the tokens aside)",
                    )
                )
        for i, w, j, b in blocks:
            if b.attention.kind not in ("global", "none"):
                out.append(
                    (
                        spec.origin(i, w, j, "attention"),
                        f"{b.attention.kind} attention "
                        "cannot see class prefix tokens; use `global` or "
                        "`conditioning.classes.inject: vector`",
                    )
                )
            if not isinstance(b.rope, NoRope):
                out.append(
                    (
                        spec.origin(i, w, j, "rope"),
                        "RoPE has no positions for class "
                        "prefix tokens; use `rope: {kind: none}` with prefix tokens",
                    )
                )
    cross = [
        (i, w, j, b) for i, w, j, b in blocks if isinstance(b.cross_attention, MemoryCrossAttention)
    ]
    if classes is not None and classes.inject == "memory" and not cross:
        out.append(
            (
                "conditioning.classes.inject",
                "`memory` class tokens need blocks with "
                "`cross_attention: {kind: memory}`; none has one",
            )
        )
    for i, w, j, b in cross:
        c = b.cross_attention
        assert isinstance(c, MemoryCrossAttention)  # the filter above
        has_class = classes is not None and classes.inject == "memory"
        if not (c.null_token or c.time_token or has_class):
            out.append(
                (
                    spec.origin(i, w, j, "cross_attention"),
                    "cross-attention has no "
                    "tokens: enable null_token / time_token or class `inject: memory`",
                )
            )
    return out


def _resolution_issues(
    spec: ModelSpec, resolution: tuple[int, int], field: str
) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if any(lvl.down is None for lvl in spec.levels[:-1]):
        return out  # reported as a structure issue; grids are undefined until it is fixed
    mh, mw = spec.resolution_multiple()
    h, w = resolution
    if h % mh or w % mw:
        out.append(
            (
                field,
                f"{h}x{w} is not divisible by patch x merges = {mh}x{mw}; nearest "
                f"valid: height {_nearest_valid(h, mh)}, width {_nearest_valid(w, mw)}",
            )
        )
        return out
    grids = spec.token_grids(resolution)
    for i, which, j, blk in spec.blocks():
        gh, gw = grids[i]
        att = blk.attention
        where = spec.origin(i, which, j, "attention")
        if isinstance(att, NeighborhoodAttention):
            for _, g, k, d in neighborhood_misfits(
                (gh, gw), pair(att.kernel_size), pair(att.dilation)
            ):
                out.append(
                    (
                        f"{where}.kernel_size",
                        f"kernel {k} x dilation {d} does not fit the {gh}x{gw} token grid "
                        f"of levels[{i}] at {h}x{w}; use a kernel <= "
                        f"{_largest_odd(g // d)} or a larger resolution",
                    )
                )
        if isinstance(att, AggregateAttention) and (gh % att.factor or gw % att.factor):
            f = att.factor
            out.append(
                (
                    f"{where}.factor",
                    f"aggregate factor {f} does not divide the "
                    f"{gh}x{gw} token grid of levels[{i}] at {h}x{w}; the grid must be "
                    f"divisible by {f} (use a resolution whose levels[{i}] grid is a "
                    f"multiple of {f})",
                )
            )
        if isinstance(att, ShiftedWindowAttention) and (
            gh % att.window_size or gw % att.window_size
        ):
            out.append(
                (
                    f"{where}.window_size",
                    f"window {att.window_size} does not tile the "
                    f"{gh}x{gw} token grid of levels[{i}] at {h}x{w}; use a divisor of "
                    "both sides",
                )
            )
    return _dedupe(out)


def _largest_odd(n: int) -> int:
    return n if n % 2 else max(1, n - 1)


def _divisors_near(n: int, target: int) -> str:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    divs.sort(key=lambda d: abs(d - target))
    return ", ".join(str(d) for d in sorted(divs[:3]))


def _dedupe(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Blocks share fields, so the same problem is found once per block: report it once."""
    return list(dict.fromkeys(items))
