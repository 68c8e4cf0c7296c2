"""Objectives as classes: one per ``ditkit.spec`` objective variant, built by :func:`objective_of`.

An objective decides everything that differs between diffusion families, and nothing outside it
branches on which family a model is (k-diffusion's ``Denoiser`` classes: preconditioning and
loss side by side). Each class owns

- its **noise range** (``sigma_min`` / ``sigma_max``: what samplers use by default) and its
  own time variable, ``sigma_to_t`` / ``t_to_sigma``;
- its **native sampling schedule** (:attr:`Objective.native_schedule`, and for DDPM its own
  discrete noise levels, :meth:`Objective.native_sigmas`);
- the **network input**: the noise level the network is told (:meth:`Objective.network_level`)
  and how ``x`` is scaled and the output turned into ``x0`` (:meth:`Objective.denoise`);
- **training**: how noise levels are drawn (:meth:`Objective.draw_level`) and the weighted
  loss (:meth:`Objective.loss`).

Samplers work in the variance-exploding convention ``x = x0 + sigma * eps`` only, so any sampler
drives any model:

=============  ==========================  =================  ===============================
objective      network input               network noise      x0 from the output ``F``
=============  ==========================  =================  ===============================
``edm``        ``c_in x``                  ``sigma``          ``c_skip x + c_out F``
``ddpm_eps``   ``x / sqrt(1 + sigma^2)``   timestep ``t(s)``  ``x - sigma F[:, :C]``
``x0``         ``x / sqrt(1 + sigma^2)``   ``1000 t(s)``      ``F``
``flow``       ``x / (1 + sigma)``         ``scale t(s)``     ``x_t - t F`` (``F = eps - x0``)
``v``          ``x / sqrt(s^2 + sd^2)``    ``scale t(s)``     ``c_skip x + c_out F`` (v-pred.)
=============  ==========================  =================  ===============================

where ``t(s)`` is the objective's own time: the DDPM timestep whose ``sigma_t =
sqrt((1 - abar_t) / abar_t)`` equals ``s`` (interpolated in ``log sigma`` between the discrete
steps), the cosine schedule's ``t = 2/pi atan(s)`` (``x0`` and ``v``), and rectified flow's
``t = s / (1 + s)``.

A learned-sigma DDPM model (DiT) has ``2C`` output channels: the second half (``v`` in
[-1, 1]) interpolates the log-variance of each reverse step between ``beta`` and
``beta_tilde``. It is dropped for the x0 estimate but returned by :meth:`Objective.denoise` so
the DDPM ancestral sampler can use it.

Losses draw their randomness from the CPU ``torch.Generator`` they are given, so a run that
restores the generator's state draws the same noise levels.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, assert_never

import torch
from torch import nn

from ditkit import spec as S
from ditkit.runtime.schedules import (
    cosine_alpha_sigma,
    cosine_sigma_to_t,
    cosine_t_to_sigma,
    ddpm_alphas_cumprod,
    ddpm_betas,
    ddpm_sigma_to_t,
    ddpm_sigmas,
    ddpm_t_to_sigma,
    edm_scalings,
    edm_weight,
    flow_sigma_to_t,
    flow_t_to_sigma,
    sample_sigma,
    sample_time,
    spaced_timesteps,
    v_scalings,
)

Extras = dict[str, float]
"""Per-batch numbers a loss reports besides itself (DDPM's ``mse`` / ``vb``, MDiT's ``var``)."""

# -------------------------------------------------------------------------------- the factory


def objective_of(spec) -> "Objective":
    """The objective class for an objective spec: the one place that matches on the variants.
    An :class:`Objective` passes through unchanged."""
    match spec:
        case Objective():
            return spec
        case S.EDMObjective():
            return EDM(spec)
        case S.DDPMObjective():
            return DDPMEpsilon(spec)
        case S.X0Objective():
            return X0Cosine(spec)
        case S.FlowObjective():
            return Flow(spec)
        case S.VObjective():
            return VPrediction(spec)
        case other:
            assert_never(other)


def as_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` (a number, a ``()`` or a ``(B,)`` tensor) as the ``(B,)`` tensor a denoiser
    computes with: on ``x``'s device, float64 for a float64 ``x``, else float32 (the
    preconditioning of a half-precision batch is computed in float32)."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if not sigma.is_floating_point():
        sigma = sigma.float()
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.to(x.dtype) if x.dtype == torch.float64 else sigma.float()


def _col(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]  # (B,) -> (B, 1, 1, 1)


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).flatten(1).mean(1)


# -------------------------------------------------------------------------------- the base


class Objective(ABC):
    """What a sampler, a denoiser wrapper and a training loss need from an objective.

    ``spec`` is the objective spec it was built from (``ditkit.spec.Objective``); the
    ``(B, C, H, W)`` tensors are in the VE convention. The network is any callable
    ``model(x, noise_level, class_labels, **cond) -> (B, C or 2C, H, W)``."""

    #: the step schedule this family samples with (``karras`` or ``uniform`` in its own time)
    native_schedule: ClassVar[str] = "uniform"

    def __init__(self, spec, sigma_min: float, sigma_max: float):
        self.spec = spec
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    @classmethod
    def of(cls, spec) -> "Objective":
        """Same as :func:`objective_of` (kept for ``NoiseRange.of``)."""
        return objective_of(spec)

    @property
    def objective(self):
        """The objective spec (kept from ``NoiseRange``)."""
        return self.spec

    @property
    def kind(self) -> str:
        return self.spec.kind

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash((type(self), self.spec))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sigma {self.sigma_min:.4g} .. {self.sigma_max:.4g}, "
            f"{self.spec!r})"
        )

    # ---------------------------------------------------------------- noise levels

    @abstractmethod
    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The objective's own time of ``sigma`` (EDM: sigma itself)."""

    @abstractmethod
    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`sigma_to_t`."""

    def native_sigmas(self, steps: int) -> torch.Tensor | None:
        """The family's own ``steps + 1`` descending noise levels over its whole range, ending
        in 0, where they are not one of the formula schedules (DDPM's respaced discrete
        timesteps); ``None``: use :attr:`native_schedule`."""
        return None

    def network_level(self, t: torch.Tensor) -> torch.Tensor:
        """The noise level the network is told at the objective's own time ``t`` (the same
        map for training and sampling)."""
        return t

    def learned_variance(self, model_spec: S.ModelSpec) -> bool:
        """Whether a model of ``model_spec`` also returns variance channels under this
        objective (a learned-sigma DDPM head)."""
        return False

    # ---------------------------------------------------------------- the denoiser

    @abstractmethod
    def denoise(
        self,
        model: nn.Module,
        x: torch.Tensor,
        sigma: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        *,
        quantize: bool = False,
        **cond: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x0, var_values | None)`` of the network ``model`` at ``x`` ``(B, C, H, W)`` and
        ``sigma`` ``(B,)`` (as :func:`as_sigma` gives it). ``quantize``: DDPM rounds the
        timestep to the nearest trained one (others ignore it)."""

    # ---------------------------------------------------------------- training

    @abstractmethod
    def draw_level(self, n: int, gen: torch.Generator, resolution: int) -> torch.Tensor:
        """``n`` training noise levels from ``gen`` (CPU), in the objective's own terms: EDM
        sigma (float64), DDPM integer timesteps, cosine / flow ``t`` (float64).
        ``resolution``: the image side (HDiT's density is shifted by it)."""

    @abstractmethod
    def loss(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor | None,
        noise: torch.Tensor,
        level: torch.Tensor,
        step: int = 0,
        **cond: torch.Tensor,
    ) -> tuple[torch.Tensor, Extras]:
        """``((B,) losses, extras)`` of ``model`` on clean ``x0`` with unit Gaussian ``noise``
        at noise levels ``level`` (:meth:`draw_level`); ``step`` is the optimizer step."""


