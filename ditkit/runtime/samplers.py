"""Samplers over any denoiser ``D(x, sigma) -> x0`` in the VE convention ``x = x0 + sigma eps``.

A *denoiser* here is a :class:`ditkit.runtime.protocols.Denoiser`: ``denoise(x, sigma,
class_labels=None, **cond) -> (x0, var_values | None)``, ``noise_range``, ``null_class`` and the
CFG-inside-the-graph attributes. :class:`ditkit.runtime.denoiser.Denoiser` (eager PyTorch),
:class:`ditkit.deploy.engines.OrtDenoiser` (onnxruntime) and
:class:`ditkit.deploy.tensorrt.TrtDenoiser` implement it, so one sampler drives all three.

Samplers (``SAMPLERS``): ``euler``, ``heun`` (EDM's 2nd order), ``ddim`` (``eta``: 0 is the
deterministic DDIM = Euler on the VE ODE; 1 the ancestral one), ``ddpm`` (ancestral DDPM
posterior on the respaced schedule, log-variance from a learned-sigma model's channels as in
ADM/DiT, else ``beta_tilde``), ``dpmpp_2m`` (DPM-Solver++ 2M) and ``dpmpp_3m_sde``
(DPM-Solver++ 3M SDE, ``eta`` defaults to 1).

Step schedules (``SCHEDULES``): ``karras`` (EDM's rho-spaced sigmas), ``uniform`` (uniform in the
objective's own time: DDPM timestep, cosine / flow ``t``, EDM ``sigma``), ``native`` (what the
model family samples with, as its objective says: EDM -> karras, DDPM -> DiT's evenly spaced
integer timesteps, x0 / flow / v -> uniform in ``t``). Every schedule ends with ``sigma = 0``.

Classifier-free guidance batches the conditional and unconditional passes into one call:
``D = D_u + w (D_c - D_u)`` (``w = 1`` is the conditional model), optionally only for sigmas
inside ``cfg_interval`` and only on the first ``cfg_channels`` channels (DiT guides 3 of
its 4 latent channels; the rest come from the conditional pass).
"""

from __future__ import annotations

import math
from typing import Callable, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from ditkit.device import DeviceError, pick_device
from ditkit.runtime.objectives import Objective
from ditkit.runtime.protocols import Denoiser
from ditkit.runtime.schedules import (  # noqa: F401
    SamplingError,
    ddpm_step_log_variance,
    spaced_timesteps,
)
from ditkit.spec.limits import OVERRIDE_HINT, limits_enabled
from ditkit.spec.sampling import SAMPLERS, SCHEDULES, Sampling  # noqa: F401  (SAMPLERS: re-exported)

MAX_STEPS = 10_000
"""More noise levels than any sampler needs; ``DITKIT_NO_SIZE_LIMITS=1`` lifts it."""


# SamplingError (sampling cannot run with these arguments, or produced non-finite values) lives
# with the schedules, which raise it too

# -------------------------------------------------------------------------------- schedules


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM: ``(sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``,
    then 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)])


def uniform_sigmas(
    steps: int, noise_range: Objective, sigma_min: float, sigma_max: float
) -> torch.Tensor:
    """Uniform in the objective's own time between ``sigma_max`` and ``sigma_min``, then 0."""
    ends = torch.tensor([sigma_max, sigma_min], dtype=torch.float64)
    t_hi, t_lo = noise_range.sigma_to_t(ends).tolist()
    t = torch.linspace(t_hi, t_lo, steps, dtype=torch.float64)
    sig = noise_range.t_to_sigma(t)
    return torch.cat([sig, sig.new_zeros(1)])


def get_sigmas(
    noise_range: Objective,
    steps: int,
    schedule: str = "native",
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
) -> torch.Tensor:
    """``steps + 1`` descending float64 sigmas ending in 0 (``steps`` model evaluations for
    first-order samplers). ``noise_range`` is the denoiser's objective: it gives the default
    range, its own time (``uniform``) and what ``native`` means."""
    if steps < 1:
        raise SamplingError(f"steps must be >= 1, got {steps}")
    if schedule not in SCHEDULES:
        raise SamplingError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    lo = noise_range.sigma_min if sigma_min is None else sigma_min
    hi = noise_range.sigma_max if sigma_max is None else sigma_max
    if not 0 < lo < hi:
        raise SamplingError(
            f"need 0 < sigma_min < sigma_max, got {lo} and {hi} (sigma_min / "
            "sigma_max default to the objective's noise range)"
        )
    if schedule == "native":
        own = noise_range.native_sigmas(steps) if sigma_min is None and sigma_max is None else None
        if own is not None:
            return own
        schedule = noise_range.native_schedule
    if schedule == "karras":
        return karras_sigmas(steps, lo, hi, rho)
    return uniform_sigmas(steps, noise_range, lo, hi)


