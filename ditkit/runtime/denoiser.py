"""Every trained model as one denoiser ``D(x, sigma, ...) -> x0`` (the VE convention).

Samplers work in the variance-exploding convention ``x = x0 + sigma * eps`` only, so that any
sampler drives any model. Each objective (``ditkit.spec.objective``) fixes how the network's
input is scaled, what noise level it is told, and how its output becomes an ``x0`` estimate:

=============  ==========================  =================  ===============================
objective      network input               network noise      x0 from the output ``F``
=============  ==========================  =================  ===============================
``edm``        ``c_in x``                  ``sigma``          ``c_skip x + c_out F``
``ddpm_eps``   ``x / sqrt(1 + sigma^2)``   timestep ``t(s)``  ``x - sigma F[:, :C]``
``x0``         ``x / sqrt(1 + sigma^2)``   ``1000 t(s)``      ``F``
``flow``       ``x / (1 + sigma)``         ``scale t(s)``     ``x_t - t F`` (``F = eps - x0``)
=============  ==========================  =================  ===============================

where ``t(s)`` is the objective's own time: the DDPM timestep whose ``sigma_t =
sqrt((1 - abar_t) / abar_t)`` equals ``s`` (interpolated in ``log sigma`` between the 1000
discrete steps), the cosine schedule's ``t = 2/pi atan(s)`` (``alpha = cos(pi t / 2)``), and
rectified flow's ``t = s / (1 + s)``. The helpers below are the single source of truth for these
maps; ``ditkit.train`` imports them.

A learned-sigma DDPM model (DiT) has ``2C`` output channels: the second half (``v`` in
[-1, 1]) interpolates the log-variance of each reverse step between ``beta`` and
``beta_tilde``. It is dropped for the x0 estimate but returned by :meth:`Denoiser.denoise` so
the DDPM ancestral sampler can use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import assert_never

import torch
from torch import nn

from ditkit import spec as S

# -------------------------------------------------------------------------------- schedules


def ddpm_betas(steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
               ) -> torch.Tensor:
    """ADM / DiT's linear beta schedule, float64: ``linspace(beta_start, beta_end, steps)``."""
    return torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)


