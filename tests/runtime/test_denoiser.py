"""Each objective's conversion to ``D(x, sigma) -> x0`` against direct formulas."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ditkit import spec as S
from ditkit.builder import build
from ditkit.runtime.denoiser import (
    Denoiser,
    NoiseRange,
    cosine_alpha_sigma,
    cosine_sigma_to_t,
    cosine_t_to_sigma,
    ddpm_alphas_cumprod,
    ddpm_sigma_to_t,
    ddpm_sigmas,
    ddpm_t_to_sigma,
    edm_scalings,
    flow_sigma_to_t,
    flow_t_to_sigma,
)
from tests.conftest import EXAMPLES


class Recorder(nn.Module):
    """Stands in for a network: returns a fixed output, records what it was given."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out
        self.calls = []

    def forward(self, x, noise_level, class_labels=None, **cond):
        self.calls.append((x.clone(), torch.as_tensor(noise_level).clone(), class_labels, cond))
        return self.out


def _data(c=3, out_c=None, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, 4, 4, generator=g, dtype=torch.float64)
    out = torch.randn(b, out_c or c, 4, 4, generator=g, dtype=torch.float64)
    return x, out


def test_ddpm_schedule_matches_numpy_linear_betas():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(ddpm_alphas_cumprod().numpy(), abar, rtol=1e-12)
    np.testing.assert_allclose(
        ddpm_sigmas(ddpm_alphas_cumprod()).numpy(), np.sqrt((1 - abar) / abar), rtol=1e-12
    )
    assert abar[0] == pytest.approx(1 - 1e-4)


def test_ddpm_sigma_t_maps_exact_on_grid_and_inverse_between():
    sig = ddpm_sigmas(ddpm_alphas_cumprod())
    t = torch.tensor([0.0, 1.0, 17.0, 500.0, 998.0, 999.0], dtype=torch.float64)
    on_grid = sig[t.long()]
    torch.testing.assert_close(ddpm_sigma_to_t(on_grid, sig), t, atol=1e-9, rtol=0)
    torch.testing.assert_close(ddpm_t_to_sigma(t, sig), on_grid, rtol=1e-12, atol=0)
    # halfway in log sigma between steps 10 and 11 is t = 10.5
    mid = (sig[10].log() + sig[11].log()).div(2).exp()
    assert float(ddpm_sigma_to_t(mid[None], sig)) == pytest.approx(10.5, abs=1e-9)
    # out of range clamps
    assert float(ddpm_sigma_to_t(torch.tensor([1e-9], dtype=torch.float64), sig)) == 0
    assert float(ddpm_sigma_to_t(torch.tensor([1e9], dtype=torch.float64), sig)) == 999


def test_cosine_and_flow_maps_are_direct_formulas_and_inverse():
    t = torch.linspace(0.01, 0.99, 7, dtype=torch.float64)
    a, s = cosine_alpha_sigma(t)
    torch.testing.assert_close(a, torch.cos(t * math.pi / 2))
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(t))
    torch.testing.assert_close(cosine_t_to_sigma(t), s / a)
    torch.testing.assert_close(cosine_sigma_to_t(cosine_t_to_sigma(t)), t)
    torch.testing.assert_close(flow_t_to_sigma(t), t / (1 - t))
    torch.testing.assert_close(flow_sigma_to_t(flow_t_to_sigma(t)), t)


def test_edm_matches_reference_fixture(fixtures_dir):
    from safetensors.torch import load_file

    io = load_file(str(fixtures_dir / "hdit_neighborhood" / "io.safetensors"))
    sigma = io["inputs.sigma"]
    c_skip, c_out, c_in = edm_scalings(sigma, 0.5)
    torch.testing.assert_close(c_skip, io["outputs.denoiser_c_skip"])
    torch.testing.assert_close(c_out, io["outputs.denoiser_c_out"])
    torch.testing.assert_close(c_in, io["outputs.denoiser_c_in"])
    # the reference's scalings applied to a network output (outputs.denoised was computed
    # from the network at c_in x, which needs the mapped weights; the scalings are what matter)
    out = io["outputs.out"]
    rec = Recorder(out)
    d = Denoiser(rec, S.EDMObjective(sigma_data=0.5))
    col = lambda v: v[:, None, None, None]  # noqa: E731
    expected = (
        col(io["outputs.denoiser_c_skip"]) * io["inputs.x"]
        + col(io["outputs.denoiser_c_out"]) * out
    )
    torch.testing.assert_close(d(io["inputs.x"], sigma), expected, rtol=1e-6, atol=1e-6)
    net_x, net_sigma = rec.calls[0][:2]
    torch.testing.assert_close(net_x, io["inputs.x"] * c_in[:, None, None, None])
    torch.testing.assert_close(net_sigma, sigma)


def test_edm_direct_formula():
    x, out = _data()
    rec = Recorder(out)
    sigma = torch.tensor([0.3, 7.0], dtype=torch.float64)
    d = Denoiser(rec, S.EDMObjective(sigma_data=0.7))
    s = sigma[:, None, None, None]
    expected = 0.49 / (s**2 + 0.49) * x + s * 0.7 / (s**2 + 0.49).sqrt() * out
    torch.testing.assert_close(d(x, sigma), expected)


