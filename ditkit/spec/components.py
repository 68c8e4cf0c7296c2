"""Component specs: the variants a block, a level or the model can choose from.

Every variant family is a discriminated union keyed by ``kind``; each variant class holds only
its own fields. Everything here is frozen, inert data (no torch).
"""

from __future__ import annotations

import math
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

BOOL_NOT_NUMBER = "true/false is not a number here"


def _admits_bool(annotation: Any) -> bool:
    """Whether a field's annotation accepts ``True``/``False`` (``bool`` or a Literal of one)."""

    if annotation is bool or annotation is typing.Any or isinstance(annotation, bool):
        return True
    return any(_admits_bool(a) for a in typing.get_args(annotation))


class Spec(BaseModel):
    """Base class: frozen, unknown keys are errors, no arbitrary types. Numbers are strict: a
    YAML ``true``/``false`` is not a number (pydantic would read it as 1/0), and ``.inf`` /
    ``.nan`` are refused everywhere."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False
    )

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        bad = []
        for name, value in data.items():
            items = value if isinstance(value, (list, tuple)) else (value,)
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            if (
                field is not None
                and any(isinstance(v, bool) for v in items)
                and not _admits_bool(field.annotation)
            ):
                bad.append(
                    f"{name}: {BOOL_NOT_NUMBER}; write a number (YAML reads "
                    "true/false/yes/no/on/off as booleans)"
                )
        if bad:
            raise ValueError("\n".join(bad))
        return data


Size2 = Union[PositiveInt, tuple[PositiveInt, PositiveInt]]
"""An int (square) or an (h, w) pair."""


def pair(value: Size2) -> tuple[int, int]:
    """``7 -> (7, 7)``; ``(7, 3) -> (7, 3)``."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def neighborhood_misfits(
    grid: tuple[int, int] | list[int], kernel_size: tuple[int, int], dilation: tuple[int, int]
) -> list[tuple[str, int, int, int]]:
    """NATTEN's constraint ``kernel * dilation <= size`` per axis, the one place it is written:
    ``(axis, size, kernel, dilation)`` for each axis of the ``(height, width)`` ``grid`` that
    breaks it. Sizes that are not ints (symbolic while tracing) are not checked."""
    return [
        (axis, n, k, d)
        for axis, n, k, d in zip(("height", "width"), grid, kernel_size, dilation)
        if isinstance(n, int) and n < k * d
    ]


# --------------------------------------------------------------------------------------------
# attention pattern: which tokens a query sees


class GlobalAttention(Spec):
    """Every token attends to every token of its level (O(n^2))."""

    kind: Literal["global"] = "global"


#: the neighborhood kernel when a spec or a family helper does not name one (HDiT's 7x7)
DEFAULT_KERNEL_SIZE = 7


class NeighborhoodAttention(Spec):
    """Each query attends to a k x k window around it (NATTEN semantics: the window shifts
    inward at the borders, so every query sees exactly k x k keys)."""

    kind: Literal["neighborhood"] = "neighborhood"
    kernel_size: Size2 = DEFAULT_KERNEL_SIZE
    dilation: Size2 = 1


class ShiftedWindowAttention(Spec):
    """Swin-style non-overlapping windows; every other block of a stack shifts the windows by
    half a window (``shift: alternate``), as HDiT does."""

    kind: Literal["shifted_window"] = "shifted_window"
    window_size: PositiveInt = 8
    shift: Literal["alternate", "none"] = "alternate"


class NoAttention(Spec):
    """The block has no attention sub-layer (feed-forward only)."""

    kind: Literal["none"] = "none"


