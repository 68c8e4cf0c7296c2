"""Spec language: round trips, presets, schema, layering."""

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from ditkit import spec as S
from tests.conftest import ROOT, example_specs


@pytest.mark.parametrize("path", example_specs(), ids=lambda p: p.name)
def test_every_example_validates_and_round_trips(path):
    spec = S.load(path)
    for fmt in ("yaml", "json"):
        for full in (False, True):
            assert S.loads(S.dumps(spec, fmt, full)) == spec
    assert S.validate(json.loads(S.dumps(spec, "json"))) == spec


def test_examples_were_found():
    names = {p.name for p in example_specs()}
    expected = {f"dit-{s}-{p}.yaml" for s in ("s", "b", "l", "xl") for p in (2, 4, 8)}
    expected |= {"hdit-imagenet-128.yaml", "hdit-ffhq-1024.yaml", "hdit-imagenet-256.yaml"}
    assert expected <= names
    assert len(list((ROOT / "examples" / "tiny").glob("*.yaml"))) >= 4


def test_presets_equal_python_helpers():
    from ditkit.spec.presets import PRESETS
    from tools.write_presets import preset_path, render

    for name, fn in PRESETS.items():
        path = preset_path(name)
        assert S.load(path) == fn(), f"{path} differs from ditkit.spec.presets[{name!r}]"
        assert path.read_text() == render(name), "rerun `python tools/write_presets.py`"


def test_python_spec_example_equals_its_yaml():
    import runpy

    ns = runpy.run_path(str(ROOT / "examples" / "python_spec.py"))
    assert ns["my_hdit"]() == S.load(ROOT / "examples" / "tiny" / "tiny-hdit-neighborhood.yaml")


def test_schema_file_is_current_and_describes_kinds():
    from tools.write_presets import schema_text

    assert (ROOT / "ditkit.schema.json").read_text() == schema_text(), (
        "rerun `python tools/write_presets.py`"
    )
    schema = S.json_schema()
    text = json.dumps(schema)
    for kind in ("neighborhood", "shifted_window", "ada_ln_zero", "geglu", "lerp", "fourier"):
        assert f'"{kind}"' in text
    assert schema["additionalProperties"] is False


def test_spec_is_frozen_and_hashable_data():
    spec = S.hdit_imagenet_128()
    with pytest.raises(ValidationError, match="frozen"):
        spec.name = "x"
    assert spec == S.hdit_imagenet_128()
    assert spec != S.hdit_imagenet_256()


def test_spec_imports_without_torch():
    code = (
        "import sys; import ditkit.spec as S; S.load('examples/hdit/hdit-imagenet-128.yaml');"
        "S.json_schema(); assert 'torch' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_override_resolution_order():
    spec = S.load(ROOT / "examples" / "tiny" / "tiny-options.yaml")
    enc = spec.stack(0, "encoder")
    assert enc[0].attention == S.NeighborhoodAttention(kernel_size=(5, 3), dilation=(1, 2))
    assert enc[1].attention.kind == "none"
    assert spec.stack(0, "decoder")[0].attention == S.NeighborhoodAttention(kernel_size=5)
    dec1 = spec.stack(1, "decoder")
    assert len(dec1) == 2 and all(b.ffn.kind == "gelu_mlp" for b in dec1)
    assert spec.stack(1, "encoder")[0].ffn.kind == "swiglu"  # model default
    mid = spec.stack(2, "middle")
    assert mid[0].modulation.kind == "none" and mid[0].logits.kind == "cosine"
    assert spec.origin(0, "encoder", 1, "attention") == "levels[0].encoder[1].attention"
    assert spec.origin(0, "decoder", 0, "attention") == "levels[0].attention"
    assert spec.origin(0, "decoder", 0, "ffn") == "block.ffn"


def test_token_grids_and_multiples():
    spec = S.hdit_ffhq_1024()
    assert spec.resolution_multiple() == (64, 64)
    assert spec.token_grids() == [(256, 256), (128, 128), (64, 64), (32, 32), (16, 16)]
    assert spec.token_grids((512, 768))[-1] == (8, 12)


def test_migration_rejects_future_versions():
    data = S.to_data(S.dit("s", 8))
    data["spec_version"] = 99
    with pytest.raises(S.SpecError, match="newer than this ditkit"):
        S.validate(data)