# -------------------------------------------------------------------------------- guidance


def cfg_combine(
    cond: torch.Tensor, uncond: torch.Tensor, scale, channels: int | None = None
) -> torch.Tensor:
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

    def __init__(
        self,
        denoiser: Denoiser,
        class_labels: torch.Tensor | None,
        cond: dict,
        cfg_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        cfg_channels: int | None = None,
    ):
        self.denoiser, self.labels, self.cond = denoiser, class_labels, cond
        self.scale, self.interval, self.channels = cfg_scale, guidance_interval, cfg_channels
        self.evaluations = 0
        if cfg_scale != 1.0:
            if class_labels is None:
                raise SamplingError("classifier-free guidance (cfg_scale != 1) needs class_labels")
            if denoiser.null_class is None:
                raise SamplingError(
                    "classifier-free guidance needs a model with a null class "
                    "(conditioning.classes.null_class)"
                )
            inside = denoiser.cfg_channels
            if denoiser.guides_inside and cfg_channels != inside:
                raise SamplingError(
                    f"this graph was exported with CFG on "
                    f"{inside or 'all'} channels; sample with cfg_channels="
                    f"{inside} (got {cfg_channels}) or re-export it"
                )

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
        # guidance on: __init__ refused cfg_scale != 1 without labels or a null class
        assert self.labels is not None and self.denoiser.null_class is not None
        if self.denoiser.guides_inside:
            return self.denoiser.guided(x, s, self.labels, self.scale, **self.cond)
        null = torch.full_like(self.labels, self.denoiser.null_class)
        cond = {k: torch.cat([v, v]) for k, v in self.cond.items()}
        x0, var = self.denoiser.denoise(
            torch.cat([x, x]), torch.cat([s, s]), torch.cat([self.labels, null]), **cond
        )
        c, u = x0.chunk(2)
        g = cfg_combine(c, u, self.scale, self.channels)
        return g, (var.chunk(2)[0] if var is not None else None)


# -------------------------------------------------------------------------------- the loop


