"""One battery over every family, instead of a copy per paper.

Every tiny example (each family's small model) goes through the same checks, each its own test
so one failure hides no other: its parameter count is what ``describe`` reports, level by level;
the forward pass has the right shape at two resolutions; a checkpoint round trip gives
bit-identical outputs; every neighborhood backend gives the same output; and (``-m slow``) its
ONNX export passes the parity check. Every example spec at full size builds on the meta device
with the same accounting.
The class-conditioned tiny models (MDiT's class token in cross-attention, MPDiT's prefix class
tokens) learn to separate two labels, and an omitted label is the null class."""

import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build, describe, use_backend
from ditkit.runtime.checkpoint import load_model, save_checkpoint
from tests.conftest import EXAMPLES, example_specs, tiny_specs
from tests.perturb import perturb


def _inputs(spec, batch=2, resolution=None, device="cpu"):
    g = torch.Generator().manual_seed(0)
    h, w = resolution or spec.input.resolution
    x = torch.randn(batch, spec.input.channels, h, w, generator=g).to(device)
    sigma = (torch.rand(batch, generator=g) + 0.5).to(device)
    labels = (
        torch.arange(batch, device=device) % spec.conditioning.classes.count
        if spec.conditioning.classes
        else None
    )
    return x, sigma, labels


def _perturbed(spec):
    torch.manual_seed(0)
    model = build(spec).eval()
    return perturb(model, seed=1, trainable_only=True)


def _other_resolution(spec):
    """A second valid resolution (a non-square one where the spec allows it)."""
    h, w = spec.input.resolution
    for cand in ((h, 2 * w), (2 * h, w), (2 * h, 2 * w)):
        if not spec.check_resolution(cand):
            return cand
    return (h, w)


def _parameter_accounting(spec, model):
    report = describe(spec)
    total = sum(p.numel() for p in model.parameters())
    assert report.params == total
    for i, level in enumerate(report.levels):
        assert level.params == sum(
            p.numel() for n, p in model.named_parameters() if n.startswith(f"levels.{i}.")
        )
    assert report.other["embed, conditioning, head"]["params"] == total - sum(
        lv.params for lv in report.levels
    )


#: one full-size example per family and structure (all of them: ``-m slow``)
FAMILY_EXAMPLES = [
    "dit/dit-s-8",
    "hdit/hdit-imagenet-128",
    "mdit/mdit-b",
    "mpdit/mpdit-b",
    "mpdit/mpdit-xl-3level",
]


@pytest.mark.parametrize("name", FAMILY_EXAMPLES)
def test_each_family_builds_on_meta_with_its_described_parameters(name):
    spec = S.load(EXAMPLES / f"{name}.yaml")
    _parameter_accounting(spec, build(spec, device="meta", init=False))


@pytest.mark.slow
@pytest.mark.parametrize("path", example_specs(), ids=lambda p: p.stem)
def test_every_example_builds_on_meta_with_its_described_parameters(path):
    spec = S.load(path)
    _parameter_accounting(spec, build(spec, device="meta", init=False))


TINY = pytest.mark.parametrize("path", tiny_specs(), ids=lambda p: p.stem)


@TINY
def test_tiny_model_parameters_are_what_describe_reports(path):
    spec = S.load(path)
    _parameter_accounting(spec, _perturbed(spec))


@TINY
def test_tiny_model_forward_shape_at_two_resolutions(path):
    spec = S.load(path)
    model = _perturbed(spec)
    for res in (tuple(spec.input.resolution), _other_resolution(spec)):
        x, sigma, labels = _inputs(spec, resolution=res)
        with torch.no_grad():
            out = model(x, sigma, labels)
        assert out.shape == (2, spec.out_channels, *res)
        assert torch.isfinite(out).all()


@TINY
def test_tiny_model_checkpoint_round_trip_is_bit_identical(path, tmp_path):
    spec = S.load(path)
    model = _perturbed(spec)
    x, sigma, labels = _inputs(spec)
    with torch.no_grad():
        before = model(x, sigma, labels)
    path_ = tmp_path / "m.safetensors"
    save_checkpoint(path_, model.state_dict(), spec)
    loaded, _ = load_model(path_)
    assert loaded.spec == spec
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), before)


