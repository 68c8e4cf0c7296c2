"""Resolution-adaptation policies: exact weight carry-over, recorded re-inits, paper costs."""

import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build, describe
from ditkit.builder.transitions import TokenMerge, TokenSplit
from ditkit.runtime.extrapolate import adapt, adapt_spec, cost_curve, loglog_slope
from tests.perturb import perturb

TINY = "examples/tiny/tiny-hdit-neighborhood.yaml"


def _trained(spec, seed=0):
    torch.manual_seed(seed)
    model = build(spec)
    return perturb(model).state_dict()


def test_hdit_add_levels_costs_match_table_1():
    spec = S.load("examples/hdit/hdit-imagenet-128.yaml")
    costs = [
        round(g) for _, g in cost_curve(spec, S.AddLevels(), [(128, 128), (256, 256), (512, 512)])
    ]
    assert costs == [31, 65, 198]
    adapted = adapt_spec(spec, S.AddLevels(), (512, 512))
    assert [lv.d_model for lv in adapted.levels] == [384, 384, 384, 768]
    assert [lv.encoder for lv in adapted.levels[:-1]] == [2, 2, 2]


def test_pixel_dit_b4_costs_match_table_1():
    spec = S.dit("b", 4, channels=3, resolution=128, space="pixel", learned_sigma=False)
    costs = [round(g) for _, g in cost_curve(spec, S.AsIs(), [(128, 128), (256, 256), (512, 512)])]
    assert costs == [106, 657, 6341]


def test_cost_slopes_linear_for_hdit_quadratic_for_dit():
    res = [(2**k, 2**k) for k in range(8, 13)]  # 256^2 .. 4096^2
    pixels = [h * w for h, w in res]
    hdit = cost_curve(S.load("examples/hdit/hdit-imagenet-128.yaml"), S.AddLevels(), res)
    assert loglog_slope(pixels, [g for _, g in hdit]) <= 1.05
    dit = cost_curve(
        S.dit("b", 4, channels=3, resolution=128, space="pixel", learned_sigma=False), S.AsIs(), res
    )
    assert 1.8 <= loglog_slope(pixels, [g for _, g in dit]) <= 2.0


def test_add_levels_carries_every_trained_tensor_exactly():
    spec = S.load(TINY)
    old = _trained(spec)
    out = adapt(spec, old, S.AddLevels(), (32, 32))
    assert out.record["added_levels"] == 1
    for key, value in old.items():
        new_key = (
            f"levels.{int(key.split('.')[1]) + 1}.{key.split('.', 2)[2]}"
            if key.startswith("levels.")
            else key
        )
        assert torch.equal(out.tensors[new_key], value), key
    assert out.record["reinitialised"] and all(
        k.startswith("levels.0.") for k in out.record["reinitialised"]
    )
    assert S.loads(S.dumps(out.spec)) == out.spec
    model = build(out.spec)
    model.load_state_dict(out.tensors, strict=True)
    y = model(torch.randn(2, 3, 32, 32), torch.ones(2), torch.tensor([1, 2]))
    assert y.shape == (2, 3, 32, 32) and torch.isfinite(y).all()


def test_add_levels_share_weights_copies_the_outer_level():
    spec = S.load(TINY)
    old = _trained(spec)
    out = adapt(spec, old, S.AddLevels(share_weights=True), (64, 64))
    assert out.record["added_levels"] == 2
    for j in (0, 1):
        assert torch.equal(
            out.tensors[f"levels.{j}.encoder.0.attn.qkv.weight"],
            old["levels.0.encoder.0.attn.qkv.weight"],
        )
    assert not any(".encoder." in k or ".decoder." in k for k in out.record["reinitialised"])


def test_add_levels_rejects_non_power_of_two():
    with pytest.raises(S.SpecError, match="power of two"):
        adapt_spec(S.load(TINY), S.AddLevels(), (48, 48))


def test_as_is_rope_policies():
    spec = S.load(TINY)
    old = _trained(spec)
    keep = adapt(spec, old, S.AsIs(), (32, 48))
    assert all(torch.equal(keep.tensors[k], v) for k, v in old.items())
    assert keep.record["reinitialised"] == []
    ext = adapt_spec(spec, S.AsIs(rope="extrapolate"), (32, 48))
    assert ext.block.rope.position_scale == (2.0, 3.0)  # normalised positions, trained at 16^2
    assert adapt_spec(spec, S.AsIs(rope="interpolate"), (32, 48)).block.rope.position_scale == (
        1.0,
        1.0,
    )
    model = build(ext)
    model.load_state_dict(keep.tensors)
    with torch.no_grad():
        a = model(torch.ones(1, 3, 32, 48), 1.0)
        model2 = build(keep.spec)
        model2.load_state_dict(keep.tensors)
        b = model2(torch.ones(1, 3, 32, 48), 1.0)
    assert not torch.allclose(a, b)  # the policy changes the positions the model sees


def test_local_core_keeps_weights_and_changes_attention():
    spec = S.load("examples/tiny/tiny-hdit-global.yaml")
    old = _trained(spec)
    out = adapt(spec, old, S.LocalCore(kernel_size=5), (32, 32))
    assert out.record["levels"] == [0, 1]
    assert all(
        b.attention == S.NeighborhoodAttention(kernel_size=5) for _, _, _, b in out.spec.blocks()
    )
    assert all(torch.equal(out.tensors[k], v) for k, v in old.items())


def test_core_patch_replicates_merge_and_split():
    spec = S.load(TINY)
    old = _trained(spec)
    out = adapt(spec, old, S.CorePatch(factor=4), (32, 32))
    assert out.spec.token_grids() == [(16, 16), (4, 4)]
    assert set(out.record["replicated"]) == {"levels.0.down.proj.weight", "levels.0.up.proj.weight"}
    m2, m4 = TokenMerge(32, 64, (2, 2)), TokenMerge(32, 64, (4, 4))
    m2.proj.weight.data = old["levels.0.down.proj.weight"]
    m4.proj.weight.data = out.tensors["levels.0.down.proj.weight"]
    coarse = torch.randn(1, 4, 4, 32)
    up2 = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)
    up4 = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert torch.allclose(m4(up4), m2(up2), atol=1e-6)  # constant cells merge as before
    s2, s4 = TokenSplit(64, 32, (2, 2)), TokenSplit(64, 32, (4, 4))
    s2.proj.weight.data = old["levels.0.up.proj.weight"]
    s4.proj.weight.data = out.tensors["levels.0.up.proj.weight"]
    t = torch.randn(1, 3, 3, 64)
    assert torch.equal(s4(t)[:, ::2, ::2], s2(t))


def test_dropping_trained_tensors_is_an_error():
    spec = S.load(TINY)
    old = _trained(spec)
    old["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="drop trained tensors"):
        adapt(spec, old, S.AsIs(), (16, 16))


def test_describe_of_adapted_spec_is_consistent():
    spec = S.load("examples/hdit/hdit-imagenet-128.yaml")
    a = adapt_spec(spec, S.LocalCore(kernel_size=15), (256, 256))
    assert describe(a).levels[1].attention == "neighborhood 15x15"