def sample(
    denoiser: Denoiser,
    shape,
    sampling: Sampling | None = None,
    *,
    class_labels=None,
    cond: dict | None = None,
    device="cpu",
    progress: bool = False,
    sigmas: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
    noise_sampler: Callable[[float, float], torch.Tensor] | None = None,
    progress_label: str | None = None,
    **settings,
) -> torch.Tensor:
    """Draw samples of ``shape`` ``(B, C, H, W)`` with the settings ``sampling`` (a
    :class:`ditkit.spec.sampling.Sampling`; default: its defaults): returns the final ``x0``
    (no clamping). ``settings`` are :class:`Sampling` fields given one by one
    (``sample(d, shape, steps=20, sampler="heun")``) and replace those of ``sampling``; they
    are validated by the spec (:class:`ditkit.spec.SpecError` names the field).

    The rest is what one call samples, not how: ``class_labels`` (one label or one per
    sample), ``cond`` (extra conditioning tensors), ``device``, ``dtype``, ``progress`` (and
    ``progress_label``, shown in the bar after the sampler's name).

    Reproducible: all randomness (the initial noise and any per-step noise) comes from one CPU
    ``torch.Generator`` seeded with ``sampling.seed``, so torch and ORT models and CPU and GPU
    runs see the same noise. ``noise`` overrides the initial unit Gaussian (scaled by the first
    sigma). ``sigmas`` overrides the schedule (descending, ending in 0). ``noise_sampler(sigma,
    sigma_next)`` replaces the stochastic samplers' per-step noise (default: a Brownian path in
    sigma from the same generator, :class:`BrownianNoise`). ``dpm_adaptive`` picks its own
    steps between the first and the last non-zero sigma (``steps`` only sets that range's
    schedule) and, like k-diffusion's, returns the sample at the last non-zero sigma."""
    sampling = Sampling.of(sampling, **settings)
    if sampling.stages:
        raise SamplingError(
            "stages: this is one sampling pass; multi-stage settings run "
            "through ditkit.runtime.multistage.sample_staged"
        )
    sampler, steps, eta = sampling.sampler, sampling.steps, sampling.eta
    sigma_min = sampling.sigma_min
    _check_arguments(shape, steps, sigmas)
    device = check_device(device)
    gen = torch.Generator().manual_seed(sampling.seed)
    if sigmas is None:
        sigmas = get_sigmas(
            denoiser.noise_range,
            steps,
            sampling.schedule,
            sigma_min=sigma_min,
            sigma_max=sampling.sigma_max,
            rho=sampling.rho,
        )
    sig = [float(v) for v in sigmas]
    if any(a <= b for a, b in zip(sig, sig[1:])) or sig[-1] != 0:
        raise SamplingError("sigmas must be strictly descending and end with 0")
    b = shape[0]
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels, dtype=torch.long).to(device)
        if class_labels.ndim == 0:
            class_labels = class_labels.expand(b)
        if class_labels.shape != (b,):
            raise SamplingError(
                f"class_labels must be one label or {b} labels, got {tuple(class_labels.shape)}"
            )
    cond = {k: torch.as_tensor(v).to(device=device, dtype=dtype) for k, v in (cond or {}).items()}
    model = Guided(
        denoiser,
        class_labels,
        cond,
        sampling.cfg_scale,
        sampling.cfg_interval,
        sampling.cfg_channels,
    )

    def randn() -> torch.Tensor:
        return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device, dtype)

    x = (noise.to(device, dtype) if noise is not None else randn()) * sig[0]
    state: dict = {"eta": eta, "noise": noise_sampler or BrownianNoise(randn)}
    if sampler == "dpm_adaptive":
        with torch.no_grad():
            lo = (
                sig[-2]
                if len(sig) > 2
                else (sigma_min if sigma_min is not None else denoiser.noise_range.sigma_min)
            )
            calls = {"n": 0}

            def finite_model(x, sigma):  # a NaN would stall its step-size control forever
                calls["n"] += 1
                out = model(x, sigma)
                if not bool(torch.isfinite(out[0]).all()):
                    raise SamplingError(
                        f"sampling produced NaN/inf at model evaluation {calls['n']} "
                        f"(dpm_adaptive, sigma {float(sigma):.6g}); the model or its weights "
                        "give non-finite outputs at this noise level (check the checkpoint, "
                        "lower --cfg, or sample in fp32)"
                    )
                return out

            return sample_dpm_adaptive(
                finite_model, x, sig[0], lo, state["noise"], eta=0.0 if eta is None else eta
            )
    step = _STEPPERS[sampler]
    n = len(sig) - 1
    bar = _progress(
        n, progress, sampler if progress_label is None else f"{sampler}, {progress_label}"
    )
    with torch.no_grad():
        for i in range(n):
            x = step(model, x, sig[i], sig[i + 1], randn, state)
            if not bool(torch.isfinite(x).all()):  # stop at once rather than write garbage
                bar.close()
                raise SamplingError(
                    f"sampling produced NaN/inf at step {i + 1} of {n} ({sampler}, sigma "
                    f"{sig[i]:.6g} -> {sig[i + 1]:.6g}); the model or its weights give "
                    "non-finite outputs at this noise level (check the checkpoint, lower "
                    "--cfg, or sample in fp32)"
                )
            if callback is not None:
                callback(i, sig[i + 1], x)
            bar.update(1)
    bar.close()
    return x


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device`` by the one rule of every command
    (:func:`ditkit.device.pick_device`: ``cuda`` is ``cuda:<LOCAL_RANK>``, ``auto`` the
    GPU when there is one); asking for CUDA where there is none is a clear error."""

    if str(device) == "meta":  # shape-only runs
        return torch.device("meta")
    try:
        return pick_device(str(device))
    except DeviceError as err:
        raise SamplingError(str(err)) from None


def _check_arguments(shape, steps: int, sigmas) -> None:
    """Arguments that would silently give garbage or exhaust memory are refused up front."""

    if shape[0] < 1:
        raise SamplingError(f"number of samples {shape[0]}: use at least 1")
    if sigmas is None:  # steps >= 1 and the other settings: checked by the Sampling spec
        if steps > MAX_STEPS and limits_enabled():
            raise SamplingError(
                f"steps {steps}: more than {MAX_STEPS:,} noise levels; {OVERRIDE_HINT}"
            )


def _progress(total: int, enabled: bool, desc: str):
    if enabled:
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
    mean = (
        math.sqrt(ab_n) * beta / (1 - ab) * x0
        + math.sqrt(1 - beta) * (1 - ab_n) / (1 - ab) * math.sqrt(ab) * x
    )
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
        x = x + state["noise"](s, s_next) * s_next * math.sqrt(-math.expm1(-2 * h * eta))
    state.update(x0_1=x0, x0_2=x0_1, h_1=h, h_2=h_1)
    return x


# -------------------------------------------------------------------------------- noise
# The stochastic steppers take their noise from ``state["noise"](sigma, sigma_next)``: a unit
# Gaussian tensor standing for the Brownian increment between the two noise levels (k-diffusion's
# ``noise_sampler`` contract). The default is a Brownian path in sigma built from the seeded
# generator, so a stepper that asks for two overlapping intervals (DPM++ SDE's half step, then
# the whole step) gets correlated noise as k-diffusion's Brownian tree gives it, and one that
# asks once per step gets independent draws.


class BrownianNoise:
    """``noise(a, b) = (W(b) - W(a)) / sqrt(|a - b|)`` of one Brownian path ``W`` in sigma,
    drawn lazily from ``randn`` as sigma decreases (``W(sigma_0) = 0``). Queries must go down:
    ``b`` at or below every point seen so far except ``a``, which must already be on the path
    (or be the first point)."""

    def __init__(self, randn: Callable[[], torch.Tensor]):
        self.randn = randn
        self.points: dict[float, torch.Tensor | float] = {}
        self.lowest: float | None = None

    def _extend(self, b: float) -> None:
        if self.lowest is None:
            self.points[b], self.lowest = 0.0, b
            return
        if b < self.lowest:
            self.points[b] = self.points[self.lowest] + math.sqrt(self.lowest - b) * self.randn()
            self.lowest = b
        elif b not in self.points:
            raise ValueError(f"Brownian noise queried at sigma {b} between points already drawn")

    def __call__(self, a: float, b: float) -> torch.Tensor:
        a, b = float(a), float(b)
        if self.lowest is None:
            self._extend(a)
        if a not in self.points:
            raise ValueError(f"Brownian noise queried from sigma {a}, not on the path")
        if a == self.lowest and b < a:  # one new increment: return the draw itself
            z = self.randn()
            self.points[b] = self.points[a] + math.sqrt(a - b) * z
            self.lowest = b
            return z
        self._extend(b)
        # only the first point is a float (0.0), and a == b divides by zero: a tensor
        return cast(torch.Tensor, (self.points[b] - self.points[a]) / math.sqrt(abs(a - b)))


# -------------------------------------------------------------------------------- k-diffusion
# Each stepper below is one step of the k-diffusion sampler of the same name
# (``k_diffusion/sampling.py``), written for ditkit's VE denoiser; ``eta`` defaults to 1 for
# the ancestral / SDE ones, as there.


def _eta(state, default: float = 1.0) -> float:
    return default if state["eta"] is None else state["eta"]


def _euler_ancestral(model, x, s, s_next, randn, state):
    x0, _ = model(x, s)
    down, up = ancestral_split(s, s_next, _eta(state))
    x = x + (x - x0) / s * (down - s)
    return x + state["noise"](s, s_next) * up if s_next > 0 else x


def _dpm_2(model, x, s, s_next, randn, state):
    """DPM-Solver-2 in Karras' sigma ODE: Euler to the log-midpoint, its slope for the step."""
    x0, _ = model(x, s)
    d = (x - x0) / s
    if s_next == 0:
        return x - d * s
    mid = math.exp((math.log(s) + math.log(s_next)) / 2)
    x_mid = x + d * (mid - s)
    x0_mid, _ = model(x_mid, mid)
    return x + (x_mid - x0_mid) / mid * (s_next - s)


