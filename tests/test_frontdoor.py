"""The Python front door (``ditkit/__init__.py``): cheap to import, and each function does what
its command does (same files out of the same inputs), with errors that name the argument."""

from __future__ import annotations

import doctest
import subprocess
import sys

import pytest
import torch

import ditkit
from ditkit import spec as S
from ditkit.errors import UserError
from tests.conftest import EXAMPLES, ROOT

TINY = EXAMPLES / "tiny" / "tiny-hdit-digits.yaml"  # 1 channel, 8x8, 10 classes, edm


def test_import_ditkit_does_not_import_torch():
    code = (
        "import sys, ditkit\n"
        "assert 'torch' not in sys.modules, 'torch'\n"
        "assert 'pydantic' not in sys.modules, 'pydantic'\n"
        "print(sorted(n for n in ditkit.__all__ if callable(getattr(ditkit, n))))\n"
        "assert 'torch' not in sys.modules, 'torch after getattr'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(
        sorted(["Model", "adapt", "build", "export", "load", "load_spec", "sample", "train"])
    )


# the docstring examples that run in a second or two; export and train are in the slow set
FAST_DOCTESTS = ["Model", "load_spec", "build", "load", "sample", "adapt"]


def _doctest(name: str):
    tests = [
        t for t in doctest.DocTestFinder().find(ditkit, "ditkit") if t.name == f"ditkit.{name}"
    ]
    assert tests and tests[0].examples, f"ditkit.{name} has no example"
    return tests[0]


@pytest.mark.parametrize("name", FAST_DOCTESTS)
def test_docstring_example_runs(name):
    result = doctest.DocTestRunner().run(_doctest(name))
    assert result.failed == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["export", "train"])
def test_docstring_example_runs_slow(name):
    pytest.importorskip("onnxscript")
    result = doctest.DocTestRunner().run(_doctest(name))
    assert result.failed == 0


