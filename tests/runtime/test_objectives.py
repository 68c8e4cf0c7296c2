"""Objectives as classes: one factory, no kind dispatch elsewhere, one default; v-prediction
against Salimans & Ho's formulas (written out here, not taken from ditkit)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ditkit import spec as S
from ditkit.errors import UserError
from ditkit.runtime.denoiser import Denoiser
from ditkit.runtime.objectives import Objective, objective_of
from ditkit.runtime.samplers import SAMPLERS, get_sigmas, sample
from ditkit.training.objectives import DiffusionLoss
from tests.conftest import EXAMPLES, example_specs
from tests.runtime.test_samplers import MU, SD, GaussianDenoiser

ROOT = Path(__file__).resolve().parents[2]
SPEC_CLASSES = {"EDMObjective", "DDPMObjective", "X0Objective", "FlowObjective", "VObjective"}

# ---------------------------------------------------------------------------- structure


def _dispatch_sites(path: Path) -> list[tuple[str, int]]:
    """``(enclosing function, line)`` of every ``isinstance`` test or ``case`` pattern that
    names an objective spec class in ``path``."""
    tree = ast.parse(path.read_text())
    sites = []

    def names(node) -> set[str]:
        out = set()
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                out.add(n.id)
            elif isinstance(n, ast.Attribute):
                out.add(n.attr)
        return out

    def visit(node, func: str):
        for child in ast.iter_child_nodes(node):
            inner = (
                child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            )
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Name)
                and child.func.id == "isinstance"
                and len(child.args) == 2
                and names(child.args[1]) & SPEC_CLASSES
            ):
                sites.append((func, child.lineno))
            if isinstance(child, ast.match_case) and names(child.pattern) & SPEC_CLASSES:
                sites.append((func, child.pattern.lineno))
            visit(child, inner)

    visit(tree, "<module>")
    return sites


def test_objective_kinds_are_dispatched_in_one_factory_only():
    allowed = {
        ("ditkit/runtime/objectives.py", "objective_of"),
        # a format gate, not a dispatch: k-diffusion checkpoints can only hold EDM models
        ("ditkit/runtime/convert/kdiffusion.py", "config_from_spec"),
        # the same for diffusers: DiTPipeline's schedulers run DDPM epsilon models only
        ("ditkit/runtime/convert/diffusers.py", "export_folder"),
    }
    found = {}
    for path in sorted((ROOT / "ditkit").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for func, line in _dispatch_sites(path):
            found.setdefault((rel, func), []).append(line)
    stray = {k: v for k, v in found.items() if k not in allowed}
    assert not stray, f"objective kinds dispatched outside objective_of: {stray}"
    assert len(found[("ditkit/runtime/objectives.py", "objective_of")]) == len(SPEC_CLASSES)
    # the denoiser, the loss and the samplers do not even name the spec classes
    for rel in (
        "ditkit/runtime/denoiser.py",
        "ditkit/runtime/samplers.py",
        "ditkit/training/objectives.py",
    ):
        text = (ROOT / rel).read_text()
        assert not [c for c in SPEC_CLASSES if c in text], rel


def test_every_kind_has_a_class_that_owns_its_range_and_time():
    assert S.OBJECTIVE_KINDS == ("edm", "ddpm_eps", "x0", "flow", "v")
    for kind in S.OBJECTIVE_KINDS:
        obj = objective_of(S.objective_of_kind(kind))
        assert isinstance(obj, Objective) and obj.kind == kind
        assert objective_of(obj) is obj
        assert 0 < obj.sigma_min < 1 < obj.sigma_max
        s = torch.tensor([obj.sigma_min, 0.5, 3.0, obj.sigma_max], dtype=torch.float64)
        torch.testing.assert_close(obj.t_to_sigma(obj.sigma_to_t(s)), s)
    with pytest.raises(ValueError, match="choose one of edm, ddpm_eps, x0, flow, v"):
        S.objective_of_kind("eps")


# ---------------------------------------------------------------------------- the default


def test_default_objective_follows_the_noise_embedding_for_every_example():
    expected = {"fourier": "edm", "fno": "flow", "sinusoidal": "ddpm_eps"}
    seen = set()
    for path in example_specs():
        spec = S.load(path)
        obj = spec.default_objective
        noise = spec.conditioning.noise.kind
        seen.add(noise)
        assert obj.kind == expected[noise], path.name
        if obj.kind == "ddpm_eps":
            assert obj.learned_sigma == spec.head.learned_sigma, path.name
        assert obj.model_issues(spec) == [], path.name
    assert seen == set(expected)


def test_cli_uses_the_spec_default_and_names_every_kind(capsys):
    from ditkit.cli.common import default_objective

    mpdit = S.load(EXAMPLES / "tiny" / "tiny-mpdit.yaml")
    assert default_objective(mpdit) == S.FlowObjective()
    assert "using flow" in capsys.readouterr().err
    assert default_objective(mpdit, "v") == S.VObjective()
    assert default_objective(mpdit, S.X0Objective(lambda_var=0.1)).lambda_var == 0.1
    with pytest.raises(UserError, match="--objective"):
        default_objective(mpdit, "eps")


def test_v_objective_refuses_a_learned_variance_head():
    dit = S.load(EXAMPLES / "tiny" / "tiny-dit.yaml")  # learned sigma
    issues = S.VObjective().model_issues(dit)
    assert [p for p, _ in issues] == ["model.head.learned_sigma"]
    assert "the v objective predicts no variance" in issues[0][1]


# ---------------------------------------------------------------------------- v-prediction


class Recorder(nn.Module):
    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, x, noise_level, class_labels=None, **cond):
        self.calls.append((x.clone(), torch.as_tensor(noise_level).clone()))
        return self.out


def test_v_denoiser_is_salimans_ho_x0_from_v():
    """z_t = alpha x0 + sigma_t eps (alpha = cos(pi t/2), sigma_t = sin(pi t/2)) is the VE
    x = x0 + tan(pi t/2) eps times alpha; x0 = alpha z_t - sigma_t v (Salimans & Ho, eq. 4's
    parameterisation); the network sees z_t and 1000 t."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    v = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.5, 0.97], dtype=torch.float64)
    alpha, sig_t = torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)
    col = lambda a: a[:, None, None, None]  # noqa: E731
    rec = Recorder(v)
    d = Denoiser(rec, S.VObjective())
    x0 = d(x, sig_t / alpha)
    z = col(alpha) * x
    torch.testing.assert_close(x0, col(alpha) * z - col(sig_t) * v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rec.calls[0][0], z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rec.calls[0][1], 1000 * t, rtol=1e-12, atol=1e-9)