def _dpm_2_ancestral(model, x, s, s_next, randn, state):
    x0, _ = model(x, s)
    down, up = ancestral_split(s, s_next, _eta(state))
    d = (x - x0) / s
    if down == 0:
        return x + d * (down - s)
    mid = math.exp((math.log(s) + math.log(down)) / 2)
    x_mid = x + d * (mid - s)
    x0_mid, _ = model(x_mid, mid)
    x = x + (x_mid - x0_mid) / mid * (down - s)
    return x + state["noise"](s, s_next) * up


def lms_coefficients(sig: list[float], i: int, order: int) -> list[float]:
    """Adams-Bashforth weights of the last ``order`` derivatives for the step ``sig[i] ->
    sig[i+1]``: the integral over that step of each Lagrange basis polynomial through
    ``sig[i], sig[i-1], ...`` (k-diffusion integrates them numerically; this is exact, by
    Gauss-Legendre quadrature of the degree-``order-1`` polynomial)."""
    nodes, weights = _gauss_legendre(order)
    a, b = sig[i], sig[i + 1]
    out = []
    for j in range(order):
        total = 0.0
        for z, w in zip(nodes, weights):
            tau = (a + b) / 2 + (b - a) / 2 * z
            prod = 1.0
            for k in range(order):
                if k != j:
                    prod *= (tau - sig[i - k]) / (sig[i - j] - sig[i - k])
            total += w * prod
        out.append(total * (b - a) / 2)
    return out


