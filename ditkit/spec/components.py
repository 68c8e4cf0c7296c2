"""Component specs: the variants a block, a level or the model can choose from.

Every variant family is a discriminated union keyed by ``kind``; each variant class holds only
its own fields. Everything here is frozen, inert data (no torch).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt


class Spec(BaseModel):
    """Base class: frozen, unknown keys are errors, no arbitrary types."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


Size2 = Union[PositiveInt, tuple[PositiveInt, PositiveInt]]
"""An int (square) or an (h, w) pair."""


def pair(value: Size2) -> tuple[int, int]:
    """``7 -> (7, 7)``; ``(7, 3) -> (7, 3)``."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


# --------------------------------------------------------------------------------------------
# attention pattern: which tokens a query sees


class GlobalAttention(Spec):
    """Every token attends to every token of its level (O(n^2))."""

    kind: Literal["global"] = "global"


class NeighborhoodAttention(Spec):
    """Each query attends to a k x k window around it (NATTEN semantics: the window shifts
    inward at the borders, so every query sees exactly k x k keys)."""

    kind: Literal["neighborhood"] = "neighborhood"
    kernel_size: Size2 = 7
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


Attention = Annotated[
    Union[GlobalAttention, NeighborhoodAttention, ShiftedWindowAttention, NoAttention],
    Field(discriminator="kind"),
]

# --------------------------------------------------------------------------------------------
# attention logits


class DotLogits(Spec):
    """``q . k / sqrt(d_head)``."""

    kind: Literal["dot"] = "dot"


class CosineLogits(Spec):
    """HDiT: cosine similarity times a learned per-head scale (learned directly, not as a log),
    ``scale * <q/|q|, k/|k|>``; ``eps`` sits inside the rsqrt of the squared norms."""

    kind: Literal["cosine"] = "cosine"
    scale_init: PositiveFloat = 10.0
    eps: PositiveFloat = 1e-6


Logits = Annotated[Union[DotLogits, CosineLogits], Field(discriminator="kind")]


class QKNorm(Spec):
    """Normalise q and k per head before the logits (``none`` disables it)."""

    kind: Literal["none", "layer", "rms"] = "none"
    affine: bool = True
    eps: PositiveFloat = 1e-6


# --------------------------------------------------------------------------------------------
# rotary position encoding (acts on q and k inside attention)


class NoRope(Spec):
    kind: Literal["none"] = "none"


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
    each sub-layer's norm; no shift, no gate."""

    kind: Literal["ada_scale"] = "ada_scale"


class NoModulation(Spec):
    kind: Literal["none"] = "none"


Modulation = Annotated[Union[AdaLNZero, AdaScale, NoModulation], Field(discriminator="kind")]

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


Down = Annotated[Union[Merge], Field(discriminator="kind")]


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


Skip = Annotated[Union[LerpSkip, AddSkip, ConcatSkip, NoSkip], Field(discriminator="kind")]

# --------------------------------------------------------------------------------------------
# conditioning


class SinusoidalNoise(Spec):
    """DiT: ``[cos, sin]`` of ``scale * t * freqs`` (``frequency_dim`` features), then
    ``Linear -> SiLU -> Linear`` to the conditioning width. ``noise_level`` is a timestep."""

    kind: Literal["sinusoidal"] = "sinusoidal"
    frequency_dim: PositiveInt = 256
    max_period: PositiveFloat = 10000.0
    scale: PositiveFloat = 1.0


class FourierNoise(Spec):
    """HDiT: random Fourier features (``std``) of ``ln(sigma) / 4``, then a bias-free Linear.
    ``noise_level`` is sigma."""

    kind: Literal["fourier"] = "fourier"
    std: PositiveFloat = 1.0


Noise = Annotated[Union[SinusoidalNoise, FourierNoise], Field(discriminator="kind")]


class Classes(Spec):
    """Class-label embedding. ``null_class`` adds one extra row (label == count) that
    classifier-free guidance uses as the unconditional label."""

    count: PositiveInt
    null_class: bool = True


class AuxInput(Spec):
    """An auxiliary conditioning vector passed to ``forward`` by keyword (e.g. HDiT's 9-d
    ``aug_cond``); embedded by Fourier features + bias-free Linear; zeros when not given."""

    name: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*$")]
    dims: PositiveInt
    std: PositiveFloat = 1.0


class Mapping(Spec):
    """HDiT's mapping network: RMSNorm, ``depth`` residual GEGLU blocks with RMSNorm, RMSNorm.
    Its width is the conditioning width."""

    depth: Annotated[int, Field(ge=0)] = 1
    ratio: PositiveFloat = 3.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


class Conditioning(Spec):
    """How noise level, class and auxiliary inputs become the vector every block is modulated
    by. ``width``: the conditioning vector's width (``null`` = the outermost ``d_model``)."""

    width: PositiveInt | None = None
    noise: Noise = Field(default_factory=SinusoidalNoise)
    classes: Classes | None = None
    aux: tuple[AuxInput, ...] = ()
    mapping: Mapping | None = None


# --------------------------------------------------------------------------------------------
# output head


class LinearHead(Spec):
    """HDiT: norm (affine, unmodulated) then a zero-initialised Linear split into patches."""

    kind: Literal["linear"] = "linear"
    norm: Norm = Field(default_factory=lambda: Norm(kind="rms", affine=True))
    bias: bool = False
    learned_sigma: bool = False


class AdaLNHead(Spec):
    """DiT's final layer: adaLN shift/scale from ``SiLU(cond)``, LayerNorm, Linear; all
    zero-initialised. ``learned_sigma`` doubles the output channels (DiT's variance head)."""

    kind: Literal["ada_ln"] = "ada_ln"
    norm: Norm = Field(default_factory=Norm)
    bias: bool = True
    learned_sigma: bool = False


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