@pytest.mark.parametrize(
    "path",
    [
        p
        for p in tiny_specs()
        if any(isinstance(b.attention, S.NeighborhoodAttention) for *_, b in S.load(p).blocks())
    ],
    ids=lambda p: p.stem,
)
def test_tiny_model_neighborhood_backends_agree(path):
    """Every neighborhood backend that runs on CPU gives the same output."""
    spec = S.load(path)
    model = _perturbed(spec)
    x, sigma, labels = _inputs(spec)
    with torch.no_grad():
        results = {}
        for name in ("gather", "tiled", "masked", "flex"):
            with use_backend(name):
                results[name] = model(x, sigma, labels)
    scale = results["masked"].abs().max()
    for name, out in results.items():
        assert (out - results["masked"]).abs().max() <= 1e-5 * max(1.0, float(scale)), name


@pytest.mark.slow
@pytest.mark.parametrize("path", tiny_specs(), ids=lambda p: p.stem)
def test_tiny_model_exports_with_parity(path, tmp_path):
    from ditkit.deploy.export import export_onnx

    spec = S.load(path)
    objective = spec.default_objective
    result = export_onnx(_perturbed(spec), objective, tmp_path / "m.onnx")
    assert result.parity
    for row in result.parity:
        assert row["max_abs_diff"] <= 1e-4 * max(1.0, row["scale"]), row


#: (tiny example, input size, noise level, smallest mean output gap between the two labels)
_CLASS_CONDITIONED = [
    ("tiny-mdit", 16, 300.0, 0.3),  # cross-attention to a class token
    ("tiny-mpdit", 8, 0.5, 0.5),
]  # prefix class tokens


@pytest.mark.parametrize(
    "name,size,level,gap", _CLASS_CONDITIONED, ids=[c[0] for c in _CLASS_CONDITIONED]
)
def test_class_conditioning_responds_to_the_label_after_training(name, size, level, gap):
    """One input, two labels trained to opposite targets: the outputs separate by label, and
    omitted labels are the null class (label 10)."""
    torch.manual_seed(0)
    model = build(S.load(EXAMPLES / "tiny" / f"{name}.yaml"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.randn(1, 4, size, size).expand(8, -1, -1, -1)  # one input: only the label differs
    y = torch.arange(8) % 2
    target = torch.where(y[:, None, None, None] == 0, 1.0, -1.0).expand_as(x)
    t = torch.full((8,), level)
    for _ in range(15):
        loss = (model(x, t, y) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        a = model(x[:1], t[:1], torch.tensor([0]))
        b = model(x[:1], t[:1], torch.tensor([1]))
        null = model(x[:1], t[:1])  # omitted labels -> the null class
        null_explicit = model(x[:1], t[:1], torch.tensor([10]))
    assert (a - b).abs().mean() > gap  # the two labels were trained to opposite targets
    assert a.mean() > b.mean()
    torch.testing.assert_close(null, null_explicit, atol=0, rtol=0)
    assert not torch.allclose(null, a)


#: (tiny example, noise levels, std that replaces its zero initialisations)
_GRADIENT_CASES = [
    ("tiny-mdit", (10.0, 500.0), 0.05),
    ("tiny-mpdit", (0.2, 0.7), 0.02),
    ("tiny-mpdit-3level", (0.2, 0.7), 0.02),
]


@pytest.mark.parametrize("name,levels,std", _GRADIENT_CASES, ids=[c[0] for c in _GRADIENT_CASES])
def test_every_parameter_gets_a_gradient(name, levels, std):
    """With the zero initialisations replaced (so gradients reach every block), one backward
    pass gives every trainable parameter a nonzero gradient."""
    torch.manual_seed(0)
    spec = S.load(EXAMPLES / "tiny" / f"{name}.yaml")
    model = build(spec)
    perturb(model, std, trainable_only=True, only_zero=True)
    h = spec.input.resolution[0]
    x = torch.randn(2, 4, h, h)
    out = model(x, torch.tensor(levels), torch.tensor([1, 3]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    dead = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum()]
    expected = []
    if isinstance(spec.conditioning.noise, S.FNONoise):
        # the FNO's output is mean-pooled: only the DC mode of its last spectral layer reaches
        # it, and the DC coefficient of a real signal has no imaginary part (the reference's
        # design)
        expected = [f"conditioning.noise.spectral.{spec.conditioning.noise.depth - 1}.weights_imag"]
    assert dead == expected, dead
