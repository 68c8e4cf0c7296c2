"""Samplers over any denoiser ``D(x, sigma) -> x0`` in the VE convention ``x = x0 + sigma eps``.

A *denoiser* here is anything with

- ``denoise(x, sigma, class_labels=None, **cond) -> (x0, var_values | None)`` (``sigma`` a
  ``(B,)`` tensor; ``var_values`` are a learned-sigma DDPM model's extra channels),
- ``noise_range`` (:class:`ditkit.runtime.denoiser.NoiseRange`: the trained sigma range and the
  objective's own time), and ``null_class`` (the unconditional label, or ``None``):

:class:`ditkit.runtime.denoiser.Denoiser` (eager PyTorch) and
:class:`ditkit.runtime.engines.OrtDenoiser` (onnxruntime) both are, so one sampler drives both.

Samplers (``SAMPLERS``): ``euler``, ``heun`` (EDM's 2nd order), ``ddim`` (``eta``: 0 is the
deterministic DDIM = Euler on the VE ODE; 1 the ancestral one), ``ddpm`` (ancestral DDPM
posterior on the respaced schedule, log-variance from a learned-sigma model's channels as in
ADM/DiT, else ``beta_tilde``), ``dpmpp_2m`` (DPM-Solver++ 2M) and ``dpmpp_3m_sde``
(DPM-Solver++ 3M SDE, ``eta`` defaults to 1).

Step schedules (``SCHEDULES``): ``karras`` (EDM's rho-spaced sigmas), ``uniform`` (uniform in the
objective's own time: DDPM timestep, cosine / flow ``t``, EDM ``sigma``), ``native`` (what the
model family samples with: EDM -> karras, DDPM -> DiT's evenly spaced integer timesteps, x0 /
flow -> uniform in ``t``). Every schedule ends with ``sigma = 0``.

Classifier-free guidance batches the conditional and unconditional passes into one call:
``D = D_u + w (D_c - D_u)`` (``w = 1`` is the conditional model), optionally only for sigmas
inside ``guidance_interval`` and only on the first ``cfg_channels`` channels (DiT guides 3 of
its 4 latent channels; the rest come from the conditional pass).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ditkit.spec.sampling import SAMPLERS, SCHEDULES

from .denoiser import NoiseRange, ddpm_sigmas, ddpm_step_log_variance

# -------------------------------------------------------------------------------- schedules


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0
                  ) -> torch.Tensor:
    """EDM: ``(sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, then 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)])


def uniform_sigmas(steps: int, noise_range: NoiseRange, sigma_min: float, sigma_max: float
                   ) -> torch.Tensor:
    """Uniform in the objective's own time between ``sigma_max`` and ``sigma_min``, then 0."""
    ends = torch.tensor([sigma_max, sigma_min], dtype=torch.float64)
    t_hi, t_lo = noise_range.sigma_to_t(ends).tolist()
    t = torch.linspace(t_hi, t_lo, steps, dtype=torch.float64)
    sig = noise_range.t_to_sigma(t)
    return torch.cat([sig, sig.new_zeros(1)])


def spaced_timesteps(total: int, steps: int) -> list[int]:
    """DiT / ADM ``space_timesteps(total, [steps])``: ``round(i (total-1)/(steps-1))``."""
    if steps > total:
        raise ValueError(f"steps {steps} is more than the model's {total} DDPM timesteps")
    if steps == 1:
        return [0]
    stride = (total - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


def get_sigmas(noise_range: NoiseRange, steps: int, schedule: str = "native", *,
               sigma_min: float | None = None, sigma_max: float | None = None,
               rho: float = 7.0) -> torch.Tensor:
    """``steps + 1`` descending float64 sigmas ending in 0 (``steps`` model evaluations for
    first-order samplers)."""
    from ditkit import spec as S

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    lo = noise_range.sigma_min if sigma_min is None else sigma_min
    hi = noise_range.sigma_max if sigma_max is None else sigma_max
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {lo} and {hi}")
    obj = noise_range.objective
    if schedule == "native":
        if isinstance(obj, S.DDPMObjective) and sigma_min is None and sigma_max is None:
            table = ddpm_sigmas(_abar(obj))
            ts = spaced_timesteps(obj.steps, steps)[::-1]
            return torch.cat([table[ts], table.new_zeros(1)])
        schedule = "karras" if isinstance(obj, S.EDMObjective) else "uniform"
    if schedule == "karras":
        return karras_sigmas(steps, lo, hi, rho)
    return uniform_sigmas(steps, noise_range, lo, hi)


def _abar(obj):
    from .denoiser import ddpm_alphas_cumprod

    return ddpm_alphas_cumprod(obj.steps, obj.beta_start, obj.beta_end)


# -------------------------------------------------------------------------------- guidance


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale,
                channels: int | None = None) -> torch.Tensor:
    """Classifier-free guidance ``u + w (c - u)`` (``w = 1``: the conditional output).

    ``scale``: a number or a ``(B,)`` tensor (one scale per sample). ``channels``: guide only
    the first ``channels`` channels; the rest come from the conditional output (DiT guides 3
    of its 4 latent channels). Shared by the samplers and the exported CFG graph."""
    if isinstance(scale, torch.Tensor) and scale.ndim == 1:
        scale = scale.to(cond.dtype)[:, None, None, None]
    g = uncond + scale * (cond - uncond)
    if channels is not None:
        g = torch.cat([g[:, :channels], cond[:, channels:]], dim=1)
    return g


