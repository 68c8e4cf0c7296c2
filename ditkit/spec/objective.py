"""Diffusion objectives (what the network predicts and how training weights it), as data.

The objective decides how a network's raw output becomes a denoised estimate, so it travels
with every checkpoint: ``ditkit.runtime`` wraps any model as one denoiser ``D(x, sigma, ...)``
from this spec, and ``ditkit.training`` turns it into a loss. Noise levels are sigma in the
variance-exploding convention ``x = x0 + sigma * eps`` unless a field says otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, Union, get_args

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    TypeAdapter,
    model_validator,
)

from .components import Spec

if TYPE_CHECKING:
    from .model import ModelSpec

# ---------------------------------------------------------------- noise-level sampling (train)


class LogNormalSigma(Spec):
    """EDM: ``ln sigma ~ N(mean, std^2)``."""

    kind: Literal["log_normal"] = "log_normal"
    mean: float = -1.2
    std: PositiveFloat = 1.2


class CosineInterpolatedSigma(Spec):
    """HDiT: k-diffusion's ``rand_cosine_interpolated`` (from simple diffusion). The cosine
    schedule's log-SNR between ``sigma_max`` (u = 0) and ``sigma_min`` (u = 1), shifted by
    ``2 ln(d / image size)`` for a reference size ``d``; the shift for ``d = low_resolution``
    applies at the high-noise end (u = 0), the one for ``high_resolution`` at the low-noise end
    (u = 1), linearly interpolated in between. The image size is the larger side of the model
    input. ``high_resolution: null`` means that size (k-diffusion's ``noise_d_high`` default);
    ``sigma_min`` / ``sigma_max`` are its ``min_value`` / ``max_value``."""

    kind: Literal["cosine_interpolated"] = "cosine_interpolated"
    sigma_min: PositiveFloat = 1e-3
    sigma_max: PositiveFloat = 1e3
    low_resolution: PositiveInt = 32
    high_resolution: PositiveInt | None = None


SigmaSampling = Annotated[
    Union[LogNormalSigma, CosineInterpolatedSigma], Field(discriminator="kind")
]


class LogitNormalTime(Spec):
    """Flow matching: ``t = sigmoid(n)``, ``n ~ N(mean, std^2)``."""

    kind: Literal["logit_normal"] = "logit_normal"
    mean: float = 0.0
    std: PositiveFloat = 1.0


class UniformTime(Spec):
    kind: Literal["uniform"] = "uniform"


TimeSampling = Annotated[Union[LogitNormalTime, UniformTime], Field(discriminator="kind")]

# ---------------------------------------------------------------- objectives


class ObjectiveSpec(Spec):
    """What every objective variant answers about the model it trains (the spec-level half of
    an objective; ``ditkit.runtime.objectives`` holds the torch half)."""

    if TYPE_CHECKING:  # every variant declares its own ``kind`` literal (not a base field)
        kind: str

    @property
    def predicts_variance(self) -> bool:
        """The network also outputs a learned variance (a second set of channels)."""
        return False

    def model_issues(self, model: ModelSpec) -> list[tuple[str, str]]:
        """``[(field path, message)]`` where ``model`` (a ``ModelSpec``) cannot be trained
        with this objective."""
        if model.head.learned_sigma and not self.predicts_variance:
            return [
                (
                    "model.head.learned_sigma",
                    f"the {self.kind} objective predicts no "
                    "variance; set head.learned_sigma: false (or use kind: ddpm_eps)",
                )
            ]
        return []


class EDMObjective(ObjectiveSpec):
    """EDM / k-diffusion preconditioning: ``D(x, s) = c_skip x + c_out F(c_in x, c_noise)``
    with ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``, ``c_in =
    1/sqrt(s^2+sd^2)``; the network gets sigma itself (its noise embedding takes ``ln(s)/4``).
    ``weighting``: ``karras`` (EDM's), ``snr``, ``min_snr`` / ``soft_min_snr`` with ``gamma``."""

    kind: Literal["edm"] = "edm"
    sigma_data: PositiveFloat = 0.5
    weighting: Literal["karras", "snr", "min_snr", "soft_min_snr"] = "karras"
    gamma: PositiveFloat = 5.0
    """``min_snr`` / ``soft_min_snr``. k-diffusion's (and HDiT's) ``soft-min-snr`` is
    ``gamma = 1 / sigma_data^2`` (4 at sigma_data 0.5): write it out."""
    sigma_sampling: SigmaSampling = Field(default_factory=LogNormalSigma)
    sigma_min: PositiveFloat | None = None
    """The noise range samplers use by default (k-diffusion's ``model.sigma_min`` /
    ``sigma_max``; HDiT: 1e-2 and 160). ``None``: the clip range of a ``cosine_interpolated``
    density, else EDM's 0.002 / 80."""
    sigma_max: PositiveFloat | None = None

    @model_validator(mode="after")
    def _range(self) -> "EDMObjective":
        if (self.sigma_min is None) != (self.sigma_max is None):
            raise ValueError("sigma_min and sigma_max: give both or neither")
        if (
            self.sigma_min is not None
            and self.sigma_max is not None
            and not self.sigma_min < self.sigma_max
        ):
            raise ValueError(f"sigma_min {self.sigma_min} must be below sigma_max {self.sigma_max}")
        return self


class DDPMObjective(ObjectiveSpec):
    """DiT / ADM: epsilon prediction on a discrete ``steps``-step linear beta schedule; the
    network gets the integer timestep. ``learned_sigma``: the second half of the output
    channels interpolates log-variance between beta and beta-tilde; trained with
    ``L_simple + lambda_vlb * L_vlb`` (the VLB term sees a stopped-gradient mean)."""

    kind: Literal["ddpm_eps"] = "ddpm_eps"
    steps: PositiveInt = 1000
    beta_start: PositiveFloat = 1e-4
    beta_end: PositiveFloat = 0.02
    learned_sigma: bool = True
    lambda_vlb: NonNegativeFloat = 0.001
    decoder_cdf: Literal["tanh", "exact"] = "tanh"
    """The normal CDF in the t = 0 decoder term: ``tanh`` is ADM/DiT's
    ``approx_standard_normal_cdf`` (so fine-tuning a DiT checkpoint continues its objective),
    ``exact`` the true CDF (``torch.special.ndtr``)."""

    @property
    def predicts_variance(self) -> bool:
        return self.learned_sigma

    def model_issues(self, model: ModelSpec) -> list[tuple[str, str]]:
        out = []
        if model.conditioning.noise.kind != "sinusoidal":
            out.append(
                (
                    "model.conditioning.noise.kind",
                    "the ddpm_eps objective feeds integer "
                    "timesteps from 0 (DiT); use `noise: {kind: sinusoidal}` (fourier "
                    "embeds ln(sigma) and needs a positive noise level)",
                )
            )
        if self.learned_sigma != model.head.learned_sigma:
            out.append(
                (
                    "objective.learned_sigma",
                    f"is {self.learned_sigma} but the model's "
                    f"head.learned_sigma is {model.head.learned_sigma}; set both the same",
                )
            )
        return out


class X0Objective(ObjectiveSpec):
    """MDiT: x0 prediction on a (continuous) cosine schedule ``alpha = cos(pi t / 2)``, with
    Min-SNR-gamma weighting and the variance-matching regulariser ``lambda_var`` (switched off
    after ``var_off_after`` steps when set). The network gets ``t * 1000``."""

    kind: Literal["x0"] = "x0"
    schedule: Literal["cosine"] = "cosine"
    min_snr_gamma: PositiveFloat = 5.0
    lambda_var: NonNegativeFloat = 0.0
    var_off_after: NonNegativeInt | None = None


class FlowObjective(ObjectiveSpec):
    """Rectified flow: ``x_t = (1 - t) x0 + t eps``, the network predicts the velocity
    ``eps - x0`` and gets ``t`` (scaled by ``time_scale``). As a VE denoiser:
    ``sigma = t / (1 - t)``, ``x_t = (1 - t) (x0 + sigma eps)``."""

    kind: Literal["flow"] = "flow"
    time_sampling: TimeSampling = Field(default_factory=LogitNormalTime)
    time_scale: PositiveFloat = 1.0


class VObjective(ObjectiveSpec):
    """v-prediction (Salimans & Ho 2022, "Progressive distillation"): on the variance-preserving
    cosine schedule ``z_t = alpha x0 + sigma_t eps`` (``alpha = cos(pi t / 2)``, ``sigma_t =
    sin(pi t / 2)``) the network predicts ``v = alpha eps - sigma_t x0`` and gets ``t``
    (scaled by ``time_scale``); the loss is the plain squared error of ``v`` (the paper's
    "SNR + 1" weighting of the x0 error). As a VE denoiser (``sigma = tan(pi t / 2)``) this is
    ``D = c_skip x + c_out F(c_in x)`` with ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = -s
    sd/sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(s^2+sd^2)``; ``sigma_data`` 1 is the paper's
    parameterisation exactly (k-diffusion's ``VDenoiser``). Training draws ``t`` from
    ``time_sampling`` in ``[1e-3, 1 - 1e-3]``."""

    kind: Literal["v"] = "v"
    sigma_data: PositiveFloat = 1.0
    time_sampling: TimeSampling = Field(default_factory=UniformTime)
    time_scale: PositiveFloat = 1000.0


Objective = Annotated[
    Union[EDMObjective, DDPMObjective, X0Objective, FlowObjective, VObjective],
    Field(discriminator="kind"),
]

_ADAPTER: TypeAdapter[ObjectiveSpec] = TypeAdapter(Objective)

OBJECTIVE_KINDS: tuple[str, ...] = tuple(
    cls.model_fields["kind"].default for cls in get_args(get_args(Objective)[0])
)
"""Every objective ``kind``, in the union's order (the command line's ``--objective`` choices)."""


def objective_of_kind(kind: str) -> ObjectiveSpec:
    """The objective ``kind`` with its default fields (``ValueError`` names the kinds)."""
    if kind not in OBJECTIVE_KINDS:
        raise ValueError(f"objective kind {kind!r}: choose one of {', '.join(OBJECTIVE_KINDS)}")
    return _ADAPTER.validate_python({"kind": kind})