class AggregateAttention(Spec):
    """MDiT's aggregate block: the (normed) grid is grouped ``factor x factor`` (pixel unshuffle,
    channels ordered (row, col, channel)), global attention runs on that coarser grid with
    ``n_heads`` heads of the block's ``d_head`` through non-square projections
    (``factor^2 d_model -> n_heads d_head`` for q, k, v and back for the output), and the
    result is split back to the input grid. The block's FFN stays at the input grid.
    ``n_heads`` is usually 1.5x the level's heads (MDiT-B: 18 at d_model 768)."""

    kind: Literal["aggregate"] = "aggregate"
    factor: Annotated[int, Field(ge=2)] = 2
    n_heads: PositiveInt


Attention = Annotated[
    Union[
        GlobalAttention,
        NeighborhoodAttention,
        ShiftedWindowAttention,
        NoAttention,
        AggregateAttention,
    ],
    Field(discriminator="kind"),
]

# --------------------------------------------------------------------------------------------
# attention logits


class DotLogits(Spec):
    """``q . k / sqrt(d_head)``."""

    kind: Literal["dot"] = "dot"
    factor: PositiveFloat = 1.0
    """A constant on the logits: 1 as trained; resolution policies set it (attention entropy
    scaling ``log n'/log n``, YaRN's temperature ``(0.1 ln s + 1)^2``)."""


class CosineLogits(Spec):
    """HDiT: cosine similarity times a learned per-head scale (learned directly, not as a log),
    ``scale * <q/|q|, k/|k|>``; ``eps`` sits inside the rsqrt of the squared norms."""

    kind: Literal["cosine"] = "cosine"
    scale_init: PositiveFloat = 10.0
    eps: PositiveFloat = 1e-6
    factor: PositiveFloat = 1.0
    """A constant on the logits (``factor * scale * cos``): 1 as trained; resolution policies
    set it (attention entropy scaling, YaRN's temperature)."""


Logits = Annotated[Union[DotLogits, CosineLogits], Field(discriminator="kind")]


class QKNorm(Spec):
    """Normalise q and k per head before the logits (``none`` disables it)."""

    kind: Literal["none", "layer", "rms"] = "none"
    affine: bool = True
    eps: PositiveFloat = 1e-6


class NoCrossAttention(Spec):
    kind: Literal["none"] = "none"


class MemoryCrossAttention(Spec):
    """MDiT: after self-attention, the block cross-attends (its own pre-norm, no modulation) to
    a few conditioning tokens: a learned ``null`` token (its own key and value), the class token
    (when ``conditioning.classes.inject`` is ``memory``) and a ``time`` token, GELU of the
    conditioning vector. Each token kind has its own bias-free key and value projection; keys
    (and queries) go through the block's ``qk_norm``; the output projection is zero-initialised
    when the block's ``zero_init_out`` is set."""

    kind: Literal["memory"] = "memory"
    null_token: bool = True
    time_token: bool = True


CrossAttention = Annotated[
    Union[NoCrossAttention, MemoryCrossAttention], Field(discriminator="kind")
]

# --------------------------------------------------------------------------------------------
# rotary position encoding (acts on q and k inside attention)


class NoRope(Spec):
    kind: Literal["none"] = "none"


class NoRopeScaling(Spec):
    """RoPE frequencies as trained."""

    kind: Literal["none"] = "none"