def _gauss_legendre(n: int) -> tuple[list[float], list[float]]:

    z, w = np.polynomial.legendre.leggauss(max(n, 1))
    return z.tolist(), w.tolist()


def _lms(model, x, s, s_next, randn, state):
    order = 4
    x0, _ = model(x, s)
    ds = state.setdefault("ds", [])
    sig = state.setdefault("sigmas", [])
    ds.append((x - x0) / s)
    sig.append(s)
    if len(ds) > order:
        ds.pop(0)
    cur = len(ds)
    pts = sig[-cur:] + [s_next]  # oldest .. current, next
    coeffs = lms_coefficients(pts, cur - 1, cur)
    return x + sum(c * d for c, d in zip(coeffs, reversed(ds)))


def _dpmpp_2s_ancestral(model, x, s, s_next, randn, state):
    x0, _ = model(x, s)
    down, up = ancestral_split(s, s_next, _eta(state))
    if down == 0:
        x = x + (x - x0) / s * (down - s)
    else:
        h = math.log(s) - math.log(down)
        mid = s * math.exp(-h / 2)
        x_mid = (mid / s) * x - math.expm1(-h / 2) * x0
        x0_mid, _ = model(x_mid, mid)
        x = (down / s) * x - math.expm1(-h) * x0_mid
    return x + state["noise"](s, s_next) * up if s_next > 0 else x


def _dpmpp_sde(model, x, s, s_next, randn, state, r: float = 0.5):
    """DPM-Solver++ (stochastic): an ancestral step to the point ``r`` of the way in log sigma,
    then the whole step with the two x0 estimates mixed; the two noises are increments of one
    Brownian path (k-diffusion draws them from a Brownian tree)."""
    eta = _eta(state)
    x0, _ = model(x, s)
    if s_next == 0:
        return x - (x - x0) / s * s
    h = math.log(s) - math.log(s_next)
    s_mid = s * math.exp(-r * h)
    down, up = ancestral_split(s, s_mid, eta)
    x_mid = (down / s) * x - math.expm1(math.log(down) - math.log(s)) * x0
    x_mid = x_mid + state["noise"](s, s_mid) * up
    x0_mid, _ = model(x_mid, s_mid)
    fac = 1 / (2 * r)
    mixed = (1 - fac) * x0 + fac * x0_mid
    down, up = ancestral_split(s, s_next, eta)
    x = (down / s) * x - math.expm1(math.log(down) - math.log(s)) * mixed
    return x + state["noise"](s, s_next) * up


def _dpmpp_2m_sde(model, x, s, s_next, randn, state):
    """DPM-Solver++(2M) SDE, midpoint variant (k-diffusion's default ``solver_type``)."""
    eta = _eta(state)
    x0, _ = model(x, s)
    if s_next == 0:
        out = x0
    else:
        h = math.log(s) - math.log(s_next)
        eh = eta * h
        out = (s_next / s) * math.exp(-eh) * x - math.expm1(-h - eh) * x0
        prev = state.get("x0")
        if prev is not None:
            r = state["h"] / h
            out = out - 0.5 * math.expm1(-h - eh) / r * (x0 - prev)
        if eta:
            out = out + state["noise"](s, s_next) * s_next * math.sqrt(-math.expm1(-2 * eh))
        state["h"] = h
    state["x0"] = x0
    return out


