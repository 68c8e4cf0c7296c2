"""ONNX export: torch.export -> ONNX, checked against eager in onnxruntime.

Each export costs 10-60 s of CPU, so the default run exports two tiny specs once (module
fixtures shared with ``test_engines.py``); the other families run with ``-m slow``."""

import json

import onnx
import pytest

from ditkit import spec as S
from ditkit.builder import build
from ditkit.runtime.checkpoint import model_hash
from ditkit.deploy.export import ExportError, allow_list, check_shape, export_onnx, resolution_rule
from tests.conftest import EXAMPLES
from tests.runtime.conftest import perturbed

TINY = EXAMPLES / "tiny"


def _check_result(result, expect_outputs):
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    x = proto.graph.input[0]
    assert x.name == "x"
    dims = x.type.tensor_type.shape.dim
    assert all(dims[a].dim_param and not dims[a].HasField("dim_value") for a in (0, 2, 3))
    # named for people writing onnxruntime / TensorRT profiles (not the exporter's s21, 4*s9)
    assert [dims[a].dim_param for a in (0, 2, 3)] == ["batch", "height", "width"]
    for info in [*proto.graph.input[1:], *proto.graph.output]:
        assert info.type.tensor_type.shape.dim[0].dim_param == "batch", info.name
    for out in proto.graph.output:
        assert [d.dim_param for d in out.type.tensor_type.shape.dim][2:] == ["height", "width"]
    spec = S.validate(json.loads({m.key: m.value for m in proto.metadata_props}["ditkit.spec"]))
    assert dims[1].dim_value == spec.input.channels  # channels stay static
    assert [o.name for o in proto.graph.output] == expect_outputs
    # two resolutions (one non-square) x two batch sizes, all within 1e-4 of eager
    shapes = {(p["batch"], p["resolution"]) for p in result.parity}
    assert len(shapes) == 4 and any(r[0] != r[1] for _, r in shapes)
    assert len({b for b, _ in shapes}) == 2
    assert all(p["max_abs_diff"] <= 1e-4 * max(1, p["scale"]) for p in result.parity)
    return proto


def test_hdit_neighborhood_export_parity_and_metadata(hdit_export):
    model, result, h = hdit_export
    proto = _check_result(result, ["denoised"])
    meta = {p.key: p.value for p in proto.metadata_props}
    assert S.validate(json.loads(meta["ditkit.spec"])) == model.spec
    assert json.loads(meta["ditkit.objective"])["kind"] == "edm"
    assert meta["ditkit.checkpoint_hash"] == h
    rule = json.loads(meta["ditkit.resolution_rule"])
    # patch 2 x merge 2 = 4; kernel 3 needs >= 3 tokens at level 0 and 2x2 grids inside: 8
    assert rule["height"] == {"min": 8, "step": 4, "max": 8192}
    # the spec's auxiliary conditioning is a real graph input with a dynamic batch
    assert [i.name for i in proto.graph.input] == ["x", "sigma", "class_labels", "aug_cond"]
    aux = proto.graph.input[3].type.tensor_type.shape.dim
    assert aux[0].dim_param and aux[1].dim_value == 9
    assert json.loads(meta["ditkit.aux"]) == [{"name": "aug_cond", "dims": 9}]
    assert json.loads(meta["ditkit.io"])["inputs"] == ["x", "sigma", "class_labels", "aug_cond"]
    assert "ditkit.cfg" not in meta


def test_dit_export_with_learned_sigma_outputs(dit_export):
    model, result = dit_export
    _check_result(result, ["denoised", "var_values"])
    assert result.rule[0].step == 2 and result.rule[0].minimum == 8


def test_forbidden_shape_is_a_clear_error_before_export(tmp_path):
    model = build(S.load(TINY / "tiny-hdit-neighborhood.yaml"))
    out = tmp_path / "never.onnx"
    with pytest.raises(ExportError, match="not divisible by patch x merges = 4x4"):
        export_onnx(model, S.EDMObjective(), out, resolution=(16, 18))
    with pytest.raises(ExportError, match="kernel 3"):
        export_onnx(model, S.EDMObjective(), out, resolution=(4, 16))
    assert not out.exists()
    rules = resolution_rule(model.spec)
    with pytest.raises(ExportError, match="kernel 3 x dilation 1 does not fit"):
        check_shape(model.spec, (1, 3, 16, 4), rules)
    with pytest.raises(ExportError, match=r"width 8196 is outside .*multiple of 4"):
        check_shape(model.spec, (1, 3, 16, 8196), rules)
    check_shape(model.spec, (1, 3, 12, 20), rules)


def test_bad_options_fail_before_any_work(tmp_path):
    model = build(S.load(TINY / "tiny-dit.yaml"))
    with pytest.raises(ExportError, match="--precision"):
        export_onnx(model, S.DDPMObjective(), tmp_path / "a.onnx", precision="int8")
    with pytest.raises(ExportError, match="--target"):
        export_onnx(model, S.DDPMObjective(), tmp_path / "a.onnx", target="coreml")
    with pytest.raises(ExportError, match="--dynamic"):
        export_onnx(model, S.DDPMObjective(), tmp_path / "a.onnx", dynamic=("channels",))