class NtkScaling(Spec):
    """NTK-aware scaling (bloc97, 2023): raise the RoPE base so the lowest frequency is
    interpolated by the scale ``s`` while the highest is kept. For the usual
    ``theta_j = base^(-2j/d)`` this is ``base' = base * s^(d/(d-2))``. ditkit's axial RoPE has
    ``m = rotated/4`` frequencies per axis (geometric: ``base^(-j/m)``; log-spaced:
    log-uniform in [freq_min, freq_max)), so the same rule reads, per axis and frequency,
    ``w' = w * s^(-g)`` with ``g = (ln w_max - ln w) / (ln w_max - ln w_min)`` over the rotary
    frequencies of the layer: ``g = 0`` at the highest frequency (kept), ``g = 1`` at the
    lowest (divided by ``s``). For the geometric layout this is exactly
    ``base' = base * s^(m/(m-1))``. Positions keep the trained spacing (extrapolated).

    ``scale``: (row, col) ratio of the new to the trained token grid; policies derive it per
    level (leave it out in a policy)."""

    kind: Literal["ntk"] = "ntk"
    scale: tuple[PositiveFloat, PositiveFloat] | None = None
    time_exponent: PositiveFloat | None = None
    """Noise-level-dependent (time-aware) scaling, DyPE-style (Issachar et al. 2025, "DyPE:
    Dynamic Position Extrapolation for Ultra High Resolution Diffusion"; ditkit's own
    parametrisation): a sample at noise fraction ``t`` (1 = pure noise, 0 = clean; ``t =
    sigma / (1 + sigma)`` for a sigma input, the flow time for an FNO input) uses the scale
    ``s(t) = s^(t^time_exponent)``: the full rescaling at high noise, where the coarse layout
    forms and low frequencies must stay in the trained range, easing to none (the trained
    frequencies at the trained spacing) as ``t -> 0``, where detail forms. None: static."""


class YarnScaling(Spec):
    """YaRN (Peng et al. 2023): per frequency, a ramp between interpolation (``w / s``) and
    extrapolation (``w``) by the number of turns ``r = L / lambda = L w / 2 pi`` the frequency
    makes over the trained length ``L``: ``gamma(r) = 0`` for ``r < alpha``, ``1`` for
    ``r > beta``, ``(r - alpha) / (beta - alpha)`` between, and
    ``w' = (1 - gamma) w / s + gamma w``. With ``temperature`` the logits are multiplied by
    ``1/t`` where ``sqrt(1/t) = 0.1 ln s + 1`` (on the block's ``logits.factor``; ``s`` is the
    geometric mean of the two axes' scales). The paper's LLaMA values are alpha = 1, beta = 32.

    ``scale`` and ``trained_length`` ((row, col): the span of the trained positions, in the
    positions' units: the trained grid for integer positions, 2 for normalised ones, times the
    trained ``position_scale``) are derived per level by the policies (leave them out there)."""

    kind: Literal["yarn"] = "yarn"
    alpha: PositiveFloat = 1.0
    beta: PositiveFloat = 32.0
    temperature: bool = True
    scale: tuple[PositiveFloat, PositiveFloat] | None = None
    trained_length: tuple[PositiveFloat, PositiveFloat] | None = None
    time_exponent: PositiveFloat | None = None
    """Noise-level-dependent (time-aware) scaling, DyPE-style (Issachar et al. 2025, "DyPE:
    Dynamic Position Extrapolation for Ultra High Resolution Diffusion"; ditkit's own
    parametrisation): a sample at noise fraction ``t`` (1 = pure noise, 0 = clean; ``t =
    sigma / (1 + sigma)`` for a sigma input, the flow time for an FNO input) uses the scale
    (and YaRN's temperature of) ``s(t) = s^(t^time_exponent)``: the full rescaling at high
    noise, where the coarse layout forms and low frequencies must stay in the trained range,
    easing to none (the trained frequencies at the trained spacing) as ``t -> 0``, where
    detail forms. None: static."""

    @model_validator(mode="after")
    def _ramp(self) -> "YarnScaling":
        if self.alpha >= self.beta:
            raise ValueError(
                f"alpha ({self.alpha}) must be below beta ({self.beta}): the ramp "
                "runs from alpha to beta turns over the trained length"
            )
        return self


def _scaling_kind(value: Any) -> Any:
    """``ntk`` is short for ``{kind: ntk}`` (the ``--policies`` text syntax)."""
    return {"kind": value} if isinstance(value, str) else value


RopeScaling = Annotated[
    Union[NoRopeScaling, NtkScaling, YarnScaling],
    Field(discriminator="kind"),
    BeforeValidator(_scaling_kind),
]
"""How RoPE frequencies are rescaled for a grid larger than the trained one."""


