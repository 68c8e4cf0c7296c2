"""Bring your config: k-diffusion ``image_transformer_v2`` JSON configs -> ditkit spec and
experiment, every key mapped or refused by name.

k-diffusion's PyPI release (0.1.1.post1) ships no ``configs/*.json`` and predates
``image_transformer_v2``, so the configs k-diffusion ships in its repository
(``configs/config_oxford_flowers.json``, ``configs/config_oxford_flowers_shifted_window.json``)
are written out below from their published keys and values, next to HDiT-paper-style ones.
Parameter-count ground truth: the k-diffusion reference fixtures (state dicts saved by
k-diffusion itself, with their ``config.json``), and k-diffusion's model when an install that
has ``image_transformer_v2`` is importable (skipped otherwise).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
from safetensors.torch import load_file

from ditkit import spec as S
from ditkit.cli import main
from ditkit.runtime.convert import kdiffusion as KD
from ditkit.runtime.convert import kdiffusion_config as KC
from ditkit.runtime.convert.remap import expected_shapes
from tests.conftest import FIXTURES

# k-diffusion's configs/config_oxford_flowers_shifted_window.json (its published keys/values)
FLOWERS_SHIFTED_WINDOW = {
    "model": {
        "type": "image_transformer_v2",
        "input_channels": 3,
        "input_size": [256, 256],
        "patch_size": [4, 4],
        "depths": [2, 2, 4],
        "widths": [128, 256, 512],
        "self_attns": [
            {"type": "shifted-window", "d_head": 64, "window_size": 8},
            {"type": "shifted-window", "d_head": 64, "window_size": 8},
            {"type": "global", "d_head": 64},
        ],
        "loss_config": "karras",
        "loss_weighting": "soft-min-snr",
        "dropout_rate": 0.1,
        "augment_prob": 0.0,
        "sigma_data": 0.5,
        "sigma_min": 1e-2,
        "sigma_max": 160,
        "sigma_sample_density": {"type": "cosine-interpolated"},
    },
    "dataset": {"type": "huggingface", "location": "nelorth/oxford-flowers", "image_key": "image"},
    "optimizer": {
        "type": "adamw",
        "lr": 5e-4,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "weight_decay": 1e-3,
    },
    "lr_sched": {"type": "constant", "warmup": 0.0},
    "ema_sched": {"type": "inverse", "power": 0.75, "max_value": 0.9999},
}
# configs/config_oxford_flowers.json: the same with neighborhood attention, kernel 7
FLOWERS = copy.deepcopy(FLOWERS_SHIFTED_WINDOW)
FLOWERS["model"]["self_attns"] = [
    {"type": "neighborhood", "d_head": 64, "kernel_size": 7},
    {"type": "neighborhood", "d_head": 64, "kernel_size": 7},
    {"type": "global", "d_head": 64},
]
# HDiT paper, FFHQ-1024 (Table 6): 3 local + 2 global levels, dropout in the innermost level
FFHQ_1024 = {
    "model": {
        "type": "image_transformer_v2",
        "input_channels": 3,
        "input_size": [1024, 1024],
        "patch_size": [4, 4],
        "depths": [2, 2, 2, 2, 2],
        "widths": [128, 256, 384, 768, 1024],
        "self_attns": [{"type": "neighborhood", "d_head": 64, "kernel_size": 7}] * 3
        + [{"type": "global", "d_head": 64}] * 2,
        "loss_config": "karras",
        "loss_weighting": "soft-min-snr",
        "dropout_rate": [0.0, 0.0, 0.0, 0.0, 0.1],
        "mapping_dropout_rate": 0.0,
        "augment_prob": 0.0,
        "sigma_data": 0.5,
        "sigma_min": 1e-3,
        "sigma_max": 1e3,
        "sigma_sample_density": {"type": "cosine-interpolated"},
    },
    "dataset": {"type": "imagefolder", "location": "ffhq-1024", "cond_dropout_rate": 0.1},
    "optimizer": {
        "type": "adamw",
        "lr": 5e-4,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "weight_decay": 1e-2,
    },
    "lr_sched": {"type": "constant", "warmup": 0.0},
    "ema_sched": {"type": "inverse", "power": 0.75, "max_value": 0.9999},
}
# HDiT paper, ImageNet-128 ablation step E: widths 384/768, depths 2/11, mapping 768 x 1
IMAGENET_128 = {
    "model": {
        "type": "image_transformer_v2",
        "input_channels": 3,
        "input_size": [128, 128],
        "patch_size": [4, 4],
        "depths": [2, 11],
        "widths": [384, 768],
        "self_attns": [
            {"type": "neighborhood", "d_head": 64, "kernel_size": 7},
            {"type": "global", "d_head": 64},
        ],
        "mapping_width": 768,
        "mapping_depth": 1,
        "loss_config": "karras",
        "loss_weighting": "soft-min-snr",
        "sigma_data": 0.5,
        "sigma_sample_density": {"type": "cosine-interpolated"},
    },
    "dataset": {
        "type": "imagefolder",
        "location": "imagenet/train",
        "num_classes": 1000,
        "cond_dropout_rate": 0.1,
    },
    "lr_sched": {"type": "constant", "warmup": 0.0},
}
CONFIGS = {
    "flowers": FLOWERS,
    "flowers_shifted_window": FLOWERS_SHIFTED_WINDOW,
    "ffhq_1024": FFHQ_1024,
    "imagenet_128": IMAGENET_128,
}


def kdiffusion_parameters(config: dict) -> int:
    """k-diffusion's ImageTransformerDenoiserModelV2 parameter count, from its layer list
    (facts of its architecture: every Linear bias-free, AdaRMSNorm = one Linear from the
    mapping width, GEGLU up-projection 2 d_ff wide, one attention scale per head, TokenMerge /
    TokenSplit 2x2 with a lerp factor; FourierFeatures and RoPE frequencies are buffers).
    Written independently of ditkit; checked against k-diffusion's own state dicts below."""
    m = config["model"]
    classes = config.get("dataset", {}).get("num_classes", 0)
    widths, depths = m["widths"], m["depths"]
    d_ffs = m.get("d_ffs") or [3 * w for w in widths]
    mw, md = m.get("mapping_width", 256), m.get("mapping_depth", 2)
    mff = m.get("mapping_d_ff") or 3 * mw
    heads = [w // sa.get("d_head", 64) for w, sa in zip(widths, m["self_attns"])]
    ph, pw = m["patch_size"]
    c = m["input_channels"]
    n = c * ph * pw * widths[0]  # patch_in
    n += 2 * mw * mw  # time_in_proj, aug_in_proj
    n += (classes + 1) * mw if classes else 0  # class_emb with the null row
    n += 2 * mw + md * (mw + mw * 2 * mff + mff * mw)  # mapping in/out norms, blocks
    for i, (w, f, h) in enumerate(zip(widths, d_ffs, heads)):
        layer = mw * w + 4 * w * w + h + mw * w + w * 2 * f + f * w
        n += layer * depths[i] * (1 if i == len(widths) - 1 else 2)
    for i in range(len(widths) - 1):
        n += 4 * widths[i] * widths[i + 1] * 2 + 1  # merge, split, split's fac
    n += widths[0] + widths[0] * c * ph * pw  # out_norm, patch_out
    return n


def _fixture(name):
    folder = FIXTURES / name
    if not folder.is_dir():
        pytest.skip(f"reference fixture {name} not found at {folder}")
    return folder


def _buffers(key: str) -> bool:
    return key.endswith("pos_emb.freqs") or key in ("time_emb.weight", "aug_emb.weight")


@pytest.mark.parametrize("name", ["hdit_global", "hdit_neighborhood", "hdit_shifted_window"])
def test_fixture_configs_build_k_diffusions_parameter_count_and_tensor_shapes(name):
    """The fixtures' config.json (k-diffusion's schema) and the state dict k-diffusion saved
    from the model it built from it: same parameter count, and every tensor loads."""
    folder = _fixture(name)
    config = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "weights.safetensors"))
    truth = sum(v.numel() for k, v in state.items() if not _buffers(k))
    t = KC.translate(config, name=name, experiment=False)
    assert KC.parameter_count(t.spec) == truth
    assert kdiffusion_parameters(config) == truth  # the independent count agrees with k-diff
    tensors = KD.to_ditkit(state, t.spec)  # every tensor, shape-checked
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_shapes(t.spec)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_published_configs_convert_with_k_diffusions_parameter_count(name):
    config = CONFIGS[name]
    t = KC.translate(config, name=name, data_path="images")
    assert KC.parameter_count(t.spec) == kdiffusion_parameters(config)
    assert S.validate(S.to_data(t.spec)) == t.spec  # a valid, loadable spec
    m = config["model"]
    for i, (lvl, sa) in enumerate(zip(t.spec.levels, m["self_attns"])):
        blk = t.spec.stack(i, "middle" if i == len(m["widths"]) - 1 else "encoder")[0]
        assert lvl.d_model == m["widths"][i] and blk.d_head == sa["d_head"]
        kind = {"shifted-window": "shifted_window"}.get(sa["type"], sa["type"])
        assert blk.attention.kind == kind
        if kind == "neighborhood":
            assert S.pair(blk.attention.kernel_size)[0] == sa["kernel_size"]
        if kind == "shifted_window":
            assert blk.attention.window_size == sa["window_size"]


