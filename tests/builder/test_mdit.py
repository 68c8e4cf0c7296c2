"""MDiT as a spec: aggregate attention, cross-attention memory, {0,0,0,L} = isotropic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditkit import spec as S
from ditkit.builder import build, kernels
from ditkit.builder.accounting import describe
from ditkit.builder.attention import AggregateAttention, AttentionConfig
from ditkit.builder.cross_attention import CrossAttention
from ditkit.spec.families import mdit
from ditkit.spec.presets import preset
from tests.conftest import EXAMPLES
from tests.perturb import perturb


def _randomise_zero_inits(model):
    perturb(model, trainable_only=True, only_zero=True)


ISOTROPIC = """
spec_version: 1
name: isotropic
input: {channels: 4, space: latent, resolution: [16, 16]}
patch: {size: 2, bias: false}
conditioning:
  width: 64
  noise: {kind: sinusoidal, frequency_dim: 384, activation: geglu}
  classes: {count: 10, inject: memory}
block:
  d_head: 16
  qk_norm: {kind: layer, affine: false}
  rope: {kind: axial, fraction: 0.25, positions: integer, frequencies: geometric}
  attention_bias: false
  norm: {kind: rms}
  modulation: {kind: none}
  cross_attention: {kind: memory}
  ffn: {kind: geglu, ratio: 2.6666666666666665, bias: false}
  zero_init_out: true
