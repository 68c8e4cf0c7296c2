"""The denoiser wrappers under torch.compile: one graph per sampling step for every objective,
and a compiled sampler run gives the eager samples."""

import pytest
import torch

from ditkit import spec as S
from ditkit.runtime.denoiser import Denoiser, compile_denoiser, compile_mode
from ditkit.runtime.samplers import sample
from tests.runtime.conftest import perturbed

OBJECTIVES = {
    "edm": (S.EDMObjective(), "tiny-hdit-neighborhood"),
    "ddpm_eps": (S.DDPMObjective(), "tiny-dit"),
    "x0": (S.X0Objective(), "tiny-hdit-global"),
    "flow": (S.FlowObjective(), "tiny-mdit"),
    "v": (S.VObjective(), "tiny-mdit"),
}


def _inputs(spec, batch=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, spec.input.channels, *spec.input.resolution, generator=g) * 3
    sigma = torch.rand(batch, generator=g) * 3 + 0.2
    labels = torch.arange(batch) % spec.conditioning.classes.count
    return x, sigma, labels


@pytest.mark.parametrize("name", OBJECTIVES)
def test_a_denoiser_step_is_one_graph_for_every_objective(name):
    objective, model_name = OBJECTIVES[name]
    den = Denoiser(perturbed(model_name), objective)
    torch._dynamo.reset()
    with torch.no_grad():
        report = torch._dynamo.explain(den.denoise)(*_inputs(den.model.spec))
    assert (report.graph_count, report.graph_break_count) == (1, 0), [
        b.reason.splitlines()[0] for b in report.break_reasons
    ]


def test_compiled_sampling_with_cfg_equals_eager_and_compiles_once_per_batch_shape():
    model = perturbed("tiny-dit")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    kwargs = dict(
        steps=3,
        sampler="heun",
        seed=0,
        class_labels=torch.tensor([1, 2]),
        cfg_scale=3.0,
        cfg_interval=(0.5, 5.0),
    )
    shape = (2, 4, 8, 8)
    eager = sample(Denoiser(model, S.DDPMObjective()), shape, **kwargs)
    torch._dynamo.reset()
    den = compile_denoiser(Denoiser(model, S.DDPMObjective()), backend=backend)
    compiled = sample(den, shape, **kwargs)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    # the guided steps (batch 4) and the unguided ones outside the interval (batch 2)
    assert 1 <= len(graphs) <= 2


def test_auto_compile_mode_per_device_and_use():
    assert compile_mode("auto", "cpu", training=False) == "default"
    assert compile_mode("auto", "cuda", training=False) == "reduce-overhead"
    assert compile_mode("auto", "cuda", training=True) == "max-autotune-no-cudagraphs"
    assert compile_mode("max-autotune", "cpu", training=True) == "max-autotune"
    with pytest.raises(ValueError, match="compile mode 'fast': choose one of auto, default"):
        compile_mode("fast", "cpu", training=False)


def _checkpoint(tmp_path):
    from ditkit.runtime.checkpoint import save_checkpoint

    model = perturbed("tiny-hdit-neighborhood")
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model.state_dict(), model.spec, objective=S.EDMObjective())
    return path


def test_cli_sample_compile_compiles_the_denoiser_and_gives_the_eager_samples(
    tmp_path, monkeypatch
):
    """``--compile`` reaches ``compile_denoiser`` with the mode (run here on Dynamo's eager
    backend: inductor's code generation is minutes on this CPU) and the samples are unchanged."""
    import numpy as np
    from PIL import Image

    from ditkit.cli import main
    from ditkit.runtime import denoiser as D

    ckpt = _checkpoint(tmp_path)
    seen = []
    real = D.compile_denoiser

    def on_eager_backend(den, mode="auto", device="cpu", backend=None):
        seen.append(mode)
        return real(den, mode, device, backend="eager")

    monkeypatch.setattr(D, "compile_denoiser", on_eager_backend)
    common = ["--steps", "2", "--classes", "1,2", "--no-progress"]
    assert main(["sample", str(ckpt), *common, "--out", str(tmp_path / "a.png")]) == 0
    torch._dynamo.reset()
    assert main(["sample", str(ckpt), *common, "--compile", "--out", str(tmp_path / "b.png")]) == 0
    assert seen == ["auto"]
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert np.array_equal(a, b)


def test_cli_refuses_an_unknown_compile_mode(tmp_path, capsys):
    from ditkit.cli import main

    ckpt = _checkpoint(tmp_path)
    assert (
        main(
            [
                "sample",
                str(ckpt),
                "--steps",
                "1",
                "--compile",
                "fast",
                "--no-progress",
                "--out",
                str(tmp_path / "a.png"),
            ]
        )
        == 2
    )
    assert "--compile fast: choose one of auto, default" in capsys.readouterr().err
    assert (
        main(["bench", "sample", str(ckpt), "--engines", "compile", "--compile-mode", "fast"]) == 2
    )
    assert "--compile-mode fast: choose from auto" in capsys.readouterr().err