def test_ffhq_three_local_two_global_levels_and_dropouts():
    t = KC.translate(FFHQ_1024, name="ffhq")
    kinds = [t.spec.stack(i, "middle" if i == 4 else "encoder")[0].attention.kind for i in range(5)]
    assert kinds == ["neighborhood"] * 3 + ["global"] * 2
    drops = [t.spec.stack(i, "middle" if i == 4 else "encoder")[0].dropout for i in range(5)]
    assert drops == [0.0, 0.0, 0.0, 0.0, 0.1]
    assert t.spec.conditioning.classes is None
    assert t.spec.conditioning.mapping.dropout == 0.0
    assert t.experiment.training.label_dropout == 0.1  # dataset.cond_dropout_rate
    assert t.experiment.objective.sigma_min == 1e-3


def test_mapping_dropout_is_the_mapping_networks_not_the_label_dropout():
    config = copy.deepcopy(IMAGENET_128)
    config["model"]["mapping_dropout_rate"] = 0.05
    config["dataset"]["cond_dropout_rate"] = 0.2
    t = KC.translate(config)
    assert t.spec.conditioning.mapping.dropout == 0.05
    assert t.experiment.training.label_dropout == 0.2
    rows = {r.key: r for r in t.rows}
    assert rows["model.mapping_dropout_rate"].target.startswith("conditioning.mapping.dropout")
    assert rows["dataset.cond_dropout_rate"].target.startswith("training.label_dropout")


