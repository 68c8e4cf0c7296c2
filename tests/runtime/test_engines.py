"""The onnxruntime engine drives the same samplers as the eager model, with the same results."""

import pytest
import torch

from ditkit import spec as S
from ditkit.builder import use_backend
from ditkit.runtime.denoiser import Denoiser
from ditkit.deploy.engines import OrtDenoiser
from ditkit.deploy.export import ExportError
from ditkit.runtime.samplers import sample

# a module fixture builds every engine / runs the whole harness (30-40 s on 2 cores): run by
# .ci/run's slow line, outside the default suite
pytestmark = pytest.mark.slow


def test_engine_reads_everything_from_metadata(hdit_export):
    model, result, _ = hdit_export
    ort = OrtDenoiser(result.path)
    assert ort.spec == model.spec
    assert isinstance(ort.objective, S.EDMObjective)
    assert ort.null_class == 10 and not ort.learned_variance
    assert ort.rules[0].step == 4


@pytest.mark.parametrize("sampler,resolution", [("heun", (16, 16)), ("dpmpp_3m_sde", (16, 24))])
def test_ort_samples_equal_eager_samples(hdit_export, sampler, resolution):
    model, result, _ = hdit_export
    ort = OrtDenoiser(result.path)
    eager = Denoiser(model, S.EDMObjective())
    kw = dict(steps=4, sampler=sampler, seed=5, class_labels=[3, 7], cfg_scale=2.5)
    shape = (2, 3, *resolution)
    with use_backend("gather"):
        a = sample(eager, shape, **kw)
    b = sample(ort, shape, **kw)
    assert ort.calls == (7 if sampler == "heun" else 4)  # CFG: one batched call per evaluation
    scale = float(a.abs().max())
    assert float((a - b).abs().max()) <= 1e-4 * max(1.0, scale)
    assert not torch.allclose(a, sample(ort, shape, **{**kw, "seed": 6}))


def test_ort_ddpm_ancestral_uses_the_learned_variance(dit_export):
    model, result = dit_export
    ort = OrtDenoiser(result.path)
    assert ort.learned_variance
    eager = Denoiser(model, S.DDPMObjective())
    kw = dict(
        steps=5, sampler="ddpm", seed=1, class_labels=[1, 2, 3], cfg_scale=1.5, cfg_channels=3
    )
    a = sample(eager, (3, 4, 8, 8), **kw)
    b = sample(ort, (3, 4, 8, 8), **kw)
    assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(a.abs().max()))
    # the learned variance matters: without it (beta_tilde) the samples differ
    x = torch.randn(3, 4, 8, 8)
    x0, var = ort.denoise(x, torch.full((3,), 5.0), torch.tensor([1, 2, 3]))
    assert var is not None and var.shape == x.shape


def test_engine_refuses_shapes_outside_the_rule(hdit_export):
    ort = OrtDenoiser(hdit_export[1].path)
    with pytest.raises(ExportError, match="not divisible"):
        ort.denoise(torch.zeros(1, 3, 16, 18), torch.ones(1))
    with pytest.raises(ValueError, match="unknown auxiliary input.*aug_cond"):
        ort.denoise(torch.zeros(1, 3, 16, 16), torch.ones(1), aug=torch.zeros(1, 9))
    with pytest.raises(ValueError, match=r"aug_cond: expected shape \(1, 9\)"):
        ort.denoise(torch.zeros(1, 3, 16, 16), torch.ones(1), aug_cond=torch.zeros(1, 8))


def test_ort_takes_real_aux_inputs(hdit_export):
    """Non-zero auxiliary conditioning reaches the graph: ORT equals eager with the same
    aux, and the aux changes the output (so it is not dropped or zeroed inside)."""
    model, result, _ = hdit_export
    ort = OrtDenoiser(result.path)
    assert ort.aux == {"aug_cond": 9}
    eager = Denoiser(model, S.EDMObjective())
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(3, 3, 16, 20, generator=g), torch.tensor([0.5, 2.0, 9.0])
    labels, aug = torch.tensor([1, 4, 10]), torch.randn(3, 9, generator=g)
    with torch.no_grad(), use_backend("gather"):
        want = eager(x, sigma, labels, aug_cond=aug)
        zero = eager(x, sigma, labels)
    got = ort(x, sigma, labels, aug_cond=aug)
    assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))
    assert float((want - zero).abs().max()) > 1e-2  # the aux input matters
    assert float((ort(x, sigma, labels) - zero).abs().max()) <= 1e-4 * max(
        1.0, float(zero.abs().max())
    )  # omitted = zeros, as in the model


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="ditkit export"):
        OrtDenoiser(tmp_path / "nope.onnx")


# -------------------------------------------------------------------------------- TensorRT

from ditkit.deploy import tensorrt as T  # noqa: E402