# -------------------------------------------------------------------------------- UniPC


def _unipc(model, x, s, s_next, randn, state, order: int = 2):
    """diffusers' ``UniPCMultistepScheduler`` with its defaults (``solver_order=2``,
    ``predict_x0``, ``solver_type="bh2"``, ``lower_order_final``, corrector on every step but
    the first), in the VE convention: the data-prediction updates do not depend on the VP
    scale, so ``alpha = 1`` and ``lambda = -log sigma``.

    Each step first corrects the previous predictor's result with the new x0 estimate (UniC;
    the model is not evaluated again), then predicts the next sample (UniP)."""
    x0, _ = model(x, s)
    hist_x0, hist_s = state.setdefault("x0s", []), state.setdefault("sigmas", [])
    if hist_x0 and "last" in state:  # UniC on the sample predicted in the last step
        x = _unic(state["last"], hist_s, hist_x0, s, x0, state["order"])
    hist_x0.append(x0)
    hist_s.append(s)
    del hist_x0[:-order], hist_s[:-order]
    this = min(order, len(hist_x0))
    if s_next == 0:  # lower_order_final: the last step is first order, which returns x0
        this = 1
    state["order"], state["last"] = this, x
    return _unip(x, hist_s, hist_x0, s_next, this)


def _unipc_b(hh: float, order: int) -> tuple[float, list[float]]:
    """``(B(h), b)`` of UniPC's bh2 variant: ``B = e^hh - 1`` and ``b_i = (i-1)! phi_i(hh) /
    B`` with ``phi_1 = (e^hh - 1) / hh - 1``, ``phi_{k+1} = phi_k / hh - 1 / (k+1)!``."""
    b_h = math.expm1(hh)
    phi = math.expm1(hh) / hh - 1
    fact, out = 1, []
    for i in range(1, order + 1):
        out.append(phi * fact / b_h)
        fact *= i + 1
        phi = phi / hh - 1 / fact
    return b_h, out


def _unip(x, hist_s, hist_x0, s_next, order):
    s0, m0 = hist_s[-1], hist_x0[-1]
    if s_next == 0:
        return m0
    h = math.log(s0) - math.log(s_next)  # lambda_t - lambda_s0
    hh = -h
    base = (s_next / s0) * x - math.expm1(hh) * m0
    if order == 1:
        return base
    rks = [(math.log(s0) - math.log(hist_s[-(i + 1)])) / h for i in range(1, order)]
    d1s = [(hist_x0[-(i + 1)] - m0) / rk for i, rk in zip(range(1, order), rks)]
    b_h, b = _unipc_b(hh, order)
    if order == 2:
        rhos = [0.5]
    else:
        rhos = _solve([[rk ** (p - 1) for rk in rks] for p in range(1, order)], b[: order - 1])
    return base - b_h * sum(rho * d for rho, d in zip(rhos, d1s))


def _unic(x_prev, hist_s, hist_x0, s, x0_t, order):
    """Correct ``x`` at ``s`` (predicted from ``x_prev`` at ``hist_s[-1]``) with ``x0_t``."""
    s0, m0 = hist_s[-1], hist_x0[-1]
    h = math.log(s0) - math.log(s)
    hh = -h
    base = (s / s0) * x_prev - math.expm1(hh) * m0
    rks = [(math.log(s0) - math.log(hist_s[-(i + 1)])) / h for i in range(1, order)] + [1.0]
    d1s = [(hist_x0[-(i + 1)] - m0) / rk for i, rk in zip(range(1, order), rks)]
    b_h, b = _unipc_b(hh, order)
    if order == 1:
        rhos = [0.5]
    else:
        rhos = _solve([[rk ** (p - 1) for rk in rks] for p in range(1, order + 1)], b)
    corr = sum(rho * d for rho, d in zip(rhos[:-1], d1s))
    return base - b_h * (corr + rhos[-1] * (x0_t - m0))


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    return torch.linalg.solve(
        torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    ).tolist()


# -------------------------------------------------------------------------------- DPM adaptive


