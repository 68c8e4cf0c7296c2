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


def _rand(shape, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float64).to(like.device)


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
    """HDiT's density: the cosine schedule's log-SNR at ``u`` in [0, 1], shifted by
    ``2 ln(d / image_d)`` for a reference size ``d`` at ``noise_d_low`` and at
    ``noise_d_high``, interpolated from the first to the second as ``u`` goes 0 -> 1."""
    logsnr_max = -2 * math.log(sigma_min / sigma_data)
    logsnr_min = -2 * math.log(sigma_max / sigma_data)

    def cosine(t, lo, hi):
        t_min, t_max = math.atan(math.exp(-0.5 * hi)), math.atan(math.exp(-0.5 * lo))
        return -2 * torch.log(torch.tan(t_min + t * (t_max - t_min)))

    def shifted(t, d):
        shift = 2 * math.log(d / image_d)
        return cosine(t, logsnr_min - shift, logsnr_max - shift) + shift

    logsnr = torch.lerp(shifted(u, noise_d_low), shifted(u, noise_d_high), u)
    return (-logsnr / 2).exp() * sigma_data


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

    ``karras``: EDM's ``(s^2 + sd^2) / (s sd)^2`` (unit weight on the network output);
    ``snr``: ``1 / s^2``; ``min_snr``: ``min(1 / s^2, gamma)`` (Hang et al.);
    ``soft_min_snr``: ``1 / (s^2 + 1 / gamma)`` (HDiT, appendix B)."""
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


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor,
                                        log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of data in [-1, 1] quantised to 256 bins under N(mean, e^(2 log_scale)) (the
    DDPM decoder at t = 0; the edge bins take the tails). Elementwise, nats. Uses the exact
    normal CDF (ADM uses a tanh approximation of it)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DDPMTables:
    """float64 tables of the linear schedule, indexed by the integer timestep."""

    def __init__(self, obj: S.DDPMObjective):
        self.betas = ddpm_betas(obj.steps, obj.beta_start, obj.beta_end)
        self.abar = ddpm_alphas_cumprod(obj.steps, obj.beta_start, obj.beta_end)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        self.post_var = self.betas * (1 - self.abar_prev) / (1 - self.abar)
        # ADM: log of the posterior variance with the (zero) first entry replaced by the second
        self.post_log_var = torch.log(torch.cat([self.post_var[1:2], self.post_var[1:]]))
        self.post_c0 = self.betas * self.abar_prev.sqrt() / (1 - self.abar)
        self.post_ct = (1 - self.abar_prev) * (1 - self.betas).sqrt() / (1 - self.abar)

    def at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)[t.cpu()].to(device=like.device,
                                               dtype=like.dtype)[:, None, None, None]


def ddpm_vlb_terms(tables: DDPMTables, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   eps: torch.Tensor, var_values: torch.Tensor) -> torch.Tensor:
    """The VLB term L_t per sample, in bits per dimension: KL(q(x_{t-1} | x_t, x0) ||
    p(x_{t-1} | x_t)) for ``t > 0``, the decoder's -log likelihood for ``t = 0``. The model's
    mean comes from ``eps`` (pass it detached for the hybrid loss), its log-variance from
    ``var_values`` (in [-1, 1]) between ``log beta_t`` and ``log beta_tilde_t``."""
    ab = tables.at("abar", t, x0)
    c0, ct = tables.at("post_c0", t, x0), tables.at("post_ct", t, x0)
    true_mean = c0 * x0 + ct * x_t
    true_log_var = tables.at("post_log_var", t, x0)
    x0_pred = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
    model_mean = c0 * x0_pred + ct * x_t
    frac = (var_values + 1) / 2
    model_log_var = frac * torch.log(tables.at("betas", t, x0)) + (1 - frac) * true_log_var
    kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    nll = nll.flatten(1).mean(1)
    return torch.where(t.to(x0.device) == 0, nll, kl) / math.log(2.0)


def ddpm_hybrid_loss(tables: DDPMTables, obj: S.DDPMObjective, x0: torch.Tensor,
                     x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                     out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-sample ``(loss, L_simple, L_t)`` of a DDPM network output ``out`` (``C`` epsilon
    channels, then ``C`` variance channels when ``learned_sigma``). The loss is
    ``L_simple + lambda_vlb * T * L_t``: ADM/DiT's ``L_simple + lambda L_vlb`` with ``L_vlb =
    sum_t L_t`` estimated by ``T L_t`` at the sampled ``t``; the VLB term sees the epsilon
    prediction detached, so it only trains the variance (as in ADM)."""
    c = x0.shape[1]
    eps = out[:, :c]
    mse = (eps - noise).pow(2).flatten(1).mean(1)
    if not obj.learned_sigma:
        return mse, mse, None
    vb = ddpm_vlb_terms(tables, x0, x_t, t, eps.detach(), out[:, c:2 * c])
    return mse + obj.lambda_vlb * obj.steps * vb, mse, vb


# -------------------------------------------------------------------------------- the loss


class DiffusionLoss:
    """``loss(model, x0, labels, gen, step) -> (scalar loss, {name: float})``.

    ``model`` is the (possibly DDP-wrapped) network; ``x0`` a batch in [-1, 1]; ``labels``
    already include the classifier-free-guidance dropout; ``step`` the optimizer step (for
    schedules such as MDiT's ``var_off_after``)."""

    def __init__(self, objective, spec: S.ModelSpec):
        self.objective, self.spec = objective, spec
        self.resolution = min(spec.input.resolution)
        if isinstance(objective, S.DDPMObjective):
            self.tables = DDPMTables(objective)

    def __call__(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor | None,
                 gen: torch.Generator, step: int = 0, **cond: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        b, c = x0.shape[0], x0.shape[1]
        obj = self.objective
        noise = _randn(x0.shape, gen, x0)
        extras: dict[str, float] = {}
        match obj:
            case S.EDMObjective(sigma_data=sd):
                sigma = sample_sigma(obj.sigma_sampling, b, gen, self.resolution, sd)
                s = sigma.to(device=x0.device, dtype=x0.dtype)
                x = x0 + s[:, None, None, None] * noise
                denoised = Denoiser(model, obj)(x, s, labels, **cond)
                w = edm_weight(obj.weighting, sigma, sd, obj.gamma).to(x0.device, x0.dtype)
                per = (denoised - x0).pow(2).flatten(1).mean(1) * w
            case S.DDPMObjective():
                t = torch.randint(0, obj.steps, (b,), generator=gen)
                ab = self.tables.at("abar", t, x0)
                x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
                out = model(x_t, t.to(x0.device), labels, **cond)
                per, mse, vb = ddpm_hybrid_loss(self.tables, obj, x0, x_t, t, noise, out)
                extras["mse"] = float(mse.mean().detach())
                if vb is not None:
                    extras["vb"] = float(vb.mean().detach())
            case S.X0Objective():
                t = (torch.rand(b, generator=gen, dtype=torch.float64) * (1 - 2e-3) + 1e-3)
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
                t = sample_time(obj.time_sampling, b, gen).clamp(1e-5, 1 - 1e-5)
                t4 = t.to(x0.device, x0.dtype)[:, None, None, None]
                x_t = (1 - t4) * x0 + t4 * noise
                v = model(x_t, (t * scale).to(x0.device, x0.dtype), labels, **cond)[:, :c]
                per = (v - (noise - x0)).pow(2).flatten(1).mean(1)
            case other:
                assert_never(other)
        return per.mean(), extras


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