class GridPositions(Spec):
    """Training uses the ordinary positions of the token grid."""

    kind: Literal["grid"] = "grid"


class RandomPositions(Spec):
    """Randomised RoPE positions in training (RPE-2D / randomized positional encodings,
    Ruoss et al. 2023, "Randomized Positional Encodings Boost Length Generalization of
    Transformers", carried to 2-D grids): while the module is training, each sample's
    positions are a random stretched and shifted window of the range ``max_scale`` times
    wider than the grid, so the model meets the relative distances of a grid up to
    ``max_scale`` times larger; in eval mode (sampling, export) the positions are the
    ordinary ones.

    Per sample and axis, with ``u, v, w ~ U[0, 1)`` (one draw per sample shared by every
    block and level, so the positions stay coherent across levels): when
    ``w < probability``, the spacing is ``a = 1 + v (max_scale - 1)``, otherwise ``a = 1``
    and the offset is 0 (the ordinary positions). A level with ``n`` tokens on the axis maps
    its position ``p`` to

    * ``integer`` positions (``p = 0 .. n-1``): ``p' = a p + u (max_scale - a) n``, inside
      ``[0, max_scale n)``;
    * ``normalized`` positions (cell centres in ``(-1, 1)``):
      ``p' = a p + (2u - 1)(max_scale - a)``, inside ``(-max_scale, max_scale)``.

    A shift alone (``a = 1``) leaves RoPE's logits unchanged (they depend on position
    differences only); the stretch is what shows the larger distances. The draws come from
    the training run's checkpointed position generator, so a resumed run is exact."""

    kind: Literal["random"] = "random"
    max_scale: Annotated[float, Field(gt=1.0)] = 2.0
    """How much wider than the grid the drawn windows may reach (2: the distances of a grid
    twice as large)."""
    probability: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    """The share of training samples that get random positions (the rest: the grid's)."""


def _positions_kind(value: Any) -> Any:
    """``random`` is short for ``{kind: random}``."""
    return {"kind": value} if isinstance(value, str) else value


TrainPositions = Annotated[
    Union[GridPositions, RandomPositions],
    Field(discriminator="kind"),
    BeforeValidator(_positions_kind),
]
"""Which RoPE positions training uses (sampling always uses the grid's)."""


class AxialRope(Spec):
    """2-D axial RoPE: a ``fraction`` of each head's channels is rotated, half of those by the
    row position and half by the column position.

    ``positions``: ``normalized`` are HDiT's cell centres in [-1, 1] per axis (so a level's
    positions are the same whatever its grid size: interpolation), ``integer`` are grid indices
    with the origin at the upper-left token (extrapolation).
    ``frequencies``: ``log_spaced`` is HDiT's layout (``n_heads * r/4`` log-uniform frequencies in
    [freq_min, freq_max], interleaved across heads); ``geometric`` is the usual
    ``base^(-j / (r/4))`` set shared by every head.
    ``position_scale``: (row, col) factors on the positions -- equivalently a rescaling of the
    frequencies. 1 in training; resolution-extrapolation policies set it to switch between
    interpolating and extrapolating positions at a new resolution.
    """

    kind: Literal["axial"] = "axial"
    fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    positions: Literal["normalized", "integer"] = "normalized"
    frequencies: Literal["log_spaced", "geometric"] = "log_spaced"
    freq_min: PositiveFloat = math.pi
    freq_max: PositiveFloat = 10.0 * math.pi
    base: PositiveFloat = 10000.0
    position_scale: tuple[PositiveFloat, PositiveFloat] = (1.0, 1.0)
    scaling: RopeScaling = Field(default_factory=NoRopeScaling)
    """A frequency rescaling for a larger grid (NTK-aware, YaRN); set by resolution policies'
    ``rope_scaling`` option, with the scale derived per level."""
    train_positions: TrainPositions = Field(default_factory=GridPositions)
    """``random``: randomised positions while training (:class:`RandomPositions`); ``grid``
    (default): the ordinary positions always."""

    @model_validator(mode="after")
    def _scaling_complete(self) -> "AxialRope":
        sc = self.scaling
        missing = [
            n
            for n in ("scale", "trained_length")
            if n in type(sc).model_fields and getattr(sc, n) is None
        ]
        if missing:
            raise ValueError(
                f"scaling {sc.kind} needs {' and '.join(missing)} (row, col) in a "
                "model spec; a policy's rope_scaling derives them from the "
                "resolution"
            )
        return self