def test_training_keys_map_to_the_experiment():
    t = KC.translate(FLOWERS, name="flowers", data_path="flowers")
    exp = t.experiment
    assert exp.objective == S.EDMObjective(
        sigma_data=0.5,
        weighting="soft_min_snr",
        gamma=4.0,
        sigma_min=0.01,
        sigma_max=160.0,
        sigma_sampling=S.CosineInterpolatedSigma(sigma_min=1e-3, sigma_max=1e3),
    )
    assert exp.optimizer.lr == 5e-4 and exp.optimizer.betas == (0.9, 0.95)
    assert exp.optimizer.eps == 1e-8 and exp.optimizer.weight_decay == 1e-3
    assert exp.optimizer.mapping_lr_scale == pytest.approx(1 / 3)
    assert (exp.ema.decay, exp.ema.warmup_power) == (0.9999, 0.75)
    assert exp.data.kind == "image_folder" and exp.data.path == "flowers"
    # every key of the config has a row
    keys = {r.key.split("[")[0] for r in t.rows}
    for section, entries in FLOWERS.items():
        assert {f"{section}.{k}" for k in entries} <= keys


def test_per_level_kernel_sizes_are_kept():
    config = copy.deepcopy(IMAGENET_128)
    config["model"].update(
        depths=[1, 1, 1],
        widths=[64, 128, 256],
        mapping_width=64,
        self_attns=[
            {"type": "neighborhood", "d_head": 32, "kernel_size": 3},
            {"type": "neighborhood", "d_head": 64, "kernel_size": 5},
            {"type": "global", "d_head": 64},
        ],
    )
    t = KC.translate(config, experiment=False)
    blocks = [t.spec.stack(i, "middle" if i == 2 else "encoder")[0] for i in range(3)]
    assert [S.pair(b.attention.kernel_size)[0] for b in blocks[:2]] == [3, 5]
    assert [b.d_head for b in blocks] == [32, 64, 64]


REFUSALS = [
    (("model", "augment_prob"), 0.12, "model.augment_prob"),
    (("model", "loss_config"), "simple", "model.loss_config"),
    (("model", "loss_scales"), 3, "model.loss_scales"),
    (("model", "loss_weighting"), "min-snr", "model.loss_weighting"),
    (("model", "sigma_sample_density"), {"type": "loglogistic"}, "model.sigma_sample_density.type"),
    (("model", "mapping_cond_dim"), 4, "model.mapping_cond_dim"),
    (("model", "has_variance"), True, "model.has_variance"),
    (
        ("model", "self_attns"),
        [{"type": "none"}, {"type": "global"}],
        r"model.self_attns\[0\].type",
    ),
    (
        ("model", "self_attns"),
        [{"type": "shifted-window", "d_head": 64}, {"type": "global"}],
        r"model.self_attns\[0\]",
    ),
    (("model", "type"), "image_transformer_v1", "model.type"),
    (("model", "mystery_key"), 1, "model.mystery_key"),
    (("lr_sched", "type"), "inverse", "lr_sched.type"),
    (("lr_sched", "warmup"), 0.99, "lr_sched.warmup"),
    (("optimizer", "type"), "sgd", "optimizer.type"),
    (("ema_sched", "type"), "constant", "ema_sched.type"),
    (("dataset", "type"), "huggingface", "dataset.type"),
    (("extras", None), {}, "extras"),
]


