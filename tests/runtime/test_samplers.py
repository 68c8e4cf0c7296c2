"""Samplers against a Gaussian data distribution, whose optimal denoiser is closed-form."""

import math

import numpy as np
import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build
from ditkit.runtime.denoiser import Denoiser, NoiseRange, ddpm_alphas_cumprod, ddpm_sigmas
from ditkit.runtime.samplers import (
    SAMPLERS,
    Guided,
    ancestral_split,
    get_sigmas,
    karras_sigmas,
    sample,
    spaced_timesteps,
)
from tests.conftest import EXAMPLES
from tests.perturb import perturb

MU, SD = 0.3, 0.5


class GaussianDenoiser:
    """Data x0 ~ N(mu_y, SD^2) per element; the optimal D(x, s) = mu + SD^2/(SD^2+s^2)(x - mu).
    Class y shifts the mean to ``y``; the null class (10) is the mixture-free mean ``MU``."""

    def __init__(self, objective=None, learned=None):
        self.noise_range = NoiseRange.of(objective or S.EDMObjective())
        self.null_class = 10
        self.learned = learned
        self.calls = []
        self.guides_inside, self.cfg_channels, self.rules = False, None, None  # the protocol

    @property
    def learned_variance(self) -> bool:
        return self.learned is not None

    def guided(self, x, sigma, class_labels, scale, **cond):
        raise ValueError("guides through the sampler")

    def denoise(self, x, sigma, class_labels=None, **cond):
        self.calls.append((x.shape[0], class_labels))
        s = sigma.to(x.dtype)[:, None, None, None]
        mu = torch.full_like(x, MU)
        if class_labels is not None:
            lab = class_labels.to(x.dtype)[:, None, None, None]
            mu = torch.where(lab == 10, mu, lab)
        x0 = mu + SD**2 / (SD**2 + s**2) * (x - mu)
        var = None if self.learned is None else torch.full_like(x, self.learned)
        return x0, var


def exact_ode(noise, s_max):
    """The probability-flow ODE is linear here: x0 = mu + (x_T - mu) SD / sqrt(SD^2 + s^2)."""
    x_T = noise * s_max
    return MU + (x_T - MU) * SD / math.sqrt(SD**2 + s_max**2)


SHAPE = (512, 2, 2, 2)


@pytest.mark.parametrize(
    "sampler,eta,order",
    [("euler", None, 1), ("heun", None, 2), ("ddim", 0.0, 1), ("dpmpp_2m", None, 2)],
)
def test_deterministic_samplers_converge_to_the_exact_ode_solution(sampler, eta, order):
    d = GaussianDenoiser()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = exact_ode(noise, 80.0)
    errs = []
    for steps in (8, 32, 128):
        x = sample(
            d,
            SHAPE,
            steps=steps,
            sampler=sampler,
            eta=eta,
            noise=noise,
            dtype=torch.float64,
            schedule="karras",
        )
        errs.append(float((x - exact).abs().max()))
    # 4x the steps: error / ~4 (first order) or / ~16 (second order); |x_T| reaches ~250
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[1] / errs[2] > (3.0 if order == 1 else 10.0), errs
    assert errs[2] < (0.05 if order == 1 else 3e-3), errs
    x = sample(
        d,
        (2048, 2, 2, 2),
        steps=64 if order == 2 else 256,
        sampler=sampler,
        eta=eta,
        seed=0,
        dtype=torch.float64,
    )
    assert float(x.mean()) == pytest.approx(MU, abs=0.02)
    assert float(x.std()) == pytest.approx(SD, abs=0.02)


@pytest.mark.parametrize(
    "sampler,objective",
    [
        ("ddim", S.EDMObjective()),
        ("ddpm", S.DDPMObjective(learned_sigma=False)),
        ("dpmpp_3m_sde", S.EDMObjective()),
        ("ddpm", S.EDMObjective()),
    ],
)
def test_stochastic_samplers_converge_to_the_data_mean_and_variance(sampler, objective):
    """Ancestral steps with the posterior mean of x0 under-disperse when steps are few (they
    ignore Var[x0 | x]); the error must shrink as steps grow and end within 0.02."""
    d = GaussianDenoiser(objective)
    eta = 1.0 if sampler == "ddim" else None
    errs = []
    for steps in (16, 256):
        x = sample(
            d, (2048, 2, 2, 2), steps=steps, sampler=sampler, eta=eta, seed=0, dtype=torch.float64
        )
        assert float(x.mean()) == pytest.approx(MU, abs=0.02)
        errs.append(abs(float(x.std()) - SD))
    assert errs[1] < 0.02 and errs[0] > errs[1], errs