def test_v_denoiser_with_sigma_data_is_the_edm_appendix_preconditioning():
    """EDM appendix / k-diffusion VDenoiser: c_skip = sd^2/(s^2+sd^2), c_out = -s sd /
    sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2); the network is told time_scale * 2/pi atan(s)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    f = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    s, sd = torch.tensor([0.2, 9.0], dtype=torch.float64), 0.5
    ss = s[:, None, None, None]
    rec = Recorder(f)
    got = Denoiser(rec, S.VObjective(sigma_data=sd, time_scale=1.0))(x, s)
    want = sd**2 / (ss**2 + sd**2) * x - ss * sd / (ss**2 + sd**2).sqrt() * f
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rec.calls[0][0], x / (ss**2 + sd**2).sqrt())
    torch.testing.assert_close(rec.calls[0][1], torch.atan(s) * 2 / math.pi)


class TinyNet(nn.Module):
    """A network whose output depends on its input and noise level, with parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1, dtype=torch.float64)
        self.emb = nn.Linear(1, 2, dtype=torch.float64)

    def forward(self, x, noise_level, class_labels=None, **cond):
        lvl = torch.as_tensor(noise_level, dtype=x.dtype)[:, None] / 1000
        return self.conv(x) + self.emb(lvl)[:, :, None, None]