Rope = Annotated[Union[NoRope, AxialRope], Field(discriminator="kind")]

# --------------------------------------------------------------------------------------------
# absolute position encoding (added once, after the patch embedding)


class NoPosition(Spec):
    kind: Literal["none"] = "none"


class SincosPosition(Spec):
    """DiT's fixed 2-D sin-cos table (first half of the channels encodes the column, second half
    the row), stored as a frozen parameter at the training grid, recomputed for other grids."""

    kind: Literal["sincos"] = "sincos"
    max_period: PositiveFloat = 10000.0


class LearnedPosition(Spec):
    """A learned table at the training grid (bicubically resized for other grids)."""

    kind: Literal["learned"] = "learned"
    init_std: PositiveFloat = 0.02


Position = Annotated[
    Union[NoPosition, SincosPosition, LearnedPosition], Field(discriminator="kind")
]

# --------------------------------------------------------------------------------------------
# norms and how the conditioning enters a block


class Norm(Spec):
    """Pre-norm of each sub-layer. ``affine`` adds a learned scale (and a bias for LayerNorm);
    modulated norms usually have none."""

    kind: Literal["layer", "rms"] = "layer"
    eps: PositiveFloat = 1e-6
    affine: bool = False


class AdaLNZero(Spec):
    """DiT: ``SiLU -> Linear(cond, 6 d_model)`` gives shift/scale/gate for both sub-layers,
    zero-initialised so every block starts as the identity."""

    kind: Literal["ada_ln_zero"] = "ada_ln_zero"


class AdaScale(Spec):
    """HDiT's AdaRMSNorm: ``Linear(cond, d_model)`` (zero-init, no bias) gives ``1 + scale`` for
    each sub-layer's norm; no shift, no gate. ``activation`` is applied to the conditioning
    vector first (MDiT: ``RN(x) * (1 + GELU(t) W_t)``; HDiT: none)."""

    kind: Literal["ada_scale"] = "ada_scale"
    activation: Literal["none", "gelu", "silu"] = "none"


class SharedAdaLNZero(Spec):
    """MPDiT's shared adaLN: DiT's shift / scale / gate for both sub-layers, but produced once
    per forward by ONE ``SiLU -> Linear(cond, 6 d_model)`` (zero-init) that every block of this
    kind reuses. All such blocks must have the same ``d_model``."""

    kind: Literal["shared_ada_ln_zero"] = "shared_ada_ln_zero"


class NoModulation(Spec):
    kind: Literal["none"] = "none"


Modulation = Annotated[
    Union[AdaLNZero, AdaScale, NoModulation, SharedAdaLNZero], Field(discriminator="kind")
]

# --------------------------------------------------------------------------------------------
# feed-forward


class _FFNBase(Spec):
    ratio: PositiveFloat = 4.0
    """Hidden width as a multiple of ``d_model`` (ignored when ``d_ff`` is set)."""
    d_ff: PositiveInt | None = None
    bias: bool = True

    def hidden(self, d_model: int) -> int:
        return self.d_ff if self.d_ff is not None else int(round(self.ratio * d_model))


class GeluMLP(_FFNBase):
    """``Linear -> GELU -> Linear`` (DiT uses the tanh approximation)."""

    kind: Literal["gelu_mlp"] = "gelu_mlp"
    approximate: Literal["tanh", "none"] = "tanh"


