"""The k-diffusion samplers and UniPC, each against its published update rule.

The reference loops below are written from k-diffusion's ``k_diffusion/sampling.py``
(``sample_euler_ancestral``, ``sample_dpm_2``, ``sample_dpm_2_ancestral``, ``sample_lms`` with
``linear_multistep_coeff``, ``sample_dpmpp_2s_ancestral``, ``sample_dpmpp_sde``,
``sample_dpmpp_2m_sde`` and ``DPMSolver.dpm_solver_adaptive`` with ``PIDStepSizeController``);
UniPC is diffusers' own ``UniPCMultistepScheduler``. All run on the closed-form Gaussian
denoiser of ``test_samplers.py`` in float64, with the same noise: a noise function of the two
noise levels (k-diffusion's ``noise_sampler(sigma, sigma_next)`` contract), so both sides see
the same noise however often they ask.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from ditkit import spec as S
from ditkit.runtime.denoiser import NoiseRange
from ditkit.runtime.samplers import (
    BrownianNoise,
    Guided,
    karras_sigmas,
    sample,
    sample_dpm_adaptive,
)
from tests.runtime.test_samplers import MU, SD, GaussianDenoiser, exact_ode

SHAPE = (64, 2, 2, 2)


def fixed_noise(a, b):
    """Unit Gaussian noise determined by the pair of noise levels."""
    seed = (int(round(float(a) * 1e6)) * 1_000_003 + int(round(float(b) * 1e6))) % (2**62)
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def kd_model(d):
    def model(x, sigma):
        return d.denoise(x, sigma * x.new_ones([x.shape[0]]))[0]

    return model


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


# ---------------------------------------------------------------- k-diffusion's loops


def ref_euler_ancestral(model, x, sigmas, noise, eta=1.0):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def ref_dpm_2(model, x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = math.exp(
                math.log(sigmas[i]) + 0.5 * (math.log(sigmas[i + 1]) - math.log(sigmas[i]))
            )
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


def ref_dpm_2_ancestral(model, x, sigmas, noise, eta=1.0):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = math.exp(
                math.log(sigmas[i]) + 0.5 * (math.log(sigma_down) - math.log(sigmas[i]))
            )
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def linear_multistep_coeff(order, t, i, j):
    def fn(tau):
        prod = 1.0
        for k in range(order):
            if j == k:
                continue
            prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return integrate.quad(fn, t[i], t[i + 1], epsrel=1e-12, epsabs=0)[0]


def ref_lms(model, x, sigmas, noise, order=4):
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur_order, sigmas, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def ref_dpmpp_2s_ancestral(model, x, sigmas, noise, eta=1.0):
    sigma_fn = lambda t: math.exp(-t)  # noqa: E731
    t_fn = lambda sigma: -math.log(sigma)  # noqa: E731
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - math.expm1(-h * r) * denoised
            denoised_2 = model(x_2, sigma_fn(s))
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - math.expm1(-h) * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def ref_dpmpp_sde(model, x, sigmas, noise, eta=1.0, r=1 / 2):
    sigma_fn = lambda t: math.exp(-t)  # noqa: E731
    t_fn = lambda sigma: -math.log(sigma)  # noqa: E731
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            sd, su = get_ancestral_step(sigma_fn(t), sigma_fn(s), eta)
            s_ = t_fn(sd)
            x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - math.expm1(t - s_) * denoised
            x_2 = x_2 + noise(sigma_fn(t), sigma_fn(s)) * su
            denoised_2 = model(x_2, sigma_fn(s))
            sd, su = get_ancestral_step(sigma_fn(t), sigma_fn(t_next), eta)
            t_next_ = t_fn(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (sigma_fn(t_next_) / sigma_fn(t)) * x - math.expm1(t - t_next_) * denoised_d
            x = x + noise(sigma_fn(t), sigma_fn(t_next)) * su
    return x


def ref_dpmpp_2m_sde(model, x, sigmas, noise, eta=1.0):
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
            h = s - t
            eta_h = eta * h
            x = (
                sigmas[i + 1] / sigmas[i] * math.exp(-eta_h) * x
                + (-math.expm1(-h - eta_h)) * denoised
            )
            if old_denoised is not None:
                r = h_last / h
                x = x + 0.5 * (-math.expm1(-h - eta_h)) * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * math.sqrt(
                    -math.expm1(-2 * eta_h)
                )
            h_last = h
        old_denoised = denoised
    return x


class RefDPMSolver:
    """k-diffusion's ``DPMSolver`` (eps cache, steps 1-3) and ``PIDStepSizeController``."""

    def __init__(self, model):
        self.model = model

    def eps(self, cache, key, x, t):
        if key in cache:
            return cache[key], cache
        sigma = math.exp(-t)
        e = (x - self.model(x, sigma)) / sigma
        return e, {key: e, **cache}

    def step1(self, x, t, t_next, cache):
        h = t_next - t
        e, cache = self.eps(cache, "eps", x, t)
        return x - math.exp(-t_next) * math.expm1(h) * e, cache

    def step2(self, x, t, t_next, r1=1 / 2, cache=None):
        h = t_next - t
        e, cache = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - math.exp(-s1) * math.expm1(r1 * h) * e
        e_r1, cache = self.eps(cache, "eps_r1", u1, s1)
        x_2 = (
            x
            - math.exp(-t_next) * math.expm1(h) * e
            - math.exp(-t_next) / (2 * r1) * math.expm1(h) * (e_r1 - e)
        )
        return x_2, cache

    def step3(self, x, t, t_next, r1=1 / 3, r2=2 / 3, cache=None):
        h = t_next - t
        e, cache = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - math.exp(-s1) * math.expm1(r1 * h) * e
        e_r1, cache = self.eps(cache, "eps_r1", u1, s1)
        u2 = (
            x
            - math.exp(-s2) * math.expm1(r2 * h) * e
            - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e_r1 - e)
        )
        e_r2, cache = self.eps(cache, "eps_r2", u2, s2)
        x_3 = (
            x
            - math.exp(-t_next) * math.expm1(h) * e
            - math.exp(-t_next) / r2 * (math.expm1(h) / h - 1) * (e_r2 - e)
        )
        return x_3, cache

    def adaptive(
        self,
        x,
        t_start,
        t_end,
        noise,
        order=3,
        rtol=0.05,
        atol=0.0078,
        h_init=0.05,
        pcoeff=0.0,
        icoeff=1.0,
        dcoeff=0.0,
        accept_safety=0.81,
        eta=0.0,
    ):
        ctrl_order = 1.5 if eta else order
        b1 = (pcoeff + icoeff + dcoeff) / ctrl_order
        b2 = -(pcoeff + 2 * dcoeff) / ctrl_order
        b3 = dcoeff / ctrl_order
        errs, h = [], h_init
        s, x_prev = t_start, x
        n_accept = 0
        while s < t_end - 1e-5:
            cache = {}
            t = min(t_end, s + h)
            if eta:
                sd, su = get_ancestral_step(math.exp(-s), math.exp(-t), eta)
                t_ = min(t_end, -math.log(sd))
                su = (math.exp(-t) ** 2 - math.exp(-t_) ** 2) ** 0.5
            else:
                t_, su = t, 0.0
            if order == 2:
                x_low, cache = self.step1(x, s, t_, cache)
                x_high, cache = self.step2(x, s, t_, cache=cache)
            else:
                x_low, cache = self.step2(x, s, t_, r1=1 / 3, cache=cache)
                x_high, cache = self.step3(x, s, t_, cache=cache)
            delta = torch.maximum(
                torch.tensor(atol, dtype=x.dtype), rtol * torch.maximum(x_low.abs(), x_prev.abs())
            )
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            inv_error = 1 / (float(error) + 1e-8)
            if not errs:
                errs = [inv_error, inv_error, inv_error]
            errs[0] = inv_error
            factor = errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3
            factor = 1 + math.atan(factor - 1)
            accept = factor >= accept_safety
            if accept:
                errs[2] = errs[1]
                errs[1] = errs[0]
            h *= factor
            if accept:
                x_prev = x_low
                x = x_high + su * noise(math.exp(-s), math.exp(-t))
                s = t
                n_accept += 1
        return x, n_accept


