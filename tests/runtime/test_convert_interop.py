"""Interop beyond the tensors: the objective each converter records, the k-diffusion config
``--to k-diffusion`` writes, head-count checks and the printed hash."""

from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch

from ditkit import spec as S
from ditkit.cli import main
from ditkit.runtime import convert as CV
from ditkit.runtime.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from ditkit.runtime.convert import dit as DIT
from ditkit.runtime.convert import kdiffusion as KD
from ditkit.runtime.convert import mpdit as MP
from ditkit.runtime.denoiser import Denoiser
from ditkit.spec.presets import preset
from tests.conftest import EXAMPLES, FIXTURES


def _folder(name):
    folder = FIXTURES / name
    if not folder.is_dir():
        pytest.skip(f"reference fixture {name} not found at {folder}")
    return folder


def _source_state(module, name: str) -> dict[str, torch.Tensor]:
    """The source-layout state dict of a preset, shapes only (meta device)."""
    spec = preset(name)
    ours = {k: torch.empty(s, device="meta") for k, s in CV.expected_shapes(spec).items()}
    return module.from_ditkit(ours, spec)


# ------------------------------------------------------------------ k-diffusion objective


def test_kdiffusion_conversion_records_the_configs_objective(tmp_path):
    """The fixtures' config: sigma_data 0.5, soft-min-snr, sigma_min 1e-2 / sigma_max 160,
    cosine-interpolated density (k-diffusion's make_sample_density: clip range
    min(1e-2, 1e-3) / max(160, 1e3), noise_d_low 32, noise_d_high = input size)."""
    out = tmp_path / "h.safetensors"
    CV.convert(_folder("hdit_global") / "weights.safetensors", "k-diffusion", out)
    obj = load_checkpoint(out).objective
    assert obj == S.EDMObjective(
        sigma_data=0.5,
        weighting="soft_min_snr",
        gamma=4.0,
        sigma_min=0.01,
        sigma_max=160.0,
        sigma_sampling=S.CosineInterpolatedSigma(
            sigma_min=1e-3, sigma_max=1e3, low_resolution=32, high_resolution=None
        ),
    )
    rng = Denoiser(torch.nn.Identity(), obj).noise_range
    assert (rng.sigma_min, rng.sigma_max) == (0.01, 160.0)  # what `ditkit sample` uses


@pytest.mark.parametrize("sd", [0.5, 1.0, 0.25])
def test_kdiffusion_soft_min_snr_gamma_is_one_over_sigma_data_squared(sd):
    config = {
        "model": {
            "type": "image_transformer_v2",
            "input_channels": 3,
            "input_size": [32, 32],
            "patch_size": [2, 2],
            "depths": [1, 1],
            "widths": [32, 64],
            "sigma_data": sd,
            "loss_weighting": "soft-min-snr",
            "sigma_sample_density": {"type": "lognormal", "mean": -1.2, "std": 1.2},
        }
    }
    obj = KD.objective({"config": json.dumps(config)}, None)
    assert obj.gamma == pytest.approx(1 / sd**2) and obj.sigma_data == sd
    assert obj.sigma_sampling == S.LogNormalSigma(mean=-1.2, std=1.2)
    assert obj.sigma_min is None  # the config names no sampling range


def test_kdiffusion_losses_ditkit_cannot_record_are_named():
    base = {
        "type": "image_transformer_v2",
        "input_channels": 3,
        "input_size": [32, 32],
        "patch_size": [2, 2],
        "depths": [1, 1],
        "widths": [32, 64],
        "sigma_data": 0.5,
    }
    for extra, needle in (
        ({"loss_scales": 3}, "loss_scales 3"),
        ({"loss_config": "simple"}, "loss_config 'simple'"),
        ({"sigma_sample_density": {"type": "loglogistic"}}, "'loglogistic'"),
    ):
        with pytest.warns(UserWarning, match=needle):
            obj = KD.objective({"config": json.dumps({"model": {**base, **extra}})}, None)
        assert isinstance(obj, S.EDMObjective) and obj.sigma_data == 0.5
    with pytest.raises(ValueError, match="loss_weighting 'min-snr'"):
        KD.objective({"config": json.dumps({"model": {**base, "loss_weighting": "min-snr"}})}, None)


# ------------------------------------------------------------------ --to k-diffusion


# What k-diffusion reads from a config: load_config (model.type), make_model
# (image_transformer_v2), make_denoiser_wrapper, make_sample_density and sample.py.
KDIFF_MODEL_KEYS = {
    "type": str,
    "input_channels": int,
    "input_size": list,
    "patch_size": list,
    "depths": list,
    "widths": list,
    "d_ffs": list,
    "self_attns": list,
    "dropout_rate": list,
    "mapping_width": int,
    "mapping_depth": int,
    "mapping_d_ff": int,
    "mapping_cond_dim": int,
    "mapping_dropout_rate": float,
    "sigma_data": float,
    "sigma_min": float,
    "sigma_max": float,
    "sigma_sample_density": dict,
    "loss_config": str,
    "loss_weighting": str,
    "loss_scales": int,
    "augment_prob": float,
    "has_variance": bool,
}