class GEGLU(_FFNBase):
    """``x W1 -> (a, g) -> a * GELU(g) -> W2``; W1 has 2 d_ff outputs (value half first)."""

    kind: Literal["geglu"] = "geglu"


class SwiGLU(_FFNBase):
    """``x W1 -> (a, g) -> a * SiLU(g) -> W2``; W1 has 2 d_ff outputs (value half first)."""

    kind: Literal["swiglu"] = "swiglu"


FFN = Annotated[Union[GeluMLP, GEGLU, SwiGLU], Field(discriminator="kind")]

# --------------------------------------------------------------------------------------------
# transitions between levels and skip merges


class Merge(Spec):
    """Down: group ``factor x factor`` tokens (channels ordered (row, col, channel) as
    k-diffusion's TokenMerge) and project to the next level's width. Up is the inverse split."""

    kind: Literal["merge"] = "merge"
    factor: PositiveInt = 2
    bias: bool = False


class Repatch(Spec):
    """Down, coarse-first (MPDiT): the next level's tokens are NOT computed from this level's
    tokens but from a fresh ``patch_size x patch_size`` patch embedding of the model input
    (``patch_size`` in input pixels, a multiple of this level's patch), plus that level's own
    absolute ``position`` table. This level's stream (after its encoder blocks) becomes the
    skip. Class prefix tokens pass through unchanged."""

    kind: Literal["repatch"] = "repatch"
    patch_size: Annotated[int, Field(ge=2)]
    bias: bool = True
    position: "Position" = Field(default_factory=lambda: NoPosition())


Down = Annotated[Union[Merge, Repatch], Field(discriminator="kind")]


class Split(Spec):
    """Up: project and ungroup (the inverse of a ``merge``; k-diffusion's TokenSplit)."""

    kind: Literal["split"] = "split"


class Upsample(Spec):
    """Up (MPDiT's TokenUpsampler): ``Linear(d, f^2 d)`` + pixel shuffle (channels ordered
    (row, col, channel)) + GELU on the grid tokens; class prefix tokens are set aside and
    re-joined; then ``norm`` and a refining ``Linear(d, d)`` over all tokens; finally this
    level's absolute ``position`` table is added to the grid tokens. The factor is the level's
    down factor; both levels must have the same ``d_model``."""

    kind: Literal["upsample"] = "upsample"
    bias: bool = True
    approximate: Literal["tanh", "none"] = "tanh"
    norm: "Norm" = Field(default_factory=lambda: Norm(kind="layer", affine=False, eps=1e-6))
    position: "Position" = Field(default_factory=lambda: NoPosition())


Up = Annotated[Union[Split, Upsample], Field(discriminator="kind")]


class LerpSkip(Spec):
    """HDiT: ``lerp(skip, up, f)`` with a learned scalar ``f`` (init 0.5)."""

    kind: Literal["lerp"] = "lerp"
    init: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5


class AddSkip(Spec):
    kind: Literal["add"] = "add"


class ConcatSkip(Spec):
    """U-Net / U-ViT style: concatenate and project back to ``d_model``."""

    kind: Literal["concat"] = "concat"
    bias: bool = True


class NoSkip(Spec):
    kind: Literal["none"] = "none"


class LinearSkip(Spec):
    """MPDiT: ``up + Linear(skip)`` (the skip is a separate fine patch embedding of the input
    when the level's encoder is empty)."""

    kind: Literal["linear"] = "linear"
    bias: bool = True


Skip = Annotated[
    Union[LerpSkip, AddSkip, ConcatSkip, NoSkip, LinearSkip], Field(discriminator="kind")
]

# --------------------------------------------------------------------------------------------
# conditioning