def test_profile_parsing_and_cache_key():
    p = T.parse_profile("1x16/2x32x48/4x64")
    assert p.min == T.Shape(1, 16, 16) and p.opt == T.Shape(2, 32, 48)
    assert p.max == T.Shape(4, 64, 64)
    for bad in ("1x16/2x32", "1x16/2x8/4x64", "ax16/2x32/4x64"):
        with pytest.raises(ValueError, match="--profile"):
            T.parse_profile(bad)
    # the same profile by the exported graph's dimension names
    named = T.parse_profile("batch=1/2/4,height=16/32/64,width=16/48/64")
    assert named == p
    assert T.parse_profile("height=16/32/64") == T.Profile(
        T.Shape(1, 16, 16), T.Shape(1, 32, 32), T.Shape(1, 64, 64)
    )
    for bad in ("batch=1/2/4", "depth=1/2/3,height=16/32/64", "height=16/32", "height=64/32/16"):
        with pytest.raises(ValueError, match="--profile"):
            T.parse_profile(bad)
    k = T.engine_cache_key("abc", [p], "fp16", "10.8.0", "H100 sm_90")
    assert k == T.engine_cache_key("abc", [p], "fp16", "10.8.0", "H100 sm_90")
    others = [
        T.engine_cache_key("abd", [p], "fp16", "10.8.0", "H100 sm_90"),
        T.engine_cache_key("abc", [p], "bf16", "10.8.0", "H100 sm_90"),
        T.engine_cache_key("abc", [p], "fp16", "10.9.0", "H100 sm_90"),
        T.engine_cache_key("abc", [p], "fp16", "10.8.0", "L4 sm_89"),
        T.engine_cache_key(
            "abc", [T.parse_profile("1x16/2x32/4x64")], "fp16", "10.8.0", "H100 sm_90"
        ),
    ]
    assert k not in others and len(set(others)) == len(others)


def test_profile_outside_the_model_rule_is_refused(hdit_export):
    rules = OrtDenoiser(hdit_export[1].path).rules
    with pytest.raises(ValueError, match="height 18"):
        T.check_profile(T.parse_profile("1x16/2x18x16/4x64"), rules)


def test_trt_build_without_tensorrt_is_a_clear_error(hdit_export, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed: this test checks the message when it is not")
    except ImportError:
        pass
    from ditkit.cli import main

    rc = main(["trt", "build", str(hdit_export[1].path), "--profile", "1x16/2x16/4x32"])
    assert rc == 2
    assert "tensorrt is not installed" in capsys.readouterr().err


def test_trt_engine_matches_onnxruntime(hdit_export, tmp_path):
    pytest.importorskip(
        "tensorrt",
        reason="TensorRT is not installable here (NVIDIA's index); this test runs only where it is",
    )
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU; none is visible")
    path = T.build_engine(
        hdit_export[1].path,
        [T.parse_profile("1x16/2x16/4x32")],
        precision="fp32",
        out=tmp_path / "e.engine",
        cache_dir=tmp_path / "cache",
    )
    trt_d = T.TrtDenoiser(path, hdit_export[1].path)
    ort = OrtDenoiser(hdit_export[1].path)
    x = torch.randn(2, 3, 16, 16)
    a, _ = ort.denoise(x, torch.tensor([0.5, 3.0]), torch.tensor([1, 2]))
    b, _ = trt_d.denoise(x.cuda(), torch.tensor([0.5, 3.0]).cuda(), torch.tensor([1, 2]).cuda())
    assert float((a - b.cpu()).abs().max()) < 1e-3


# -------------------------------------------------------------------------------- bench


def test_cli_bench_sample_eager(capsys, tmp_path):
    import json

    from ditkit.cli import main
    from tests.conftest import EXAMPLES

    spec = str(EXAMPLES / "tiny" / "tiny-hdit-neighborhood.yaml")
    rc = main(
        [
            "bench",
            "sample",
            spec,
            "--resolutions",
            "16,16x24",
            "--engines",
            "eager,tensorrt",
            "--repeats",
            "2",
            "--json",
        ]
    )
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["engine"] for r in rows] == ["eager", "tensorrt"] * 2
    assert [r["resolution"] for r in rows] == ["16x16", "16x16", "16x24", "16x24"]
    assert all(r["ms_per_step"] > 0 for r in rows if r["engine"] == "eager")
    # the old forms (space-separated list, --json FILE) still work, with one line each
    out = tmp_path / "rows.json"
    assert (
        main(
            [
                "bench",
                "sample",
                spec,
                "--resolutions",
                "16",
                "16x24",
                "--engines",
                "eager",
                "--repeats",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "eager" in captured.out and "16x24" in captured.out  # the table
    assert "space-separated --resolutions values are deprecated" in captured.err
    assert "--json FILE is deprecated" in captured.err
    assert [r["resolution"] for r in json.loads(out.read_text())] == ["16x16", "16x24"]
