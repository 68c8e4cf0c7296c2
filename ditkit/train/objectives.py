"""Training losses, one per objective (each a paper's recipe).

The conversions between an objective's own variables and the network's inputs (EDM
preconditioning, DDPM alphas, the cosine schedule, flow time) come from
:mod:`ditkit.runtime.denoiser`, the single source of truth shared with the samplers. What lives
here is what only training needs: how noise levels are drawn, how the losses are weighted, the
DDPM hybrid loss's variational term and MDiT's variance-matching regulariser.

Every loss draws its randomness from the ``torch.Generator`` it is given (on the CPU), so a run
that restores the generator's state draws the same noise.
"""

from __future__ import annotations

import math
from typing import assert_never

import torch
from torch import nn

from ditkit import spec as S
from ditkit.runtime.denoiser import (Denoiser, cosine_alpha_sigma, ddpm_alphas_cumprod,
                                     ddpm_betas)

# -------------------------------------------------------------------------------- sampling


def _randn(shape, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=like.device, dtype=like.dtype)


def sample_sigma(sampling, n: int, gen: torch.Generator, resolution: int,
                 sigma_data: float) -> torch.Tensor:
    """EDM noise levels ``(n,)`` (float64, CPU). ``resolution``: the image side (HDiT's
    cosine-interpolated density is shifted by it)."""
    match sampling:
        case S.LogNormalSigma(mean=mean, std=std):
            return (torch.randn(n, generator=gen, dtype=torch.float64) * std + mean).exp()
        case S.CosineInterpolatedSigma() as c:
            u = torch.rand(n, generator=gen, dtype=torch.float64)
            return cosine_interpolated_sigma(u, resolution, c.low_resolution,
                                             c.high_resolution or resolution, sigma_data,
                                             c.sigma_min, c.sigma_max)
        case other:
            assert_never(other)