class SinusoidalNoise(Spec):
    """DiT: ``[cos, sin]`` of ``scale * t * freqs`` (``frequency_dim`` features), then
    ``Linear -> SiLU -> Linear`` to the conditioning width. ``noise_level`` is a timestep.
    ``activation: geglu`` makes the first Linear twice as wide and gates it (MDiT's 2-layer
    GEGLU mapping network); auxiliary inputs with ``embed: sinusoidal`` are concatenated to
    these features before the first Linear."""

    kind: Literal["sinusoidal"] = "sinusoidal"
    frequency_dim: PositiveInt = 256
    max_period: PositiveFloat = 10000.0
    scale: PositiveFloat = 1.0
    activation: Literal["silu", "geglu"] = "silu"
    frequency_shift: Literal[0, 1] = 0
    """``f_k = max_period^(-k / (half - frequency_shift))``: 0 is DiT's reference code, 1 is
    diffusers' ``downscale_freq_shift=1``, which its ``DiTTransformer2DModel`` hard-codes (a
    different embedding: a DiT trained with one computes something else with the other)."""


class FourierNoise(Spec):
    """HDiT: random Fourier features (``std``) of ``ln(sigma) / 4``, then a bias-free Linear.
    ``noise_level`` is sigma."""

    kind: Literal["fourier"] = "fourier"
    std: PositiveFloat = 1.0


class FNONoise(Spec):
    """MPDiT's FNO time embedding: ``points`` grid values in [-1, 1] shifted by t, lifted by
    ``Linear(1, width)``, ``depth`` blocks of (spectral 1-D convolution keeping ``modes`` Fourier
    modes + pointwise 1-D convolution) with GELU between them, mean-pooled over the grid and
    projected to the conditioning width. ``noise_level`` is a flow time in [0, 1]."""

    kind: Literal["fno"] = "fno"
    points: Annotated[int, Field(ge=2)] = 32
    modes: PositiveInt = 16
    width: PositiveInt = 32
    depth: PositiveInt = 3


Noise = Annotated[Union[SinusoidalNoise, FourierNoise, FNONoise], Field(discriminator="kind")]


class Classes(Spec):
    """Class-label embedding. ``null_class`` adds one extra row (label == count) that
    classifier-free guidance uses as the unconditional label.

    ``inject``: ``vector`` adds the embedding to the conditioning vector (DiT, HDiT);
    ``prefix`` makes each class ``tokens`` learned tokens of the outer ``d_model`` prepended to
    the token sequence of every level (MPDiT; blocks then attend globally without RoPE, and the
    head drops them); ``memory`` makes the class one token (conditioning width) that
    ``cross_attention: {kind: memory}`` blocks attend to (MDiT)."""

    count: PositiveInt
    """Number of classes; labels are 0 .. count - 1."""
    null_class: bool = True
    """An extra "unconditional" label (= ``count``) for classifier-free guidance."""
    inject: Literal["vector", "prefix", "memory"] = "vector"
    tokens: PositiveInt = 1

    @property
    def rows(self) -> int:
        """Rows of the class embedding table: one per class, plus the null row."""
        return self.count + int(self.null_class)

    @property
    def null_label(self) -> int | None:
        """The label that means "unconditional" (the last row), or None without a null row."""
        return self.count if self.null_class else None


class AuxInput(Spec):
    """An auxiliary conditioning vector passed to ``forward`` by keyword (e.g. HDiT's 9-d
    ``aug_cond``); zeros when not given.

    ``embed: fourier`` (HDiT): random Fourier features (``std``) + bias-free Linear, summed
    into the conditioning vector. ``embed: sinusoidal`` (MDiT's aspect ratio / scale):
    ``features`` sinusoidal features per dim (``[cos, sin]`` at geometric frequencies from
    ``freq_min`` to ``freq_max``) concatenated to the sinusoidal noise features before the
    noise MLP. ``dropout``: in training, the input is zeroed (= "not given") with this
    probability per sample, so the model also learns the unconditional case (for guidance)."""

    name: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*$")]
    dims: PositiveInt
    std: PositiveFloat = 1.0
    embed: Literal["fourier", "sinusoidal"] = "fourier"
    features: Annotated[int, Field(ge=2, multiple_of=2)] = 256
    freq_min: PositiveFloat = 1.0
    freq_max: PositiveFloat = 1000.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


