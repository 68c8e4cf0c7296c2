"""``ditkit.spec.diff``: field-by-field differences, level alignment, text table; torch-free."""

import subprocess
import sys

from ditkit import spec as S
from ditkit.spec.diff import MISSING, align_levels, diff, format_diff
from tests.conftest import EXAMPLES, ROOT

TWO_LEVELS = """
name: two
input: {channels: 3, resolution: [32, 32]}
patch: {size: 2}
block: {d_head: 16}
levels:
  - {d_model: 32, encoder: 1, decoder: 1, attention: {kind: neighborhood, kernel_size: 3},
     down: {kind: merge, factor: 2}, skip: {kind: lerp}}
  - d_model: 64
    middle: [{repeat: 2}, {attention: {kind: none}}]
"""


def spec(text: str = TWO_LEVELS, **replace: str) -> S.ModelSpec:
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return S.loads(text)


def test_equal_specs_have_no_rows():
    assert diff(spec(), spec()) == []
    assert "no field differs" in format_diff([])


def test_same_kind_change_is_one_leaf_row():
    a, b = spec(), spec(**{"kernel_size: 3": "kernel_size: 5"})
    rows = diff(a, b)
    assert [(r.path, r.a, r.b) for r in rows] == [("levels[0].attention.kernel_size", 3, 5)]
    assert (rows[0].level_a, rows[0].level_b) == (0, 0)


def test_kind_change_is_one_row_with_both_variants():
    b = spec(**{"{kind: neighborhood, kernel_size: 3}": "{kind: global}"})
    rows = diff(spec(), b)
    assert len(rows) == 1
    assert rows[0].path == "levels[0].attention"
    assert rows[0].a == {"kind": "neighborhood", "kernel_size": 3, "dilation": 1}
    assert rows[0].b == {"kind": "global"}


def test_override_lists_compare_element_by_element():
    b = spec(**{"middle: [{repeat: 2}, {attention: {kind: none}}]": "middle: [{repeat: 2}]"})
    rows = diff(spec(), b)
    assert [r.path for r in rows] == ["levels[1].middle[1]"]
    assert rows[0].a["attention"] == {"kind": "none"} and rows[0].b is MISSING


def test_an_added_outer_level_is_one_row_and_the_rest_align():
    outer = (
        "  - {d_model: 32, encoder: 1, decoder: 1, attention: {kind: neighborhood, "
        "kernel_size: 3},\n     down: {kind: merge, factor: 2}, skip: {kind: lerp}}\n"
    )
    text = TWO_LEVELS.replace("levels:\n", "levels:\n" + outer).replace("[32, 32]", "[64, 64]")
    a, b = spec(), S.loads(text)
    assert align_levels(a, b) == [(None, 0), (0, 1), (1, 2)]
    assert align_levels(b, a) == [(0, None), (1, 0), (2, 1)]
    rows = diff(a, b)
    assert [r.path for r in rows] == ["input.resolution", "levels[→0]"]
    assert rows[0].a == [32, 32] and rows[0].b == [64, 64]
    added = rows[1]
    assert added.a is MISSING and added.level_b == 0 and added.b["d_model"] == 32
    assert None not in added.b.values()  # the level as written, inherited fields left out
    back = diff(b, a)
    assert [r.path for r in back] == ["input.resolution", "levels[0→]"]


def test_shifted_levels_name_both_indices():
    outer = (
        "  - {d_model: 32, encoder: 1, decoder: 1, attention: {kind: neighborhood, "
        "kernel_size: 3},\n     down: {kind: merge, factor: 2}, skip: {kind: lerp}}\n"
    )
    a = S.loads(
        TWO_LEVELS.replace("levels:\n", "levels:\n" + outer).replace("[32, 32]", "[64, 64]")
    )
    b = S.loads(TWO_LEVELS.replace("d_model: 64", "d_model: 128"))
    paths = [r.path for r in diff(a, b)]
    assert "levels[2→1].d_model" in paths


def test_text_table_lists_every_row():
    a = S.load(EXAMPLES / "tiny/tiny-hdit-global.yaml")
    b = S.load(EXAMPLES / "tiny/tiny-hdit-neighborhood.yaml")
    text = format_diff(diff(a, b), "global", "neighborhood")
    assert "levels[0].attention" in text and "kind: neighborhood" in text
    assert text.splitlines()[0].split() == ["field", "global", "neighborhood"]
    assert text.endswith("2 field(s) differ")


def test_diff_does_not_import_torch():
    code = (
        "import sys; from ditkit.spec.diff import diff; from ditkit.spec.presets import "
        "preset; diff(preset('mdit-b'), preset('mpdit-xl')); print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
