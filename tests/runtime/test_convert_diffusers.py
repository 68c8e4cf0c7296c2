"""ditkit DiT <-> diffusers ``DiTTransformer2DModel`` folders: outputs equal diffusers' own
module on the same inputs, refusals name the spec field, folders are written atomically and
read without unpickling."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build
from ditkit.cli import main
from ditkit.runtime.checkpoint import load_checkpoint, save_checkpoint
from ditkit.runtime.convert import diffusers as DF
from ditkit.runtime.convert.remap import ConversionError
from ditkit.spec.diff import diff
from ditkit.spec.presets import preset

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
DiTTransformer2DModel = diffusers.DiTTransformer2DModel


def _tiny(learned_sigma=True, classes=10, **block) -> S.ModelSpec:
    """A 2-block, width-32 DiT in diffusers' layout (frequency_shift 1)."""
    return S.ModelSpec(
        name="tiny-dit",
        input=S.Input(channels=4, space="latent", resolution=(8, 8)),
        patch=S.Patch(size=2, bias=True),
        position=S.SincosPosition(),
        conditioning=S.Conditioning(
            noise=S.SinusoidalNoise(frequency_shift=1), classes=S.Classes(count=classes)
        ),
        block=S.Block(d_head=8, **block),
        levels=(S.Level(d_model=32, middle=2),),
        head=S.AdaLNHead(learned_sigma=learned_sigma),
        init=S.Init(linear="xavier_uniform", embedding_std=0.02),
    )


def _random_model(spec: S.ModelSpec, seed: int = 0) -> torch.nn.Module:
    """Built and then perturbed: adaLN-Zero's zero-initialised Linears would hide a wrong
    chunk order or a dropped tensor."""
    torch.manual_seed(seed)
    model = build(spec).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(spec: S.ModelSpec, batch: int = 3):
    g = torch.Generator().manual_seed(1)
    c, (h, w) = spec.input.channels, spec.input.resolution
    x = torch.randn(batch, c, h, w, generator=g)
    t = torch.tensor([0, 437, 999, 12, 700, 999][:batch])  # integer DDPM timesteps
    count = spec.conditioning.classes.count
    y = torch.tensor([0, count, 3, count, 1, 2][:batch])  # the null label included
    return x, t, y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def _load(folder) -> torch.nn.Module:
    return DiTTransformer2DModel.from_pretrained(str(folder)).eval()


@pytest.mark.parametrize("learned_sigma", [True, False])
def test_to_diffusers_output_equals_ditkit(tmp_path, learned_sigma):
    spec = _tiny(learned_sigma)
    ours = _random_model(spec)
    out = tmp_path / "dit"
    DF.write_folder(ours.state_dict(), spec, out)
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["out_channels"] == (8 if learned_sigma else 4)
    assert config["norm_eps"] == 1e-6 and config["num_embeds_ada_norm"] == 10
    theirs = _load(out)
    x, t, y = _inputs(spec)
    with torch.no_grad():
        a = ours(x, t, y)
        b = theirs(x, timestep=t, class_labels=y).sample
    assert a.shape == b.shape == (3, 8 if learned_sigma else 4, 8, 8)
    assert _rel(a, b) <= 1e-5


def test_exact_gelu_ffn_maps_to_gelu_activation(tmp_path):
    spec = _tiny(ffn=S.GeluMLP(approximate="none"))
    ours = _random_model(spec, seed=3)
    DF.write_folder(ours.state_dict(), spec, tmp_path / "dit")
    theirs = _load(tmp_path / "dit")
    assert theirs.config.activation_fn == "gelu"
    x, t, y = _inputs(spec)
    with torch.no_grad():
        assert _rel(ours(x, t, y), theirs(x, timestep=t, class_labels=y).sample) <= 1e-5


