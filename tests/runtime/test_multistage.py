"""Multi-stage sampling (ditkit.runtime.multistage) on the closed-form Gaussian denoiser."""

import numpy as np
import pytest
import torch

from ditkit.evaluate.npz import NpzError, sample_npz
from ditkit.runtime.multistage import enlarge, sample_staged, stage_sigmas
from ditkit.runtime.samplers import sample
from ditkit.runtime.schedules import SamplingError
from ditkit.spec import SpecError
from ditkit.spec.sampling import Sampling, Stage, parse_stages
from tests.runtime.test_samplers import GaussianDenoiser


class Recording(GaussianDenoiser):
    """Records the shape and sigma of every evaluation."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def denoise(self, x, sigma, class_labels=None, **cond):
        self.seen.append((tuple(x.shape), float(sigma[0])))
        return super().denoise(x, sigma, class_labels, **cond)


def staged(text, **fields):
    return Sampling.of(stages=parse_stages(text), **fields)


def test_each_stage_samples_its_resolution():
    den = Recording()
    shapes = []
    x = sample_staged(
        den,
        (2, 3, 16, 16),
        staged("4,8:2.0,16x16:1.0:3", steps=4),
        on_stage=lambda k, x: shapes.append((k, tuple(x.shape))),
    )
    assert shapes == [(0, (2, 3, 4, 4)), (1, (2, 3, 8, 8)), (2, (2, 3, 16, 16))]
    assert x.shape == (2, 3, 16, 16)
    # dpmpp_2m: one evaluation per step; stage 2 has its own 3 steps
    assert [s for s, _ in den.seen].count((2, 3, 4, 4)) == 4
    assert [s for s, _ in den.seen].count((2, 3, 8, 8)) == 4
    assert [s for s, _ in den.seen].count((2, 3, 16, 16)) == 3


def test_one_stage_is_plain_sampling_bit_for_bit():
    den = GaussianDenoiser()
    for sampler in ("dpmpp_2m", "euler_ancestral"):
        plain = sample(den, (2, 3, 8, 8), Sampling(steps=5, seed=3, sampler=sampler))
        one = sample_staged(den, (2, 3, 8, 8), staged("8", steps=5, seed=3, sampler=sampler))
        assert torch.equal(plain, one)


def test_the_last_stage_starts_at_its_sigma():
    den = Recording()
    sample_staged(den, (1, 1, 8, 8), staged("4,8:1.7", sampler="euler", steps=4))
    at_8 = [sigma for shape, sigma in den.seen if shape[-1] == 8]
    assert at_8[0] == pytest.approx(1.7, rel=0, abs=1e-6)  # float32 sigma of the network call
    assert len(at_8) == 4 and all(a > b for a, b in zip(at_8, at_8[1:]))
    sig = stage_sigmas(den, Sampling(steps=4), Stage(resolution=8, sigma=1.7))
    assert float(sig[0]) == 1.7 and float(sig[-1]) == 0.0 and len(sig) == 5


def test_the_refinement_starts_from_the_enlarged_draft():
    # a tiny re-noise keeps the draft: the output is the enlarged first stage
    den = GaussianDenoiser()
    drafts = []
    x = sample_staged(
        den,
        (1, 1, 8, 8),
        staged("4,8:0.01:1:nearest", sampler="euler"),
        on_stage=lambda k, x: drafts.append(x),
    )
    up = drafts[0].repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert (x - up).abs().max() < 0.05
    assert (x - up).abs().max() > 0  # but it was re-noised and denoised


def test_seeds_are_reproducible_and_matter():
    den = GaussianDenoiser()
    s = staged("4,8:2.0", steps=3, sampler="euler_ancestral", seed=5)
    a = sample_staged(den, (2, 1, 8, 8), s)
    assert torch.equal(a, sample_staged(den, (2, 1, 8, 8), s))
    assert not torch.equal(a, sample_staged(den, (2, 1, 8, 8), Sampling.of(s, seed=6)))


def test_enlarge_modes():
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    assert enlarge(x, (4, 4), "nearest")[0, 0].tolist() == [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 3, 3],
        [2, 2, 3, 3],
    ]
    flat = torch.full((1, 2, 3, 3), 0.25)
    assert torch.allclose(enlarge(flat, (7, 5), "bicubic"), torch.full((1, 2, 7, 5), 0.25))


@pytest.mark.parametrize(
    "text,where",
    [
        ("8:1.0", "stages[0].sigma"),
        ("8,16", "stages[1].sigma"),
        ("16,8:1.0", "stages[1].resolution"),
        ("8,16:-1", "stages[1].sigma"),
        ("8,16:1:0", "stages[1].steps"),
    ],
)
def test_bad_stages_name_the_field(text, where):
    with pytest.raises(SpecError) as err:
        staged(text)
    assert where in str(err.value)


@pytest.mark.parametrize("text", ["", "8,", "a", "8:1:2:3", "8x8x8", "8,16:two"])
def test_malformed_stage_text(text):
    with pytest.raises(ValueError, match="RES\\[:SIGMA\\[:STEPS\\]\\]"):
        parse_stages(text)


def test_stage_text_round_trips():
    s = staged("4,8x16:2:3,16:0.5:nearest")
    assert ",".join(st.text() for st in s.stages) == "4,8x16:2:3,16:0.5:nearest"
    assert "stages 4,8x16:2:3,16:0.5:nearest" in s.describe()
    assert Sampling().recorded() == {
        k: v for k, v in Sampling().recorded().items() if k != "stages"
    }  # one pass records what it always did
    assert "stages" not in Sampling().recorded()


def test_runtime_refusals():
    den = GaussianDenoiser()
    with pytest.raises(SamplingError, match="last stage samples 8x8 but 16x16"):
        sample_staged(den, (1, 1, 16, 16), staged("4,8:1.0"))
    with pytest.raises(SamplingError, match="above the model's highest noise level"):
        sample_staged(den, (1, 1, 8, 8), staged("4,8:1000"))
    with pytest.raises(SamplingError, match="multistage"):
        sample(den, (1, 1, 8, 8), staged("4,8:1.0"))


class Interrupted(GaussianDenoiser):
    """Stops (like a killed run) after ``calls`` evaluations."""

    def __init__(self, calls):
        super().__init__()
        self.left = calls

    def denoise(self, x, sigma, class_labels=None, **cond):
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return super().denoise(x, sigma, class_labels, **cond)


def test_npz_records_the_stages_and_refuses_other_ones(tmp_path):
    out = tmp_path / "s.npz"
    s = staged("2,4:1.0", steps=2)
    with pytest.raises(KeyboardInterrupt):  # chunk 0 (4 evaluations) done, chunk 1 not
        sample_npz(Interrupted(5), out, s, num=3, shape=(3, 4, 4), batch=2, progress=False)
    with pytest.raises(NpzError, match="stages"):  # other stages: refused, nothing lost
        sample_npz(
            GaussianDenoiser(),
            out,
            staged("2,4:0.5", steps=2),
            num=3,
            shape=(3, 4, 4),
            batch=2,
            progress=False,
        )
    with pytest.raises(NpzError, match="stages"):  # one pass where stages were drawn
        sample_npz(
            GaussianDenoiser(),
            out,
            Sampling(steps=2),
            num=3,
            shape=(3, 4, 4),
            batch=2,
            progress=False,
        )
    result = sample_npz(GaussianDenoiser(), out, s, num=3, shape=(3, 4, 4), batch=2, progress=False)
    assert result.reused == 2 and np.load(out)["arr_0"].shape == (3, 4, 4, 3)
    whole = tmp_path / "whole.npz"  # the resumed file equals one drawn in one go
    sample_npz(GaussianDenoiser(), whole, s, num=3, shape=(3, 4, 4), batch=2, progress=False)
    assert np.array_equal(np.load(out)["arr_0"], np.load(whole)["arr_0"])
