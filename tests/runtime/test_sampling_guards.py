"""The sampling driver refuses arguments that would give garbage and stops at the first NaN,
naming the step and the sigma (issue 13, item 4); export says when parity compared zeros."""

from __future__ import annotations

import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build
from ditkit.errors import UserError
from ditkit.runtime.denoiser import Denoiser
from ditkit.runtime.samplers import SAMPLERS, SamplingError, sample
from ditkit.spec import SpecError
from ditkit.spec.limits import no_size_limits

from ..training.conftest import tiny_model


@pytest.fixture(scope="module")
def denoiser():
    torch.manual_seed(0)
    return Denoiser(build(S.validate(tiny_model())).eval(), S.EDMObjective())


class _PoisonAt:
    """Wraps a denoiser; returns NaN once sigma drops below ``below``."""

    def __init__(self, inner, below: float):
        self.inner, self.below = inner, below
        self.noise_range, self.null_class = inner.noise_range, getattr(inner, "null_class", None)
        self.learned_variance = False

    def __call__(self, x, sigma, class_labels=None, **cond):
        out = self.inner(x, sigma, class_labels, **cond)
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        return out * float("nan") if s < self.below else out

    def denoise(self, x, sigma, class_labels=None, **cond):
        return self(x, sigma, class_labels, **cond), None


@pytest.mark.parametrize(
    "sampler, step, interval",
    [
        ("euler", 3, r"sigma 0\.5 -> 0\.1"),  # evaluates the model at sigma 0.5
        ("heun", 2, r"sigma 3 -> 0\.5"),  # its corrector evaluates at the next sigma
        ("dpmpp_2m", 3, r"sigma 0\.5 -> 0\.1"),
    ],
)
def test_a_nan_stops_sampling_naming_the_step_and_sigma(denoiser, sampler, step, interval):
    poisoned = _PoisonAt(denoiser, below=1.0)
    sigmas = torch.tensor([10.0, 3.0, 0.5, 0.1, 0.0])
    with pytest.raises(SamplingError, match=rf"NaN/inf at step {step} of 4 .*{interval}"):
        sample(
            poisoned,
            (2, 1, 8, 8),
            steps=4,
            sampler=sampler,
            sigmas=sigmas,
            class_labels=torch.tensor([1, 2]),
        )


def test_a_finite_run_is_untouched(denoiser):
    x = sample(denoiser, (2, 1, 8, 8), steps=3, sampler="heun", class_labels=[0, 1])
    assert torch.isfinite(x).all()


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        # the Sampling spec refuses these, naming the field
        ({"cfg_scale": float("nan")}, SpecError, r"cfg_scale: must be a finite number"),
        ({"cfg_scale": float("inf")}, SpecError, r"cfg_scale: must be a finite number"),
        ({"steps": 0}, SpecError, r"steps: .*greater than 0"),
        ({"sampler": "magic"}, SpecError, r"sampler: unknown sampler .magic.; choose one of euler"),
        ({"eta": -0.5}, SpecError, r"eta: .*greater than or equal to 0"),
        ({"sigma_min": 2.0, "sigma_max": 1.0}, SpecError, r"sigma_min: .*below sigma_max"),
        # the sampler refuses what is valid data but too much to run
        ({"steps": 10**8}, SamplingError, "more than 10,000"),
    ],
)
def test_arguments_that_give_garbage_are_refused(denoiser, kwargs, error, needle):
    args = {"steps": 2, "sampler": "euler", **kwargs}
    with pytest.raises(error, match=needle):
        sample(denoiser, (1, 1, 8, 8), class_labels=[0], **args)
    assert issubclass(error, UserError)


def test_zero_samples_are_refused(denoiser):
    with pytest.raises(SamplingError, match="at least 1"):
        sample(denoiser, (0, 1, 8, 8), steps=2, sampler="euler")


def test_the_step_limit_has_an_override(denoiser, monkeypatch):
    from ditkit.runtime import samplers

    monkeypatch.setattr(samplers, "MAX_STEPS", 3)
    with pytest.raises(SamplingError, match="more than 3"):
        sample(denoiser, (1, 1, 8, 8), steps=4, sampler="euler", class_labels=[0])
    with no_size_limits():
        assert sample(denoiser, (1, 1, 8, 8), steps=4, sampler="euler", class_labels=[0]).shape == (
            1,
            1,
            8,
            8,
        )


def test_every_sampler_is_guarded(denoiser):
    poisoned = _PoisonAt(denoiser, below=100.0)  # NaN from the first call
    for name in SAMPLERS:
        # dpm_adaptive picks its own steps (and a NaN would stall its step-size control)
        where = "model evaluation 1 " if name == "dpm_adaptive" else "step 1 of"
        with pytest.raises(SamplingError, match=where):
            sample(poisoned, (1, 1, 8, 8), steps=3, sampler=name, class_labels=[0])


def test_zero_initialised_layers_are_found():
    from ditkit.deploy.export import zero_weights

    model = build(S.validate(tiny_model()))  # zero_init_out: true
    zeros = zero_weights(model)
    assert zeros and all(name.endswith("weight") for name in zeros)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in zeros:
                p.normal_()
    assert zero_weights(model) == []


@pytest.mark.slow
def test_export_of_an_untrained_spec_says_parity_compared_zeros(tmp_path):
    """(slow: two exports) The note, and the perturbed check that makes parity meaningful."""
    from ditkit.deploy.export import export_onnx

    model = build(S.validate(tiny_model()))
    plain = export_onnx(model, S.EDMObjective(), tmp_path / "a.onnx")
    assert plain.parity_note and "plumbing only" in plain.parity_note
    checked = export_onnx(model, S.EDMObjective(), tmp_path / "b.onnx", perturb_zero_layers=True)
    perturbed = [r for r in checked.parity if r.get("perturbed")]
    assert perturbed and all(
        0 < r["max_abs_diff"] <= r["tolerance"] * max(1, r["scale"]) for r in perturbed
    )
