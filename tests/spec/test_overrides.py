"""``--set PATH=VALUE`` overrides (ditkit.spec.overrides): parsed as YAML, applied to the plain
data, validated by the same schema with the same field-named errors."""

import pytest

from ditkit import spec as S
from ditkit.spec.experiment import load_experiment
from ditkit.spec.overrides import apply_overrides, parse_override
from tests.conftest import EXAMPLES

DEMO = EXAMPLES / "experiments" / "demo-digits.yaml"


@pytest.mark.parametrize(
    "text, keys, value",
    [
        ("training.batch_size=8", ["training", "batch_size"], 8),
        ("optimizer.lr=3e-4", ["optimizer", "lr"], 3e-4),  # YAML would read a string
        ("optimizer.lr=0.001", ["optimizer", "lr"], 0.001),
        ("levels.1.d_model=512", ["levels", 1, "d_model"], 512),
        ("levels[0].attention={kind: global}", ["levels", 0, "attention"], {"kind": "global"}),
        ("input.resolution=[32, 32]", ["input", "resolution"], [32, 32]),
        ("evaluation.enabled=false", ["evaluation", "enabled"], False),
        ("name=my-run", ["name"], "my-run"),
        ("finetune=", ["finetune"], None),
    ],
)
def test_parse_override(text, keys, value):
    assert parse_override(text) == (keys, value)


@pytest.mark.parametrize("text", ["training.batch_size", "=3", "a..b=1", ""])
def test_malformed_overrides_are_spec_errors(text):
    with pytest.raises(S.SpecError, match="PATH=VALUE"):
        parse_override(text)


def test_apply_does_not_touch_the_input():
    data = {"a": {"b": 1}, "l": [{"x": 1}, {"x": 2}]}
    out = apply_overrides(data, ["a.b=2", "l.1.x=5", "a.c.d=7"])
    assert out == {"a": {"b": 2, "c": {"d": 7}}, "l": [{"x": 1}, {"x": 5}]}
    assert data == {"a": {"b": 1}, "l": [{"x": 1}, {"x": 2}]}
    with pytest.raises(S.SpecError) as info:
        apply_overrides(data, ["l.2.x=1"])
    assert info.value.issues[0][0] == "l.2" and "2 item(s)" in info.value.issues[0][1]
    with pytest.raises(S.SpecError, match="not a mapping"):
        apply_overrides(data, ["a.b.c=1"])


def test_experiment_overrides_are_validated_with_field_names():
    exp = load_experiment(
        DEMO, ["training.batch_size=8", "optimizer.lr=3e-4", "evaluation.count=20"]
    )
    assert exp.training.batch_size == 8 and exp.optimizer.lr == pytest.approx(3e-4)
    assert exp.evaluation.count == 20
    base = load_experiment(DEMO)
    assert base.training.batch_size == 64  # the file is unchanged
    with pytest.raises(S.SpecError) as info:
        load_experiment(DEMO, ["training.batch_sise=8"])
    assert any(path == "training.batch_sise" for path, _ in info.value.issues)
    assert "--set" in str(info.value)
    with pytest.raises(S.SpecError) as info:
        load_experiment(DEMO, ["training.batch_size=-1"])
    assert any(path == "training.batch_size" for path, _ in info.value.issues)
    # cross-field checks run too: 3 does not divide 64 ... after accumulate
    with pytest.raises(S.SpecError) as info:
        load_experiment(DEMO, ["training.accumulate=3"])
    assert any(path == "training.accumulate" for path, _ in info.value.issues)


def test_an_override_reaches_into_a_referenced_model_file():
    exp = load_experiment(DEMO, ["model.levels.0.d_model=32"])
    assert exp.model_spec.levels[0].d_model == 32
    assert load_experiment(DEMO).model_spec.levels[0].d_model != 32
    with pytest.raises(S.SpecError) as info:
        load_experiment(DEMO, ["model.levels.0.d_model=30"])  # heads no longer divide it
    assert any(path.startswith("model.") for path, _ in info.value.issues)
