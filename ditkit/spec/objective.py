"""Diffusion objectives (what the network predicts and how training weights it), as data.

The objective decides how a network's raw output becomes a denoised estimate, so it travels
with every checkpoint: ``ditkit.runtime`` wraps any model as one denoiser ``D(x, sigma, ...)``
from this spec, and ``ditkit.train`` turns it into a loss. Noise levels are sigma in the
variance-exploding convention ``x = x0 + sigma * eps`` unless a field says otherwise.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from .components import Spec

# ---------------------------------------------------------------- noise-level sampling (train)


class LogNormalSigma(Spec):
    """EDM: ``ln sigma ~ N(mean, std^2)``."""

    kind: Literal["log_normal"] = "log_normal"
    mean: float = -1.2
    std: PositiveFloat = 1.2


class CosineInterpolatedSigma(Spec):
    """HDiT / k-diffusion: the cosine schedule's log-SNR, shifted for the image size (shift
    ``2 ln(d / image size)``) at a ``low_resolution`` and a ``high_resolution`` reference size
    and interpolated between the two along the schedule; sigma clipped to
    ``[sigma_min, sigma_max]``. ``high_resolution: null`` means the training resolution."""

    kind: Literal["cosine_interpolated"] = "cosine_interpolated"
    sigma_min: PositiveFloat = 1e-3
    sigma_max: PositiveFloat = 1e3
    low_resolution: PositiveInt = 32
    high_resolution: PositiveInt | None = None


SigmaSampling = Annotated[Union[LogNormalSigma, CosineInterpolatedSigma],
                          Field(discriminator="kind")]


class LogitNormalTime(Spec):
    """Flow matching: ``t = sigmoid(n)``, ``n ~ N(mean, std^2)``."""

    kind: Literal["logit_normal"] = "logit_normal"
    mean: float = 0.0
    std: PositiveFloat = 1.0


class UniformTime(Spec):
    kind: Literal["uniform"] = "uniform"


TimeSampling = Annotated[Union[LogitNormalTime, UniformTime], Field(discriminator="kind")]

# ---------------------------------------------------------------- objectives


class EDMObjective(Spec):
    """EDM / k-diffusion preconditioning: ``D(x, s) = c_skip x + c_out F(c_in x, c_noise)``
    with ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``, ``c_in =
    1/sqrt(s^2+sd^2)``; the network gets sigma itself (its noise embedding takes ``ln(s)/4``).
    ``weighting``: ``karras`` (EDM's), ``snr``, ``min_snr`` / ``soft_min_snr`` with ``gamma``."""

    kind: Literal["edm"] = "edm"
    sigma_data: PositiveFloat = 0.5
    weighting: Literal["karras", "snr", "min_snr", "soft_min_snr"] = "karras"
    gamma: PositiveFloat = 5.0
    sigma_sampling: SigmaSampling = Field(default_factory=LogNormalSigma)


class DDPMObjective(Spec):
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


class X0Objective(Spec):
    """MDiT: x0 prediction on a (continuous) cosine schedule ``alpha = cos(pi t / 2)``, with
    Min-SNR-gamma weighting and the variance-matching regulariser ``lambda_var`` (switched off
    after ``var_off_after`` steps when set). The network gets ``t * 1000``."""

    kind: Literal["x0"] = "x0"
    schedule: Literal["cosine"] = "cosine"
    min_snr_gamma: PositiveFloat = 5.0
    lambda_var: NonNegativeFloat = 0.0
    var_off_after: NonNegativeInt | None = None


class FlowObjective(Spec):
    """Rectified flow: ``x_t = (1 - t) x0 + t eps``, the network predicts the velocity
    ``eps - x0`` and gets ``t`` (scaled by ``time_scale``). As a VE denoiser:
    ``sigma = t / (1 - t)``, ``x_t = (1 - t) (x0 + sigma eps)``."""

    kind: Literal["flow"] = "flow"
    time_sampling: TimeSampling = Field(default_factory=LogitNormalTime)
    time_scale: PositiveFloat = 1.0


Objective = Annotated[Union[EDMObjective, DDPMObjective, X0Objective, FlowObjective],
                      Field(discriminator="kind")]
