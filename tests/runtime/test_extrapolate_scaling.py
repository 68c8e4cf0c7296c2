"""RoPE frequency scaling (NTK-aware, YaRN) and attention entropy scaling as options of every
extrapolation policy: each checked against a hand-written attention with the papers' formulas,
a no-op at the training resolution, composable with the policy kinds, parsed and labelled."""

import math

import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build
from ditkit.builder.attention import AttentionConfig, GlobalAttention
from ditkit.evaluate.report import noop_check, parse_policy, policy_label
from ditkit.runtime.extrapolate import adapt_model, adapt_spec
from tests.perturb import perturb

TINY = "examples/tiny/tiny-hdit-neighborhood.yaml"
BASE, M = 100.0, 4  # geometric RoPE base; frequencies per axis (d_head 32, fraction 0.5)


def _flat_spec() -> S.ModelSpec:
    """One global-attention level, dot logits, integer positions, geometric RoPE: 16x16 input,
    patch 2 -> an 8x8 trained grid."""
    return S.ModelSpec(
        input=S.Input(channels=3, resolution=(16, 16)),
        patch=S.Patch(size=2),
        conditioning=S.Conditioning(noise=S.FourierNoise()),
        block=S.Block(
            d_head=32,
            rope=S.AxialRope(fraction=0.5, positions="integer", frequencies="geometric", base=BASE),
        ),
        levels=(S.Level(d_model=64, middle=1),),
    )


def _reference_attention(attn, x, freqs_row, freqs_col, factor):
    """Multi-head attention written out: qkv, axial RoPE on the first 4m channels of each head
    (channel i pairs with i + 2m; rows then columns), softmax(q.k / sqrt(d) * factor) v, out."""
    b, hh, ww, c = x.shape
    nh, d = attn.n_heads, attn.d_head
    qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).view(b, hh, ww, 3, nh, d)
    q, k, v = (qkv[..., i, :, :].permute(0, 3, 1, 2, 4) for i in range(3))  # (B, nh, H, W, d)
    rows = torch.arange(hh, dtype=torch.float64)[:, None, None] * freqs_row  # (H, 1, m)
    cols = torch.arange(ww, dtype=torch.float64)[None, :, None] * freqs_col  # (1, W, m)
    ang = torch.cat([rows.expand(hh, ww, -1), cols.expand(hh, ww, -1)], -1).float()
    half = ang.shape[-1]

    def rotate(t):
        a, bb, rest = t[..., :half], t[..., half : 2 * half], t[..., 2 * half :]
        return torch.cat([a * ang.cos() - bb * ang.sin(), bb * ang.cos() + a * ang.sin(), rest], -1)

    q, k = rotate(q).flatten(2, 3), rotate(k).flatten(2, 3)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) * factor, -1)
    o = (w @ v.flatten(2, 3)).view(b, nh, hh, ww, d).permute(0, 2, 3, 1, 4).reshape(b, hh, ww, c)
    return o @ attn.out.weight.T + attn.out.bias


def _adapted_attention(policy, resolution):
    """The attention module of the adapted spec's one block, with random weights."""
    blk = adapt_spec(_flat_spec(), policy, resolution).stack(0, "middle")[0]
    torch.manual_seed(0)
    cfg = AttentionConfig(64, blk.d_head, blk.qk_norm, blk.logits, blk.rope)
    return GlobalAttention(cfg).eval(), blk


def test_ntk_matches_the_base_rescaling_formula_per_axis():
    # 16x16 -> 32x16: rows scale by s = 2, columns stay (s = 1)
    attn, blk = _adapted_attention(parse_policy("as_is:rope_scaling=ntk"), (32, 16))
    assert blk.rope.scaling == S.NtkScaling(scale=(2.0, 1.0))
    j = torch.arange(M, dtype=torch.float64)
    base_row = BASE * 2.0 ** (M / (M - 1))  # base' = base * s^(d/(d-2)), d = 2m per axis
    freqs_row, freqs_col = base_row ** (-j / M), BASE ** (-j / M)
    assert freqs_row[0] == 1.0 and math.isclose(freqs_row[-1], BASE ** (-(M - 1) / M) / 2)
    x = torch.randn(2, 16, 8, 64)
    with torch.no_grad():
        ref = _reference_attention(attn, x, freqs_row, freqs_col, 1.0)
        torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)
        # and it is not plain extrapolation (the unscaled frequencies)
        plain = _reference_attention(attn, x, BASE ** (-j / M), freqs_col, 1.0)
        assert (attn(x) - plain).abs().max() > 1e-3