# -------------------------------------------------------------------------------- EDM


class EDM(Objective):
    """EDM / k-diffusion: ``D = c_skip x + c_out F(c_in x, sigma)`` (:func:`edm_scalings`);
    the network is told sigma itself. Loss: k-diffusion's ``Denoiser.loss`` written as a
    weight on the x0 error, ``||F - (x0 - c_skip x) / c_out||^2 w_k = ||D - x0||^2 w_k /
    c_out^2`` (:func:`edm_weight`); sigma is drawn from ``sigma_sampling``."""

    native_schedule = "karras"

    def __init__(self, spec: S.EDMObjective):
        if spec.sigma_min is not None and spec.sigma_max is not None:  # the recipe's own range
            lo, hi = spec.sigma_min, spec.sigma_max
        elif isinstance(spec.sigma_sampling, S.CosineInterpolatedSigma):  # its clip range
            lo, hi = spec.sigma_sampling.sigma_min, spec.sigma_sampling.sigma_max
        else:
            lo, hi = 0.002, 80.0
        super().__init__(spec, lo, hi)

    def sigma_to_t(self, sigma):
        return sigma

    def t_to_sigma(self, t):
        return t

    def denoise(self, model, x, sigma, class_labels=None, *, quantize=False, **cond):
        c = x.shape[1]
        s = _col(sigma)
        c_skip, c_out, c_in = edm_scalings(s, self.spec.sigma_data)
        out = model((x * c_in).to(x.dtype), self.network_level(sigma), class_labels, **cond)
        return (c_skip * x + c_out * out[:, :c]).to(x.dtype), None

    def draw_level(self, n, gen, resolution):
        return sample_sigma(self.spec.sigma_sampling, n, gen, resolution, self.spec.sigma_data)

    def loss(self, model, x0, labels, noise, level, step=0, **cond):
        obj = self.spec
        sigma = level.to(torch.float64)
        s = sigma.to(device=x0.device, dtype=x0.dtype)
        x = x0 + _col(s) * noise
        denoised, _ = self.denoise(model, x, as_sigma(s, x), labels, **cond)
        w = edm_weight(obj.weighting, sigma, obj.sigma_data, obj.gamma).to(x0.device, x0.dtype)
        return _per_sample_mse(denoised, x0) * w, {}