@pytest.mark.parametrize("where,value,key", REFUSALS, ids=[r[2] for r in REFUSALS])
def test_keys_ditkit_cannot_map_are_refused_by_name(where, value, key):
    config = copy.deepcopy(IMAGENET_128)
    section, name = where
    if name is None:
        config[section] = value
    else:
        config.setdefault(section, {})[name] = value
    with pytest.raises(KC.KDiffusionConfigError, match=key):
        KC.translate(config)


def test_absent_lr_schedule_is_k_diffusions_inverse_default_and_refused():
    config = copy.deepcopy(IMAGENET_128)
    del config["lr_sched"]
    with pytest.raises(KC.KDiffusionConfigError, match=r"lr_sched.type \(absent"):
        KC.translate(config)
    assert KC.translate(config, experiment=False).spec  # the model alone converts


def test_cli_writes_spec_and_experiment_that_load(tmp_path, capsys):
    from ditkit.spec.experiment import load_experiment

    cfg = tmp_path / "config_imagenet_128.json"
    cfg.write_text(json.dumps(IMAGENET_128))
    spec_path, exp_path = tmp_path / "spec.yaml", tmp_path / "runs" / "exp.yaml"
    assert (
        main(
            [
                "convert",
                "--from",
                "k-diffusion",
                str(cfg),
                "--out",
                str(spec_path),
                "--experiment",
                str(exp_path),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "model.mapping_dropout_rate" in printed and "parameters" in printed
    spec = S.load(spec_path)
    assert spec.name == "imagenet-128"
    exp = load_experiment(exp_path)
    assert exp.model == spec and exp.training.label_dropout == 0.1
    assert main(["describe", str(spec_path)]) == 0
    assert f"{kdiffusion_parameters(IMAGENET_128):,}" in capsys.readouterr().out


def test_cli_refusal_is_exit_2_one_line_and_writes_nothing(tmp_path, capsys):
    config = copy.deepcopy(IMAGENET_128)
    config["model"]["augment_prob"] = 0.12
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(config))
    assert (
        main(
            [
                "convert",
                "--from",
                "k-diffusion",
                str(cfg),
                "--out",
                str(tmp_path / "s.yaml"),
                "--experiment",
                str(tmp_path / "e.yaml"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.augment_prob" in err
    assert sorted(os.listdir(tmp_path)) == ["c.json"]


def test_against_k_diffusion_itself_when_importable():
    try:
        from k_diffusion import config as kconfig
        from k_diffusion.models import image_transformer_v2  # noqa: F401
    except Exception as err:  # not installed, or a release without HDiT (PyPI 0.1.1.post1)
        pytest.skip(
            f"k-diffusion with image_transformer_v2 is not importable ({err!r}); "
            "the fixtures' state dicts are the ground truth instead"
        )
    import torch

    for name, config in CONFIGS.items():
        with torch.device("meta"):
            model = kconfig.make_model(kconfig.load_config(copy.deepcopy(config)))
        want = sum(p.numel() for p in model.parameters())
        assert KC.parameter_count(KC.translate(config, experiment=False).spec) == want, name


@pytest.mark.parametrize(
    "name,preset_name", [("ffhq_1024", "hdit-ffhq-1024"), ("imagenet_128", "hdit-imagenet-128")]
)
def test_paper_configs_convert_to_ditkits_hdit_presets(name, preset_name):
    """The HDiT paper's models written as k-diffusion configs are ditkit's presets, field for
    field (the presets were written from the paper's Table 6 independently)."""
    from ditkit.spec.diff import diff
    from ditkit.spec.presets import preset

    spec = KC.translate(CONFIGS[name], experiment=False).spec
    assert [c.path for c in diff(spec, preset(preset_name))] == ["name", "description"]


def test_checkpoint_conversion_keeps_per_level_kernel_and_window_sizes():
    """The checkpoint path reads the same keys (a checkpoint's config metadata): a kernel
    or window size that differs per level must not take level 0's (it changes no tensor
    shape, so the weights would load into the wrong model silently)."""
    config = {
        "model": {
            "type": "image_transformer_v2",
            "input_channels": 3,
            "input_size": [64, 64],
            "patch_size": [2, 2],
            "depths": [1, 1, 1, 1],
            "widths": [32, 64, 64, 64],
            "mapping_width": 32,
            "self_attns": [
                {"type": "neighborhood", "d_head": 16, "kernel_size": 3},
                {"type": "neighborhood", "d_head": 16, "kernel_size": 5},
                {"type": "shifted-window", "d_head": 16, "window_size": 4},
                {"type": "shifted-window", "d_head": 16, "window_size": 2},
            ],
        }
    }
    spec = KD.infer_spec({}, {"config": json.dumps(config)})
    atts = [spec.stack(i, "middle" if i == 3 else "encoder")[0].attention for i in range(4)]
    assert [S.pair(a.kernel_size)[0] for a in atts[:2]] == [3, 5]
    assert [a.window_size for a in atts[2:]] == [4, 2]