def test_yarn_ramp_temperature_and_entropy_match_the_papers():
    policy = parse_policy("as_is:rope_scaling=yarn(alpha=0.1,beta=1),attention_scaling=entropy")
    attn, blk = _adapted_attention(policy, (32, 16))
    freqs = [BASE ** (-j / M) for j in range(M)]

    def yarn(w, s, length=8.0, alpha=0.1, beta=1.0):  # Peng et al. 2023, eq. 17-18
        r = length * w / (2 * math.pi)
        gamma = 0.0 if r < alpha else 1.0 if r > beta else (r - alpha) / (beta - alpha)
        return (1 - gamma) * w / s + gamma * w

    freqs_row = torch.tensor([yarn(w, 2.0) for w in freqs], dtype=torch.float64)
    freqs_col = torch.tensor(freqs, dtype=torch.float64)
    # the ramp is partly active here: one kept, two blended, one interpolated
    assert freqs_row[0] == freqs_col[0] and freqs_row[-1] == freqs_col[-1] / 2
    temperature = (0.1 * math.log(math.sqrt(2.0 * 1.0)) + 1) ** 2  # sqrt(1/t) = 0.1 ln s + 1
    entropy = math.log(16 * 8) / math.log(8 * 8)  # tokens attended: the whole grid
    assert blk.logits.factor == pytest.approx(temperature * entropy, rel=1e-12)
    x = torch.randn(2, 16, 8, 64)
    with torch.no_grad():
        ref = _reference_attention(attn, x, freqs_row, freqs_col, temperature * entropy)
        torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_entropy_scaling_is_a_no_op_for_a_neighborhood_level():
    spec = S.load(TINY)  # level 0: neighborhood k=3 on 8x8; level 1: global on 4x4
    new = adapt_spec(spec, S.AsIs(attention_scaling="entropy"), (32, 32))
    assert new.stack(0, "encoder")[0].logits.factor == 1.0
    assert new.stack(1, "middle")[0].logits.factor == pytest.approx(math.log(64) / math.log(16))


def test_cosine_logits_factor_multiplies_the_learned_scale():
    blk = S.load(TINY).stack(1, "middle")[0]
    cfg = AttentionConfig(64, blk.d_head, blk.qk_norm, blk.logits, S.NoRope())
    cfg2 = AttentionConfig(
        64, blk.d_head, blk.qk_norm, blk.logits.model_copy(update={"factor": 1.7}), S.NoRope()
    )
    torch.manual_seed(0)
    a = GlobalAttention(cfg).eval()
    b = GlobalAttention(cfg2).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.scale.mul_(1.7)  # 1.7 * scale * cos(q, k) either way
        x = torch.randn(2, 4, 4, 64)
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


def test_options_compose_with_core_patch_only_where_the_grid_changes():
    spec = S.load(TINY)
    new = adapt_spec(
        spec, parse_policy("core_patch:rope_scaling=ntk,attention_scaling=entropy"), (32, 32)
    )
    outer, inner = new.stack(0, "encoder")[0], new.stack(1, "middle")[0]
    assert outer.rope.scaling == S.NtkScaling(scale=(2.0, 2.0))
    assert outer.rope.position_scale == (2.0, 2.0)  # normalised positions keep their spacing
    assert inner == spec.stack(1, "middle")[0]  # the core keeps its 4x4 grid: untouched
    # add_levels: the new outer level is compared with the trained outer level
    added = adapt_spec(spec, S.AddLevels(rope_scaling=S.YarnScaling()), (32, 32))
    assert added.stack(0, "encoder")[0].rope.scaling.scale == (2.0, 2.0)
    assert added.stack(1, "encoder")[0] == spec.stack(0, "encoder")[0]


@pytest.mark.parametrize(
    "text",
    [
        "as_is:rope_scaling=ntk,attention_scaling=entropy",
        "as_is:rope_scaling=yarn",
        "as_is:rope_scaling=ntk(time_exponent=1.0)",
        "local_core:kernel_size=3,rope_scaling=ntk,attention_scaling=entropy",
        "core_patch:rope_scaling=yarn(beta=16.0),attention_scaling=entropy",
        "add_levels:share_weights=True,rope_scaling=yarn,attention_scaling=entropy",
    ],
)
def test_options_are_bit_identical_at_the_training_resolution(text):
    spec = S.load(TINY)
    torch.manual_seed(0)
    tensors = perturb(build(spec)).state_dict()
    policy = parse_policy(text)
    assert policy_label(policy) == text  # the report's label round-trips the text syntax
    plain = policy.model_copy(
        update={"rope_scaling": S.NoRopeScaling(), "attention_scaling": "none"}
    )
    # at 1x the options add nothing to the policy's own spec (local_core with k=3 on the 4x4
    # core changes the model by itself, so the report's no-op check is for the others)
    assert adapt_spec(spec, policy, (16, 16)) == adapt_spec(spec, plain, (16, 16))
    if policy.kind != "local_core":
        assert noop_check(spec, tensors, policy)["status"] == "identical"
    # and at 2x the options do change the outputs of the same policy without them (add_levels
    # shares weights here: fresh added levels start with a zero output projection, so their
    # attention -- the only place the options act -- would not show)
    model = build(spec).eval()
    model.load_state_dict(tensors)
    x, sigma, labels = torch.randn(1, 3, 32, 32), torch.tensor([1.0]), torch.tensor([1])
    with torch.no_grad():
        a = adapt_model(model, policy, (32, 32))(x, sigma, labels)
        b = adapt_model(model, plain, (32, 32))(x, sigma, labels)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize(
    "text, message",
    [
        ("as_is:rope_scaling=bogus", "does not match any of the expected tags"),
        ("as_is:rope_scaling=yarn(alpha=40)", "alpha (40.0) must be below beta (32.0)"),
        ("as_is:rope=extrapolate,rope_scaling=ntk", "leave rope at keep"),
        ("as_is:attention_scaling=log", "attention_scaling"),
    ],
)
def test_bad_options_name_the_field_and_the_fix(text, message):
    with pytest.raises(S.SpecError) as err:
        parse_policy(text, flag="--policy")
    assert message in str(err.value) and "--policy" in str(err.value)


