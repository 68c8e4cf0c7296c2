"""Builder: every spec builds, tiny specs train a step, init follows the papers."""

import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build
from tests.conftest import example_specs, tiny_specs
from tests.perturb import perturb


@pytest.mark.parametrize("path", example_specs(), ids=lambda p: p.name)
def test_every_example_builds_on_meta(path):
    spec = S.load(path)
    model = build(spec, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    h, w = spec.input.resolution
    x = torch.zeros(1, spec.input.channels, h, w, device="meta")
    labels = torch.zeros(1, dtype=torch.long, device="meta") if spec.conditioning.classes else None
    with torch.no_grad():
        out = model(x, torch.ones(1, device="meta"), labels)
    assert out.shape == (1, spec.out_channels, h, w)


def _inputs(spec, batch=2, seed=0, resolution=None):
    g = torch.Generator().manual_seed(seed)
    h, w = resolution or spec.input.resolution
    x = torch.randn(batch, spec.input.channels, h, w, generator=g)
    sigma = torch.rand(batch, generator=g) * 3 + 0.1
    if spec.conditioning.noise.kind == "sinusoidal":
        sigma = sigma * 100
    labels = (
        torch.arange(batch) % (spec.conditioning.classes.count + 1)
        if spec.conditioning.classes
        else None
    )
    return x, sigma, labels


def _perturb(model, seed=1):
    """Zero-initialised tensors would hide bugs; give every parameter some noise."""
    perturb(model, seed=seed, trainable_only=True)


@pytest.mark.parametrize("path", tiny_specs(), ids=lambda p: p.name)
def test_tiny_spec_forward_backward_is_finite(path):
    spec = S.load(path)
    torch.manual_seed(0)
    model = build(spec)
    _perturb(model)
    x, sigma, labels = _inputs(spec)
    out = model(x, sigma, labels)
    assert out.shape == (2, spec.out_channels, *spec.input.resolution)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    # conditioning reaches the output
    out2 = model(x, sigma * 1.5, labels)
    assert (out2 - out).abs().max() > 1e-4


@pytest.mark.parametrize("path", tiny_specs(), ids=lambda p: p.name)
def test_tiny_spec_runs_at_another_resolution(path):
    spec = S.load(path)
    model = build(spec)
    _perturb(model)
    mh, mw = spec.resolution_multiple()
    h, w = spec.input.resolution
    res = next(
        (h + a * mh, w + b * mw)
        for a in range(1, 5)
        for b in range(0, 5)
        if a != b and not spec.check_resolution((h + a * mh, w + b * mw))
    )
    with torch.no_grad():
        out = model(*_inputs(spec, resolution=res))
    assert out.shape[-2:] == res and torch.isfinite(out).all()


def test_bad_input_shape_names_the_rule():
    spec = S.load("examples/tiny/tiny-hdit-neighborhood.yaml")
    model = build(spec)
    with pytest.raises(ValueError, match="input.channels"):
        model(torch.zeros(1, 4, 16, 16), 1.0)
    with pytest.raises(ValueError, match="not divisible by patch x merges = 4x4"):
        model(torch.zeros(1, 3, 18, 16), 1.0)


def test_dit_init_is_adaln_zero():
    spec = S.load("examples/tiny/tiny-dit.yaml")
    torch.manual_seed(0)
    model = build(spec)
    for blk in model.levels[0].middle:
        assert blk.modulation.weight.abs().sum() == 0 and blk.modulation.bias.abs().sum() == 0
        # xavier-uniform bound on the attention projection, zero biases
        w = blk.attn.qkv.weight
        bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
        assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
        assert blk.attn.qkv.bias.abs().sum() == 0
    assert model.head.proj.weight.abs().sum() == 0
    assert 0.015 < model.conditioning.class_embed.weight.std() < 0.025
    x, t, y = _inputs(spec)
    assert model(x, t, y).abs().max() == 0  # zero head: the model starts at zero


def test_hdit_init_matches_k_diffusion():
    spec = S.load("examples/tiny/tiny-hdit-neighborhood.yaml")
    model = build(spec)
    blk = model.levels[0].encoder[0]
    assert torch.equal(blk.attn.scale, torch.full((2,), 10.0))
    assert blk.attn.out.weight.abs().sum() == 0 and blk.ffn.down.weight.abs().sum() == 0
    assert blk.modulation.weight.abs().sum() == 0 and blk.modulation.bias is None
    assert model.levels[0].skip.fac.item() == 0.5
    assert torch.equal(model.head.norm.scale, torch.ones(32))
    assert 0.8 < model.conditioning.class_embed.weight.std() < 1.2
    assert model.conditioning.noise.weight.shape == (16, 1)


def test_shifted_window_alternates_across_encoder_and_decoder():
    spec = S.load("examples/tiny/tiny-hdit-shifted-window.yaml")
    model = build(spec)
    assert model.levels[0].encoder[0].attn.window_shift == 0
    assert model.levels[0].decoder[0].attn.window_shift == 2


def test_null_class_is_used_when_labels_are_omitted():
    spec = S.load("examples/tiny/tiny-dit.yaml")
    model = build(spec)
    _perturb(model)
    x, t, _ = _inputs(spec)
    with torch.no_grad():
        a = model(x, t)
        b = model(x, t, torch.full((2,), 10))
    assert torch.equal(a, b)


def test_unknown_conditioning_input_is_an_error():
    model = build(S.load("examples/tiny/tiny-hdit-global.yaml"))
    with pytest.raises(ValueError, match="aug_cond"):
        model(torch.zeros(1, 3, 16, 16), 1.0, torch.zeros(1, dtype=torch.long), augment=None)