levels:
- {d_model: 64, middle: 2}
head: {kind: linear, norm: {kind: rms, affine: true}, bias: false}
"""


def test_mdit_0_0_0_l_is_the_isotropic_model():
    torch.manual_seed(0)
    m = build(mdit(0, 0, 0, 2, core=64, d_head=16, resolution=16, classes=10, aux=False))
    iso = build(S.loads(ISOTROPIC))
    shapes = lambda model: {k: tuple(v.shape) for k, v in model.state_dict().items()}  # noqa
    assert shapes(m) == shapes(iso)
    _randomise_zero_inits(m)
    iso.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 4, 16, 16)
    t, y = torch.tensor([3.0, 700.0]), torch.tensor([2, 10])
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, y), iso(x, t, y), atol=0, rtol=0)
    # the committed example is the same spec
    assert (
        S.load(EXAMPLES / "tiny" / "tiny-mdit-isotropic.yaml").levels
        == mdit(0, 0, 0, 2, core=64, d_head=16, resolution=16, classes=10, aux=False).levels
    )


def test_aggregate_attention_matches_a_direct_computation():
    torch.manual_seed(0)
    d, d_head, heads, f = 8, 4, 3, 2
    att = AggregateAttention(AttentionConfig(d, d_head, bias=False), heads, f)
    x = torch.randn(2, 4, 6, d)
    with torch.no_grad():
        out = att(x)
        # pixel unshuffle by hand: token (i, j) of the coarse grid holds rows 2i..2i+1,
        # cols 2j..2j+1, channels ordered (row, col, channel)
        g = x.view(2, 2, f, 3, f, d).permute(0, 1, 3, 2, 4, 5).reshape(2, 6, f * f * d)
        q, k, v = att.qkv(g).view(2, 6, 3, heads, d_head).permute(2, 0, 3, 1, 4)
        probs = (q @ k.transpose(-1, -2) / d_head**0.5).softmax(-1)
        o = (probs @ v).transpose(1, 2).reshape(2, 6, heads * d_head)
        o = att.out(o).view(2, 2, 3, f, f, d).permute(0, 1, 3, 2, 4, 5).reshape(2, 4, 6, d)
    assert att.qkv.weight.shape == (3 * heads * d_head, f * f * d)  # non-square
    assert att.out.weight.shape == (f * f * d, heads * d_head)
    torch.testing.assert_close(out, o, atol=1e-6, rtol=1e-6)


def test_cross_attention_uses_null_class_and_time_tokens_and_counts_macs():
    torch.manual_seed(0)
    cfg = AttentionConfig(8, 4, S.QKNorm(kind="layer", affine=False), bias=False)
    ca = CrossAttention(cfg, 6, ["label", "time"], null_token=True)
    ca.init_special()
    x = torch.randn(2, 3, 5, 8)
    mem = {"label": torch.randn(2, 6), "time": torch.randn(2, 6)}
    with torch.no_grad():
        out = ca(x, mem)
        keys, values = [ca.null[0].expand(2, 8)], [ca.null[1].expand(2, 8)]
        for s in ("label", "time"):
            k, v = ca.kv[s](mem[s]).chunk(2, -1)
            keys.append(k)
            values.append(v)
        k = torch.stack(keys, 1).view(2, 3, 2, 4).transpose(1, 2)
        v = torch.stack(values, 1).view(2, 3, 2, 4).transpose(1, 2)
        q = ca.q(x).view(2, 15, 2, 4).transpose(1, 2)
        q, k = F.layer_norm(q, (4,), eps=1e-6), F.layer_norm(k, (4,), eps=1e-6)
        o = ((q @ k.transpose(-1, -2)) / 2).softmax(-1) @ v
        expected = ca.out(o.transpose(1, 2).reshape(2, 3, 5, 8))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    with kernels.count_attention() as counts:
        ca(x, mem)
    assert sum(counts.values()) == 2 * 2 * 2 * 15 * 3 * 4  # 2 (QK, AV) x B x heads x N x M x D


def test_aggregate_attention_is_counted_on_the_coarse_grid():
    spec = S.load(EXAMPLES / "tiny" / "tiny-mdit.yaml")
    report = describe(spec)
    # core grid 8x8 (64 tokens, d 64, 4 heads of 16): two standard blocks with global
    # self-attention (2 * 64^2 * 64 each) and cross-attention to 3 tokens (2 * 64 * 3 * 64
    # each), one aggregate block: 4x4 coarse grid, 6 heads of 16 (2 * 16^2 * 96);
    # outer grid 16x16, d 32, neighborhood 3x3: 2 blocks of 2 * 256 * 9 * 32
    core = 2 * (2 * 64 * 64 * 64 + 2 * 64 * 3 * 64) + 2 * 16 * 16 * 96
    outer = 2 * (2 * 256 * 9 * 32)
    assert round(report.attention_gmacs * 1e9) == core + outer


def test_describe_numbers_for_the_mdit_presets():
    expected = {
        "mdit-b": (133_692_289, 31.49),  # the paper: "MDiT-B used 133 Million"
        "mdit-l": (465_330_689, 110.03),
        "mdit-xl": (641_600_065, 152.86),
    }
    for name, (params, gmacs) in expected.items():
        report = describe(preset(name))
        assert report.params == params, name
        assert abs(report.gmacs - gmacs) < 0.01, (name, report.gmacs)


@pytest.mark.parametrize("name", ["tiny-mdit", "tiny-mpdit", "tiny-mpdit-3level"])
def test_tiny_models_export(name):
    torch.manual_seed(0)
    spec = S.load(EXAMPLES / "tiny" / f"{name}.yaml")
    model = build(spec).eval()
    _randomise_zero_inits(model)
    h = spec.input.resolution[0]
    x, t, y = torch.randn(2, 4, h, h), torch.tensor([0.3, 0.6]), torch.tensor([1, 10])
    exported = torch.export.export(model, (x, t, y))
    with torch.no_grad():
        eager = model(x, t, y)
        assert eager.abs().max() > 1e-3
        torch.testing.assert_close(exported.module()(x, t, y), eager, atol=1e-5, rtol=1e-5)


def test_aspect_and_scale_inputs_condition_the_model_and_drop_out_in_training():
    torch.manual_seed(0)
    spec = S.load(EXAMPLES / "tiny" / "tiny-mdit.yaml")
    assert [a.name for a in spec.conditioning.aux] == ["scale", "aspect"]
    model = build(spec)
    cond = model.conditioning
    assert cond.noise.fc1.in_features == 384 + 256 + 256  # concatenated before the MLP
    cond.eval()
    t, y = torch.tensor([100.0, 100.0]), torch.tensor([1, 1])
    with torch.no_grad():
        base = cond(t, y)
        given = cond(t, y, scale=torch.tensor([[0.5], [1.0]]), aspect=torch.tensor([[1.5], [1.0]]))
        zeros = cond(t, y, scale=torch.zeros(2, 1), aspect=torch.zeros(2, 1))
    torch.testing.assert_close(base, zeros, atol=0, rtol=0)  # omitted = zeros = "dropped"
    assert (given - base).abs().amax(-1).min() > 1e-4  # every sample moved
    assert not torch.allclose(given[0], given[1])
    cond.train()
    n = 4000
    with torch.no_grad():
        out = cond(
            torch.full((n,), 100.0),
            torch.ones(n, dtype=torch.long),
            scale=torch.ones(n, 1),
            aspect=torch.ones(n, 1),
        )
        dropped_both = cond(torch.full((1,), 100.0), torch.ones(1, dtype=torch.long))
    # each input is dropped with p = 0.1, independently: both dropped in ~1% of samples
    both = (out - dropped_both).abs().amax(-1) < 1e-6
    assert 0.002 < both.float().mean() < 0.03