# -------------------------------------------------------------------------------- DDPM


class DDPMEpsilon(Objective):
    """DiT / ADM: epsilon prediction on the discrete linear-beta schedule. The network sees
    the VP sample ``x / sqrt(1 + sigma^2)`` and the (continuous) timestep of ``sigma``;
    ``x0 = x - sigma eps``. Natively sampled on DiT's evenly respaced integer timesteps. Loss:
    ADM/DiT's ``training_losses`` (``L_simple`` + the VLB term for a learned variance)."""

    def __init__(self, spec: S.DDPMObjective):
        # float64 and not a buffer, so ``.half()`` / ``.to(dtype)`` never rounds the table
        self.sigmas = ddpm_sigmas(ddpm_alphas_cumprod(spec.steps, spec.beta_start, spec.beta_end))
        self._tables: DDPMTables | None = None
        super().__init__(spec, float(self.sigmas[0]), float(self.sigmas[-1]))

    @property
    def tables(self) -> "DDPMTables":
        """The training tables (built on first use: sampling never needs them)."""
        if self._tables is None:
            self._tables = DDPMTables(self.spec)
        return self._tables

    def sigma_to_t(self, sigma):
        return ddpm_sigma_to_t(sigma, self.sigmas)

    def t_to_sigma(self, t):
        return ddpm_t_to_sigma(t, self.sigmas)

    def native_sigmas(self, steps):
        ts = spaced_timesteps(self.spec.steps, steps)[::-1]
        return torch.cat([self.sigmas[ts], self.sigmas.new_zeros(1)])

    def learned_variance(self, model_spec):
        return model_spec.head.learned_sigma

    def denoise(self, model, x, sigma, class_labels=None, *, quantize=False, **cond):
        c = x.shape[1]
        s = _col(sigma)
        table = self.sigmas.to(x.device)
        t = ddpm_sigma_to_t(sigma.double(), table)
        if quantize:
            t = t.round()
            s = _col(ddpm_t_to_sigma(t, table).to(s.dtype))
        t = t.to(sigma.dtype)
        out = model(
            (x / (1 + s**2).sqrt()).to(x.dtype), self.network_level(t), class_labels, **cond
        )
        eps = out[:, :c]
        var = out[:, c : 2 * c] if out.shape[1] >= 2 * c else None
        return (x - s * eps).to(x.dtype), var

    def draw_level(self, n, gen, resolution):
        return torch.randint(0, self.spec.steps, (n,), generator=gen)

    def loss(self, model, x0, labels, noise, level, step=0, **cond):
        t, tables = level, self.tables
        x_t = tables.at("sqrt_abar", t, x0) * x0 + tables.at("sqrt_one_minus_abar", t, x0) * noise
        out = model(x_t, self.network_level(t).to(x0.device), labels, **cond)
        per, mse, vb = ddpm_hybrid_loss(tables, self.spec, x0, x_t, t, noise, out)
        extras = {"mse": float(mse.mean().detach())}
        if vb is not None:
            extras["vb"] = float(vb.mean().detach())
        return per, extras


# -------------------------------------------------------------------------------- x0 (MDiT)