def ddpm_alphas_cumprod(steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
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


def edm_scalings(sigma: torch.Tensor, sigma_data: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM preconditioning ``(c_skip, c_out, c_in)`` for ``D = c_skip x + c_out F(c_in x)``."""
    s2, d2 = sigma**2, sigma_data**2
    return d2 / (s2 + d2), sigma * sigma_data / (s2 + d2).sqrt(), 1 / (s2 + d2).sqrt()


def ddpm_step_log_variance(var_values: torch.Tensor | None, sigma: float, sigma_next: float
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


# -------------------------------------------------------------------------------- noise ranges


@dataclass(frozen=True)
class NoiseRange:
    """The VE noise levels an objective's model was trained on, and its own time variable:
    what samplers need to know about a model besides ``D`` itself (shared by torch and ORT)."""

    objective: S.EDMObjective | S.DDPMObjective | S.X0Objective | S.FlowObjective
    sigma_min: float
    sigma_max: float

    @classmethod
    def of(cls, objective) -> "NoiseRange":
        match objective:
            case S.EDMObjective(sigma_min=float() as lo, sigma_max=float() as hi):
                return cls(objective, lo, hi)  # the recipe's own sampling range
            case S.EDMObjective(sigma_sampling=S.CosineInterpolatedSigma() as cs):
                return cls(objective, cs.sigma_min, cs.sigma_max)
            case S.EDMObjective():
                return cls(objective, 0.002, 80.0)
            case S.DDPMObjective():
                sig = ddpm_sigmas(_alphas_cumprod(objective))
                return cls(objective, float(sig[0]), float(sig[-1]))
            case S.X0Objective():  # t in [1e-3, 1 - 1e-3]
                return cls(objective, math.tan(math.pi * 1e-3 / 2),
                           math.tan(math.pi * (1 - 1e-3) / 2))
            case S.FlowObjective():
                return cls(objective, 1e-3 / (1 - 1e-3), (1 - 1e-3) / 1e-3)
            case other:
                assert_never(other)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The objective's own time of ``sigma`` (EDM: sigma itself)."""
        match self.objective:
            case S.EDMObjective():
                return sigma
            case S.DDPMObjective():
                return ddpm_sigma_to_t(sigma, ddpm_sigmas(_alphas_cumprod(self.objective)))
            case S.X0Objective():
                return cosine_sigma_to_t(sigma)
            case S.FlowObjective():
                return flow_sigma_to_t(sigma)
            case other:
                assert_never(other)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        match self.objective:
            case S.EDMObjective():
                return t
            case S.DDPMObjective():
                return ddpm_t_to_sigma(t, ddpm_sigmas(_alphas_cumprod(self.objective)))
            case S.X0Objective():
                return cosine_t_to_sigma(t)
            case S.FlowObjective():
                return flow_t_to_sigma(t)
            case other:
                assert_never(other)


def _alphas_cumprod(obj: S.DDPMObjective) -> torch.Tensor:
    return ddpm_alphas_cumprod(obj.steps, obj.beta_start, obj.beta_end)


# -------------------------------------------------------------------------------- denoiser


class Denoiser(nn.Module):
    """``D(x, sigma, class_labels=None, **cond) -> x0`` for a model trained with ``objective``.

    ``x`` is ``(B, C, H, W)`` in the VE convention, ``sigma`` a number or ``(B,)`` tensor.
    ``null_class`` is the label that means "unconditional" (for classifier-free guidance), or
    ``None`` when the model has no class conditioning."""

    def __init__(self, model: nn.Module, objective, quantize: bool = False):
        super().__init__()
        self.model = model
        self.objective = objective
        self.noise_range = NoiseRange.of(objective)
        self.quantize = quantize  # DDPM: round the timestep to the nearest trained one
        spec: S.ModelSpec | None = getattr(model, "spec", None)
        self.channels = spec.input.channels if spec is not None else None
        classes = spec.conditioning.classes if spec is not None else None
        self.null_class = classes.count if classes is not None and classes.null_class else None
        if isinstance(objective, S.DDPMObjective):
            # float64 and not a buffer, so ``.half()`` / ``.to(dtype)`` never rounds the table
            self.ddpm_sigmas = ddpm_sigmas(_alphas_cumprod(objective))

    @property
    def sigma_min(self) -> float:
        return self.noise_range.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.noise_range.sigma_max

    @property
    def learned_variance(self) -> bool:
        spec = getattr(self.model, "spec", None)
        return (isinstance(self.objective, S.DDPMObjective) and spec is not None
                and spec.head.learned_sigma)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None,
                **cond: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, sigma, class_labels, **cond)[0]

    def denoise(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None,
                **cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x0, var_values)``; ``var_values`` is the learned-sigma channels of a DDPM model
        (``(B, C, H, W)`` in [-1, 1]) or ``None``."""
        b, c = x.shape[0], x.shape[1]
        sigma = torch.as_tensor(sigma, device=x.device)
        if not sigma.is_floating_point():
            sigma = sigma.float()
        if sigma.ndim == 0:
            sigma = sigma.expand(b)
        sigma = sigma.to(x.dtype) if x.dtype == torch.float64 else sigma.float()
        s = sigma[:, None, None, None]  # (B, 1, 1, 1)
        obj = self.objective
        match obj:
            case S.EDMObjective(sigma_data=sd):
                c_skip, c_out, c_in = edm_scalings(s, sd)
                out = self.model((x * c_in).to(x.dtype), sigma, class_labels, **cond)
                return (c_skip * x + c_out * out[:, :c]).to(x.dtype), None
            case S.DDPMObjective():
                table = self.ddpm_sigmas.to(x.device)
                t = ddpm_sigma_to_t(sigma.double(), table)
                if self.quantize:
                    t = t.round()
                    s = ddpm_t_to_sigma(t, table).to(s.dtype)[:, None, None, None]
                t = t.to(sigma.dtype)
                out = self.model((x / (1 + s**2).sqrt()).to(x.dtype), t, class_labels, **cond)
                eps = out[:, :c]
                var = out[:, c:2 * c] if out.shape[1] >= 2 * c else None
                return (x - s * eps).to(x.dtype), var
            case S.X0Objective():
                t = cosine_sigma_to_t(sigma)
                out = self.model((x / (1 + s**2).sqrt()).to(x.dtype), t * 1000, class_labels,
                                 **cond)
                return out[:, :c], None
            case S.FlowObjective(time_scale=scale):
                t = flow_sigma_to_t(sigma)
                xt = x / (1 + s)
                v = self.model(xt.to(x.dtype), t * scale, class_labels, **cond)[:, :c]
                return (xt - t[:, None, None, None] * v).to(x.dtype), None
            case other:
                assert_never(other)
