"""A battery of invalid specs: each must fail with a message naming the field and the fix."""

import pytest
import yaml

from ditkit import spec as S
from tests.conftest import EXAMPLES

BASE = (EXAMPLES / "tiny" / "tiny-hdit-neighborhood.yaml").read_text()


def mutate(fn) -> str:
    data = yaml.safe_load(BASE)
    fn(data)
    return yaml.safe_dump(data)


def setitem(path, value):
    def fn(data):
        cur = data
        for key in path[:-1]:
            cur = cur[key]
        cur[path[-1]] = value

    return fn


CASES = [
    # (mutation, expected field path, words the message must contain)
    (setitem(["levels", 0, "d_model"], 30), "block.d_head", ["does not divide d_model 30"]),
    (
        setitem(["levels", 0, "attention", "kernel_size"], 4),
        "levels[0].attention.kernel_size",
        ["even", "use 3 or 5"],
    ),
    (
        setitem(["levels", 0, "attention", "kernel_size"], 9),
        "levels[0].attention.kernel_size",
        ["does not fit the 8x8 token grid", "kernel <= 7"],
    ),
    (
        setitem(["input", "resolution"], [18, 16]),
        "input.resolution",
        ["not divisible by patch x merges = 4x4", "height 16 or 20"],
    ),
    (
        setitem(["levels", 0, "attention", "kernal_size"], 3),
        "levels[0].attention.kernal_size",
        ["unknown key", "did you mean `kernel_size`"],
    ),
    (setitem(["nmae"], "x"), "nmae", ["did you mean `name`"]),
    (setitem(["block", "ffn", "kind"], "relu"), "block.ffn.kind", ["unknown kind 'relu'", "geglu"]),
    (setitem(["block", "rope", "fraction"], 0.3), "block.rope.fraction", ["multiple of 4"]),
    (setitem(["levels", 1, "encoder"], 2), "levels[1].encoder", ["innermost level has no"]),
    (setitem(["levels", 0, "middle"], 2), "levels[0].middle", ["only the innermost"]),
    (lambda d: d["levels"][0].pop("down"), "levels[0].down", ["down: {kind: merge"]),
    (lambda d: d["levels"][0].pop("skip"), "levels[0].skip", ["skip: {kind: lerp}"]),
    (lambda d: d["levels"][1].pop("middle"), "levels[1].middle", ["needs `middle`"]),
    (
        setitem(["levels", 0, "attention"], {"kernel_size": 3}),
        "levels[0].attention",
        ["missing `kind`"],
    ),
    (setitem(["levels", 0, "dropout"], 1.5), "levels[0].dropout", ["less than 1"]),
    (setitem(["spec_version"], 7), "spec_version", ["newer than this ditkit"]),
    (setitem(["levels"], []), "levels", ["at least 1"]),
    (setitem(["block", "norm", "kind"], "batch"), "block.norm.kind", ["'layer' or 'rms'"]),
    (
        setitem(["levels", 0, "attention"], {"kind": "shifted_window", "window_size": 3}),
        "levels[0].attention.window_size",
        ["does not tile the 8x8"],
    ),
    (
        setitem(["conditioning", "aux"], [{"name": "Bad-Name", "dims": 2}]),
        "conditioning.aux[0].name",
        ["pattern"],
    ),
]


@pytest.mark.parametrize("mutation,path,words", CASES, ids=[c[1] for c in CASES])
def test_invalid_spec_names_field_and_fix(mutation, path, words):
    with pytest.raises(S.SpecError) as info:
        S.loads(mutate(mutation))
    paths = [p for p, _ in info.value.issues]
    assert path in paths, f"{path} not among {paths}"
    message = dict(info.value.issues)[path]
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert path in str(info.value)


def test_not_yaml_and_not_mapping():
    with pytest.raises(S.SpecError, match="not valid YAML"):
        S.loads("levels: [unclosed")
    with pytest.raises(S.SpecError, match="expected a mapping"):
        S.loads("- a list")


def test_missing_file(tmp_path):
    with pytest.raises(S.SpecError, match="no such file"):
        S.load(tmp_path / "nope.yaml")


def test_base_is_valid():
    S.loads(BASE)