class Mapping(Spec):
    """HDiT's mapping network: RMSNorm, ``depth`` residual GEGLU blocks with RMSNorm, RMSNorm.
    Its width is the conditioning width."""

    depth: Annotated[int, Field(ge=0)] = 1
    """Residual GEGLU blocks."""
    ratio: PositiveFloat = 3.0
    """Hidden width of each block as a multiple of the conditioning width."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


class Conditioning(Spec):
    """How noise level, class and auxiliary inputs become the vector every block is modulated
    by. ``width``: the conditioning vector's width (``null`` = the outermost ``d_model``)."""

    width: PositiveInt | None = None
    """The conditioning vector's width (``null``: the outermost level's ``d_model``)."""
    noise: Noise = Field(default_factory=SinusoidalNoise)
    """How the noise level (a timestep, sigma or flow time) is embedded."""
    classes: Classes | None = None
    """Class labels (``null``: an unconditional model)."""
    aux: tuple[AuxInput, ...] = ()
    """Auxiliary inputs, each passed to ``forward`` by its name."""
    mapping: Mapping | None = None
    """A mapping network after the sum of the embeddings (``null``: none, as in DiT)."""


# --------------------------------------------------------------------------------------------
# output head


class LinearHead(Spec):
    """HDiT: norm (affine, unmodulated) then a zero-initialised Linear split into patches."""

    kind: Literal["linear"] = "linear"
    norm: Norm = Field(default_factory=lambda: Norm(kind="rms", affine=True))
    bias: bool = False
    learned_sigma: bool = False
    """Double the output channels: the second half predicts the variance (DiT / ADM)."""


class AdaLNHead(Spec):
    """DiT's final layer: adaLN shift/scale from ``SiLU(cond)``, LayerNorm, Linear; all
    zero-initialised. ``learned_sigma`` doubles the output channels (DiT's variance head)."""

    kind: Literal["ada_ln"] = "ada_ln"
    norm: Norm = Field(default_factory=Norm)
    bias: bool = True
    learned_sigma: bool = False
    shared: bool = False
    """Take shift / scale from the blocks' shared adaLN (its FFN shift and scale, MPDiT's final
    layer) instead of an own modulation Linear; needs ``shared_ada_ln_zero`` blocks."""


Head = Annotated[Union[LinearHead, AdaLNHead], Field(discriminator="kind")]


# --------------------------------------------------------------------------------------------
# input and init


class Input(Spec):
    """What the model is fed: ``channels`` at ``resolution`` (the training grid, in model input
    pixels). ``space: latent`` means the input is an autoencoder latent; ``latent_factor`` is
    the autoencoder's downsampling (image resolution = resolution * latent_factor)."""

    channels: PositiveInt = 3
    space: Literal["pixel", "latent"] = "pixel"
    resolution: tuple[PositiveInt, PositiveInt] = (32, 32)
    latent_factor: PositiveInt = 8


class Patch(Spec):
    """The outer patch embedding: ``size x size`` pixels -> one token (a Linear over the patch,
    channel order (row, col, channel))."""

    size: Size2 = 2
    bias: bool = True


class Init(Spec):
    """Weight init of linear layers: ``xavier_uniform`` (DiT, biases zero) or ``torch_default``
    (k-diffusion). ``embedding_std``: class embedding init std (DiT 0.02, k-diffusion 1.0).
    Zero-inits (adaLN, output projections, heads) are fixed by the components that need them."""

    linear: Literal["xavier_uniform", "torch_default"] = "xavier_uniform"
    embedding_std: PositiveFloat = 0.02