@pytest.mark.parametrize("sd", [1.0, 0.5])
def test_v_loss_is_the_squared_error_of_v(sd):
    """Salimans & Ho (sigma_data 1): L = ||v_hat(z_t, t) - v||^2, v = alpha eps - sigma_t x0.
    For sigma_data sd the same with z_t = (x0 + s eps) / sqrt(s^2 + sd^2) and the target
    (x0 - c_skip x) / c_out of the EDM appendix's scalings (s = tan(pi t / 2))."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.01, 0.3, 0.6, 0.99], dtype=torch.float64)
    torch.manual_seed(0)
    net = TinyNet()
    spec = S.load(EXAMPLES / "tiny" / "tiny-mdit.yaml")  # only its resolution is read
    got, extras = DiffusionLoss(S.VObjective(sigma_data=sd), spec).per_sample(net, x0, None, eps, t)
    col = lambda a: a[:, None, None, None]  # noqa: E731
    if sd == 1.0:
        alpha, sig_t = col(torch.cos(math.pi * t / 2)), col(torch.sin(math.pi * t / 2))
        z = alpha * x0 + sig_t * eps
        target = alpha * eps - sig_t * x0
    else:
        s = col(torch.tan(math.pi * t / 2))
        x = x0 + s * eps
        c_skip, c_out = sd**2 / (s**2 + sd**2), -s * sd / (s**2 + sd**2).sqrt()
        z = x / (s**2 + sd**2).sqrt()
        target = (x0 - c_skip * x) / c_out
    want = ((net(z, 1000 * t) - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert extras == {}
    grads = torch.autograd.grad(got.mean(), list(net.parameters()))
    ref = torch.autograd.grad(want.mean(), list(net.parameters()))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_v_draws_uniform_cosine_time_in_range():
    obj = objective_of(S.VObjective())
    t = obj.draw_level(20000, torch.Generator().manual_seed(0), 32)
    assert t.dtype == torch.float64 and float(t.min()) >= 1e-3 and float(t.max()) <= 1 - 1e-3
    assert float(t.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(t.std()) == pytest.approx(1 / math.sqrt(12), abs=0.01)


def test_v_native_schedule_is_uniform_in_cosine_time():
    sig = get_sigmas(objective_of(S.VObjective()), 5)
    t = torch.linspace(1 - 1e-3, 1e-3, 5, dtype=torch.float64)
    torch.testing.assert_close(sig[:-1], torch.tan(math.pi * t / 2), rtol=1e-12, atol=0)
    assert float(sig[-1]) == 0


class PerfectV(nn.Module):
    """The v that makes ``x0 = alpha z - sigma_t v`` the optimal x0 of Gaussian data
    N(MU, SD^2) (the closed form that ``GaussianDenoiser`` uses), from the network's own inputs
    (z_t and 1000 t)."""

    def forward(self, z, level, class_labels=None, **cond):
        t = level.to(z.dtype)[:, None, None, None] / 1000
        alpha, sig_t = torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)
        s = sig_t / alpha
        x0 = MU + SD**2 / (SD**2 + s**2) * (z / alpha - MU)
        return (alpha * z - x0) / sig_t


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_drives_a_v_model(sampler):
    """A v network wrapped by its objective samples what the closed-form denoiser samples
    (on the v objective's own noise range and native schedule), with every sampler."""
    shape = (64, 2, 2, 2)
    wrapped = Denoiser(PerfectV(), S.VObjective())
    exact = GaussianDenoiser(S.VObjective())
    kw = dict(steps=12, sampler=sampler, seed=4, dtype=torch.float64)
    got = sample(wrapped, shape, **kw)
    want = sample(exact, shape, **kw)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)


def test_a_v_model_samples_the_data_distribution():
    x = sample(
        Denoiser(PerfectV(), S.VObjective()),
        (4096, 2, 2, 2),
        steps=48,
        sampler="heun",
        seed=0,
        dtype=torch.float64,
    )
    assert float(x.mean()) == pytest.approx(MU, abs=0.02)
    assert float(x.std()) == pytest.approx(SD, abs=0.02)