class X0Cosine(Objective):
    """MDiT: x0 prediction on the cosine schedule (``alpha = cos(pi t / 2)``, ``sigma = tan(pi
    t / 2)`` in VE terms); the network sees the VP sample and ``1000 t``. Loss: Min-SNR-gamma
    weighted x0 error, plus the variance-matching regulariser while it is on."""

    def __init__(self, spec: S.X0Objective):
        # t in [1e-3, 1 - 1e-3]
        super().__init__(spec, math.tan(math.pi * 1e-3 / 2), math.tan(math.pi * (1 - 1e-3) / 2))

    def sigma_to_t(self, sigma):
        return cosine_sigma_to_t(sigma)

    def t_to_sigma(self, t):
        return cosine_t_to_sigma(t)

    def network_level(self, t):
        return t * 1000

    def denoise(self, model, x, sigma, class_labels=None, *, quantize=False, **cond):
        c = x.shape[1]
        s = _col(sigma)
        t = cosine_sigma_to_t(sigma)
        out = model(
            (x / (1 + s**2).sqrt()).to(x.dtype), self.network_level(t), class_labels, **cond
        )
        return out[:, :c], None

    def draw_level(self, n, gen, resolution):
        return torch.rand(n, generator=gen, dtype=torch.float64) * (1 - 2e-3) + 1e-3

    def loss(self, model, x0, labels, noise, level, step=0, **cond):
        obj, c = self.spec, x0.shape[1]
        t = level.to(torch.float64)
        alpha, sig = cosine_alpha_sigma(t)
        a4 = _col(alpha.to(x0.device, x0.dtype))
        s4 = _col(sig.to(x0.device, x0.dtype))
        x_t = a4 * x0 + s4 * noise
        pred = model(x_t, self.network_level(t).to(x0.device, x0.dtype), labels, **cond)[:, :c]
        w = torch.clamp(alpha**2 / sig**2, max=obj.min_snr_gamma).to(x0.device, x0.dtype)
        per = _per_sample_mse(pred, x0) * w
        extras: Extras = {}
        if obj.lambda_var > 0 and (obj.var_off_after is None or step < obj.var_off_after):
            var_true = x0.flatten(2).var(-1)  # (B, C): per-sample, per-channel
            var_pred = pred.flatten(2).var(-1)
            reg = (var_true - var_pred).abs().mean(1)
            extras["var"] = float(reg.mean().detach())
            per = per + obj.lambda_var * reg
        return per, extras


# -------------------------------------------------------------------------------- flow (MPDiT)


class Flow(Objective):
    """Rectified flow: ``x_t = (1 - t) x0 + t eps`` (VE: ``sigma = t / (1 - t)``, ``x_t = x /
    (1 + sigma)``); the network predicts the velocity ``eps - x0`` and is told ``time_scale
    t``; ``x0 = x_t - t F``. Loss: MPDiT's ``OTFlow.loss`` (l2, uniform reweighting)."""

    def __init__(self, spec: S.FlowObjective):
        super().__init__(spec, 1e-3 / (1 - 1e-3), (1 - 1e-3) / 1e-3)

    def sigma_to_t(self, sigma):
        return flow_sigma_to_t(sigma)

    def t_to_sigma(self, t):
        return flow_t_to_sigma(t)

    def network_level(self, t):
        return t * self.spec.time_scale

    def denoise(self, model, x, sigma, class_labels=None, *, quantize=False, **cond):
        c = x.shape[1]
        s = _col(sigma)
        t = flow_sigma_to_t(sigma)
        xt = x / (1 + s)
        v = model(xt.to(x.dtype), self.network_level(t), class_labels, **cond)[:, :c]
        return (xt - _col(t) * v).to(x.dtype), None

    def draw_level(self, n, gen, resolution):
        # MPDiT does not clamp; the clamp moves t by at most 1e-5
        return sample_time(self.spec.time_sampling, n, gen).clamp(1e-5, 1 - 1e-5)

    def loss(self, model, x0, labels, noise, level, step=0, **cond):
        c = x0.shape[1]
        t = level.to(torch.float64)
        t4 = _col(t.to(x0.device, x0.dtype))
        x_t = (1 - t4) * x0 + t4 * noise
        v = model(x_t, self.network_level(t).to(x0.device, x0.dtype), labels, **cond)[:, :c]
        return _per_sample_mse(v, noise - x0), {}


# -------------------------------------------------------------------------------- v-prediction