def cosine_interpolated_sigma(u: torch.Tensor, image_d: int, noise_d_low: int, noise_d_high: int,
                              sigma_data: float, sigma_min: float, sigma_max: float
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


def edm_weight(weighting: str, sigma: torch.Tensor, sigma_data: float, gamma: float
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


# -------------------------------------------------------------------------------- DDPM terms


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """ADM/DiT's tanh approximation of the standard normal CDF:
    ``(1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2``."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor,
                                        log_scale: torch.Tensor, cdf: str = "tanh"
                                        ) -> torch.Tensor:
    """log P(x) of data in [-1, 1] quantised to 256 bins under N(mean, e^(2 log_scale)) (the
    DDPM decoder at t = 0; the edge bins take the tails). Elementwise, nats. ``cdf``:
    ``tanh`` (ADM/DiT's approximation) or ``exact``."""
    phi = approx_standard_normal_cdf if cdf == "tanh" else torch.special.ndtr
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = phi(inv_std * (centered + 1 / 255))
    cdf_min = phi(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DDPMTables:
    """The linear schedule's tables, all computed in float64 and indexed by the integer
    timestep; :meth:`at` casts one gathered entry to the batch's dtype (as ADM/DiT's
    ``_extract_into_tensor`` does), so no square root or log is ever taken in float32."""

    def __init__(self, obj: S.DDPMObjective):
        betas = ddpm_betas(obj.steps, obj.beta_start, obj.beta_end)
        abar = ddpm_alphas_cumprod(obj.steps, obj.beta_start, obj.beta_end)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.betas, self.abar, self.abar_prev = betas, abar, abar_prev
        self.log_betas = betas.log()
        self.sqrt_abar = abar.sqrt()
        self.sqrt_one_minus_abar = (1 - abar).sqrt()
        self.sqrt_recip_abar = (1 / abar).sqrt()
        self.sqrt_recipm1_abar = (1 / abar - 1).sqrt()
        self.post_var = betas * (1 - abar_prev) / (1 - abar)
        # ADM: log of the posterior variance with the (zero) first entry replaced by the second
        self.post_log_var = torch.log(torch.cat([self.post_var[1:2], self.post_var[1:]]))
        self.post_c0 = betas * abar_prev.sqrt() / (1 - abar)
        self.post_ct = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)

    def at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)[t.cpu()].to(device=like.device,
                                               dtype=like.dtype)[:, None, None, None]


def ddpm_vlb_terms(tables: DDPMTables, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   eps: torch.Tensor, var_values: torch.Tensor, cdf: str = "tanh"
                   ) -> torch.Tensor:
    """The VLB term L_t per sample, in bits per dimension: KL(q(x_{t-1} | x_t, x0) ||
    p(x_{t-1} | x_t)) for ``t > 0``, the decoder's -log likelihood for ``t = 0`` (ADM's
    ``_vb_terms_bpd``). The model's mean comes from ``eps`` (pass it detached for the hybrid
    loss), its log-variance from ``var_values`` (in [-1, 1]) between ``log beta_t`` and
    ``log beta_tilde_t``."""
    c0, ct = tables.at("post_c0", t, x0), tables.at("post_ct", t, x0)
    true_mean = c0 * x0 + ct * x_t
    true_log_var = tables.at("post_log_var", t, x0)
    x0_pred = tables.at("sqrt_recip_abar", t, x0) * x_t - tables.at("sqrt_recipm1_abar", t,
                                                                   x0) * eps
    model_mean = c0 * x0_pred + ct * x_t
    frac = (var_values + 1) / 2
    model_log_var = frac * tables.at("log_betas", t, x0) + (1 - frac) * true_log_var
    kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var, cdf)
    nll = nll.flatten(1).mean(1)
    return torch.where(t.to(x0.device) == 0, nll, kl) / math.log(2.0)


def ddpm_hybrid_loss(tables: DDPMTables, obj: S.DDPMObjective, x0: torch.Tensor,
                     x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                     out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-sample ``(loss, L_simple, L_t)`` of a DDPM network output ``out`` (``C`` epsilon
    channels, then ``C`` variance channels when ``learned_sigma``). The loss is
    ``L_simple + lambda_vlb * T * L_t``: ADM/DiT's ``L_simple + lambda L_vlb`` with ``L_vlb =
    sum_t L_t`` estimated by ``T L_t`` at the sampled ``t`` (DiT's ``mse + vb`` at T = 1000,
    lambda = 0.001); the VLB term sees the epsilon prediction detached, so it only trains the
    variance (as in ADM)."""
    c = x0.shape[1]
    eps = out[:, :c]
    mse = (eps - noise).pow(2).flatten(1).mean(1)
    if not obj.learned_sigma:
        return mse, mse, None
    vb = ddpm_vlb_terms(tables, x0, x_t, t, eps.detach(), out[:, c:2 * c], obj.decoder_cdf)
    return mse + obj.lambda_vlb * obj.steps * vb, mse, vb


# -------------------------------------------------------------------------------- the loss


class DiffusionLoss:
    """``loss(model, x0, labels, gen, step) -> (scalar loss, {name: float})``.

    ``model`` is the (possibly DDP-wrapped) network; ``x0`` a batch in [-1, 1]; ``labels``
    already include the classifier-free-guidance dropout; ``step`` the optimizer step (for
    schedules such as MDiT's ``var_off_after``). :meth:`draw` takes the noise and noise level
    from the generator, :meth:`per_sample` computes the losses for given ones (what the tests
    pin to the reference implementations' formulas)."""

    def __init__(self, objective, spec: S.ModelSpec):
        self.objective, self.spec = objective, spec
        # k-diffusion's cosine-interpolated density: image_d = max(input_size)
        self.resolution = max(spec.input.resolution)
        if isinstance(objective, S.DDPMObjective):
            self.tables = DDPMTables(objective)

    def draw(self, x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noise, level)``: unit Gaussian noise like ``x0`` and one noise level per sample
        (EDM: sigma, float64; DDPM: integer timestep; x0 / flow: t, float64), in that order
        from ``gen``."""
        b = x0.shape[0]
        obj = self.objective
        noise = _randn(x0.shape, gen, x0)
        match obj:
            case S.EDMObjective(sigma_data=sd):
                level = sample_sigma(obj.sigma_sampling, b, gen, self.resolution, sd)
            case S.DDPMObjective():
                level = torch.randint(0, obj.steps, (b,), generator=gen)
            case S.X0Objective():
                level = torch.rand(b, generator=gen, dtype=torch.float64) * (1 - 2e-3) + 1e-3
            case S.FlowObjective():
                # MPDiT does not clamp; the clamp moves t by at most 1e-5
                level = sample_time(obj.time_sampling, b, gen).clamp(1e-5, 1 - 1e-5)
            case other:
                assert_never(other)
        return noise, level

    def __call__(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor | None,
                 gen: torch.Generator, step: int = 0, **cond: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        noise, level = self.draw(x0, gen)
        per, extras = self.per_sample(model, x0, labels, noise, level, step, **cond)
        return per.mean(), extras

    def per_sample(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor | None,
                   noise: torch.Tensor, level: torch.Tensor, step: int = 0, **cond: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[str, float]]:
        """``((B,) losses, {name: float})`` for the given noise and noise levels (see
        :meth:`draw`).

        - ``edm``: k-diffusion's ``Denoiser.loss``, written as a weight on the x0 error:
          ``||F - (x0 - c_skip x) / c_out||^2 w_k = ||D - x0||^2 w_k / c_out^2``.
        - ``ddpm_eps``: ADM/DiT's ``training_losses`` (``mse`` + ``vb``).
        - ``x0``: MDiT's min-SNR x0 loss (+ the variance regulariser).
        - ``flow``: MPDiT's ``OTFlow.loss`` with ``l2`` loss and uniform reweighting."""
        c = x0.shape[1]
        obj = self.objective
        extras: dict[str, float] = {}
        match obj:
            case S.EDMObjective(sigma_data=sd):
                sigma = level.to(torch.float64)
                s = sigma.to(device=x0.device, dtype=x0.dtype)
                x = x0 + s[:, None, None, None] * noise
                denoised = Denoiser(model, obj)(x, s, labels, **cond)
                w = edm_weight(obj.weighting, sigma, sd, obj.gamma).to(x0.device, x0.dtype)
                per = (denoised - x0).pow(2).flatten(1).mean(1) * w
            case S.DDPMObjective():
                t = level
                x_t = (self.tables.at("sqrt_abar", t, x0) * x0
                       + self.tables.at("sqrt_one_minus_abar", t, x0) * noise)
                out = model(x_t, t.to(x0.device), labels, **cond)
                per, mse, vb = ddpm_hybrid_loss(self.tables, obj, x0, x_t, t, noise, out)
                extras["mse"] = float(mse.mean().detach())
                if vb is not None:
                    extras["vb"] = float(vb.mean().detach())
            case S.X0Objective():
                t = level.to(torch.float64)
                alpha, sig = cosine_alpha_sigma(t)
                a4 = alpha.to(x0.device, x0.dtype)[:, None, None, None]
                s4 = sig.to(x0.device, x0.dtype)[:, None, None, None]
                x_t = a4 * x0 + s4 * noise
                pred = model(x_t, (t * 1000).to(x0.device, x0.dtype), labels, **cond)[:, :c]
                w = torch.clamp(alpha**2 / sig**2, max=obj.min_snr_gamma).to(x0.device, x0.dtype)
                per = (pred - x0).pow(2).flatten(1).mean(1) * w
                if obj.lambda_var > 0 and (obj.var_off_after is None or step < obj.var_off_after):
                    var_true = x0.flatten(2).var(-1)  # (B, C): per-sample, per-channel
                    var_pred = pred.flatten(2).var(-1)
                    reg = (var_true - var_pred).abs().mean(1)
                    extras["var"] = float(reg.mean().detach())
                    per = per + obj.lambda_var * reg
            case S.FlowObjective(time_scale=scale):
                t = level.to(torch.float64)
                t4 = t.to(x0.device, x0.dtype)[:, None, None, None]
                x_t = (1 - t4) * x0 + t4 * noise
                v = model(x_t, (t * scale).to(x0.device, x0.dtype), labels, **cond)[:, :c]
                per = (v - (noise - x0)).pow(2).flatten(1).mean(1)
            case other:
                assert_never(other)
        return per, extras


def drop_labels(labels: torch.Tensor | None, rate: float, null_class: int | None,
                gen: torch.Generator) -> torch.Tensor | None:
    """Classifier-free guidance: each label becomes ``null_class`` with probability ``rate``."""
    if labels is None or null_class is None:
        return labels
    drop = torch.rand(labels.shape[0], generator=gen) < rate
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)


def drop_aux(cond: dict[str, torch.Tensor], rate: float, gen: torch.Generator
             ) -> dict[str, torch.Tensor]:
    """... and auxiliary conditioning vectors become zeros with probability ``rate``."""
    out = {}
    for name, value in cond.items():
        keep = (torch.rand(value.shape[0], generator=gen) >= rate).to(value)
        out[name] = value * keep.view(-1, *([1] * (value.ndim - 1)))
    return out