def test_target_allow_lists():
    ort_ops = allow_list("onnxruntime", 18)
    assert "ai.onnx::MatMul" in ort_ops and "ai.onnx::NoSuchOp" not in ort_ops
    assert "ai.onnx::Attention" not in allow_list("tensorrt-10.13", 23)
    assert "ai.onnx::Attention" in allow_list("tensorrt-10.14", 23)
    assert "ai.onnx::RMSNormalization" not in allow_list("tensorrt-10.14", 23)
    assert "ai.onnx::RMSNormalization" in allow_list("tensorrt-10.15", 23)
    assert allow_list("tensorrt-10.x", 18) == allow_list("tensorrt-10.0", 18)


def test_exported_ops_are_in_the_tensorrt_allow_list(hdit_export, dit_export):
    trt = allow_list("tensorrt-10.x", 18)
    for result in (hdit_export[1], dit_export[1]):
        # onnxruntime-target fp32 files write attention and exact GELU as onnxruntime's
        # contrib ops (runtime/ort_fusion.py); a --target tensorrt export does not
        # (test_ort_fusion.py)
        ops = set(result.ops) - {"com.microsoft::MultiHeadAttention", "com.microsoft::Gelu"}
        assert ops <= trt, ops - trt


def test_existing_file_is_kept_when_export_fails(tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous engine")
    model = build(S.load(TINY / "tiny-dit.yaml"))
    with pytest.raises(ExportError):
        export_onnx(model, S.DDPMObjective(), out, resolution=(9, 9))
    assert out.read_bytes() == b"previous engine"


@pytest.mark.slow
def test_opset_23_attention_is_refused_for_old_tensorrt(tmp_path):
    model = build(S.load(TINY / "tiny-hdit-global.yaml"))
    with pytest.raises(ExportError, match="Attention.*--opset 22"):
        export_onnx(
            model,
            S.EDMObjective(),
            tmp_path / "a.onnx",
            opset=23,
            target="tensorrt-10.8",
            check=False,
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,objective",
    [
        ("tiny-hdit-global", S.EDMObjective()),
        ("tiny-hdit-shifted-window", S.EDMObjective()),
        ("tiny-mdit", S.X0Objective()),
        ("tiny-mpdit", S.FlowObjective()),
        ("tiny-mdit", S.VObjective()),
    ],
)
def test_other_families_export_with_parity(tmp_path, name, objective):
    result = export_onnx(perturbed(name), objective, tmp_path / f"{name}.onnx")
    _check_result(result, ["denoised"])


@pytest.mark.slow
def test_learned_positions_refuse_dynamic_resolution_but_export_fixed(tmp_path):
    """tiny-options has a learned absolute position table (resized by a Python branch on the
    grid): a dynamic-resolution export must fail loudly, a fixed-resolution one works."""
    model = perturbed("tiny-options")
    with pytest.raises(ExportError, match="speciali[sz]e"):
        export_onnx(model, S.EDMObjective(), tmp_path / "a.onnx")
    result = export_onnx(model, S.EDMObjective(), tmp_path / "b.onnx", dynamic=("batch",))
    assert {p["batch"] for p in result.parity} == {1, 3}
    assert all(p["max_abs_diff"] <= 1e-4 * max(1, p["scale"]) for p in result.parity)


@pytest.mark.slow
def test_fp16_export_within_stated_tolerance(tmp_path):
    result = export_onnx(
        perturbed("tiny-hdit-neighborhood"),
        S.EDMObjective(),
        tmp_path / "fp16.onnx",
        precision="fp16",
    )
    assert all(p["max_abs_diff"] <= 2e-2 * max(1, p["scale"]) for p in result.parity)


# -------------------------------------------------------------------------------- ditkit export


@pytest.mark.slow
def test_cli_export_checkpoint_then_sample_the_onnx(tmp_path, capsys):
    from PIL import Image

    from ditkit.cli import main
    from ditkit.runtime.checkpoint import save_checkpoint

    model = perturbed("tiny-hdit-global")
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, model.state_dict(), model.spec, objective=S.EDMObjective())
    out = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "--out", str(out), "--no-check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # --json: one object, no log lines
    assert report["out"] == str(out) and report["dynamic"] == ["batch", "resolution"]
    assert report["resolution_rule"]["height"] == {"min": 8, "step": 4, "max": 8192}
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["ditkit.checkpoint_hash"] == model_hash(ckpt)
    grid = tmp_path / "g.png"
    assert (
        main(
            [
                "sample",
                str(out),
                "--steps",
                "2",
                "--classes",
                "1,2",
                "--cfg-scale",
                "2",
                "--resolution",
                "8x12",
                "--out",
                str(grid),
                "--no-progress",
            ]
        )
        == 0
    )
    assert Image.open(grid).size[0] > 12


@pytest.mark.parametrize(
    "args,message",
    [
        (["--resolution", "9"], "not divisible"),
        (["--dynamic", "time"], "--dynamic"),
        (["--target", "tensorrt-9"], "--target"),
    ],
)
def test_cli_export_bad_input_exits_2(tmp_path, capsys, args, message):
    from ditkit.cli import main

    out = tmp_path / "x.onnx"
    rc = main(["export", str(TINY / "tiny-dit.yaml"), "--out", str(out), *args])
    assert rc == 2 and message in capsys.readouterr().err
    assert not out.exists()