def test_derived_fields_belong_to_the_model_spec_not_the_policy():
    with pytest.raises(ValueError, match="derived per level"):
        S.AsIs(rope_scaling=S.NtkScaling(scale=(2.0, 2.0)))
    with pytest.raises(ValueError, match="needs scale and trained_length"):
        S.AxialRope(scaling=S.YarnScaling())
    spec = adapt_spec(_flat_spec(), parse_policy("as_is:rope_scaling=yarn"), (32, 32))
    assert S.loads(S.dumps(spec)) == spec  # the adapted spec round-trips like any spec


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [
        "as_is:rope_scaling=yarn,attention_scaling=entropy",
        "as_is:rope_scaling=ntk(time_exponent=1.0)",
    ],
)
def test_scaled_policy_exports_to_onnx_within_parity(tmp_path, text):
    from ditkit.deploy.export import export_onnx

    spec = S.load("examples/tiny/tiny-hdit-global.yaml")
    torch.manual_seed(0)
    model = perturb(build(spec)).eval()
    policy = parse_policy(text)
    adapted = adapt_model(model, policy, (32, 32))
    result = export_onnx(adapted, S.EDMObjective(), tmp_path / "m.onnx")
    assert result.parity
    assert all(p["max_abs_diff"] <= 1e-4 * max(1, p["scale"]) for p in result.parity)


# ------------------------------------------------------------------ noise-dependent scaling


def test_time_aware_ntk_scale_follows_each_samples_noise_fraction():
    from ditkit.builder.model import Context

    policy = parse_policy("as_is:rope_scaling=ntk(time_exponent=2.0)")
    attn, blk = _adapted_attention(policy, (32, 16))
    j = torch.arange(M, dtype=torch.float64)
    x = torch.randn(3, 16, 8, 64)
    t = torch.tensor([1.0, 0.5, 0.0])  # pure noise, half, clean
    with torch.no_grad():
        out = attn(x, Context(noise=t))
        for b, tb in enumerate(t.tolist()):
            s_t = 2.0 ** (tb**2.0)  # s(t) = s^(t^gamma), rows only (columns keep s = 1)
            freqs_row = (BASE * s_t ** (M / (M - 1))) ** (-j / M)
            ref = _reference_attention(attn, x[b : b + 1], freqs_row, BASE ** (-j / M), 1.0)
            torch.testing.assert_close(out[b : b + 1], ref, atol=1e-5, rtol=1e-5)


def test_time_aware_yarn_is_static_yarn_at_pure_noise_and_plain_when_clean():
    from ditkit.builder.model import Context

    static, _ = _adapted_attention(
        parse_policy("as_is:rope_scaling=yarn(alpha=0.1,beta=1.0)"), (32, 32)
    )
    dynamic, blk = _adapted_attention(
        parse_policy("as_is:rope_scaling=yarn(alpha=0.1,beta=1.0,time_exponent=1.0)"), (32, 32)
    )
    assert blk.logits.factor == 1.0  # the temperature goes per sample, inside the attention
    j = torch.arange(M, dtype=torch.float64)
    x = torch.randn(2, 16, 16, 64)
    with torch.no_grad():
        out = dynamic(x, Context(noise=torch.tensor([1.0, 0.0])))
        torch.testing.assert_close(out[:1], static(x[:1]), atol=1e-5, rtol=1e-5)
        plain = _reference_attention(dynamic, x[1:], BASE ** (-j / M), BASE ** (-j / M), 1.0)
        torch.testing.assert_close(out[1:], plain, atol=1e-5, rtol=1e-5)


def test_noise_fraction_of_a_sigma_input_and_timestep_models_refused():
    model = build(S.load(TINY))
    frac = model.conditioning.noise.fraction(torch.tensor([1.0, 3.0]))
    assert frac.tolist() == [0.5, 0.75]  # sigma / (1 + sigma)
    dit = S.load("examples/tiny/tiny-dit.yaml")  # a timestep input: no noise fraction
    with pytest.raises(S.SpecError, match="drop time_exponent"):
        adapt_spec(dit, parse_policy("as_is:rope_scaling=ntk(time_exponent=1.0)"), (64, 64))