@pytest.mark.parametrize(
    "sampler,objective",
    [("euler", S.FlowObjective()), ("heun", S.X0Objective()), ("dpmpp_2m", S.DDPMObjective())],
)
def test_samplers_on_other_objectives_native_schedules(sampler, objective):
    d = GaussianDenoiser(objective)
    x = sample(d, (2048, 2, 2, 2), steps=64, sampler=sampler, seed=0, dtype=torch.float64)
    assert float(x.mean()) == pytest.approx(MU, abs=0.02)
    assert float(x.std()) == pytest.approx(SD, abs=0.02)


def test_ddpm_with_beta_tilde_equals_ddim_eta_1():
    d = GaussianDenoiser(S.DDPMObjective(learned_sigma=False))
    a = sample(d, SHAPE, steps=20, sampler="ddpm", seed=4, dtype=torch.float64)
    b = sample(d, SHAPE, steps=20, sampler="ddim", eta=1.0, seed=4, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_ddpm_learned_variance_one_step_matches_posterior_formula():
    """v = +1 means log var = log beta (the upper end): one step s -> s' checked by hand."""
    d = GaussianDenoiser(S.DDPMObjective(), learned=1.0)
    s, s_n = 5.0, 2.0
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = torch.tensor([s, s_n, 0.0], dtype=torch.float64)
    seen = []
    sample(
        d,
        SHAPE,
        steps=2,
        sampler="ddpm",
        sigmas=sig,
        noise=noise,
        seed=7,
        dtype=torch.float64,
        callback=lambda i, sn, x: seen.append(x.clone()),
    )
    gen = torch.Generator().manual_seed(7)  # ``noise`` given: the first draw is the step's
    z = torch.randn(SHAPE, generator=gen, dtype=torch.float32).double()
    x = noise * s
    x0 = MU + SD**2 / (SD**2 + s**2) * (x - MU)
    ab, ab_n = 1 / (1 + s * s), 1 / (1 + s_n * s_n)
    alpha = ab / ab_n
    beta = 1 - alpha
    x_vp = math.sqrt(ab) * x
    mean = math.sqrt(ab_n) * beta / (1 - ab) * x0 + math.sqrt(alpha) * (1 - ab_n) / (1 - ab) * x_vp
    expected = (mean + math.sqrt(beta) * z) / math.sqrt(ab_n)
    torch.testing.assert_close(seen[0], expected)


def test_karras_and_native_schedules():
    sig = karras_sigmas(3, 0.002, 80.0, rho=7.0)
    expected = [80.0, ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7, 0.002, 0.0]
    np.testing.assert_allclose(sig.numpy(), expected, rtol=1e-12)
    # DiT's "250" respacing of 1000 steps: round(i * 999/249)
    ts = spaced_timesteps(1000, 250)
    assert len(ts) == 250 and ts[0] == 0 and ts[-1] == 999 and ts[1] == 4
    table = ddpm_sigmas(ddpm_alphas_cumprod())
    native = get_sigmas(NoiseRange.of(S.DDPMObjective()), 250)
    assert native.shape == (251,) and float(native[-1]) == 0
    np.testing.assert_allclose(native[:-1].numpy(), table[ts[::-1]].numpy())
    flow = get_sigmas(
        NoiseRange.of(S.FlowObjective()), 5, "uniform", sigma_min=0.25, sigma_max=4.0
    )  # t from 0.8 to 0.2
    t = torch.linspace(0.8, 0.2, 5, dtype=torch.float64)
    np.testing.assert_allclose(flow[:-1].numpy(), (t / (1 - t)).numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="schedule"):
        get_sigmas(NoiseRange.of(S.EDMObjective()), 5, "cosine")


def test_ancestral_split_is_ddim_sigma():
    down, up = ancestral_split(2.0, 1.0, 1.0)
    assert down**2 + up**2 == pytest.approx(1.0)
    # DDIM's sigma_t(eta=1) in VP terms, converted to VE by dividing by sqrt(abar_prev)
    ab, ab_p = 1 / 5, 1 / 2
    c = math.sqrt((1 - ab_p) / (1 - ab)) * math.sqrt(1 - ab / ab_p)
    assert up == pytest.approx(c / math.sqrt(ab_p))


def test_seeded_and_reproducible():
    d = GaussianDenoiser()
    a = sample(d, SHAPE, steps=6, sampler="dpmpp_3m_sde", seed=3)
    b = sample(d, SHAPE, steps=6, sampler="dpmpp_3m_sde", seed=3)
    c = sample(d, SHAPE, steps=6, sampler="dpmpp_3m_sde", seed=4)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_cfg_is_one_batched_pass_with_the_guidance_formula():
    d = GaussianDenoiser()
    labels = torch.tensor([2, 5])
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    g = Guided(d, labels, {}, cfg_scale=3.0)
    out, _ = g(x, 1.5)
    assert d.calls[-1][0] == 4  # cond and uncond in one batch
    s = torch.full((2,), 1.5, dtype=torch.float64)
    c, _ = d.denoise(x, s, labels)
    u, _ = d.denoise(x, s, torch.tensor([10, 10]))
    torch.testing.assert_close(out, u + 3 * (c - u))
    # only the first channel guided (DiT's "first 3 channels" option)
    out1, _ = Guided(d, labels, {}, cfg_scale=3.0, cfg_channels=1)(x, 1.5)
    torch.testing.assert_close(out1[:, :1], (u + 3 * (c - u))[:, :1])
    torch.testing.assert_close(out1[:, 1:], c[:, 1:])
    # outside the guidance interval: the conditional model alone, unbatched
    out2, _ = Guided(d, labels, {}, cfg_scale=3.0, guidance_interval=(0.1, 1.0))(x, 1.5)
    assert d.calls[-1][0] == 2
    torch.testing.assert_close(out2, c)
    with pytest.raises(ValueError, match="class_labels"):
        Guided(d, None, {}, cfg_scale=2.0)


def test_cfg_on_a_built_model_batched_equals_separate_passes():
    torch.manual_seed(0)
    model = build(S.load(EXAMPLES / "tiny" / "tiny-hdit-global.yaml")).eval()
    perturb(model)  # leave the zero-init: outputs depend on labels
    d = Denoiser(model, S.EDMObjective())
    labels = torch.tensor([1, 7])
    kw = dict(steps=3, sampler="heun", seed=0, class_labels=labels)
    cond_only = sample(d, (2, 3, 16, 16), **kw)
    assert torch.equal(sample(d, (2, 3, 16, 16), cfg_scale=1.0, **kw), cond_only)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        g, _ = Guided(d, labels, {}, cfg_scale=4.0)(x, 2.0)
        c = d(x, torch.full((2,), 2.0), labels)
        u = d(x, torch.full((2,), 2.0), torch.tensor([10, 10]))
        g0, _ = Guided(d, labels, {}, cfg_scale=0.0)(x, 2.0)
    assert not torch.allclose(c, u, atol=1e-4)
    torch.testing.assert_close(g, u + 4 * (c - u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g0, u, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_a_built_model(sampler):
    torch.manual_seed(0)
    model = build(S.load(EXAMPLES / "tiny" / "tiny-dit.yaml")).eval()
    d = Denoiser(model, S.DDPMObjective())
    x = sample(
        d,
        (2, 4, 8, 8),
        steps=3,
        sampler=sampler,
        class_labels=[0, 3],
        cfg_scale=2.0,
        cfg_channels=3,
    )
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()


def test_bad_arguments_name_the_fix():
    d = GaussianDenoiser()
    with pytest.raises(ValueError, match="choose one of"):
        sample(d, SHAPE, steps=3, sampler="plms")
    with pytest.raises(ValueError, match="labels"):
        sample(d, SHAPE, steps=3, class_labels=[1, 2, 3])
    with pytest.raises(ValueError, match="descending"):
        sample(d, SHAPE, steps=3, sigmas=torch.tensor([1.0, 2.0, 0.0]))


# -------------------------------------------------------------------------------- ditkit sample


def _checkpoint(tmp_path, name, objective, metadata=None):
    from ditkit.runtime.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build(S.load(EXAMPLES / "tiny" / f"{name}.yaml"))
    path = tmp_path / f"{name}.safetensors"
    save_checkpoint(path, model.state_dict(), model.spec, objective=objective, metadata=metadata)
    return path


def test_cli_sample_writes_grid_and_individual_images(tmp_path, capsys):
    from PIL import Image

    from ditkit.cli import main

    ckpt = _checkpoint(tmp_path, "tiny-hdit-neighborhood", S.EDMObjective())
    grid, folder = tmp_path / "grid.png", tmp_path / "each"
    rc = main(
        [
            "sample",
            str(ckpt),
            "--steps",
            "2",
            "--classes",
            "1,2,3",
            "--cfg-scale",
            "2",
            "--resolution",
            "16x24",
            "--out",
            str(grid),
            "--individual",
            str(folder),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    images = sorted(folder.glob("*.png"))
    assert [p.name for p in images] == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(images[0]).size == (24, 16)
    assert Image.open(grid).size[0] > 24  # a grid of upscaled samples


def test_cli_sample_latent_model_needs_a_local_autoencoder(tmp_path, capsys):
    from PIL import Image

    from ditkit.cli import main

    ckpt = _checkpoint(tmp_path, "tiny-dit", S.DDPMObjective(), {"ditkit.cfg_channels": "3"})
    grid = tmp_path / "grid.png"
    args = [
        "sample",
        str(ckpt),
        "--steps",
        "2",
        "--sampler",
        "ddpm",
        "--classes",
        "4",
        "--num",
        "2",
        "--cfg",
        "1.5",
        "--out",
        str(grid),
        "--no-progress",
    ]
    assert main(args) == 0  # the old spellings --num and --cfg still work, with one line each
    err = capsys.readouterr().err
    assert "no --autoencoder" in err and not grid.exists()
    assert "--num is deprecated, use --count" in err
    assert "--cfg is deprecated, use --cfg-scale" in err
    latents = torch.load(tmp_path / "grid.latents.pt")
    assert latents.shape == (2, 4, 8, 8)

    class Decoder(torch.nn.Module):  # latents (B, 4, 8, 8) -> "images" (B, 3, 64, 64)
        def forward(self, z):
            return z[:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3).tanh()

    dec = tmp_path / "decoder.pt"
    torch.jit.script(Decoder()).save(str(dec))
    assert main(args + ["--autoencoder", str(dec)]) == 0
    assert Image.open(grid).size == (2 * 65 + 1, 65 + 1)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--classes", "10"], "labels must be in [0, 10)"),
        (["--resolution", "18"], "not divisible by patch x merges"),
        (["--cfg-scale", "3"], "--cfg-scale needs --classes"),
        (["--steps", "0"], "--steps 0"),
        (["--cfg-interval", "5"], "LO,HI"),
    ],
)
def test_cli_sample_bad_input_exits_2(tmp_path, capsys, extra, message):
    from ditkit.cli import main

    ckpt = _checkpoint(tmp_path, "tiny-hdit-neighborhood", S.EDMObjective())
    extra = extra + (["--classes", "1"] if "--cfg-interval" in extra else [])
    rc = main(
        [
            "sample",
            str(ckpt),
            "--steps",
            "1",
            "--out",
            str(tmp_path / "g.png"),
            "--no-progress",
            *extra,
        ]
    )
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_sample_grid_has_one_column_per_class(tmp_path, capsys):
    from PIL import Image

    from ditkit.cli import main

    ckpt = _checkpoint(tmp_path, "tiny-hdit-neighborhood", S.EDMObjective())
    grid = tmp_path / "grid.png"
    base = [
        "sample",
        str(ckpt),
        "--steps",
        "1",
        "--resolution",
        "8",
        "--no-progress",
        "--out",
        str(grid),
        "--seed",
        "3",
    ]
    # 5 classes, 10 samples: 5 columns (each one class) x 2 rows; 8 px images upscaled x8
    assert main(base + ["--classes", "0,1,2,3,4", "--count", "10"]) == 0
    cell = 8 * 8 + 1
    assert Image.open(grid).size == (5 * cell + 1, 2 * cell + 1)
    assert main(base + ["--classes", "0,1,2,3,4", "--count", "10", "--cols", "2"]) == 0
    assert Image.open(grid).size == (2 * cell + 1, 5 * cell + 1)
    assert main(base + ["--count", "9"]) == 0  # unconditional: square
    assert Image.open(grid).size == (3 * cell + 1, 3 * cell + 1)
    capsys.readouterr()
