"""Each objective's loss is finite and goes down; the DDPM hybrid loss matches a direct
computation; the sigma densities and weightings have their documented values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build, use_backend
from ditkit.data.datasets import digits_tensor
from ditkit.training.loop import param_groups
from ditkit.training.objectives import (
    DDPMTables,
    DiffusionLoss,
    cosine_interpolated_sigma,
    ddpm_hybrid_loss,
    drop_labels,
    edm_weight,
)

from .conftest import OBJECTIVES, tiny_experiment


def _fixed_loss(loss_fn, model, x0, labels) -> float:
    """The loss on a fixed batch with fixed noise (a fresh generator each time)."""
    total = 0.0
    for seed in range(4):
        gen = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            total += float(loss_fn(model, x0, labels, gen)[0])
    return total / 4


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_loss_finite_and_decreasing(objective):
    exp = tiny_experiment(objective)
    torch.manual_seed(0)
    model = build(exp.model_spec)
    loss_fn = DiffusionLoss(exp.objective, exp.model_spec)
    x, y = digits_tensor((8, 8))
    x0, labels = x[:64], y[:64]
    opt = torch.optim.AdamW(param_groups(model, exp.optimizer), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    with use_backend("masked"):
        before = _fixed_loss(loss_fn, model, x0, labels)
        for step in range(40):
            idx = torch.randint(0, x.shape[0], (32,), generator=gen)
            loss, _ = loss_fn(model, x[idx], y[idx], gen, step)
            assert torch.isfinite(loss), f"{objective}: loss {loss} at step {step}"
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = _fixed_loss(loss_fn, model, x0, labels)
    assert math.isfinite(before) and math.isfinite(after)
    assert after < 0.8 * before, f"{objective}: loss {before:.4f} -> {after:.4f}"


# ---------------------------------------------------------------------------- DDPM hybrid loss


def _hand_ddpm(x0, eps, t, eps_hat, v, cdf):
    """Improved-DDPM's hybrid loss for one scalar pixel, written out with numpy/math."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    x_t = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps
    l_simple = (eps - eps_hat) ** 2
    # true posterior q(x_{t-1} | x_t, x0)
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    beta_tilde_clipped = beta_tilde[1] if t == 0 else beta_tilde[t]
    mu = (
        math.sqrt(abar_prev[t]) * betas[t] / (1 - abar[t]) * x0
        + math.sqrt(alphas[t]) * (1 - abar_prev[t]) / (1 - abar[t]) * x_t
    )
    # the model: mean from eps_hat (via x0_hat), log variance interpolated by v
    x0_hat = (x_t - math.sqrt(1 - abar[t]) * eps_hat) / math.sqrt(abar[t])
    mu_hat = (
        math.sqrt(abar_prev[t]) * betas[t] / (1 - abar[t]) * x0_hat
        + math.sqrt(alphas[t]) * (1 - abar_prev[t]) / (1 - abar[t]) * x_t
    )
    f = (v + 1) / 2
    logvar_hat = f * math.log(betas[t]) + (1 - f) * math.log(beta_tilde_clipped)
    if t > 0:
        logvar = math.log(beta_tilde[t])
        kl = 0.5 * (
            -1
            + logvar_hat
            - logvar
            + math.exp(logvar - logvar_hat)
            + (mu - mu_hat) ** 2 * math.exp(-logvar_hat)
        )
        l_t = kl / math.log(2)
    else:  # decoder: P(x0 in its 1/255-wide bin) under N(mu_hat, var_hat)
        sd = math.exp(0.5 * logvar_hat)
        p = cdf((x0 + 1 / 255 - mu_hat) / sd) - cdf((x0 - 1 / 255 - mu_hat) / sd)
        l_t = -math.log(p) / math.log(2)
    return l_simple + 0.001 * 1000 * l_t, l_simple, l_t, x_t


def _exact_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _tanh_cdf(z):  # ADM's approx_standard_normal_cdf
    return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


@pytest.mark.parametrize("t", [0, 1, 10, 500, 999])
@pytest.mark.parametrize("cdf", ["tanh", "exact"])
def test_ddpm_hybrid_loss_matches_direct_computation(t, cdf):
    obj = S.DDPMObjective(decoder_cdf=cdf)
    tables = DDPMTables(obj)
    x0, eps, eps_hat, v = 0.3, -0.7, -0.5, 0.25
    want, want_simple, want_t, x_t = _hand_ddpm(
        x0, eps, t, eps_hat, v, _tanh_cdf if cdf == "tanh" else _exact_cdf
    )
    f = lambda a: torch.full((1, 1, 1, 1), a, dtype=torch.float64)  # noqa: E731
    out = torch.cat([f(eps_hat), f(v)], dim=1)
    loss, simple, l_t = ddpm_hybrid_loss(tables, obj, f(x0), f(x_t), torch.tensor([t]), f(eps), out)
    assert simple.item() == pytest.approx(want_simple, rel=1e-12)
    assert l_t.item() == pytest.approx(want_t, rel=1e-9)
    assert loss.item() == pytest.approx(want, rel=1e-9)
    assert want_t > 0