def sample_dpm_adaptive(
    model,
    x,
    sigma_max: float,
    sigma_min: float,
    noise,
    *,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
) -> torch.Tensor:
    """k-diffusion's ``sample_dpm_adaptive`` (DPM-Solver-12 / 23 with a PID step-size
    controller, in ``t = -log sigma``) from ``sigma_max`` down to ``sigma_min``; like it, it
    returns the sample *at* ``sigma_min`` (no final denoising). ``model(x, sigma) -> (x0, _)``,
    ``noise(sigma, sigma_next)`` as for the other samplers. The step size is one for the whole
    batch (the error norm runs over all of it)."""
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order}")

    def eps_at(cache, key, x, t):
        if key not in cache:
            sig = math.exp(-t)
            cache[key] = (x - model(x, sig)[0]) / sig
        return cache[key]

    def step1(cache, x, t, tn):
        h = tn - t
        return x - math.exp(-tn) * math.expm1(h) * eps_at(cache, "e", x, t)

    def step2(cache, x, t, tn, r1=0.5):
        h = tn - t
        e = eps_at(cache, "e", x, t)
        s1 = t + r1 * h
        u1 = x - math.exp(-s1) * math.expm1(r1 * h) * e
        e1 = eps_at(cache, "e1", u1, s1)
        return (
            x
            - math.exp(-tn) * math.expm1(h) * e
            - math.exp(-tn) / (2 * r1) * math.expm1(h) * (e1 - e)
        )

    def step3(cache, x, t, tn, r1=1 / 3, r2=2 / 3):
        h = tn - t
        e = eps_at(cache, "e", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - math.exp(-s1) * math.expm1(r1 * h) * e
        e1 = eps_at(cache, "e1", u1, s1)
        u2 = (
            x
            - math.exp(-s2) * math.expm1(r2 * h) * e
            - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - e)
        )
        e2 = eps_at(cache, "e2", u2, s2)
        return (
            x
            - math.exp(-tn) * math.expm1(h) * e
            - math.exp(-tn) / r2 * (math.expm1(h) / h - 1) * (e2 - e)
        )

    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    b1, b2, b3 = ((pcoeff + icoeff + dcoeff), -(pcoeff + 2 * dcoeff), dcoeff)
    ctrl_order = 1.5 if eta else order
    b1, b2, b3 = b1 / ctrl_order, b2 / ctrl_order, b3 / ctrl_order
    errs: list[float] = []
    h = abs(h_init)
    s, x_prev = t_start, x
    while s < t_end - 1e-5:
        cache: dict = {}
        t = min(t_end, s + h)
        if eta:
            down, _ = ancestral_split(math.exp(-s), math.exp(-t), eta)
            t_ = min(t_end, -math.log(down))
            up = math.sqrt(max(math.exp(-2 * t) - math.exp(-2 * t_), 0.0))
        else:
            t_, up = t, 0.0
        if order == 2:
            x_low, x_high = step1(cache, x, s, t_), step2(cache, x, s, t_)
        else:
            x_low, x_high = step2(cache, x, s, t_, r1=1 / 3), step3(cache, x, s, t_)
        delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
        error = float(torch.linalg.norm((x_low - x_high) / delta)) / x.numel() ** 0.5
        inv = 1 / (error + 1e-8)
        if not errs:
            errs = [inv, inv, inv]
        errs[0] = inv
        factor = 1 + math.atan(errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3 - 1)
        if factor >= accept_safety:
            errs[2], errs[1] = errs[1], errs[0]
            x_prev = x_low
            x = x_high + (noise(math.exp(-s), math.exp(-t)) * up if up else 0)
            s = t
        h *= factor
    return x


_STEPPERS = {
    "euler": _euler,
    "heun": _heun,
    "ddim": _ddim,
    "ddpm": _ddpm,
    "dpmpp_2m": _dpmpp_2m,
    "dpmpp_3m_sde": _dpmpp_3m_sde,
    "euler_ancestral": _euler_ancestral,
    "dpm_2": _dpm_2,
    "dpm_2_ancestral": _dpm_2_ancestral,
    "lms": _lms,
    "dpmpp_2s_ancestral": _dpmpp_2s_ancestral,
    "dpmpp_sde": _dpmpp_sde,
    "dpmpp_2m_sde": _dpmpp_2m_sde,
    "unipc": _unipc,
}