def ref_euler(model, x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def ref_heun(model, x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
    return x


def ref_dpmpp_2m(model, x, sigmas, noise):
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:  # first branch with t_next = inf: 0 * x + 1 * denoised
            x = denoised
        else:
            t, t_next = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
            h = t_next - t
            if old_denoised is None:
                x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * denoised
            else:
                r = (t - (-math.log(sigmas[i - 1]))) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


def ref_dpmpp_3m_sde(model, x, sigmas, noise, eta=1.0):
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
            h = s - t
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x + (-math.expm1(-h_eta)) * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                x = x + phi_2 * d
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * math.sqrt(
                    -math.expm1(-2 * h * eta)
                )
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


REFERENCES = {
    "euler": ref_euler,
    "heun": ref_heun,
    "dpmpp_2m": ref_dpmpp_2m,
    "dpmpp_3m_sde": ref_dpmpp_3m_sde,
    "euler_ancestral": ref_euler_ancestral,
    "dpm_2": ref_dpm_2,
    "dpm_2_ancestral": ref_dpm_2_ancestral,
    "lms": ref_lms,
    "dpmpp_2s_ancestral": ref_dpmpp_2s_ancestral,
    "dpmpp_sde": ref_dpmpp_sde,
    "dpmpp_2m_sde": ref_dpmpp_2m_sde,
}


CASES = [
    (name, eta, cfg)
    for name in sorted(REFERENCES)
    for cfg in (1.0, 3.0)
    for eta in ((None,) if name in ("euler", "heun", "dpmpp_2m", "dpm_2", "lms") else (None, 0.5))
]


@pytest.mark.parametrize("name,eta,cfg", CASES)
def test_sampler_equals_k_diffusions_update_rule(name, eta, cfg):
    d = GaussianDenoiser()
    labels = torch.arange(SHAPE[0]) % 4 if cfg != 1.0 else None
    sigmas = karras_sigmas(10, 0.002, 80.0)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = sample(
        d,
        SHAPE,
        steps=10,
        sampler=name,
        sigmas=sigmas,
        noise=x_T,
        eta=eta,
        dtype=torch.float64,
        noise_sampler=fixed_noise,
        class_labels=labels,
        cfg_scale=cfg,
    )

    def model(x, sigma):  # classifier-free guidance as k-diffusion's CFG wrappers do it
        s = sigma * x.new_ones([x.shape[0]])
        if labels is None:
            return d.denoise(x, s)[0]
        c = d.denoise(x, s, labels)[0]
        u = d.denoise(x, s, torch.full_like(labels, 10))[0]
        return u + cfg * (c - u)

    kw = {} if eta is None else {"eta": eta}
    sig = [float(v) for v in sigmas]
    want = REFERENCES[name](model, x_T * sig[0], sig, fixed_noise, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_adaptive_equals_k_diffusions_dpm_solver_adaptive(eta):
    d = GaussianDenoiser()
    sigmas = karras_sigmas(10, 0.01, 80.0)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = sample(
        d,
        SHAPE,
        steps=10,
        sampler="dpm_adaptive",
        sigmas=sigmas,
        noise=x_T,
        eta=eta,
        dtype=torch.float64,
        noise_sampler=fixed_noise,
    )
    solver = RefDPMSolver(kd_model(d))
    want, accepted = solver.adaptive(
        x_T * 80.0, -math.log(80.0), -math.log(0.01), fixed_noise, eta=eta
    )
    assert accepted > 3
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- UniPC = diffusers


@pytest.mark.parametrize("steps", [5, 12])
def test_unipc_equals_diffusers_unipc_multistep_scheduler(steps):
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="sample",
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
    )
    sched.set_timesteps(steps)
    sig = sched.sigmas.double()  # VE sigmas of the chosen timesteps, then 0
    assert float(sig[-1]) == 0 and len(sig) == steps + 1
    d = GaussianDenoiser(S.DDPMObjective())
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # diffusers works on the VP sample x_vp = x_ve / sqrt(1 + sigma^2); its model predicts x0
    x = x_T * float(sig[0]) / math.sqrt(1 + float(sig[0]) ** 2)
    for i, t in enumerate(sched.timesteps):
        s = float(sig[i])
        x0 = d.denoise(x * math.sqrt(1 + s**2), torch.full((SHAPE[0],), s, dtype=torch.float64))[0]
        x = sched.step(x0, t, x).prev_sample
    got = sample(d, SHAPE, steps=steps, sampler="unipc", sigmas=sig, noise=x_T, dtype=torch.float64)
    torch.testing.assert_close(got, x.double(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- sanity on Gaussian data


@pytest.mark.parametrize(
    "sampler,order", [("dpm_2", 2), ("lms", 2), ("unipc", 2), ("dpmpp_2m_sde", 2)]
)
def test_new_deterministic_samplers_converge_to_the_exact_ode(sampler, order):
    d = GaussianDenoiser()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = exact_ode(noise, 80.0)
    eta = 0.0 if sampler == "dpmpp_2m_sde" else None
    errs = [
        float(
            (
                sample(
                    d,
                    SHAPE,
                    steps=n,
                    sampler=sampler,
                    noise=noise,
                    eta=eta,
                    dtype=torch.float64,
                    schedule="karras",
                )
                - exact
            )
            .abs()
            .max()
        )
        for n in (8, 32, 128)
    ]
    assert errs[0] > errs[1] > errs[2] and errs[1] / errs[2] > 3.0, errs
    assert errs[2] < 5e-3, errs


@pytest.mark.parametrize(
    "sampler",
    ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde"],
)
def test_new_stochastic_samplers_reach_the_data_distribution(sampler):
    """(Ancestral steps under-disperse when steps are few; 256 steps bring them within.)"""
    d = GaussianDenoiser()
    x = sample(d, (2048, 2, 2, 2), steps=256, sampler=sampler, seed=0, dtype=torch.float64)
    assert float(x.mean()) == pytest.approx(MU, abs=0.02)
    assert float(x.std()) == pytest.approx(SD, abs=0.03)


def test_dpm_adaptive_error_follows_its_tolerance():
    """The adaptive solver ends at sigma_min (0.002 here) on the exact ODE solution there,
    within what its tolerances allow, spending more evaluations when they are tighter."""
    d = GaussianDenoiser()
    shape = (256, 2, 2, 2)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = MU + (noise * 80.0 - MU) * math.sqrt(SD**2 + 0.002**2) / math.sqrt(SD**2 + 80.0**2)
    errs, nfes = [], []
    for tol in (0.05, 1e-3):
        model = Guided(d, None, {})
        x = sample_dpm_adaptive(
            model, noise * 80.0, 80.0, 0.002, fixed_noise, rtol=tol, atol=tol / 6
        )
        errs.append(float((x - exact).abs().mean()))
        nfes.append(model.evaluations)
    assert errs[1] < errs[0] / 10 and errs[1] < 2e-3, errs
    assert nfes[1] > nfes[0], nfes


def test_brownian_noise_asked_once_per_step_is_the_generators_draws():
    draws = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    it = iter(draws)
    w = BrownianNoise(lambda: next(it))
    got = [w(8.0, 4.0), w(4.0, 1.5), w(1.5, 0.25)]
    assert all(torch.equal(g, d) for g, d in zip(got, draws))


def test_brownian_noise_increments_add_up():
    draws = iter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    w = BrownianNoise(lambda: next(draws))
    a = w(10.0, 6.0)  # W(6) - W(10) over sqrt(4)
    b = w(10.0, 1.0)  # extends the same path to 1: shares the first increment
    c = w(6.0, 1.0)
    torch.testing.assert_close(b * 3.0, a * 2.0 + c * math.sqrt(5.0))
    with pytest.raises(ValueError, match="between points"):
        w(1.0, 3.0)


def test_sampler_sigma_range_comes_from_the_objective():
    obj = S.EDMObjective(
        sigma_min=0.01, sigma_max=160.0, sigma_sampling=S.CosineInterpolatedSigma()
    )
    rng = NoiseRange.of(obj)
    assert (rng.sigma_min, rng.sigma_max) == (0.01, 160.0)
    rng = NoiseRange.of(S.EDMObjective(sigma_sampling=S.CosineInterpolatedSigma()))
    assert (rng.sigma_min, rng.sigma_max) == (1e-3, 1e3)
    np.testing.assert_allclose(karras_sigmas(3, 0.01, 160.0)[[0, 2]].numpy(), [160.0, 0.01])
