"""Fine-tuning a resolution-adapted checkpoint: only the named parameters train."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ditkit import spec as S
from ditkit.builder import build
from ditkit.runtime.checkpoint import load_checkpoint, load_model, save_checkpoint
from ditkit.runtime.extrapolate import adapt
from ditkit.spec.experiment import experiment_from_data
from ditkit.training import finetune
from ditkit.training.checkpoints import read_tensors
from ditkit.training.loop import train

from .conftest import tiny_experiment_data, tiny_model
from tests.perturb import perturb

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def source(tmp_path):
    """A 'trained' checkpoint of the tiny 8x8 model (random weights, a fixed seed)."""
    spec = S.validate(tiny_model())
    torch.manual_seed(3)
    model = build(spec)
    perturb(model, 0.01)  # zero-initialised outputs would hide frozen/trainable mixups
    path = tmp_path / "source.safetensors"
    save_checkpoint(path, model.state_dict(), spec, objective=S.EDMObjective())
    return path, spec, model.state_dict()


def _exp(source_path, steps=4, sections=None, **ft):
    section = {
        "checkpoint": str(source_path),
        "policy": {"kind": "core_patch", "factor": 4},
        "resolution": [16, 16],
        "trainable": ["new"],
        **ft,
    }
    return experiment_from_data(
        tiny_experiment_data("edm", steps, finetune=section, **(sections or {}))
    )


def test_frozen_parameters_stay_bit_identical_and_trainable_ones_change(tmp_path, source):
    path, spec, trained = source
    exp = _exp(path, steps=4, trainable=["new", "head.*"])
    result = train(exp, tmp_path / "run", progress=False)
    assert result.step == 4
    ckpt = tmp_path / "run/checkpoints/step-000004"
    after = read_tensors(ckpt / "model.safetensors")
    ema = read_tensors(ckpt / "ema.safetensors")
    start = adapt(spec, trained, S.CorePatch(factor=4), (16, 16)).tensors
    trainable = {
        "levels.0.down.proj.weight",
        "levels.0.up.proj.weight",
        "head.proj.weight",
        "head.norm.scale",
    }
    assert set(after) == set(start)
    for key in start:
        if key in trainable:
            assert not torch.equal(after[key], start[key]), key
        else:
            assert torch.equal(after[key], start[key]), key  # frozen: bit-identical
            assert torch.equal(ema[key], start[key]), key
    record = json.loads((tmp_path / "run/finetune.json").read_text())
    assert sorted(record["trainable"]) == sorted(trainable)
    assert record["trainable_params"] == sum(start[k].numel() for k in trainable)
    assert record["policy"]["kind"] == "core_patch" and record["resolution"] == [16, 16]


def test_checkpoint_round_trips_for_sample_and_resume(tmp_path, source):
    path, spec, _ = source
    exp = _exp(
        path,
        steps=4,
        sections={"checkpoint": {"every": 2}},
        trainable=["re:^levels\\.0\\.(down|up)\\."],
    )
    train(exp, tmp_path / "run", progress=False, stop_after=2)
    run = tmp_path / "run"
    saved = S.loads((run / "experiment.yaml").read_text(), S.experiment.Experiment)
    # the saved experiment carries the adapted spec, the source spec, policy and patterns
    assert saved.model_spec.input.resolution == (16, 16)
    assert saved.model_spec.levels[0].down.factor == 4
    assert saved.finetune.source_model == spec
    assert saved.finetune.trainable == ("re:^levels\\.0\\.(down|up)\\.",)
    # the final checkpoint loads like any other (ditkit sample / extrapolate) ...
    final = train(saved, run, progress=False, resume=True)  # ... and resuming does not re-adapt
    assert final.step == 4
    model, info = load_model(run / "checkpoints/step-000004/ema.safetensors")
    assert info.spec == saved.model_spec
    meta = json.loads(info.metadata[finetune.METADATA_KEY])
    assert meta["trainable"] == ["levels.0.down.proj.weight", "levels.0.up.proj.weight"]
    out = model(torch.randn(2, 1, 16, 16), torch.ones(2), torch.tensor([1, 2]))
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    # the resumed run equals an uninterrupted one
    full = train(exp, tmp_path / "full", progress=False)
    a = load_checkpoint(run / "checkpoints/step-000004/model.safetensors").tensors
    b = load_checkpoint(tmp_path / "full/checkpoints/step-000004/model.safetensors").tensors
    assert full.step == 4 and all(torch.equal(a[k], b[k]) for k in a)


def test_presets_and_patterns_select_parameters(source):
    path, _, _ = source
    exp, plan = finetune.prepare(_exp(path, trainable=["patch"]))
    assert set(plan.trainable) == {
        "embed.proj.weight",
        "head.norm.scale",
        "head.proj.weight",
        "levels.0.down.proj.weight",
        "levels.0.up.proj.weight",
    }
    exp, plan = finetune.prepare(_exp(path, policy={"kind": "add_levels"}, trainable=["new"]))
    # the new outer level (blocks, merge, split, skip) and nothing that was trained
    assert plan.trainable and all(n.startswith("levels.0.") for n in plan.trainable)
    assert "levels.0.down.proj.weight" in plan.trainable
    assert exp.model_spec.input.resolution == (16, 16) and len(exp.model_spec.levels) == 3
    exp, plan = finetune.prepare(_exp(path, trainable="levels.1.middle.*"))
    assert plan.trainable and all(n.startswith("levels.1.middle.") for n in plan.trainable)


def test_aggregate_preset_selects_mdit_aggregate_blocks():
    spec = S.load(ROOT / "examples/tiny/tiny-mdit.yaml")
    names = [n for n, _ in build(spec, device="meta").named_parameters()]
    agg = [
        (i, w, j)
        for i in range(len(spec.levels))
        for w in ("encoder", "middle", "decoder")
        for j, b in enumerate(spec.stack(i, w))
        if b.attention.kind == "aggregate"
    ]
    assert agg  # the tiny MDiT has aggregate blocks in its core
    hit = finetune.match("aggregate", names, spec, {})
    want = {n for n in names for i, w, j in agg if n.startswith(f"levels.{i}.{w}.{j}.")}
    assert hit == want and any(n.endswith("attn.qkv.weight") for n in hit)


def test_bad_patterns_and_policies_name_the_field(source):
    path, _, _ = source
    with pytest.raises(S.SpecError) as err:
        finetune.prepare(_exp(path, trainable=["head.*", "levels.0.dwn.proj.weight"]))
    assert err.value.issues[0][0] == "finetune.trainable.1"
    assert "levels.0.down.proj.weight" in err.value.issues[0][1]  # a close name
    with pytest.raises(S.SpecError) as err:  # 24 is not 8 times a power of two
        finetune.prepare(_exp(path, policy={"kind": "add_levels"}, resolution=[24, 24]))
    assert err.value.issues[0][0] == "finetune.resolution"
    with pytest.raises(S.SpecError) as err:
        finetune.prepare(_exp(path, policy={"kind": "core_patch", "factor": 3}))
    assert err.value.issues[0][0] == "finetune.policy.factor"
    with pytest.raises(S.SpecError) as err:
        finetune.prepare(_exp(path.with_name("missing.safetensors")))
    assert err.value.issues[0][0] == "finetune.checkpoint"
    with pytest.raises(S.SpecError, match=r"finetune.trainable.*regular expression"):
        _exp(path, trainable=["re:levels.(("])
    other = tiny_experiment_data("edm", 2, finetune={"checkpoint": str(path), "trainable": ["new"]})
    other["model"]["levels"][1]["d_model"] = 32
    with pytest.raises(S.SpecError) as err:
        finetune.prepare(experiment_from_data(other))
    assert err.value.issues[0][0] == "model"


def test_cli_bad_pattern_exits_2(tmp_path, source):
    path, _, _ = source
    data = tiny_experiment_data(
        "edm",
        2,
        finetune={
            "checkpoint": "source.safetensors",  # relative to the experiment file
            "policy": {"kind": "as_is"},
            "trainable": ["levels.*.atention.*"],
        },
    )
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ditkit.cli",
            "train",
            str(tmp_path / "exp.yaml"),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert "finetune.trainable.0" in proc.stderr and "levels.0.encoder.0.attn" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_extrapolate_reports_a_finetuned_checkpoint_as_an_extra_row(tmp_path, source):
    from ditkit.cli import main

    path, _, _ = source
    train(_exp(path, steps=2), tmp_path / "run", progress=False)
    tuned = tmp_path / "run/checkpoints/step-000002/ema.safetensors"
    out = tmp_path / "report"
    assert (
        main(
            [
                "extrapolate",
                str(path),
                "--resolutions",
                "16",
                "--policies",
                "core_patch:factor=4",
                "--finetuned",
                str(tuned),
                "--steps",
                "1",
                "--attention-backend",
                "tiled",
                "--grid-count",
                "2",
                "--no-measure",
                "--metrics",
                "none",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    labels = [r["policy"] for r in results["rows"]]
    assert labels == ["core_patch:factor=4", "core_patch:factor=4 + fine-tune new (2 steps)"]
    assert all(r["grid"] and (out / r["grid"]).is_file() for r in results["rows"])
    assert (
        main(
            [
                "extrapolate",
                str(path),
                "--resolutions",
                "16",
                "--finetuned",
                str(tmp_path / "nope.safetensors"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "extrapolate",
                str(path),
                "--resolutions",
                "16",
                "--attention-backend",
                "nope",
                "--no-measure",
                "--out",
                str(out),
            ]
        )
        == 2
    )


def test_training_resolutions_are_checked_against_the_adapted_model(source):
    """A fine-tune trains the adapted model: 12x12 runs through the 8x8 source's 2x2 merge but
    not through the 4x4 merge core_patch gives it at 16x16, so prepare() refuses it there."""
    path, _, _ = source
    exp = _exp(path, sections={"training": {"resolutions": [16, 12]}})  # the source takes both
    with pytest.raises(S.SpecError) as err:
        finetune.prepare(exp)
    assert err.value.issues[0][0] == "training.resolutions[1]"
    assert "[12, 12] does not fit the model" in err.value.issues[0][1]
    ok, _ = finetune.prepare(_exp(path, sections={"training": {"resolutions": [16, 32]}}))
    assert ok.training.resolutions == ((16, 16), (32, 32))
