"""Each objective pinned to the reference implementation's own loss, on identical inputs.

The expected values are written here from the published definitions, independently of
``ditkit.training.objectives``:

- k-diffusion ``utils.rand_cosine_interpolated`` (HDiT's sigma density) and
  ``layers.Denoiser.loss`` with its ``karras`` / ``snr`` / ``soft-min-snr`` weightings;
- ADM/DiT ``gaussian_diffusion.training_losses`` (``q_sample``, ``mse`` + ``_vb_terms_bpd``
  with ``normal_kl`` and ``discretized_gaussian_log_likelihood`` using
  ``approx_standard_normal_cdf``), with DiT's float64 tables cast to the batch dtype once;
- MPDiT ``OTFlow.loss`` (``l2`` loss, ``uniform`` reweighting).

The "network" is a small module with a handful of parameters, so the losses and their
gradients can be compared without building a transformer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ditkit import spec as S
from ditkit.training.objectives import DiffusionLoss, cosine_interpolated_sigma

SPEC = S.ModelSpec.model_validate(
    {
        "name": "ref",
        "input": {"channels": 2, "resolution": [8, 8]},
        "patch": {"size": 2},
        "conditioning": {"width": 32, "noise": {"kind": "fourier"}},
        "block": {"d_head": 16},
        "levels": [{"d_model": 32, "middle": 1}],
        "head": {"kind": "linear"},
    }
)


# ------------------------------------------------------------------ k-diffusion's density


def kdiff_rand_cosine_interpolated(
    u, image_d, noise_d_low, noise_d_high, sigma_data, min_value, max_value
):
    """k-diffusion ``rand_cosine_interpolated`` at given uniforms ``u`` (numpy, float64),
    with its own (swapped) names: its ``logsnr_min`` comes from ``min_value``."""

    def logsnr_schedule_cosine(t, logsnr_min, logsnr_max):
        t_min = math.atan(math.exp(-0.5 * logsnr_max))
        t_max = math.atan(math.exp(-0.5 * logsnr_min))
        return -2 * np.log(np.tan(t_min + t * (t_max - t_min)))

    def logsnr_schedule_cosine_shifted(t, noise_d, logsnr_min, logsnr_max):
        shift = 2 * math.log(noise_d / image_d)
        return logsnr_schedule_cosine(t, logsnr_min - shift, logsnr_max - shift) + shift

    logsnr_min = -2 * math.log(min_value / sigma_data)
    logsnr_max = -2 * math.log(max_value / sigma_data)
    low = logsnr_schedule_cosine_shifted(u, noise_d_low, logsnr_min, logsnr_max)
    high = logsnr_schedule_cosine_shifted(u, noise_d_high, logsnr_min, logsnr_max)
    logsnr = low + u * (high - low)  # torch.lerp(low, high, u)
    return np.exp(-logsnr / 2) * sigma_data


IMAGENET_128 = dict(
    image_d=128, noise_d_low=32, noise_d_high=128, sigma_data=0.5, min_value=1e-3, max_value=1e3
)


@pytest.mark.parametrize(
    "setting",
    [
        IMAGENET_128,
        dict(
            image_d=64,
            noise_d_low=32,
            noise_d_high=64,
            sigma_data=1.0,
            min_value=1e-2,
            max_value=160,
        ),
        dict(
            image_d=16,
            noise_d_low=32,
            noise_d_high=16,
            sigma_data=0.5,
            min_value=1e-3,
            max_value=1e3,
        ),
    ],
)
def test_cosine_interpolated_equals_k_diffusion_at_fixed_u(setting):
    u = np.linspace(0.0, 1.0, 101)
    want = kdiff_rand_cosine_interpolated(u, **setting)
    got = cosine_interpolated_sigma(
        torch.from_numpy(u),
        setting["image_d"],
        setting["noise_d_low"],
        setting["noise_d_high"],
        setting["sigma_data"],
        setting["min_value"],
        setting["max_value"],
    ).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_cosine_interpolated_quantiles_are_hdits_imagenet_128_density():
    """k-diffusion's sampler at ImageNet-128 settings: 5th percentile sigma 0.043, 95th 23.2,
    std of ln sigma 1.91 (the mirrored sampler had 0.148, 6.77 and 1.18)."""
    # the density is decreasing in u: the q-quantile of sigma is its value at u = 1 - q
    q = torch.tensor([0.95, 0.5, 0.05], dtype=torch.float64)
    s5, med, s95 = cosine_interpolated_sigma(q, 128, 32, 128, 0.5, 1e-3, 1e3).tolist()
    assert s5 == pytest.approx(0.043, rel=0.02)
    assert s95 == pytest.approx(23.2, rel=0.01)
    u = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    log_s = cosine_interpolated_sigma(u, 128, 32, 128, 0.5, 1e-3, 1e3).log()
    assert float(log_s.std()) == pytest.approx(1.91, abs=0.01)
    assert s5 < med < s95


def test_loss_draws_sigma_at_the_larger_input_side():
    """k-diffusion: ``image_d = noise_d_high = max(input_size)``."""
    spec = SPEC.model_copy(update={"input": SPEC.input.model_copy(update={"resolution": (8, 16)})})
    obj = S.EDMObjective(sigma_sampling=S.CosineInterpolatedSigma(low_resolution=4))
    _, sigma = DiffusionLoss(obj, spec).draw(
        torch.zeros(4, 2, 8, 16), torch.Generator().manual_seed(0)
    )
    gen = torch.Generator().manual_seed(0)
    torch.randn((4, 2, 8, 16), generator=gen)
    u = torch.rand(4, generator=gen, dtype=torch.float64).numpy()
    want = kdiff_rand_cosine_interpolated(u, 16, 4, 16, 0.5, 1e-3, 1e3)
    np.testing.assert_allclose(sigma.numpy(), want, rtol=1e-10)


# ------------------------------------------------------------------ a tiny "network"


class Net(nn.Module):
    """``F(x, noise, labels) = a x + b tanh(x) + c log(noise) / 4``, per channel; with
    ``out_channels = 2C`` the second half is ``tanh(d x)`` (a learned-sigma head)."""

    def __init__(self, channels=2, learned=False, log_noise=True):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a = nn.Parameter(torch.randn(channels, 1, 1, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(channels, 1, 1, generator=g, dtype=torch.float64))
        self.c = nn.Parameter(torch.randn(channels, 1, 1, generator=g, dtype=torch.float64))
        self.d = nn.Parameter(torch.randn(channels, 1, 1, generator=g, dtype=torch.float64))
        self.learned, self.log_noise = learned, log_noise

    def forward(self, x, noise, labels=None):
        n = noise.to(x.dtype)[:, None, None, None]
        n = n.log() / 4 if self.log_noise else n / 1000
        f = self.a.to(x.dtype) * x + self.b.to(x.dtype) * torch.tanh(x) + self.c.to(x.dtype) * n
        if self.learned:
            f = torch.cat([f, torch.tanh(self.d.to(x.dtype) * x)], dim=1)
        return f


def _grads(loss, net):
    grads = torch.autograd.grad(loss, list(net.parameters()), materialize_grads=True)
    return torch.cat([g.flatten() for g in grads])


def _data(b=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # 8-bit pixels in [-1, 1], including both edge bins
    x0 = torch.randint(0, 256, (b, 2, 8, 8), generator=g).to(dtype) / 127.5 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0], dtype=dtype)
    noise = torch.randn(b, 2, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    return x0, noise


# ------------------------------------------------------------------ EDM = k-diffusion


def kdiff_denoiser_loss(inner, x0, noise, sigma, sigma_data, weighting):
    """k-diffusion ``layers.Denoiser.loss`` (``scales = 1``)."""
    sd = sigma_data
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / (sigma**2 + sd**2) ** 0.5
    c_in = 1 / (sigma**2 + sd**2) ** 0.5
    if weighting == "karras":
        c_weight = torch.ones_like(sigma)
    elif weighting == "soft-min-snr":
        c_weight = (sigma * sd) ** 2 / (sigma**2 + sd**2) ** 2
    elif weighting == "snr":
        c_weight = sd**2 / (sigma**2 + sd**2)
    dims = lambda v: v[:, None, None, None]  # noqa: E731  (utils.append_dims)
    noised = x0 + noise * dims(sigma)
    out = inner(noised * dims(c_in), sigma)
    target = (x0 - dims(c_skip) * noised) / dims(c_out)
    return ((out - target) ** 2).flatten(1).mean(1) * c_weight


@pytest.mark.parametrize(
    "weighting,ours",
    [
        ("karras", {"weighting": "karras"}),
        ("snr", {"weighting": "snr"}),
        ("soft-min-snr", {"weighting": "soft_min_snr", "gamma": 4.0}),
    ],
)
@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_losses_and_gradients_equal_k_diffusion_denoiser_loss(weighting, ours, sigma_data):
    if "gamma" in ours:
        ours = {**ours, "gamma": 1 / sigma_data**2}  # k-diffusion ties gamma to sigma_data
    obj = S.EDMObjective(sigma_data=sigma_data, **ours)
    x0, noise = _data()
    sigma = torch.tensor([0.002, 0.03, 0.5, 1.7, 20.0, 160.0], dtype=torch.float64)
    net = Net()
    got, _ = DiffusionLoss(obj, SPEC).per_sample(net, x0, None, noise, sigma)
    want = kdiff_denoiser_loss(net, x0, noise, sigma, sigma_data, weighting)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(
        _grads(got.mean(), net), _grads(want.mean(), net), rtol=1e-9, atol=1e-12
    )


def test_soft_min_snr_with_the_default_gamma_is_not_k_diffusions():
    """gamma = 5 (the spec default) is not k-diffusion's soft-min-snr at sigma_data 0.5."""
    x0, noise = _data()
    sigma = torch.tensor([0.01, 0.1, 0.3, 1.0, 3.0, 10.0], dtype=torch.float64)
    net = Net()
    got, _ = DiffusionLoss(S.EDMObjective(weighting="soft_min_snr", gamma=5.0), SPEC).per_sample(
        net, x0, None, noise, sigma
    )
    want = kdiff_denoiser_loss(net, x0, noise, sigma, 0.5, "soft-min-snr")
    ratio = (got / want).max().item()
    assert ratio == pytest.approx(1.25, rel=0.01)  # small sigma: (1/4) / (1/5)