def test_from_diffusers_output_equals_diffusers(tmp_path):
    """A model diffusers made (random weights, saved by diffusers itself) -> ditkit checkpoint
    via the command line -> the same outputs."""
    torch.manual_seed(5)
    theirs = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_eps=1e-6,
    ).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
        # diffusers' blocks each hold a timestep / label embedder; ditkit has one: a model
        # trained in diffusers keeps them equal only if they were copies (as converted DiTs are)
        first = theirs.transformer_blocks[0].norm1.emb
        for blk in theirs.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(first.state_dict())
    theirs.save_pretrained(str(tmp_path / "src"), safe_serialization=True)
    out = tmp_path / "dit.safetensors"
    assert main(["convert", "--from", "diffusers", str(tmp_path / "src"), "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.spec.conditioning.noise.frequency_shift == 1
    assert ckpt.spec.name == "dit-d2-w32-p2"  # diffusers wrote it: the name says its shape
    assert ckpt.objective == S.DDPMObjective(learned_sigma=True)
    ours = build(ckpt.spec).eval()
    ours.load_state_dict(ckpt.tensors)
    x, t, y = _inputs(ckpt.spec)
    with torch.no_grad():
        assert _rel(theirs(x, timestep=t, class_labels=y).sample, ours(x, t, y)) <= 1e-5
    # and back: the same tensors diffusers saved
    assert main(["convert", "--to", "diffusers", str(out), "--out", str(tmp_path / "back")]) == 0
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "src" / DF.WEIGHTS))
    b = load_file(str(tmp_path / "back" / DF.WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_is_bit_exact(tmp_path):
    spec = _tiny()
    sd = _random_model(spec, seed=2).state_dict()
    DF.write_folder(sd, spec, tmp_path / "d")
    state, config = DF.read_folder(tmp_path / "d")
    back_spec = DF.spec_from_config(config, name=spec.name)
    assert [c.path for c in diff(spec, back_spec)] == ["description"]
    back = DF.from_diffusers(state, back_spec)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.slow
def test_dit_s2_preset_shapes_output_equals_ditkit(tmp_path):
    """DiT-S/2 (33M parameters, 32x32x4 latents, 1000 classes) with random weights."""
    base = S.dit("s", 2)
    spec = base.model_copy(
        update={
            "conditioning": base.conditioning.model_copy(
                update={"noise": S.SinusoidalNoise(frequency_shift=1)}
            )
        }
    )
    ours = _random_model(spec, seed=7)
    DF.write_folder(ours.state_dict(), spec, tmp_path / "dit-s-2")
    theirs = _load(tmp_path / "dit-s-2")
    assert sum(p.numel() for p in theirs.parameters()) > sum(
        p.numel() for p in ours.parameters() if p.requires_grad
    )  # the per-block embedder copies
    x, t, y = _inputs(spec, batch=2)
    with torch.no_grad():
        assert _rel(ours(x, t, y), theirs(x, timestep=t, class_labels=y).sample) <= 1e-5


# ------------------------------------------------------------------ refusals


def _with(spec: S.ModelSpec, path: str, value) -> S.ModelSpec:
    data = S.to_data(spec, full=True)
    *head, last = path.split(".")
    node = data
    for k in head:
        node = node[int(k)] if isinstance(node, list) else node[k]
    node[last] = value
    return S.validate(data)


@pytest.mark.parametrize(
    "spec,field",
    [
        (S.hdit_imagenet_128(), "levels"),
        (preset("mdit-b"), "levels"),
        (preset("mpdit-xl"), "levels"),
        (S.dit("s", 2), "conditioning.noise.frequency_shift"),
        (_with(_tiny(), "block.ffn", {"kind": "gelu_mlp", "ratio": 3.0}), "block.ffn.ratio"),
        (_with(_tiny(), "block.qk_norm", {"kind": "layer"}), "block.qk_norm"),
        (_with(_tiny(), "block.norm", {"kind": "layer", "eps": 1e-5}), "block.norm.eps"),
        (_with(_tiny(), "position", {"kind": "learned"}), "position"),
        (
            _with(_tiny(), "conditioning.classes.null_class", False),
            "conditioning.classes.null_class",
        ),
        (_with(_tiny(), "conditioning.classes", None), "conditioning.classes"),
        (_with(_tiny(), "input.resolution", [8, 16]), "input.resolution"),
        (_with(_tiny(), "head", {"kind": "linear"}), "head.kind"),
    ],
)
def test_specs_diffusers_cannot_express_are_refused_naming_the_field(spec, field):
    with pytest.raises(DF.DiffusersError, match=field.replace(".", r"\.")):
        DF.config_from_spec(spec)


def test_cli_refusal_is_exit_2_one_line_and_leaves_nothing(tmp_path, capsys):
    spec = S.hdit(
        [32, 64], [1, 1], resolution=16, classes=10, mapping_width=32, d_head=16, kernel_size=3
    )
    ckpt = tmp_path / "h.safetensors"
    save_checkpoint(ckpt, build(spec).state_dict(), spec)
    before = sorted(os.listdir(tmp_path))
    assert main(["convert", "--to", "diffusers", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "levels has 2 entries" in err
    assert sorted(os.listdir(tmp_path)) == before


def test_failed_write_leaves_no_partial_folder_and_keeps_the_old_one(tmp_path, monkeypatch):
    spec = _tiny()
    sd = _random_model(spec).state_dict()
    out = tmp_path / "dit"
    DF.write_folder(sd, spec, out)
    old = (out / DF.WEIGHTS).read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DF, "save_file", broken)  # the use site
    from ditkit.errors import EnvironmentFault

    with pytest.raises(EnvironmentFault, match="disk is full"):
        DF.write_folder(sd, spec, out)
    assert sorted(os.listdir(tmp_path)) == ["dit"]  # no temporary folder left beside it
    assert (out / DF.WEIGHTS).read_bytes() == old
    with pytest.raises(EnvironmentFault):
        DF.write_folder(sd, spec, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["dit"]


def test_pickled_weights_are_refused_without_being_read(tmp_path, monkeypatch):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not read")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(DF.DiffusersError, match="never unpickles"):
        DF.read_folder(folder)


def test_configs_ditkit_cannot_read_are_refused_by_key():
    base = {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "num_layers": 1,
        "sample_size": 8,
        "norm_eps": 1e-6,
    }
    assert DF.spec_from_config(base).levels[0].d_model == 16
    for extra, key in (
        ({"norm_eps": 1e-5}, "norm_eps"),
        ({}, "norm_eps"),
        ({"norm_elementwise_affine": True}, "norm_elementwise_affine"),
        ({"attention_bias": False}, "attention_bias"),
        ({"activation_fn": "geglu"}, "activation_fn"),
        ({"out_channels": 5}, "out_channels"),
        ({"num_embeds_ada_norm": None}, "num_embeds_ada_norm"),
        ({"norm_type": "ada_norm"}, "norm_type"),
        ({"mystery": 1}, "mystery"),
        ({"_class_name": "PixArtTransformer2DModel"}, "_class_name"),
    ):
        config = {**base, **extra}
        if not extra:
            config.pop("norm_eps")  # absent: diffusers' default 1e-5
        with pytest.raises(DF.DiffusersError, match=key):
            DF.spec_from_config(config)


def test_per_block_embedders_that_differ_are_refused(tmp_path):
    spec = _tiny()
    DF.write_folder(_random_model(spec).state_dict(), spec, tmp_path / "d")
    state, config = DF.read_folder(tmp_path / "d")
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"
    state[key] = state[key] + 1
    with pytest.raises(ConversionError, match="differs from transformer_blocks.0"):
        DF.from_diffusers(state, DF.spec_from_config(config))


def test_diffusers_timestep_embedding_is_refused_by_the_dit_reference_layout():
    """The other way round: DiT's reference code computes the unshifted embedding, so a model
    in diffusers' layout must not be written as a facebookresearch/DiT checkpoint."""
    from ditkit.runtime.convert import dit as DIT

    spec = _tiny()
    with pytest.raises(ValueError, match="frequency_shift"):
        DIT.from_ditkit(_random_model(spec).state_dict(), spec)


def test_writing_over_a_folder_replaces_it_and_leaves_nothing_beside_it(tmp_path):
    spec = _tiny()
    out = tmp_path / "dit"
    DF.write_folder(_random_model(spec, seed=0).state_dict(), spec, out)
    first = (out / DF.WEIGHTS).read_bytes()
    DF.write_folder(_random_model(spec, seed=1).state_dict(), spec, out)
    assert (out / DF.WEIGHTS).read_bytes() != first
    assert sorted(os.listdir(tmp_path)) == ["dit"]
    assert sorted(os.listdir(out)) == ["config.json", DF.WEIGHTS]


def test_shifted_timestep_features_are_diffusers_own():
    """``frequency_shift: 1`` computes what diffusers' DiT embeds (its own function, bit for
    bit); 0 (DiT's reference) is another embedding, not a rounding difference."""
    from diffusers.models.embeddings import get_timestep_embedding

    from ditkit.builder.conditioning import timestep_features

    t = torch.tensor([0, 1, 17, 500, 999])
    theirs = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    assert torch.equal(timestep_features(t, 256, shift=1), theirs)
    assert (timestep_features(t, 256) - theirs).abs().max() > 0.1


def test_pipeline_folders_and_sharded_weights_are_read(tmp_path):
    from safetensors.torch import load_file, save_file

    spec = _tiny()
    DF.write_folder(_random_model(spec).state_dict(), spec, tmp_path / "pipe" / "transformer")
    state, config = DF.read_folder(tmp_path / "pipe")  # DiTPipeline layout: transformer/
    assert config["num_layers"] == 2
    # the same tensors in two shards with an index (save_pretrained's layout for big models)
    shard = tmp_path / "sharded"
    shard.mkdir()
    (shard / "config.json").write_text(json.dumps(config))
    keys = sorted(state)
    parts = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2],
    }
    for name, part in parts.items():
        save_file({k: state[k] for k in part}, str(shard / name))
    index = {"weight_map": {k: name for name, part in parts.items() for k in part}}
    (shard / (DF.WEIGHTS + ".index.json")).write_text(json.dumps(index))
    again, _ = DF.read_folder(shard)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    ref = load_file(str(tmp_path / "pipe" / "transformer" / DF.WEIGHTS))
    assert ref.keys() == state.keys()
