"""Checkpoint interop: DiT and k-diffusion HDiT weights -> ditkit checkpoints -> back.

The reference fixtures (``../shared/fixtures/reference``) hold weights, inputs and outputs of
the original code; these tests skip with a reason where that folder is absent."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ditkit import spec as S
from ditkit.cli import main
from ditkit.runtime import convert as CV
from ditkit.runtime.checkpoint import load_checkpoint, load_model, read_metadata
from ditkit.runtime.convert import dit as DIT
from ditkit.runtime.convert import kdiffusion as KD
from ditkit.spec.presets import preset
from tests.conftest import EXAMPLES, FIXTURES
from tests.perturb import perturb

DIT_FIXTURES = ["dit_tiny"]
HDIT_FIXTURES = ["hdit_global", "hdit_neighborhood", "hdit_shifted_window"]
SOURCE_OF = {**{f: "dit" for f in DIT_FIXTURES}, **{f: "k-diffusion" for f in HDIT_FIXTURES}}
TOL = dict(atol=1e-4, rtol=1e-4)


def fixture(name: str):
    folder = FIXTURES / name
    if not folder.is_dir():
        pytest.skip(f"reference fixture {name} not found at {folder}")
    with safe_open(str(folder / "weights.safetensors"), framework="pt") as f:
        meta = dict(f.metadata() or {})
    info = json.loads((folder / "fixture.json").read_text())
    return (
        folder,
        load_file(str(folder / "weights.safetensors")),
        load_file(str(folder / "io.safetensors")),
        meta,
        info,
    )


def hints_for(name: str, info: dict) -> dict:
    # DiT's head count is not in its weights; the fixture's constructor config has it
    return {"n_heads": info["config"]["num_heads"]} if SOURCE_OF[name] == "dit" else {}


def dit_forward_with_cfg(model, x, t, y, scale: float, channels: int):
    """DiT's ``forward_with_cfg``: the first half of the batch is run with both labels, and
    only the first ``channels`` output channels are guided."""
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half]), t, y)
    eps, rest = out[:, :channels], out[:, channels:]
    cond, uncond = eps.chunk(2)
    guided = uncond + scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), rest], dim=1)


# ------------------------------------------------------------------------- fixtures: numbers


@pytest.mark.parametrize("name", DIT_FIXTURES)
def test_dit_fixture_outputs(name, tmp_path):
    folder, _, io, _, info = fixture(name)
    out = tmp_path / "dit.safetensors"
    CV.convert(folder / "weights.safetensors", "dit", out, **hints_for(name, info))
    model, ckpt = load_model(out)
    assert ckpt.metadata["ditkit.converted_from"] == "dit"
    assert isinstance(ckpt.objective, S.DDPMObjective) and ckpt.objective.learned_sigma
    with torch.no_grad():
        got = model(io["inputs.x"], io["inputs.t"], io["inputs.y"])
        torch.testing.assert_close(got, io["outputs.out"], **TOL)
        channels = ckpt.cfg_channels
        assert channels == 3
        cfg = dit_forward_with_cfg(
            model,
            io["inputs.cfg_x"],
            io["inputs.cfg_t"],
            io["inputs.cfg_y"],
            float(io["inputs.cfg_scale"][0]),
            channels,
        )
        torch.testing.assert_close(cfg, io["outputs.cfg_out"], **TOL)
        # guiding every channel (ditkit's default) is measurably different here
        all_ch = dit_forward_with_cfg(
            model,
            io["inputs.cfg_x"],
            io["inputs.cfg_t"],
            io["inputs.cfg_y"],
            float(io["inputs.cfg_scale"][0]),
            8,
        )
        assert (all_ch - io["outputs.cfg_out"]).abs().max() > 1e-2


@pytest.mark.parametrize("name", HDIT_FIXTURES)
def test_hdit_fixture_outputs(name, tmp_path):
    folder, _, io, _, _ = fixture(name)
    out = tmp_path / "hdit.safetensors"
    CV.convert(folder / "weights.safetensors", "k-diffusion", out)
    model, ckpt = load_model(out)
    x, sigma, labels = io["inputs.x"], io["inputs.sigma"], io["inputs.class_cond"]
    with torch.no_grad():
        torch.testing.assert_close(model(x, sigma, labels), io["outputs.out"], **TOL)
    # the EDM preconditioning, with sigma_data read from the checkpoint's own objective
    obj = ckpt.objective
    assert isinstance(obj, S.EDMObjective) and obj.sigma_data == 0.5
    assert obj.weighting == "soft_min_snr"
    sd = obj.sigma_data
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1 / (sigma**2 + sd**2).sqrt()
    for k, v in (("c_skip", c_skip), ("c_out", c_out), ("c_in", c_in)):
        torch.testing.assert_close(v, io[f"outputs.denoiser_{k}"], **TOL)
    b = (slice(None), None, None, None)
    with torch.no_grad():
        denoised = model(x * c_in[b], sigma, labels) * c_out[b] + x * c_skip[b]
    torch.testing.assert_close(denoised, io["outputs.denoised"], **TOL)


@pytest.mark.parametrize("name", HDIT_FIXTURES)
def test_hdit_fixture_through_runtime_denoiser(name, tmp_path):
    from ditkit.runtime.denoiser import Denoiser

    folder, _, io, _, _ = fixture(name)
    out = tmp_path / "hdit.safetensors"
    CV.convert(folder / "weights.safetensors", "k-diffusion", out)
    model, ckpt = load_model(out)
    with torch.no_grad():
        got = Denoiser(model, ckpt.objective)(
            io["inputs.x"], io["inputs.sigma"], io["inputs.class_cond"]
        )
    torch.testing.assert_close(got, io["outputs.denoised"], **TOL)


# ------------------------------------------------------------------------- specs


def test_inferred_specs_equal_the_tiny_presets():
    pairs = [("dit_tiny", "tiny-dit")] + [(f, "tiny-" + f.replace("_", "-")) for f in HDIT_FIXTURES]
    for name, yaml_name in pairs:
        _, state, _, meta, info = fixture(name)
        mod = CV.source_module(SOURCE_OF[name])
        spec = mod.infer_spec(state, meta, **hints_for(name, info))
        ref = S.load(EXAMPLES / "tiny" / f"{yaml_name}.yaml")
        same = {"name": "x", "description": ""}
        assert spec.model_copy(update=same) == ref.model_copy(update=same), name


def _meta_state(spec: S.ModelSpec) -> dict[str, torch.Tensor]:
    shapes = CV.expected_shapes(spec)
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize("name", ["dit-s-2", "dit-b-4", "dit-l-8", "dit-xl-2"])
def test_dit_presets_are_inferred_from_their_shapes(name):
    """A DiT state dict of each paper size (shapes only, on the meta device) infers back to
    the preset, heads included (the DiT sizes' widths imply their head counts)."""
    spec = preset(name)
    state = DIT.from_ditkit(_meta_state(spec), spec)
    assert state["x_embedder.proj.weight"].shape[1:] == (4, spec.patch.size, spec.patch.size)
    inferred = DIT.infer_spec(state, {})
    assert inferred.name == name
    assert inferred.model_copy(update={"description": ""}) == spec.model_copy(
        update={"description": ""}
    )


@pytest.mark.parametrize("name", ["hdit-imagenet-128", "hdit-ffhq-1024", "hdit-imagenet-256"])
def test_hdit_presets_round_trip_through_the_kdiffusion_config(name):
    spec = preset(name)
    config = KD.config_from_spec(spec, sigma_data=0.5)
    model, classes = KD.model_config({"config": json.dumps(config)})
    back = KD.spec_from_config(model, classes, spec.name)
    assert back.model_copy(update={"description": ""}) == spec.model_copy(
        update={"description": ""}
    )


def test_kdiffusion_config_defaults_follow_load_config():
    """Absent keys take k-diffusion's load_config defaults (mapping 256 x 2, d_ff 3x, the
    neighborhood-7 / global layout, d_head 64)."""
    config = {
        "model": {
            "type": "image_transformer_v2",
            "input_channels": 3,
            "input_size": [64, 64],
            "patch_size": [4, 4],
            "depths": [2, 4],
            "widths": [128, 256],
        },
        "dataset": {"num_classes": 0},
    }
    model, classes = KD.model_config({"config": json.dumps(config)})
    spec = KD.spec_from_config(model, classes)
    assert spec.cond_width == 256 and spec.conditioning.mapping.depth == 2
    assert spec.conditioning.classes is None
    assert spec.levels[0].attention == S.NeighborhoodAttention(kernel_size=7)
    assert spec.levels[1].attention == S.GlobalAttention()
    assert spec.block.d_head == 64
    assert [len(spec.stack(0, "encoder")), len(spec.stack(1, "middle"))] == [2, 4]
    assert spec.stack(0, "encoder")[0].ffn.hidden(128) == 384


def test_kdiffusion_per_level_overrides():
    config = {
        "model": {
            "type": "image_transformer_v2",
            "input_channels": 3,
            "input_size": [32, 32],
            "patch_size": [2, 2],
            "depths": [1, 1],
            "widths": [32, 64],
            "d_ffs": [64, 192],
            "mapping_width": 32,
            "mapping_depth": 1,
            "mapping_d_ff": 64,
            "self_attns": [
                {"type": "neighborhood", "d_head": 8, "kernel_size": 5},
                {"type": "global", "d_head": 32},
            ],
        },
        "dataset": {"num_classes": 10},
    }
    model, classes = KD.model_config({"config": json.dumps(config)})
    spec = KD.spec_from_config(model, classes)
    enc, mid = spec.stack(0, "encoder")[0], spec.stack(1, "middle")[0]
    assert (enc.d_head, mid.d_head) == (8, 32)
    assert enc.attention == S.NeighborhoodAttention(kernel_size=5)
    assert (enc.ffn.hidden(32), mid.ffn.hidden(64)) == (64, 192)
    assert spec.conditioning.mapping.ratio == 2.0
    # and the config written back is the same model
    again = KD.config_from_spec(spec)["model"]
    assert again["d_ffs"] == [64, 192] and again["mapping_d_ff"] == 64
    assert again["self_attns"] == config["model"]["self_attns"]


def test_kdiffusion_unsupported_config_is_named():
    base = {
        "type": "image_transformer_v2",
        "input_channels": 3,
        "input_size": [32, 32],
        "patch_size": [2, 2],
        "depths": [1, 1],
        "widths": [32, 64],
    }
    for extra, needle in (
        ({"mapping_cond_dim": 4}, "mapping_cond_dim"),
        ({"self_attns": [{"type": "none"}, {"type": "global"}]}, r"self_attns\[0\].type"),
    ):
        meta = {"config": json.dumps({"model": {**base, **extra}})}
        with pytest.raises(ValueError, match=needle):
            KD.infer_spec({}, meta)
    with pytest.raises(ValueError, match="image_transformer_v2"):
        KD.infer_spec({}, {"config": json.dumps({"model": {"type": "image_v1"}})})


def test_dit_spec_cannot_be_exported_as_kdiffusion():
    with pytest.raises(ValueError, match="not an HDiT-layout spec"):
        KD.from_ditkit({}, S.load(EXAMPLES / "tiny" / "tiny-dit.yaml"))
    with pytest.raises(ValueError, match="not a DiT-layout spec"):
        DIT.from_ditkit({}, S.load(EXAMPLES / "tiny" / "tiny-hdit-global.yaml"))


# ------------------------------------------------------------------------- refusals


def test_dit_refuses_unknown_missing_and_misshaped_keys():
    _, state, _, _, info = fixture("dit_tiny")
    spec = DIT.infer_spec(state, {}, n_heads=info["config"]["num_heads"])
    bad = dict(state)
    bad["blocks.0.extra.weight"] = torch.zeros(3)
    del bad["blocks.1.mlp.fc2.bias"]
    bad["blocks.0.attn.qkv.weight"] = torch.zeros(190, 64)
    with pytest.raises(CV.ConversionError) as err:
        DIT.to_ditkit(bad, spec)
    msg = str(err.value)
    assert "blocks.0.extra.weight" in msg and "left over" in msg
    assert "blocks.1.mlp.fc2.bias" in msg and "missing (1)" in msg
    assert (
        "blocks.0.attn.qkv.weight -> levels.0.middle.0.attn.qkv.weight: got (190, 64), the "
        "spec needs (192, 64)" in msg
    )
    assert err.value.unexpected == ["blocks.0.extra.weight"]
    assert err.value.missing == ["blocks.1.mlp.fc2.bias"]
    assert len(err.value.mismatched) == 1


def test_dit_patch_weight_of_wrong_rank_is_reported():
    _, state, _, _, info = fixture("dit_tiny")
    spec = DIT.infer_spec(state, {}, n_heads=4)
    bad = dict(state)
    bad["pos_embed"] = torch.zeros(1, 9, 64)
    with pytest.raises(
        CV.ConversionError,
        match=r"pos_embed \(1, 9, 64\) cannot become "
        r"position.table",
    ):
        DIT.to_ditkit(bad, spec)


def test_kdiffusion_refuses_bad_keys_and_wrong_rope_layout():
    _, state, _, meta, _ = fixture("hdit_neighborhood")
    spec = KD.infer_spec(state, meta)
    bad = dict(state)
    bad["mapping_cond_in_proj.weight"] = torch.zeros(32, 4)
    del bad["up_levels.0.0.ff.norm.linear.weight"]
    bad["mid_level.0.self_attn.pos_emb.freqs"] = state["mid_level.0.self_attn.pos_emb.freqs"].T
    bad["down_levels.0.0.self_attn.pos_emb.freqs"] = state[
        "down_levels.0.0.self_attn.pos_emb.freqs"
    ].flip(0)
    with pytest.raises(CV.ConversionError) as err:
        KD.to_ditkit(bad, spec)
    msg = str(err.value)
    assert "mapping_cond_in_proj.weight" in msg
    assert "up_levels.0.0.ff.norm.linear.weight" in msg
    assert "mid_level.0.self_attn.pos_emb.freqs: got (2, 4)" in msg
    assert "down_levels.0.0.self_attn.pos_emb.freqs differs from the RoPE frequencies" in msg
    # the block whose norm projection is missing is not reported a second time
    assert "levels.0.decoder.0.modulation.weight (ditkit)" not in msg


def test_preset_that_does_not_fit_lists_the_problems():
    _, state, _, _, _ = fixture("dit_tiny")
    with pytest.raises(CV.ConversionError) as err:
        DIT.to_ditkit(state, preset("dit-s-2"))
    assert err.value.mismatched and err.value.missing
    assert "blocks.{2..11}.attn.qkv.weight" in str(err.value)  # long runs are folded


def test_compact_folds_runs_without_dropping_names():
    names = ["blocks.2.a", "blocks.3.a", "blocks.4.a", "x", "l.0.m.1.w", "l.1.m.3.w"]
    assert CV.compact(names) == ["blocks.{2..4}.a", "x", "l.0.m.1.w", "l.1.m.3.w"]
    assert CV.compact(["b.1.a", "b.5.a"]) == ["b.{1,5}.a"]


# ------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", DIT_FIXTURES + HDIT_FIXTURES)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_to_source_layout_is_bit_exact(name, suffix, tmp_path):
    folder, state, _, _, info = fixture(name)
    source = SOURCE_OF[name]
    ours = tmp_path / "ours.safetensors"
    CV.convert(folder / "weights.safetensors", source, ours, **hints_for(name, info))
    back = tmp_path / f"back{suffix}"
    main(["convert", "--to", source, str(ours), "--out", str(back)])
    got, meta = CV.read_source(back)
    assert set(got) == set(state)
    for k in state:
        assert got[k].dtype == state[k].dtype and torch.equal(got[k], state[k]), k
    if source == "k-diffusion" and suffix == ".safetensors":
        # the exported file carries k-diffusion's config and converts to the same spec again
        spec = load_checkpoint(ours).spec
        assert KD.infer_spec(got, meta, name=spec.name) == spec
        exported = json.loads(meta["config"])["model"]
        original = json.loads(read_metadata(folder / "weights.safetensors")["config"])["model"]
        for key in (
            "widths",
            "depths",
            "d_ffs",
            "self_attns",
            "patch_size",
            "input_size",
            "mapping_width",
            "mapping_depth",
            "mapping_d_ff",
            "sigma_data",
        ):
            assert exported[key] == original[key], key


# ------------------------------------------------------------------------- reading sources


def test_training_dict_prefers_ema_and_strips_compile_prefix(tmp_path):
    _, state, _, _, _ = fixture("dit_tiny")
    raw = {k: v + 1.0 for k, v in state.items()}
    path = tmp_path / "train.pt"
    torch.save(
        {
            "model": raw,
            "ema": {f"_orig_mod.{k}": v for k, v in state.items()},
            "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "args": argparse.Namespace(model="DiT-XL/2", image_size=256),
        },
        path,
    )
    got, meta = CV.read_source(path, DIT.PREFERRED_KEYS)
    assert meta["ditkit.source_key"] == "ema" and json.loads(meta["args"])["image_size"] == 256
    assert all(torch.equal(got[k], state[k]) for k in state) and set(got) == set(state)
    got, meta = CV.read_source(path, DIT.PREFERRED_KEYS, key="model")
    assert all(torch.equal(got[k], raw[k]) for k in state)
    with pytest.raises(ValueError, match="no entry 'nope'.*--key"):
        CV.read_source(path, key="nope")

    out = tmp_path / "ours.safetensors"
    CV.convert(path, "dit", out, n_heads=4)
    ckpt = load_checkpoint(out)
    assert ckpt.metadata["ditkit.source_key"] == "ema"
    assert torch.equal(ckpt.tensors["head.proj.weight"], state["final_layer.linear.weight"])


def test_kdiffusion_training_checkpoint(tmp_path):
    folder, state, io, meta, _ = fixture("hdit_global")
    path = tmp_path / "00100.pth"
    torch.save(
        {
            "config": json.loads(meta["config"]),
            "model": {k: v * 0 for k, v in state.items()},
            "model_ema": state,
            "step": 100,
            "epoch": 1,
        },
        path,
    )
    out = tmp_path / "ours.safetensors"
    CV.convert(path, "k-diffusion", out)
    model, ckpt = load_model(out)
    assert ckpt.metadata["ditkit.source_key"] == "model_ema"
    with torch.no_grad():
        got = model(io["inputs.x"], io["inputs.sigma"], io["inputs.class_cond"])
    torch.testing.assert_close(got, io["outputs.out"], **TOL)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_unsafe_pickles_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Evil()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        CV.read_source(path)
    assert "unpickled arbitrary code" not in capsys.readouterr().out


# ------------------------------------------------------------------------- command line


def test_cli_convert_and_back(tmp_path, capsys):
    folder = fixture("hdit_global")[0]
    out = tmp_path / "h.safetensors"
    assert (
        main(
            [
                "convert",
                "--from",
                "k-diffusion",
                str(folder / "weights.safetensors"),
                "--out",
                str(out),
                "--name",
                "my-hdit",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    assert load_checkpoint(out).spec.name == "my-hdit"
    back = tmp_path / "k.safetensors"
    assert main(["convert", "--to", "k-diffusion", str(out), "--out", str(back)]) == 0
    assert "config" in read_metadata(back)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["convert", "--from", "dit", "{missing}", "--out", "{out}"], "no such file"),
        (["convert", "--from", "nope", "{dit}", "--out", "{out}"], "unknown source format 'nope'"),
        (["convert", "--from", "dit", "{dit}", "--out", "{out}"], "--heads N"),
        (["convert", "--from", "dit", "{dit}", "--out", "{tmp}/x.pt"], "is a .safetensors file"),
        (
            ["convert", "--from", "dit", "{dit}", "--out", "{out}", "--preset", "dit-s-2"],
            "mis-shaped",
        ),
        (
            ["convert", "--from", "dit", "{dit}", "--out", "{out}", "--preset", "no-such"],
            "not a spec file or a preset name",
        ),
        (["convert", "--from", "k-diffusion", "{dit}", "--out", "{out}"], "no k-diffusion config"),
        (["convert", "--to", "dit", "{dit}", "--out", "{tmp}/x.pt"], "not a ditkit checkpoint"),
        (
            ["convert", "--to", "dit", "{dit}", "--out", "{tmp}/x.pt", "--heads", "4"],
            "--heads applies to --from only",
        ),
    ],
)
def test_cli_bad_input_exits_2_without_traceback(argv, needle, tmp_path, capsys):
    folder = fixture("dit_tiny")[0]
    subs = {
        "missing": str(tmp_path / "missing.pt"),
        "out": str(tmp_path / "o.safetensors"),
        "dit": str(folder / "weights.safetensors"),
        "tmp": str(tmp_path),
    }
    assert main([a.format(**subs) for a in argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_refuses_a_ditkit_checkpoint_as_source(tmp_path, capsys):
    folder = fixture("dit_tiny")[0]
    ours = tmp_path / "ours.safetensors"
    CV.convert(folder / "weights.safetensors", "dit", ours, n_heads=4)
    assert (
        main(["convert", "--from", "dit", str(ours), "--out", str(tmp_path / "again.safetensors")])
        == 2
    )
    assert "already a ditkit checkpoint" in capsys.readouterr().err


def test_write_failure_keeps_the_existing_output(tmp_path):
    """A conversion that fails leaves a previous output untouched."""
    folder = fixture("dit_tiny")[0]
    out = tmp_path / "o.safetensors"
    CV.convert(folder / "weights.safetensors", "dit", out, n_heads=4)
    before = out.read_bytes()
    bad = tmp_path / "bad.safetensors"
    state = load_file(str(folder / "weights.safetensors"))
    del state["final_layer.linear.bias"]
    save_file(state, str(bad))
    with pytest.raises(CV.ConversionError):
        CV.convert(bad, "dit", out, n_heads=4)
    assert out.read_bytes() == before


def test_kdiffusion_fp16_inference_file(tmp_path):
    """convert_for_inference.py writes fp16 by default (RoPE buffers included): the rounded
    frequencies are accepted, the round trip stays bit-exact, and the outputs stay close."""
    folder, state, io, meta, _ = fixture("hdit_shifted_window")
    half = {k: v.half() for k, v in state.items()}
    src = tmp_path / "fp16.safetensors"
    save_file(half, str(src), metadata=meta)
    ours = tmp_path / "ours.safetensors"
    CV.convert(src, "k-diffusion", ours)
    back = tmp_path / "back.safetensors"
    CV.export(ours, "k-diffusion", back)
    got, _ = CV.read_source(back)
    assert set(got) == set(half)
    assert all(got[k].dtype == torch.float16 and torch.equal(got[k], half[k]) for k in half)
    model, _ = load_model(ours)  # built in fp32 from the fp16 values
    with torch.no_grad():
        out = model(io["inputs.x"], io["inputs.sigma"], io["inputs.class_cond"])
    assert (out - io["outputs.out"]).abs().max() < 5e-3  # measured 1.1e-3


# ------------------------------------------------------------------------- paper-size models


@pytest.mark.slow
@pytest.mark.parametrize("name, source", [("dit-b-2", "dit"), ("hdit-imagenet-128", "k-diffusion")])
def test_paper_size_model_round_trip(name, source, tmp_path):
    """A paper-size model written in the source layout (a DiT .pt state dict, a k-diffusion
    inference safetensors with its config) converts to a ditkit checkpoint whose model gives
    the same numbers, and exports back bit-exactly."""
    from ditkit.builder import build

    spec = preset(name)
    torch.manual_seed(0)
    model = build(spec).eval()
    perturb(model, 0.02)
    mod = CV.source_module(source)
    state = mod.from_ditkit(model.state_dict(), spec)
    if source == "dit":
        src = tmp_path / "src.pt"
        torch.save(state, src)
    else:
        src = tmp_path / "src.safetensors"
        save_file(state, str(src), metadata=KD.source_metadata(spec))
    ours = tmp_path / "ours.safetensors"
    assert main(["convert", "--from", source, str(src), "--out", str(ours)]) == 0
    loaded, ckpt = load_model(ours)
    assert ckpt.spec.model_copy(update={"name": name, "description": ""}) == spec.model_copy(
        update={"description": ""}
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, spec.input.channels, *spec.input.resolution, generator=g)
    noise = torch.tensor([500]) if source == "dit" else torch.tensor([2.0])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, noise, torch.tensor([7])), model(x, noise, torch.tensor([7])), atol=0, rtol=0
        )
    back = tmp_path / f"back{src.suffix}"
    CV.export(ours, source, back)
    got, _ = CV.read_source(back)
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