def _export(tmp_path, name="tiny-hdit-global", objective=None):
    torch.manual_seed(0)
    from ditkit.builder import build

    spec = S.load(EXAMPLES / "tiny" / f"{name}.yaml")
    model = build(spec)
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, model.state_dict(), spec, objective=objective)
    out = tmp_path / "k.safetensors"
    return ckpt, out


def test_to_kdiffusion_writes_every_key_kdiffusion_reads(tmp_path):
    obj = S.EDMObjective(
        sigma_data=0.5,
        weighting="soft_min_snr",
        gamma=4.0,
        sigma_min=0.01,
        sigma_max=160.0,
        sigma_sampling=S.CosineInterpolatedSigma(),
    )
    ckpt, out = _export(tmp_path, objective=obj)
    assert main(["convert", "--to", "k-diffusion", str(ckpt), "--out", str(out)]) == 0
    config = json.loads(read_metadata(out)["config"])
    model = config["model"]
    for key, kind in KDIFF_MODEL_KEYS.items():
        assert key in model, key
        assert isinstance(model[key], kind) or (kind is float and isinstance(model[key], int)), (
            key,
            model[key],
        )
    size = model["input_size"]
    assert len(size) == 2 and size[0] == size[1]  # sample.py's assertion
    assert all(isinstance(v, int) for v in size + model["patch_size"])
    for sa in model["self_attns"]:
        assert sa["type"] in ("global", "neighborhood", "shifted-window") and "d_head" in sa
    assert isinstance(config["dataset"]["num_classes"], int)
    for section in ("optimizer", "lr_sched", "ema_sched"):
        assert "type" in config[section]
    assert model["loss_weighting"] == "soft-min-snr" and model["sigma_data"] == 0.5
    assert (model["sigma_min"], model["sigma_max"]) == (0.01, 160.0)
    assert model["sigma_sample_density"] == {
        "type": "cosine-interpolated",
        "min_value": 1e-3,
        "max_value": 1e3,
        "noise_d_low": 32,
        "noise_d_high": 16,
    }
    # and back: the same spec (name included) and objective
    again = tmp_path / "again.safetensors"
    assert main(["convert", "--from", "k-diffusion", str(out), "--out", str(again)]) == 0
    src, back = load_checkpoint(ckpt), load_checkpoint(again)
    assert back.spec.name == "tiny-hdit-global"
    assert back.spec.model_copy(update={"description": ""}) == src.spec
    assert back.objective == obj


def test_to_kdiffusion_refuses_what_it_cannot_express(tmp_path):
    spec = S.load(EXAMPLES / "tiny" / "tiny-hdit-global.yaml")
    plain = spec.model_copy(
        update={"conditioning": spec.conditioning.model_copy(update={"aux": ()})}
    )
    with pytest.raises(
        ValueError,
        match="k-diffusion's image_transformer_v2 requires a "
        "9-dimensional aug_cond input; this model has none",
    ):
        KD.source_metadata(plain, S.EDMObjective())
    with pytest.raises(ValueError, match="soft-min-snr is gamma = 1 / sigma_data"):
        KD.source_metadata(spec, S.EDMObjective(weighting="soft_min_snr", gamma=5.0))
    with pytest.raises(ValueError, match="no min-snr"):
        KD.source_metadata(spec, S.EDMObjective(weighting="min_snr"))
    with pytest.raises(ValueError, match="EDM preconditioning"):
        KD.source_metadata(spec, S.FlowObjective())


