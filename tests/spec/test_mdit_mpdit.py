"""MDiT / MPDiT component kinds in the spec language: presets, round trips, validation."""

from __future__ import annotations

import pytest

from ditkit import spec as S
from ditkit.spec.families import mdit, mpdit
from ditkit.spec.presets import PRESETS
from tests.conftest import EXAMPLES

NEW_PRESETS = ["mdit-b", "mdit-l", "mdit-xl", "mpdit-b", "mpdit-xl", "mpdit-xl-3level"]
TINY = ["tiny-mdit", "tiny-mdit-isotropic", "tiny-mpdit", "tiny-mpdit-3level"]


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_preset_yaml_equals_the_python_helper_and_round_trips(name):
    family = name.split("-")[0]
    from_file = S.load(EXAMPLES / family / f"{name}.yaml")
    assert from_file == PRESETS[name]()
    assert S.loads(S.dumps(from_file)) == from_file
    assert S.loads(S.dumps(from_file, format="json")) == from_file


@pytest.mark.parametrize("name", TINY)
def test_tiny_specs_round_trip(name):
    spec = S.load(EXAMPLES / "tiny" / f"{name}.yaml")
    assert S.loads(S.dumps(spec)) == spec


def test_mdit_core_alternates_standard_and_aggregate_then_l_standard():
    spec = mdit(2, 4, 4, 5)
    core = spec.stack(1, "middle")
    kinds = [b.attention.kind for b in core]
    assert kinds == ["global", "aggregate", "global", "aggregate"] + ["global"] * 5
    # cross-attention (and no modulation) exactly in the standard core blocks
    assert [b.cross_attention.kind for b in core] == [
        "memory" if k == "global" else "none" for k in kinds
    ]
    assert [b.modulation.kind for b in core] == [
        "none" if k == "global" else "ada_scale" for k in kinds
    ]
    assert core[1].attention.n_heads == 18
    assert len(spec.stack(0, "encoder")) == 2 and len(spec.stack(0, "decoder")) == 4
    assert spec.token_grids() == [(32, 32), (16, 16)]


def test_mpdit_levels_are_coarse_first():
    spec = mpdit(768, 12, (18, 6, 4), (8, 4, 2), resolution=64)
    assert spec.token_grids() == [(32, 32), (16, 16), (8, 8)]
    assert spec.factors() == [2, 2]
    assert [len(spec.stack(i, "decoder")) for i in range(2)] == [4, 6]
    assert len(spec.stack(2, "middle")) == 18


def _problems(data: dict) -> str:
    with pytest.raises(S.SpecError) as err:
        S.validate(data)
    return str(err.value)


def _data(spec: S.ModelSpec) -> dict:
    return S.to_data(spec)


def test_aggregate_on_an_odd_grid_is_rejected_with_the_field_and_the_fix():
    data = _data(
        mdit(
            1,
            1,
            2,
            1,
            outer=32,
            core=64,
            d_head=16,
            aggregate_heads=6,
            kernel_size=3,
            resolution=16,
            classes=10,
        )
    )
    data["input"]["resolution"] = [18, 18]  # core grid 9x9
    msg = _problems(data)
    assert "levels[1].middle[1].attention.factor" in msg
    assert "does not divide the 9x9 token grid" in msg


def test_aggregate_needs_dot_logits():
    data = _data(
        mdit(
            1,
            1,
            2,
            1,
            outer=32,
            core=64,
            d_head=16,
            aggregate_heads=6,
            kernel_size=3,
            resolution=16,
            classes=10,
        )
    )
    data["levels"][1]["middle"][1]["logits"] = {"kind": "cosine"}
    assert "levels[1].middle[1].logits" in _problems(data)


def test_prefix_tokens_reject_local_attention_and_rope():
    data = _data(mpdit(64, 4, (2, 2), (4, 2), resolution=8, classes=10, class_tokens=4))
    data["levels"][0]["attention"] = {"kind": "neighborhood", "kernel_size": 3}
    data["levels"][1]["rope"] = {"kind": "axial", "fraction": 0.25}
    msg = _problems(data)
    assert "levels[0].attention: neighborhood attention cannot see class prefix tokens" in msg
    assert "levels[1].rope" in msg


def test_repatch_patch_must_be_a_multiple_of_the_level_patch():
    data = _data(mpdit(64, 4, (2, 2), (4, 2), resolution=8, classes=10, class_tokens=4))
    data["levels"][0]["down"]["patch_size"] = 3
    assert "levels[0].down.patch_size: patch_size 3 must be a multiple" in _problems(data)


def test_shared_head_needs_shared_blocks_and_memory_classes_need_cross_attention():
    data = _data(mpdit(64, 4, (2, 2), (4, 2), resolution=8, classes=10, class_tokens=4))
    data["block"]["modulation"] = {"kind": "ada_ln_zero"}
    assert "head.shared" in _problems(data)
    data = _data(
        mdit(
            1,
            1,
            2,
            1,
            outer=32,
            core=64,
            d_head=16,
            aggregate_heads=6,
            kernel_size=3,
            resolution=16,
            classes=10,
        )
    )
    data["levels"][1]["middle"] = 2
    assert "conditioning.classes.inject: `memory` class tokens need blocks" in _problems(data)


def test_upsample_needs_equal_widths():
    data = _data(mpdit(64, 4, (2, 2), (4, 2), resolution=8, classes=None))
    data["levels"][1]["d_model"] = 128
    assert "levels[0].up: upsample keeps the width" in _problems(data)


def test_fno_modes_must_fit_the_grid():
    data = _data(mpdit(64, 4, (2, 2), (4, 2), resolution=8, classes=None))
    data["conditioning"]["noise"] = {"kind": "fno", "points": 8, "modes": 16}
    assert "conditioning.noise.modes" in _problems(data)


def test_the_schema_knows_the_new_kinds():
    text = str(S.json_schema())
    for kind in ("aggregate", "memory", "repatch", "upsample", "shared_ada_ln_zero", "fno"):
        assert f"'{kind}'" in text
