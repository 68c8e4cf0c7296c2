"""Experiment specs: examples load, round trip, cross-field checks, CLI errors (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ditkit import spec as S
from ditkit.cli import main
from ditkit.spec.experiment import Experiment, experiment_from_data, load_experiment

from .conftest import tiny_experiment_data

EXPERIMENTS = sorted((Path(__file__).resolve().parents[2] / "examples/experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_example_experiments_resolve_and_round_trip(path):
    exp = load_experiment(path)
    assert isinstance(exp.model, S.ModelSpec)
    assert S.loads(S.dumps(exp), Experiment) == exp
    assert S.loads(S.dumps(exp, "json"), Experiment) == exp


def test_demo_experiment_uses_the_tiny_digits_spec():
    exp = load_experiment(next(p for p in EXPERIMENTS if p.name == "demo-digits.yaml"))
    assert exp.model_spec == S.load(
        Path(__file__).resolve().parents[2] / "examples/tiny/tiny-hdit-digits.yaml"
    )


def test_the_packaged_demo_experiment_is_the_examples_one():
    """``ditkit demo`` runs the copy shipped in the package (an installed wheel has no
    examples/); it must stay the experiment examples/ documents."""
    from ditkit.training.demo import DEMO_EXPERIMENT

    root = Path(__file__).resolve().parents[2]
    assert DEMO_EXPERIMENT.is_relative_to(root / "ditkit")
    packaged = load_experiment(DEMO_EXPERIMENT)
    example = load_experiment(root / "examples/experiments/demo-digits.yaml")
    assert packaged == example
    assert packaged.model_spec == S.load(root / "examples/tiny/tiny-hdit-digits.yaml")


@pytest.mark.parametrize(
    "change, path, fragment",
    [
        ({"optimizer": {"lr": -1}}, "optimizer.lr", "greater than 0"),
        ({"trainig": {"steps": 3}}, "trainig", "did you mean `training`"),
        ({"objective": {"kind": "edm", "weighting": "loud"}}, "objective.weighting", "karras"),
        ({"objective": {"kind": "ddpm_eps"}}, "model.conditioning.noise.kind", "sinusoidal"),
        ({"training": {"batch_size": 10, "accumulate": 4}}, "training.accumulate", "divide"),
        ({"data": {"kind": "shapes"}}, "data.kind", "3 channel"),
    ],
)
def test_bad_experiments_name_the_field(change, path, fragment):
    data = tiny_experiment_data("edm")
    data.update(change)
    with pytest.raises(S.SpecError) as err:
        experiment_from_data(data)
    assert any(p.startswith(path) and fragment in m for p, m in err.value.issues), err.value.issues


def test_inline_model_problems_are_reported_under_model():
    data = tiny_experiment_data("edm")
    data["model"]["levels"][0]["attention"]["kernel_size"] = 4
    with pytest.raises(S.SpecError) as err:
        experiment_from_data(data)
    assert any(
        p == "model.levels[0].attention.kernel_size" and "odd" in m for p, m in err.value.issues
    )


def test_model_reference_is_relative_to_the_experiment_file(tmp_path):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(tiny_experiment_data()["model"]))
    data = tiny_experiment_data()
    data["model"] = "m.yaml"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/exp.yaml").write_text(yaml.safe_dump({**data, "model": "../m.yaml"}))
    exp = load_experiment(tmp_path / "sub/exp.yaml")
    assert exp.model_spec.name == "test-tiny"
    (tmp_path / "sub/bad.yaml").write_text(yaml.safe_dump({**data, "model": "nope.yaml"}))
    with pytest.raises(S.SpecError, match="model: no such model spec file"):
        load_experiment(tmp_path / "sub/bad.yaml")


def test_cli_train_invalid_experiment_exits_2_with_field(tmp_path, capsys):
    data = tiny_experiment_data()
    data["optimizer"]["betas"] = [0.9, 1.5]
    data["ema"]["decay"] = 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "optimizer.betas[1]" in err and "ema.decay" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cli_train_bad_data_folder_exits_2(tmp_path, capsys):
    data = tiny_experiment_data()
    data["model"]["conditioning"]["classes"] = None
    data["data"] = {"kind": "image_folder", "path": "missing"}
    data["training"]["label_dropout"] = 0.0
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data.path: no such folder" in err and "missing" in err


def test_experiment_schema_file_is_current_and_knows_the_new_sections():
    import json
    import sys

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    try:
        from tools.write_presets import experiment_schema_text
    finally:
        sys.path.remove(str(root))
    assert (root / "ditkit.experiment.schema.json").read_text() == experiment_schema_text(), (
        "rerun `python tools/write_presets.py`"
    )
    schema = json.loads(experiment_schema_text())
    assert schema["additionalProperties"] is False
    assert {"finetune", "distributed", "data"} <= set(schema["properties"])
    text = json.dumps(schema)
    for word in ('"webdataset"', '"latents"', '"fsdp2"', '"trainable"', '"reshard_after_forward"'):
        assert word in text


@pytest.mark.parametrize(
    "sections",
    [
        {
            "distributed": {
                "strategy": "fsdp2",
                "param_dtype": "bf16",
                "reshard_after_forward": False,
            }
        },
        {"data": {"kind": "webdataset", "shards": ["a.tar", "b.tar"], "flip": False}},
        {
            "finetune": {
                "checkpoint": "ckpt/ema.safetensors",
                "policy": {"kind": "core_patch", "factor": 4},
                "resolution": [32, 32],
                "trainable": ["new", "re:levels\\.0\\."],
            }
        },
    ],
    ids=["fsdp2", "webdataset", "finetune"],
)
def test_new_sections_round_trip(sections):
    exp = experiment_from_data(tiny_experiment_data(**sections))
    for key, value in sections.items():
        got = S.to_data(getattr(exp, key))
        assert {k: got[k] for k in value} == {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in value.items()
        }
    assert S.loads(S.dumps(exp), Experiment) == exp
    assert S.loads(S.dumps(exp, "json"), Experiment) == exp


def test_cli_schema_experiment(tmp_path, capsys):
    out = tmp_path / "exp.schema.json"
    assert main(["schema", "--experiment", "--out", str(out)]) == 0
    import json

    assert '"finetune"' in out.read_text()
    assert '"finetune"' not in json.dumps(S.json_schema())  # the model-spec schema stays apart


def test_showcase_finetunes_start_from_the_base_runs_final_checkpoint():
    """examples/experiments/shapes-showcase.sh trains shapes-extrapolate.yaml into runs/shapes,
    then the three fine-tunes: each must name that run's last checkpoint, its model, 2x its
    resolution and the same budget."""
    base = load_experiment(next(p for p in EXPERIMENTS if p.name == "shapes-extrapolate.yaml"))
    fts = [p for p in EXPERIMENTS if p.name.startswith("shapes-finetune-")]
    assert len(fts) == 3
    script = (EXPERIMENTS[0].parent / "shapes-showcase.sh").read_text()
    budgets = set()
    for path in fts:
        ft = load_experiment(path)
        assert (
            Path(ft.finetune.checkpoint)
            .as_posix()
            .endswith(f"runs/shapes/checkpoints/step-{base.training.steps:06d}/ema.safetensors")
        )
        assert ft.model_spec == base.model_spec
        assert list(ft.finetune.resolution) == [2 * r for r in base.model_spec.input.resolution]
        budgets.add((ft.training.steps, ft.training.batch_size))
        assert path.name in script or path.stem.removeprefix("shapes-finetune-") in script
    assert len(budgets) == 1
