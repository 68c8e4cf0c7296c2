"""MPDiT as a spec: the reference fixtures, FNO time embedding, prefix tokens, accounting."""

from __future__ import annotations

import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build
from ditkit.builder.accounting import describe
from ditkit.builder.conditioning import FNOEmbed
from tests.conftest import EXAMPLES


def _fixture(fixtures_dir, name):
    from safetensors.torch import load_file

    return (
        load_file(str(fixtures_dir / name / "weights.safetensors")),
        load_file(str(fixtures_dir / name / "io.safetensors")),
    )


def _cfg(model, x, t, y, scale):
    """MPDiT's forward_with_cfg: first half duplicated, every channel guided."""
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half]), t, y)
    cond, uncond = out.chunk(2)
    guided = uncond + scale * (cond - uncond)
    return torch.cat([guided, guided])


@pytest.mark.parametrize("name", ["mpdit_tiny", "mpdit_tiny_mlp"])
def test_converted_reference_weights_reproduce_the_fixture(fixtures_dir, name):
    from ditkit.runtime.convert import mpdit as convert

    weights, io = _fixture(fixtures_dir, name)
    spec = convert.infer_spec(weights, {}, n_heads=4)
    assert spec.conditioning.noise.kind == ("fno" if name == "mpdit_tiny" else "sinusoidal")
    tensors = convert.to_ditkit(weights, spec)
    model = build(spec)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    with torch.no_grad():
        out = model(io["inputs.x"], io["inputs.t"], io["inputs.y"])
        cfg = _cfg(
            model,
            io["inputs.cfg_x"],
            io["inputs.cfg_t"],
            io["inputs.cfg_y"],
            float(io["inputs.cfg_scale"][0]),
        )
        time_emb = model.conditioning(io["inputs.t"])
        shared = model.shared_modulation(time_emb)
    torch.testing.assert_close(time_emb, io["intermediates.t_embedder"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared, io["intermediates.time_modulation"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, io["outputs.out"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cfg, io["outputs.cfg_out"], atol=1e-4, rtol=1e-4)
    # and back: the source layout is restored bit for bit
    back = convert.from_ditkit(tensors, spec)
    assert set(back) == set(weights)
    assert all(torch.equal(back[k], weights[k]) for k in weights)


def test_fixture_spec_equals_the_tiny_example(fixtures_dir):
    from ditkit.runtime.convert import mpdit as convert

    weights, _ = _fixture(fixtures_dir, "mpdit_tiny")
    inferred = convert.infer_spec(weights, {}, n_heads=4)
    tiny = S.load(EXAMPLES / "tiny" / "tiny-mpdit.yaml")
    assert inferred.model_copy(update={"name": "x", "description": ""}) == tiny.model_copy(
        update={"name": "x", "description": ""}
    )


def test_fno_embedding_is_smooth_in_t_and_exports():
    torch.manual_seed(0)
    emb = FNOEmbed(64)
    emb.init_special()
    t = torch.linspace(0, 1, 101)
    with torch.no_grad():
        e = emb(t)
        h = 1e-3
        d1 = (emb(t + h) - e) / h
        d2 = (emb(t + h / 2) - e) / (h / 2)
    scale = e.abs().max()
    # bounded difference quotients (Lipschitz in t) and consistent as the step halves
    assert d1.abs().max() < 50 * scale
    assert (d1 - d2).abs().max() < 0.05 * d1.abs().max()
    # neighbouring times give neighbouring embeddings: no jumps on the grid
    steps = (e[1:] - e[:-1]).norm(dim=-1)
    assert steps.max() < 3 * steps.median()
    exported = torch.export.export(emb, (t,))
    torch.testing.assert_close(exported.module()(t), e, atol=1e-5, rtol=1e-5)


def test_mpdit_parameters_match_the_paper():
    for name, paper in (("mpdit-b", 104.8), ("mpdit-xl", 481.2)):
        report = describe(S.preset(name) if hasattr(S, "preset") else _preset(name))
        assert abs(report.params / 1e6 - paper) < 0.06, (name, report.params)


def _preset(name):
    from ditkit.spec.presets import preset

    return preset(name)


def test_describe_numbers_for_the_mpdit_presets():
    expected = {  # params (measured, = the paper's 104.8M / 481.2M), GMACs
        "mpdit-b": (104_852_912, 16.17),
        "mpdit-xl": (481_207_856, 56.43),
        "mpdit-xl-3level": (490_653_104, 131.65),
    }
    for name, (params, gmacs) in expected.items():
        report = describe(_preset(name))
        assert report.params == params, name
        assert abs(report.gmacs - gmacs) < 0.01, (name, report.gmacs)


def test_three_stage_layout_round_trips_through_the_mpditv2_names():
    from ditkit.runtime.convert import mpdit as convert

    torch.manual_seed(0)
    spec = S.load(EXAMPLES / "tiny" / "tiny-mpdit-3level.yaml")
    tensors = build(spec).state_dict()
    src = convert.from_ditkit(dict(tensors), spec)
    d, c = 32, 4
    # MPDiTv2's names and shapes: patch 8 / 4 / 2 embedders, tables per grid, two upsamplers
    assert tuple(src["x_embedder.proj.weight"].shape) == (d, c, 8, 8)
    assert tuple(src["x_embedder_lvl1.proj.weight"].shape) == (d, c, 4, 4)
    assert tuple(src["x_embedder_lvl2.proj.weight"].shape) == (d, c, 2, 2)
    assert tuple(src["pos_embed"].shape) == (1, 4, d)
    assert tuple(src["pos_embed_lvl1"].shape) == (1, 16, d)
    assert tuple(src["pos_embed_lvl2"].shape) == (1, 64, d)
    assert tuple(src["upsampler_lvl1.proj.weight"].shape) == (4 * d, d)
    assert {k.split(".")[0] for k in src} == {
        "x_embedder",
        "x_embedder_lvl1",
        "x_embedder_lvl2",
        "linear_skip_lvl1",
        "linear_skip_lvl2",
        "t_embedder",
        "y_embedder",
        "pos_embed",
        "pos_embed_lvl1",
        "pos_embed_lvl2",
        "time_modulation",
        "downsample_blocks",
        "upsampler_lvl1",
        "upsample_blocks_lvl1",
        "upsampler_lvl2",
        "upsample_blocks_lvl2",
        "final_layer",
    }
    inferred = convert.infer_spec(src, {}, n_heads=2)
    assert inferred.levels == spec.levels and inferred.conditioning == spec.conditioning
    back = convert.to_ditkit(src, inferred)
    assert set(back) == set(tensors)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_upsampler_rows_follow_mpdit_pixel_shuffle_order():
    """A source proj row (d, p, q) must land on ditkit's (p, q, d)."""
    from ditkit.runtime.convert.mpdit import _shuffle

    d, f = 3, 2
    rows = torch.arange(d * f * f, dtype=torch.float32)  # source index = d_ * 4 + p * 2 + q
    out = _shuffle(f).to_ditkit(rows)
    for p in range(f):
        for q in range(f):
            for d_ in range(d):
                assert out[(p * f + q) * d + d_] == d_ * f * f + p * f + q
    assert torch.equal(_shuffle(f).to_source(out), rows)