def test_ddpm_vlb_gradient_reaches_only_the_variance_channels():
    obj = S.DDPMObjective()
    tables = DDPMTables(obj)
    x0 = torch.full((1, 1, 2, 2), 0.2, dtype=torch.float64)
    noise = torch.full_like(x0, 0.5)
    out = torch.zeros(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([300])
    ab = tables.abar[t].view(1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    loss, simple, vb = ddpm_hybrid_loss(tables, obj, x0, x_t, t, noise, out)
    (grad,) = torch.autograd.grad(vb.sum(), out)
    assert grad[:, :1].abs().max() == 0 and grad[:, 1:].abs().max() > 0


# ---------------------------------------------------------------------------- densities, weights


def test_cosine_interpolated_sigma_spans_the_range_and_shifts_with_resolution():
    u = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    s = cosine_interpolated_sigma(u, 64, 64, 64, 0.5, 1e-3, 1e3)
    assert s[0].item() == pytest.approx(1e3, rel=1e-9)  # u = 0: the high-noise end
    assert s[2].item() == pytest.approx(1e-3, rel=1e-9)
    # unshifted cosine schedule at u = 0.5: sigma_data * tan of the midpoint angle
    t_min, t_max = math.atan(1e-3 / 0.5), math.atan(1e3 / 0.5)
    assert s[1].item() == pytest.approx(0.5 * math.tan((t_min + t_max) / 2), rel=1e-9)
    # a reference size twice the image: log-SNR + 2 ln 2 -> sigma halves at the middle
    s2 = cosine_interpolated_sigma(u, 64, 128, 128, 0.5, 1e-3, 1e3)
    big = cosine_interpolated_sigma(u, 64, 32, 32, 0.5, 1e-3, 1e3)
    assert s2[1].item() < s[1].item() < big[1].item()


def test_edm_weightings():
    s = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    assert torch.allclose(edm_weight("snr", s, 0.5, 5.0), 1 / s**2)
    assert torch.allclose(
        edm_weight("min_snr", s, 0.5, 5.0), torch.tensor([5.0, 4.0, 0.25], dtype=torch.float64)
    )
    assert torch.allclose(edm_weight("soft_min_snr", s, 0.5, 4.0), 1 / (s**2 + 0.25))
    # karras: unit weight on the network output, lambda * c_out^2 == 1
    c_out2 = (s * 0.5) ** 2 / (s**2 + 0.25)
    assert torch.allclose(
        edm_weight("karras", s, 0.5, 5.0) * c_out2, torch.ones(3, dtype=torch.float64)
    )


def test_label_dropout_rate_and_null_class():
    labels = torch.arange(10).repeat(1000)
    gen = torch.Generator().manual_seed(0)
    dropped = drop_labels(labels, 0.1, 10, gen)
    frac = (dropped == 10).double().mean().item()
    assert 0.09 < frac < 0.11
    assert ((dropped == labels) | (dropped == 10)).all()
    assert drop_labels(labels, 0.0, 10, gen).equal(labels)


# ---------------------------------------------------------------------------- v end to end


@pytest.mark.slow
def test_v_objective_trains_checkpoints_and_samples_with_every_sampler(tmp_path):
    """The training loop on a v experiment: the loss goes down, the checkpoint records the
    objective, and the trained model samples with every sampler (the CLI too)."""
    from ditkit.cli import main
    from ditkit.runtime.checkpoint import load_model
    from ditkit.runtime.denoiser import Denoiser
    from ditkit.runtime.samplers import SAMPLERS, sample
    from ditkit.training.loop import train

    exp = tiny_experiment("v", steps=40, preview={"every": 40, "count": 4, "steps": 3})
    assert exp.objective == S.VObjective()
    result = train(exp, tmp_path / "run", progress=False)
    first, last = np.mean(result.losses[:8]), np.mean(result.losses[-8:])
    assert last < 0.9 * first, (first, last)
    model, info = load_model(tmp_path / "run" / "checkpoints" / "step-000040" / "ema.safetensors")
    assert info.objective == S.VObjective()
    d = Denoiser(model, info.objective)
    for sampler in SAMPLERS:
        x = sample(
            d, (2, 1, 8, 8), steps=3, sampler=sampler, seed=1, class_labels=[3, 7], cfg_scale=2.0
        )
        assert x.shape == (2, 1, 8, 8) and bool(torch.isfinite(x).all()), sampler
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                str(tmp_path / "run"),
                "--steps",
                "3",
                "--count",
                "2",
                "--sampler",
                "unipc",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert out.stat().st_size > 0