class Guided:
    """``(x, sigma) -> (x0, var)`` with the labels, conditioning and CFG bound in.

    A denoiser with ``guides_inside = True`` (an ONNX graph exported with ``--cfg``) batches
    the two passes itself: it gets ``denoiser.guided(x, sigma, labels, scale, **cond)``."""

    def __init__(self, denoiser, class_labels: torch.Tensor | None, cond: dict,
                 cfg_scale: float = 1.0, guidance_interval: tuple[float, float] | None = None,
                 cfg_channels: int | None = None):
        self.denoiser, self.labels, self.cond = denoiser, class_labels, cond
        self.scale, self.interval, self.channels = cfg_scale, guidance_interval, cfg_channels
        self.evaluations = 0
        if cfg_scale != 1.0:
            if class_labels is None:
                raise ValueError("classifier-free guidance (cfg_scale != 1) needs class_labels")
            if getattr(denoiser, "null_class", None) is None:
                raise ValueError("classifier-free guidance needs a model with a null class "
                                 "(conditioning.classes.null_class)")
            inside = getattr(denoiser, "cfg_channels", None)
            if getattr(denoiser, "guides_inside", False) and cfg_channels != inside:
                raise ValueError(f"this graph was exported with CFG on "
                                 f"{inside or 'all'} channels; sample with cfg_channels="
                                 f"{inside} (got {cfg_channels}) or re-export it")

    def _guide_at(self, sigma: float) -> bool:
        if self.scale == 1.0:
            return False
        if self.interval is None:
            return True
        lo, hi = self.interval
        return lo <= sigma <= hi

    def __call__(self, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = x.shape[0]
        self.evaluations += 1
        s = torch.full((b,), sigma, dtype=x.dtype, device=x.device)
        if not self._guide_at(sigma):
            return self.denoiser.denoise(x, s, self.labels, **self.cond)
        if getattr(self.denoiser, "guides_inside", False):
            return self.denoiser.guided(x, s, self.labels, self.scale, **self.cond)
        null = torch.full_like(self.labels, self.denoiser.null_class)
        cond = {k: torch.cat([v, v]) for k, v in self.cond.items()}
        x0, var = self.denoiser.denoise(torch.cat([x, x]), torch.cat([s, s]),
                                        torch.cat([self.labels, null]), **cond)
        c, u = x0.chunk(2)
        g = cfg_combine(c, u, self.scale, self.channels)
        return g, (var.chunk(2)[0] if var is not None else None)


# -------------------------------------------------------------------------------- the loop


def sample(denoiser, shape, *, steps: int, sampler: str = "heun", seed: int = 0,
           class_labels=None, cfg_scale: float = 1.0, device="cpu", progress: bool = False,
           schedule: str = "native", sigmas: torch.Tensor | None = None,
           sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0,
           eta: float | None = None, guidance_interval: tuple[float, float] | None = None,
           cfg_channels: int | None = None, cond: dict | None = None,
           noise: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
           callback: Callable[[int, float, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Draw samples of ``shape`` ``(B, C, H, W)``: returns the final ``x0`` (no clamping).

    Reproducible: all randomness (the initial noise and any per-step noise) comes from one CPU
    ``torch.Generator`` seeded with ``seed``, so torch and ORT models and CPU and GPU runs see
    the same noise. ``noise`` overrides the initial unit Gaussian (scaled by the first sigma).
    ``sigmas`` overrides the schedule (descending, ending in 0)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    if sigmas is None:
        sigmas = get_sigmas(denoiser.noise_range, steps, schedule, sigma_min=sigma_min,
                            sigma_max=sigma_max, rho=rho)
    sig = [float(v) for v in sigmas]
    if any(a <= b for a, b in zip(sig, sig[1:])) or sig[-1] != 0:
        raise ValueError("sigmas must be strictly descending and end with 0")
    b = shape[0]
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels, dtype=torch.long).to(device)
        if class_labels.ndim == 0:
            class_labels = class_labels.expand(b)
        if class_labels.shape != (b,):
            raise ValueError(f"class_labels must be one label or {b} labels, got "
                             f"{tuple(class_labels.shape)}")
    cond = {k: torch.as_tensor(v).to(device=device, dtype=dtype) for k, v in (cond or {}).items()}
    model = Guided(denoiser, class_labels, cond, cfg_scale, guidance_interval, cfg_channels)

    def randn() -> torch.Tensor:
        return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device, dtype)

    x = (noise.to(device, dtype) if noise is not None else randn()) * sig[0]
    step = _STEPPERS[sampler]
    state: dict = {"eta": eta}
    n = len(sig) - 1
    bar = _progress(n, progress, sampler)
    with torch.no_grad():
        for i in range(n):
            x = step(model, x, sig[i], sig[i + 1], randn, state)
            if callback is not None:
                callback(i, sig[i + 1], x)
            bar.update(1)
    bar.close()
    return x


def _progress(total: int, enabled: bool, desc: str):
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"sampling ({desc})", unit="step")

    class _Null:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Null()


# -------------------------------------------------------------------------------- steppers
# step(model, x, sigma, sigma_next, randn, state) -> x_next; ``state`` carries history.


def _euler(model, x, s, s_next, randn, state):
    x0, _ = model(x, s)
    return x0 + s_next * (x - x0) / s  # = x + d (s_next - s) with d = (x - x0) / s


def _heun(model, x, s, s_next, randn, state):
    x0, _ = model(x, s)
    d = (x - x0) / s
    x_euler = x + d * (s_next - s)
    if s_next == 0:
        return x_euler
    x0_2, _ = model(x_euler, s_next)
    d2 = (x_euler - x0_2) / s_next
    return x + (d + d2) / 2 * (s_next - s)


def ancestral_split(s: float, s_next: float, eta: float) -> tuple[float, float]:
    """``(sigma_down, sigma_up)``: a deterministic step to ``sigma_down`` plus fresh noise of
    std ``sigma_up``, ``sigma_down^2 + sigma_up^2 = sigma_next^2``. In VE terms this is DDIM's
    ``sigma_t(eta)``: ``sigma_up = eta s_next sqrt(s^2 - s_next^2) / s``."""
    if s_next == 0 or eta == 0:
        return s_next, 0.0
    up = min(s_next, eta * s_next * math.sqrt(s**2 - s_next**2) / s)
    return math.sqrt(s_next**2 - up**2), up


def _ddim(model, x, s, s_next, randn, state):
    eta = 0.0 if state["eta"] is None else state["eta"]
    x0, _ = model(x, s)
    down, up = ancestral_split(s, s_next, eta)
    x = x0 + down * (x - x0) / s
    return x + up * randn() if up > 0 else x


def _ddpm(model, x, s, s_next, randn, state):
    """The DDPM posterior ``q(x_next | x, x0)`` of the respaced step ``s -> s_next``:
    mean ``sqrt(ab') beta/(1-ab) x0 + sqrt(1-beta) (1-ab')/(1-ab) x_vp`` with ``x_vp =
    sqrt(ab) x``, variance from the learned channels (or ``beta_tilde``); back to VE by
    dividing by ``sqrt(ab')``."""
    x0, var_values = model(x, s)
    if s_next == 0:
        return x0
    ab, ab_n = 1 / (1 + s**2), 1 / (1 + s_next**2)
    beta, _, log_var = ddpm_step_log_variance(var_values, s, s_next)
    mean = (math.sqrt(ab_n) * beta / (1 - ab) * x0
            + math.sqrt(1 - beta) * (1 - ab_n) / (1 - ab) * math.sqrt(ab) * x)
    std = torch.exp(0.5 * torch.as_tensor(log_var, dtype=x.dtype, device=x.device))
    return (mean + std * randn()) / math.sqrt(ab_n)


def _dpmpp_2m(model, x, s, s_next, randn, state):
    x0, _ = model(x, s)
    if s_next == 0:
        return x0
    t, t_next = -math.log(s), -math.log(s_next)
    h = t_next - t
    prev = state.get("x0")
    if prev is None:
        d = x0
    else:
        r = state["h"] / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev
    state["x0"], state["h"] = x0, h
    return (s_next / s) * x - math.expm1(-h) * d


def _dpmpp_3m_sde(model, x, s, s_next, randn, state):
    eta = 1.0 if state["eta"] is None else state["eta"]
    x0, _ = model(x, s)
    if s_next == 0:
        return x0
    h = math.log(s) - math.log(s_next)
    h_eta = h * (eta + 1)
    x = math.exp(-h_eta) * x - math.expm1(-h_eta) * x0
    x0_1, x0_2 = state.get("x0_1"), state.get("x0_2")
    h_1, h_2 = state.get("h_1"), state.get("h_2")
    phi_2 = math.expm1(-h_eta) / h_eta + 1
    if x0_2 is not None:
        r0, r1 = h_1 / h, h_2 / h
        d1_0 = (x0 - x0_1) / r0
        d1_1 = (x0_1 - x0_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_3 = phi_2 / h_eta - 0.5
        x = x + phi_2 * d1 - phi_3 * d2
    elif x0_1 is not None:
        x = x + phi_2 * (x0 - x0_1) / (h_1 / h)
    if eta:
        x = x + randn() * s_next * math.sqrt(-math.expm1(-2 * h * eta))
    state.update(x0_1=x0, x0_2=x0_1, h_1=h, h_2=h_1)
    return x


_STEPPERS = {"euler": _euler, "heun": _heun, "ddim": _ddim, "ddpm": _ddpm,
             "dpmpp_2m": _dpmpp_2m, "dpmpp_3m_sde": _dpmpp_3m_sde}