# ------------------------------------------------------------------ DDPM = ADM / DiT


def adm_tables(steps=1000):
    """ADM ``GaussianDiffusion.__init__`` (linear betas, numpy float64)."""
    betas = np.linspace(1e-4, 0.02, steps, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        "log_betas": np.log(betas),
    }


def adm_extract(arr, t, like):
    """``_extract_into_tensor``: gather from the float64 table, cast once."""
    return torch.from_numpy(arr)[t].to(like.dtype)[:, None, None, None]


def adm_normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def adm_approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def adm_discretized_gaussian_log_likelihood(x, means, log_scales, cdf):
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def adm_training_losses(model, x_start, t, noise, cdf=adm_approx_standard_normal_cdf):
    """DiT's ``training_losses`` (loss_type MSE, learned_range variance, epsilon target)."""
    tb = adm_tables()
    ex = lambda name: adm_extract(tb[name], t, x_start)  # noqa: E731
    x_t = ex("sqrt_alphas_cumprod") * x_start + ex("sqrt_one_minus_alphas_cumprod") * noise
    out = model(x_t, t)
    c = x_start.shape[1]
    eps, var_values = out[:, :c], out[:, c:]
    frozen_eps = eps.detach()
    # p_mean_variance on the frozen output
    min_log, max_log = ex("posterior_log_variance_clipped"), ex("log_betas")
    frac = (var_values + 1) / 2
    model_log_variance = frac * max_log + (1 - frac) * min_log
    pred_xstart = (
        ex("sqrt_recip_alphas_cumprod") * x_t - ex("sqrt_recipm1_alphas_cumprod") * frozen_eps
    )
    model_mean = ex("posterior_mean_coef1") * pred_xstart + ex("posterior_mean_coef2") * x_t
    true_mean = ex("posterior_mean_coef1") * x_start + ex("posterior_mean_coef2") * x_t
    true_log_variance_clipped = ex("posterior_log_variance_clipped")
    kl = adm_normal_kl(true_mean, true_log_variance_clipped, model_mean, model_log_variance)
    kl = kl.mean(dim=list(range(1, kl.ndim))) / math.log(2.0)
    nll = -adm_discretized_gaussian_log_likelihood(
        x_start, model_mean, 0.5 * model_log_variance, cdf
    )
    nll = nll.mean(dim=list(range(1, nll.ndim))) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    mse = ((noise - eps) ** 2).mean(dim=list(range(1, eps.ndim)))
    return {"loss": mse + vb, "mse": mse, "vb": vb}