def test_every_front_door_function_has_an_example():
    for name in ditkit.__all__:
        if name != "__version__":
            assert ">>> " in (getattr(ditkit, name).__doc__ or ""), name


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint (random weights, perturbed so no output layer is zero)."""
    from ditkit.builder import build
    from ditkit.runtime.checkpoint import save_checkpoint

    spec = S.load(TINY)
    torch.manual_seed(3)
    net = build(spec)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, net.state_dict(), spec, objective=S.EDMObjective())
    return path, net


def test_load_a_checkpoint_holds_network_spec_and_objective(checkpoint):
    path, net = checkpoint
    m = ditkit.load(path)
    assert isinstance(m, ditkit.Model) and m.checkpoint == path
    assert m.spec == S.load(TINY) and m.network.spec == m.spec
    assert m.objective == S.EDMObjective() and len(m.checkpoint_hash) == 64
    assert not m.network.training
    for key, value in net.state_dict().items():
        assert torch.equal(m.network.state_dict()[key], value), key


def test_sample_writes_the_grid_the_command_writes(checkpoint, tmp_path, capsys):
    from ditkit.cli import main

    path, _ = checkpoint
    cli_png, py_png = tmp_path / "cli.png", tmp_path / "py.png"
    assert (
        main(
            [
                "sample",
                str(path),
                "--classes",
                "3,7",
                "--count",
                "4",
                "--steps",
                "3",
                "--seed",
                "5",
                "--cfg-scale",
                "2",
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(cli_png),
            ]
        )
        == 0
    )
    x = ditkit.sample(
        ditkit.load(path), labels=[3, 7], count=4, steps=3, seed=5, cfg_scale=2.0, out=py_png
    )
    assert tuple(x.shape) == (4, 1, 8, 8) and x.dtype == torch.float32
    assert py_png.read_bytes() == cli_png.read_bytes()
    again = ditkit.sample(path, labels=[3, 7], count=4, steps=3, seed=5, cfg_scale=2.0)
    assert torch.equal(again, x)  # a path is loaded the same way; same seed, same samples
    other = ditkit.sample(path, labels=[3, 7], count=4, steps=3, seed=6, cfg_scale=2.0)
    assert not torch.allclose(other, x)


def test_build_is_seeded_without_touching_the_global_generator():
    state = torch.random.get_rng_state()
    a = ditkit.build(TINY, seed=1)
    b = ditkit.build(ditkit.load_spec(str(TINY)), seed=1)
    c = ditkit.build(TINY, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.spec == S.load(TINY)


def test_adapt_as_is_keeps_the_weights_and_add_levels_adds_one(checkpoint):
    m = ditkit.load(checkpoint[0])
    same = ditkit.adapt(m, resolution=16)
    assert same.spec.input.resolution == (16, 16) and same.objective == m.objective
    old, new = m.network.state_dict(), same.network.state_dict()
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    deeper = ditkit.adapt(m, (16, 16), "add_levels")
    assert len(deeper.spec.levels) == len(m.spec.levels) + 1
    x = ditkit.sample(deeper, labels=[1], steps=2)
    assert tuple(x.shape) == (1, 1, 16, 16)
    assert ditkit.adapt(m, 16, S.AddLevels()).spec == deeper.spec  # a policy object too


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda m: ditkit.sample(m, labels=[10]), "labels: must be in [0, 10)"),
        (lambda m: ditkit.sample(m, labels=["a"]), "labels ['a']: give class labels as integers"),
        (lambda m: ditkit.sample(m, cfg_scale=3.0), "cfg_scale: guidance needs labels"),
        (lambda m: ditkit.sample(m, count=0), "count 0: must be positive"),
        (lambda m: ditkit.sample(m, resolution=9), "resolution: 9x9 is not divisible"),
        (lambda m: ditkit.sample(m, steps=2, sampler="nope"), "unknown sampler 'nope'"),
        (lambda m: ditkit.adapt(m, (16, 0)), "resolution (16, 0): must be positive"),
        (lambda m: ditkit.adapt(m, 16, "as_is:rope"), "expected key=value"),
        (lambda m: ditkit.load("no-such-preset"), "not a spec file or a preset name"),
        (
            lambda m: ditkit.load(TINY, objective="edn"),
            "objective 'edn' (--objective): choose one of edm,",
        ),
        (lambda m: ditkit.load("model.onnx"), "an exported .onnx file, but this takes"),
        (lambda m: ditkit.train("no-such.yaml"), "no-such.yaml"),
        (lambda m: ditkit.load_spec(TINY, overrides=["levels.0.d_modl=8"]), "d_modl"),
    ],
)
def test_bad_arguments_raise_a_user_error_naming_them(call, fragment):
    m = ditkit.load(TINY)
    with pytest.raises(UserError) as err:
        call(m)
    assert fragment in str(err.value)


def test_a_network_from_build_samples_with_the_usual_objective():
    net = ditkit.build(TINY, seed=0).eval()
    x = ditkit.sample(net, steps=2, count=2, seed=0)
    y = ditkit.sample(ditkit.load(TINY), steps=2, count=2, seed=0)  # load: seed-0 weights
    assert torch.equal(x, y)


def test_export_without_the_onnx_extra_names_the_pip_line(tmp_path, monkeypatch):
    from ditkit.errors import MissingExtra

    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` fails
    with pytest.raises(MissingExtra, match=r"pip install 'ditkit\[onnx\]'"):
        ditkit.export(TINY, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_the_front_doors_train_is_not_shadowed_by_a_subpackage():
    """``ditkit.train`` is the function even after the training floor is imported (a
    subpackage named ``train`` would replace the attribute on first import)."""
    import ditkit.training.loop  # noqa: F401

    assert callable(ditkit.train) and ditkit.train.__module__ == "ditkit"


def test_sample_with_stages():
    import torch

    import ditkit

    m = ditkit.load(str(ROOT / "examples" / "tiny" / "tiny-hdit-digits.yaml"))
    x = ditkit.sample(m, labels=[1, 2], steps=2, seed=4, stages="8,16:2.0:1")
    assert tuple(x.shape[-2:]) == (16, 16)  # the last stage's resolution
    same = ditkit.sample(
        m,
        labels=[1, 2],
        steps=2,
        seed=4,
        stages=[{"resolution": 8}, {"resolution": 16, "sigma": 2.0, "steps": 1}],
    )
    assert torch.equal(x, same)
    plain = ditkit.sample(m, labels=[1, 2], steps=2, seed=4)
    assert torch.equal(plain, ditkit.sample(m, labels=[1, 2], steps=2, seed=4, stages="8"))
    with pytest.raises(UserError, match="stages"):
        ditkit.sample(m, labels=[1], steps=2, stages="8,16")
