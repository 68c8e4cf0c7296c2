"""Noise levels: each objective family's schedule maps and training densities, as plain functions.

The VE convention throughout: ``x = x0 + sigma * eps``. Each family has its own time variable
(the DDPM timestep, the cosine schedule's ``t``, rectified flow's ``t``; EDM uses ``sigma``
itself); the maps below convert between it and ``sigma``. The objective classes
(:mod:`ditkit.runtime.objectives`) are their only callers in the library: a sampler or a loss
asks its objective, never these functions by name.
"""

from __future__ import annotations

import math
from typing import assert_never

import torch

from ditkit import spec as S
from ditkit.errors import UserError


class SamplingError(UserError):
    """Sampling cannot run with these arguments, or produced non-finite values (the message
    names the setting and the fix)."""


# -------------------------------------------------------------------------------- schedules


def ddpm_betas(steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """ADM / DiT's linear beta schedule, float64: ``linspace(beta_start, beta_end, steps)``."""
    return torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)


def ddpm_alphas_cumprod(
    steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """``abar_t = prod_{i<=t} (1 - beta_i)`` for ``t = 0 .. steps-1`` (float64)."""
    return torch.cumprod(1.0 - ddpm_betas(steps, beta_start, beta_end), dim=0)


def ddpm_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VE noise level of each DDPM step: ``sigma_t = sqrt((1 - abar_t) / abar_t)``."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def ddpm_sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Continuous timestep of ``sigma``: linear interpolation in ``log sigma`` between the
    discrete steps ``sigmas`` (ascending, one per timestep), clamped to ``[0, steps-1]``.

    Written with comparisons and gathers only (no ``searchsorted``), so it exports to ONNX."""
    log_sigmas = sigmas.log().to(sigma.dtype if sigma.is_floating_point() else torch.float32)
    log_sigma = sigma.to(log_sigmas.dtype).log()
    n = log_sigmas.shape[0]
    above = (log_sigma[..., None] >= log_sigmas).sum(-1)  # steps at or below sigma
    low = (above - 1).clamp(0, n - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
    return low.to(log_sigma.dtype) + w


def ddpm_t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ddpm_sigma_to_t`: ``log sigma`` interpolated at continuous ``t``."""
    log_sigmas = sigmas.log().to(t.dtype)
    t = t.clamp(0, sigmas.shape[0] - 1)
    low = t.floor().long().clamp(max=sigmas.shape[0] - 2)
    w = t - low.to(t.dtype)
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def cosine_alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cosine schedule (VP): ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``."""
    return torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)


def cosine_t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """VE noise level of cosine time ``t``: ``sigma_vp / alpha = tan(pi t / 2)``."""
    return torch.tan(math.pi * t / 2)


def cosine_sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    return torch.atan(sigma) * (2 / math.pi)


def flow_t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """Rectified flow ``x_t = (1-t) x0 + t eps = (1-t) (x0 + sigma eps)``: ``sigma = t/(1-t)``."""
    return t / (1 - t)


def flow_sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    return sigma / (1 + sigma)


def edm_scalings(
    sigma: torch.Tensor, sigma_data: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM preconditioning ``(c_skip, c_out, c_in)`` for ``D = c_skip x + c_out F(c_in x)``."""
    s2, d2 = sigma**2, sigma_data**2
    return d2 / (s2 + d2), sigma * sigma_data / (s2 + d2).sqrt(), 1 / (s2 + d2).sqrt()


def ddpm_step_log_variance(
    var_values: torch.Tensor | None, sigma: float, sigma_next: float
) -> tuple[float, float, torch.Tensor | float]:
    """One reverse step ``sigma -> sigma_next`` of a (respaced) DDPM, in VP terms:
    ``(beta, beta_tilde, log_variance)``. ``var_values`` (a learned-sigma model's extra
    channels, in [-1, 1]) interpolate ``log var = f log beta + (1-f) log beta_tilde`` with
    ``f = (v + 1) / 2``, as ADM/DiT do on the respaced betas; ``None`` gives ``beta_tilde``.
    ``beta_tilde`` is floored at a tiny value so its log is finite (ADM clips the first one)."""
    ab, ab_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    beta = 1 - ab / ab_next
    beta_tilde = beta * (1 - ab_next) / (1 - ab)
    log_tilde = math.log(max(beta_tilde, 1e-20))
    if var_values is None:
        return beta, beta_tilde, log_tilde
    frac = (var_values + 1) / 2
    return beta, beta_tilde, frac * math.log(beta) + (1 - frac) * log_tilde


def v_scalings(
    sigma: torch.Tensor, sigma_data: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v-prediction preconditioning ``(c_skip, c_out, c_in)`` for ``D = c_skip x + c_out F(c_in
    x)``. With ``sigma_data`` 1: ``c_in x = x / sqrt(1 + s^2)`` is the VP sample ``z = alpha x0
    + sigma_t eps`` (``alpha = 1/sqrt(1+s^2)``, ``sigma_t = s/sqrt(1+s^2)``), and ``x0 = alpha
    z - sigma_t v`` gives ``c_skip = alpha^2``, ``c_out = -sigma_t``; a general ``sigma_data``
    rescales as EDM does. The network's target is ``v = (x0 - c_skip x) / c_out``."""
    s2, d2 = sigma**2, sigma_data**2
    return d2 / (s2 + d2), -sigma * sigma_data / (s2 + d2).sqrt(), 1 / (s2 + d2).sqrt()


def spaced_timesteps(total: int, steps: int) -> list[int]:
    """DiT / ADM ``space_timesteps(total, [steps])``: ``round(i (total-1)/(steps-1))``."""
    if steps > total:
        raise SamplingError(
            f"steps {steps} is more than the model's {total} DDPM timesteps; "
            "use fewer steps or another schedule"
        )
    if steps == 1:
        return [0]
    stride = (total - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


# -------------------------------------------------------------------------------- densities (train)


def sample_sigma(
    sampling, n: int, gen: torch.Generator, resolution: int, sigma_data: float
) -> torch.Tensor:
    """EDM noise levels ``(n,)`` (float64, CPU). ``resolution``: the image side (HDiT's
    cosine-interpolated density is shifted by it)."""
    match sampling:
        case S.LogNormalSigma(mean=mean, std=std):
            return (torch.randn(n, generator=gen, dtype=torch.float64) * std + mean).exp()
        case S.CosineInterpolatedSigma() as c:
            u = torch.rand(n, generator=gen, dtype=torch.float64)
            return cosine_interpolated_sigma(
                u,
                resolution,
                c.low_resolution,
                c.high_resolution or resolution,
                sigma_data,
                c.sigma_min,
                c.sigma_max,
            )
        case other:
            assert_never(other)


def cosine_interpolated_sigma(
    u: torch.Tensor,
    image_d: int,
    noise_d_low: int,
    noise_d_high: int,
    sigma_data: float,
    sigma_min: float,
    sigma_max: float,
) -> torch.Tensor:
    """HDiT's density at ``u`` in [0, 1]: k-diffusion's ``rand_cosine_interpolated``.

    For a reference size ``d`` the cosine schedule runs from ``sigma_max`` (u = 0) to
    ``sigma_min`` (u = 1) with its log-SNR raised by ``2 ln(d / image_d)`` in the middle (the
    ends stay where they are). The low-resolution schedule (``noise_d_low``) holds at the
    high-noise end, the high-resolution one at the low-noise end, and the log-SNR moves
    linearly from the first to the second as ``u`` goes 0 -> 1. Decreasing in ``u``, so the
    ``q``-quantile of sigma is its value at ``u = 1 - q``."""

    def logsnr(t: torch.Tensor, d: int) -> torch.Tensor:
        k = d / image_d  # the shift is 2 ln k
        a0 = math.atan(sigma_max * k / sigma_data)
        a1 = math.atan(sigma_min * k / sigma_data)
        return -2 * torch.log(torch.tan(a0 + t * (a1 - a0)) / k)

    mixed = torch.lerp(logsnr(u, noise_d_low), logsnr(u, noise_d_high), u)
    return sigma_data * torch.exp(-mixed / 2)


def sample_time(sampling, n: int, gen: torch.Generator) -> torch.Tensor:
    """Flow-matching times ``(n,)`` in (0, 1), float64 on the CPU."""
    match sampling:
        case S.LogitNormalTime(mean=mean, std=std):
            return torch.sigmoid(torch.randn(n, generator=gen, dtype=torch.float64) * std + mean)
        case S.UniformTime():
            return torch.rand(n, generator=gen, dtype=torch.float64)
        case other:
            assert_never(other)


def edm_weight(
    weighting: str, sigma: torch.Tensor, sigma_data: float, gamma: float
) -> torch.Tensor:
    """Weight of the squared error of the *x0 estimate* at noise level ``sigma``.

    k-diffusion's ``Denoiser.loss`` weighs the *network output's* error by ``w_k``; on the x0
    error that is ``w_k / c_out^2`` with ``c_out^2 = (s sd)^2 / (s^2 + sd^2)``:

    ``karras``: ``w_k = 1`` -> ``(s^2 + sd^2) / (s sd)^2`` (EDM's);
    ``snr``: ``w_k = sd^2 / (s^2 + sd^2)`` -> ``1 / s^2``;
    ``soft_min_snr``: ``w_k = (s sd)^2 / (s^2 + sd^2)^2`` -> ``1 / (s^2 + sd^2)``, i.e.
    ``1 / (s^2 + 1 / gamma)`` with k-diffusion's ``gamma = 1 / sd^2`` (HDiT, appendix B);
    ``min_snr``: ``min(1 / s^2, gamma)`` (Hang et al.; not in k-diffusion)."""
    s2 = sigma**2
    match weighting:
        case "karras":
            return (s2 + sigma_data**2) / (s2 * sigma_data**2)
        case "snr":
            return 1 / s2
        case "min_snr":
            return torch.clamp(1 / s2, max=gamma)
        case "soft_min_snr":
            return 1 / (s2 + 1 / gamma)
    raise ValueError(f"unknown weighting {weighting!r}")