def test_cli_to_kdiffusion_without_aug_cond_names_why(tmp_path, capsys):
    from ditkit.builder import build

    spec = S.load(EXAMPLES / "tiny" / "tiny-hdit-global.yaml")
    spec = spec.model_copy(
        update={"conditioning": spec.conditioning.model_copy(update={"aux": ()})}
    )
    spec = S.ModelSpec.model_validate(S.to_data(spec, full=True))
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, build(spec).state_dict(), spec, objective=S.EDMObjective())
    assert (
        main(
            ["convert", "--to", "k-diffusion", str(ckpt), "--out", str(tmp_path / "k.safetensors")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "requires a 9-dimensional aug_cond input; this model has none" in err
    assert "Traceback" not in err and not (tmp_path / "k.safetensors").exists()


# ------------------------------------------------------------------ MPDiT objective


def test_mpdit_conversion_records_the_rectified_flow(tmp_path):
    weights = _folder("mpdit_tiny") / "weights.safetensors"
    out = tmp_path / "m.safetensors"
    CV.convert(weights, "mpdit", out, n_heads=4)
    obj = load_checkpoint(out).objective
    # no args: the published recipe (script/train.sh: lognormal, p_mean 0, p_std 1.0)
    assert obj == S.FlowObjective(
        time_sampling=S.LogitNormalTime(mean=0.0, std=1.0), time_scale=1.0
    )
    # a training checkpoint's args win
    state, _ = CV.read_source(weights)
    path = tmp_path / "train.pt"
    torch.save(
        {
            "model": state,
            "ema": state,
            "args": argparse.Namespace(time_sampler="uniform", p_mean=0.0, p_std=1.0),
        },
        path,
    )
    CV.convert(path, "mpdit", tmp_path / "u.safetensors", n_heads=4)
    assert load_checkpoint(tmp_path / "u.safetensors").objective == S.FlowObjective(
        time_sampling=S.UniformTime()
    )
    torch.save({"ema": state, "args": argparse.Namespace(p_mean=-0.2, p_std=0.5)}, path)
    CV.convert(path, "mpdit", tmp_path / "l.safetensors", n_heads=4)
    assert load_checkpoint(tmp_path / "l.safetensors").objective.time_sampling == S.LogitNormalTime(
        mean=-0.2, std=0.5
    )


def test_mpdit_flow_denoiser_gives_the_model_t_itself(tmp_path):
    """MPDiT's network is called with t in [0, 1] (OTFlow.get_xt / sample_euler)."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x, t, labels=None):
            seen.append(t.clone())
            return torch.zeros_like(x)

    obj = MP.objective({}, None)
    Denoiser(Probe(), obj)(torch.zeros(2, 4, 8, 8), torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(seen[0], torch.tensor([0.5, 0.75]))


# ------------------------------------------------------------------ heads and the hash


def test_heads_that_do_not_divide_the_width_are_refused():
    state = _source_state(DIT, "dit-s-2")
    with pytest.raises(ValueError, match="--heads 5 does not divide the width 384"):
        DIT.infer_spec(state, {}, n_heads=5)
    mp = _source_state(MP, "mpdit-b")
    with pytest.raises(ValueError, match="--heads 7 does not divide the width 768"):
        MP.infer_spec(mp, {}, n_heads=7)


def test_heads_differing_from_the_preset_warn():
    state = _source_state(DIT, "dit-s-2")
    with pytest.warns(UserWarning, match="--heads 4 differs from the 6 heads of the width-384"):
        spec = DIT.infer_spec(state, {}, n_heads=4)
    assert spec.block.d_head == 96
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DIT.infer_spec(state, {}, n_heads=6)  # the preset's own count: silent
    with pytest.warns(UserWarning, match="differs from the 12 heads of the width-768 MPDiT"):
        MP.infer_spec(_source_state(MP, "mpdit-b"), {}, n_heads=8)


def test_printed_hash_covers_the_spec(tmp_path, capsys):
    weights = _folder("dit_tiny") / "weights.safetensors"
    digests = []
    for heads in (4, 2):
        out = tmp_path / f"h{heads}.safetensors"
        assert (
            main(
                ["convert", "--from", "dit", str(weights), "--out", str(out), "--heads", str(heads)]
            )
            == 0
        )
        line = capsys.readouterr().out
        digests.append(line.split("sha256 ")[1].split()[0])
        ckpt = load_checkpoint(out)
        assert digests[-1] == CV.conversion_hash(ckpt.tensors, ckpt.spec, ckpt.objective)[:16]
    assert digests[0] != digests[1]  # same tensors, different models


# ------------------------------------------------------------------ ditkit sample's range


def test_cli_sample_uses_the_configs_sigma_range_and_the_flags(tmp_path, monkeypatch, capsys):
    from ditkit.runtime import samplers

    out = tmp_path / "h.safetensors"
    CV.convert(_folder("hdit_global") / "weights.safetensors", "k-diffusion", out)
    seen = []
    real = samplers.karras_sigmas
    monkeypatch.setattr(
        samplers,
        "karras_sigmas",
        lambda n, lo, hi, rho=7.0: seen.append((lo, hi)) or real(n, lo, hi, rho),
    )
    args = [
        "sample",
        str(out),
        "--steps",
        "2",
        "--count",
        "1",
        "--out",
        str(tmp_path / "g.png"),
        "--no-progress",
    ]
    assert main(args) == 0
    assert main(args + ["--sigma-min", "0.05", "--sigma-max", "20"]) == 0
    assert seen == [(0.01, 160.0), (0.05, 20.0)]
    assert main(args + ["--sigma-min", "30", "--sigma-max", "20"]) == 2
    assert "--sigma-min 30.0: must be below --sigma-max 20.0" in capsys.readouterr().err