T_VALUES = torch.tensor([0, 0, 1, 10, 500, 999])


def test_ddpm_losses_and_gradients_equal_dits_training_losses_float64():
    x0, noise = _data()
    net = Net(learned=True, log_noise=False)
    loss = DiffusionLoss(S.DDPMObjective(), SPEC)
    got, extras = loss.per_sample(net, x0, None, noise, T_VALUES)
    want = adm_training_losses(net, x0, T_VALUES, noise)
    torch.testing.assert_close(got, want["loss"], rtol=1e-12, atol=0)
    torch.testing.assert_close(
        _grads(got.mean(), net), _grads(want["loss"].mean(), net), rtol=1e-10, atol=1e-14
    )
    assert extras["vb"] == pytest.approx(float(want["vb"].detach().mean()), rel=1e-12)


def test_ddpm_exact_cdf_is_an_option_and_differs_at_t0_only():
    x0, noise = _data()
    net = Net(learned=True, log_noise=False)
    exact = DiffusionLoss(S.DDPMObjective(decoder_cdf="exact"), SPEC)
    got, _ = exact.per_sample(net, x0, None, noise, T_VALUES)
    want = adm_training_losses(net, x0, T_VALUES, noise, cdf=torch.special.ndtr)
    torch.testing.assert_close(got, want["loss"], rtol=1e-12, atol=0)
    # the same implementation with the tanh CDF: only the t = 0 decoder term may change (the
    # reference's own float ops differ from ditkit's in the last bit at t > 0)
    tanh, _ = DiffusionLoss(S.DDPMObjective(), SPEC).per_sample(net, x0, None, noise, T_VALUES)
    rel = (got - tanh).abs() / tanh
    assert rel[:2].min() > 1e-5 and rel[2:].max() == 0  # the t = 0 decoder term only