def test_ddpm_eps_matches_dit_predict_xstart():
    """DiT's ``_predict_xstart_from_eps``: x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps, with
    the network seeing x_t = sqrt(abar) x_VE and the integer timestep."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    t = np.array([10, 600])
    x, out = _data(c=4, out_c=8)
    rec = Recorder(out)
    d = Denoiser(rec, S.DDPMObjective())
    sigma = torch.tensor(np.sqrt((1 - abar[t]) / abar[t]))
    x0, var = d.denoise(x, sigma)
    ab = torch.tensor(abar[t])[:, None, None, None]
    x_t = ab.sqrt() * x
    eps = out[:, :4]
    torch.testing.assert_close(x0, (1 / ab).sqrt() * x_t - (1 / ab - 1).sqrt() * eps)
    torch.testing.assert_close(var, out[:, 4:])
    net_x, net_t = rec.calls[0][:2]
    torch.testing.assert_close(net_x, x_t)
    torch.testing.assert_close(
        net_t.double(), torch.tensor(t, dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert d.learned_variance is False  # the recorder has no spec: no head to read


def test_ddpm_quantize_rounds_timestep():
    sig = ddpm_sigmas(ddpm_alphas_cumprod())
    x, out = _data(c=3)
    rec = Recorder(out)
    d = Denoiser(rec, S.DDPMObjective(learned_sigma=False), quantize=True)
    between = (sig[100].log() * 0.7 + sig[101].log() * 0.3).exp()
    x0, var = d.denoise(x, between.expand(2))
    assert var is None
    assert rec.calls[0][1].tolist() == [100.0, 100.0]
    s = float(sig[100])
    torch.testing.assert_close(rec.calls[0][0], x / math.sqrt(1 + s**2), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x0, x - s * out, rtol=1e-6, atol=1e-6)


def test_x0_cosine_direct_formula():
    x, out = _data()
    rec = Recorder(out)
    d = Denoiser(rec, S.X0Objective())
    t = torch.tensor([0.2, 0.9], dtype=torch.float64)
    alpha, sig_vp = torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)
    sigma = sig_vp / alpha
    torch.testing.assert_close(d(x, sigma), out)
    torch.testing.assert_close(rec.calls[0][0], x * alpha[:, None, None, None])
    torch.testing.assert_close(rec.calls[0][1], 1000 * t)


def test_flow_velocity_direct_formula():
    """x_t = (1-t) x0 + t eps and v = eps - x0 give x0 = x_t - t v; as VE x = x_t / (1-t)."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.25, 0.8], dtype=torch.float64)
    tt = t[:, None, None, None]
    x_t = (1 - tt) * x0 + tt * eps
    rec = Recorder(eps - x0)  # the perfect velocity
    d = Denoiser(rec, S.FlowObjective(time_scale=1000.0))
    sigma = t / (1 - t)
    torch.testing.assert_close(d(x_t / (1 - tt), sigma), x0)
    torch.testing.assert_close(rec.calls[0][0], x_t)
    torch.testing.assert_close(rec.calls[0][1], 1000 * t)


def test_denoiser_on_built_models_shapes_and_null_class():
    torch.manual_seed(0)
    dit = build(S.load(EXAMPLES / "tiny" / "tiny-dit.yaml")).eval()
    d = Denoiser(dit, S.DDPMObjective(learned_sigma=True))
    assert d.learned_variance and d.null_class == 10
    x = torch.randn(2, 4, 8, 8)
    x0, var = d.denoise(x, torch.tensor([1.0, 20.0]), torch.tensor([1, 2]))
    assert x0.shape == var.shape == (2, 4, 8, 8)
    hdit = build(S.load(EXAMPLES / "tiny" / "tiny-hdit-neighborhood.yaml")).eval()
    d = Denoiser(hdit, S.EDMObjective())
    assert d(torch.randn(2, 3, 16, 16), 2.0).shape == (2, 3, 16, 16)


def test_noise_range_per_objective():
    assert NoiseRange.of(S.EDMObjective()).sigma_max == 80.0
    cs = S.EDMObjective(sigma_sampling=S.CosineInterpolatedSigma(sigma_min=0.01, sigma_max=160))
    assert (NoiseRange.of(cs).sigma_min, NoiseRange.of(cs).sigma_max) == (0.01, 160)
    r = NoiseRange.of(S.DDPMObjective())
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    assert r.sigma_max == pytest.approx(math.sqrt((1 - abar[-1]) / abar[-1]))
    assert r.sigma_min == pytest.approx(math.sqrt((1 - abar[0]) / abar[0]))
    for obj in (S.X0Objective(), S.FlowObjective(), S.DDPMObjective()):
        nr = NoiseRange.of(obj)
        s = torch.tensor([nr.sigma_min, 1.0, nr.sigma_max], dtype=torch.float64)
        torch.testing.assert_close(nr.t_to_sigma(nr.sigma_to_t(s)), s)
