"""``--precision bf16`` for eager sampling: the network under bf16 autocast, x0 in fp32, an
approximation of the fp32 result; recorded in ``--npz`` settings; refused where it cannot apply."""

import subprocess
import sys

import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build
from ditkit.device import cpu_has_bf16
from ditkit.errors import UserError
from ditkit.runtime.denoiser import Denoiser
from tests.conftest import EXAMPLES, ROOT
from tests.perturb import perturb

TINY = EXAMPLES / "tiny" / "tiny-hdit-global.yaml"


def test_bf16_denoiser_approximates_fp32_and_returns_fp32():
    torch.manual_seed(0)
    spec = S.load(TINY)
    model = perturb(build(spec).eval())
    x = torch.randn(2, spec.input.channels, *spec.input.resolution)
    sigma = torch.tensor([0.5, 3.0])
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        ref = Denoiser(model, S.EDMObjective())(x, sigma, labels)
        low = Denoiser(model, S.EDMObjective(), precision="bf16")(x, sigma, labels)
    assert low.dtype == torch.float32 and low.shape == ref.shape
    err = (low - ref).abs().max() / ref.abs().max()
    assert 0 < err < 5e-2  # really bf16 (not fp32), and close to it


def test_unknown_precision_is_a_user_error():
    with pytest.raises(UserError, match="precision 'fp8'"):
        Denoiser(build(S.load(TINY)), S.EDMObjective(), precision="fp8")


def test_cpu_bf16_units_are_read_from_the_flags():
    assert cpu_has_bf16("flags : fpu sse avx512f avx512_bf16 amx_tile")
    assert cpu_has_bf16("flags : fpu amx_bf16")
    assert not cpu_has_bf16("flags : fpu sse avx2 avx512f")


def _sample(*args):
    return subprocess.run(
        [sys.executable, "-m", "ditkit.cli", "sample", str(TINY), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(
    not cpu_has_bf16(),
    reason="this CPU has no bf16 units: the command falls "
    "back to fp32 (a note), so there is no bf16 --npz to resume",
)
def test_npz_records_the_precision_and_a_resume_must_match(tmp_path):
    out = tmp_path / "s.npz"
    base = [
        "--npz",
        str(out),
        "--count",
        "2",
        "--steps",
        "2",
        "--labels",
        "1",
        "--no-progress",
        "--device",
        "cpu",
    ]
    first = _sample(*base, "--precision", "bf16", "--batch", "1")
    assert first.returncode == 0, first.stderr
    out.unlink()  # keep the parts: the next run resumes them
    other = _sample(*base, "--precision", "fp32", "--batch", "1")
    assert other.returncode == 2 and "precision" in other.stderr
    assert "Traceback" not in other.stderr