def test_ddpm_float32_at_small_t_is_as_close_to_float64_as_dits():
    """DiT's float32 loss at t = 0 differs from its float64 value by ~5e-6 (its tables are
    float64, cast once); a float32 ``(1 - abar).sqrt()`` made it 1.2e-4."""
    x64, n64 = _data(b=6, seed=1)
    t = torch.zeros(6, dtype=torch.long)
    net = Net(learned=True, log_noise=False)
    ref64 = adm_training_losses(net, x64, t, n64)["vb"]
    _, ext32 = DiffusionLoss(S.DDPMObjective(), SPEC).per_sample(
        net, x64.float(), None, n64.float(), t
    )
    ours32 = ext32["vb"]
    dit32 = float(adm_training_losses(net, x64.float(), t, n64.float())["vb"].detach().mean())
    ref = float(ref64.detach().mean())
    dit_err = abs(dit32 - ref) / ref
    assert abs(ours32 - ref) / ref <= max(2e-5, 2 * dit_err), (ours32, dit32, ref)
    assert ours32 == pytest.approx(dit32, rel=1e-6)  # the same float32 arithmetic as DiT


# ------------------------------------------------------------------ flow = MPDiT


def mpdit_otflow_loss(model, x, n, t):
    """MPDiT ``OTFlow.loss`` per sample: ``get_xt``, ``velocity``, ``l2`` with uniform
    reweighting (before its final ``.mean()``)."""
    tv = t.view(-1, 1, 1, 1)
    xt = (1 - tv) * x + tv * n
    v = n - x
    vt = model(xt, t)
    return torch.mean((vt - v) ** 2, dim=(1, 2, 3)) * torch.ones_like(t)


def test_flow_losses_and_gradients_equal_mpdits_otflow_loss():
    x0, noise = _data()
    t = torch.tensor([1e-4, 0.05, 0.3, 0.5, 0.9, 0.9999], dtype=torch.float64)
    net = Net(log_noise=False)
    got, _ = DiffusionLoss(S.FlowObjective(), SPEC).per_sample(net, x0, None, noise, t)
    want = mpdit_otflow_loss(net, x0, noise, t)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        _grads(got.mean(), net), _grads(want.mean(), net), rtol=1e-10, atol=1e-14
    )


def test_flow_time_is_clamped_by_at_most_1e_5():
    obj = S.FlowObjective(time_sampling=S.UniformTime())
    _, t = DiffusionLoss(obj, SPEC).draw(
        torch.zeros(4096, 1, 1, 1), torch.Generator().manual_seed(0)
    )
    gen = torch.Generator().manual_seed(0)
    torch.randn((4096, 1, 1, 1), generator=gen)
    raw = torch.rand(4096, generator=gen, dtype=torch.float64)
    assert (t - raw).abs().max() <= 1e-5
    assert t.min() >= 1e-5 and t.max() <= 1 - 1e-5