class VPrediction(Objective):
    """v-prediction (Salimans & Ho 2022) on the cosine schedule: the network sees the VP
    sample ``z = c_in x`` and ``time_scale t`` (``t = 2/pi atan(sigma)``) and predicts ``v``;
    ``D = c_skip x + c_out F`` (:func:`v_scalings`). Loss: the squared error of ``v``, whose
    target in VE terms is ``v = (sd eps - (s / sd) x0) / sqrt(s^2 + sd^2)`` (``= (x0 - c_skip
    x) / c_out``, written without that difference's cancellation at small sigma); at
    ``sigma_data`` 1 it is the paper's ``alpha eps - sigma_t x0``."""

    def __init__(self, spec: S.VObjective):
        super().__init__(spec, math.tan(math.pi * 1e-3 / 2), math.tan(math.pi * (1 - 1e-3) / 2))

    def sigma_to_t(self, sigma):
        return cosine_sigma_to_t(sigma)

    def t_to_sigma(self, t):
        return cosine_t_to_sigma(t)

    def network_level(self, t):
        return t * self.spec.time_scale

    def denoise(self, model, x, sigma, class_labels=None, *, quantize=False, **cond):
        c = x.shape[1]
        c_skip, c_out, c_in = v_scalings(_col(sigma), self.spec.sigma_data)
        t = cosine_sigma_to_t(sigma)
        out = model((x * c_in).to(x.dtype), self.network_level(t), class_labels, **cond)
        return (c_skip * x + c_out * out[:, :c]).to(x.dtype), None

    def draw_level(self, n, gen, resolution):
        return sample_time(self.spec.time_sampling, n, gen).clamp(1e-3, 1 - 1e-3)

    def loss(self, model, x0, labels, noise, level, step=0, **cond):
        c, sd = x0.shape[1], self.spec.sigma_data
        t = level.to(torch.float64)
        sigma = cosine_t_to_sigma(t)
        _, _, c_in = v_scalings(sigma, sd)
        s4 = _col(sigma.to(x0.device, x0.dtype))
        in4 = _col(c_in.to(x0.device, x0.dtype))
        z = (x0 + s4 * noise) * in4
        out = model(z, self.network_level(t).to(x0.device, x0.dtype), labels, **cond)[:, :c]
        target = (sd * noise - (s4 / sd) * x0) * in4
        return _per_sample_mse(out, target), {}


# -------------------------------------------------------------------------------- DDPM terms


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """ADM/DiT's tanh approximation of the standard normal CDF:
    ``(1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2``."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, cdf: str = "tanh"
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
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


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
        return getattr(self, name)[t.cpu()].to(device=like.device, dtype=like.dtype)[
            :, None, None, None
        ]


def ddpm_vlb_terms(
    tables: DDPMTables,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    var_values: torch.Tensor,
    cdf: str = "tanh",
) -> torch.Tensor:
    """The VLB term L_t per sample, in bits per dimension: KL(q(x_{t-1} | x_t, x0) ||
    p(x_{t-1} | x_t)) for ``t > 0``, the decoder's -log likelihood for ``t = 0`` (ADM's
    ``_vb_terms_bpd``). The model's mean comes from ``eps`` (pass it detached for the hybrid
    loss), its log-variance from ``var_values`` (in [-1, 1]) between ``log beta_t`` and
    ``log beta_tilde_t``."""
    c0, ct = tables.at("post_c0", t, x0), tables.at("post_ct", t, x0)
    true_mean = c0 * x0 + ct * x_t
    true_log_var = tables.at("post_log_var", t, x0)
    x0_pred = (
        tables.at("sqrt_recip_abar", t, x0) * x_t - tables.at("sqrt_recipm1_abar", t, x0) * eps
    )
    model_mean = c0 * x0_pred + ct * x_t
    frac = (var_values + 1) / 2
    model_log_var = frac * tables.at("log_betas", t, x0) + (1 - frac) * true_log_var
    kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var, cdf)
    nll = nll.flatten(1).mean(1)
    return torch.where(t.to(x0.device) == 0, nll, kl) / math.log(2.0)


def ddpm_hybrid_loss(
    tables: DDPMTables,
    obj: S.DDPMObjective,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
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
    vb = ddpm_vlb_terms(tables, x0, x_t, t, eps.detach(), out[:, c : 2 * c], obj.decoder_cdf)
    return mse + obj.lambda_vlb * obj.steps * vb, mse, vb
