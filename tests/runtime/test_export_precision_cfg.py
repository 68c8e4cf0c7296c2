"""Reduced-precision (fp16 / bf16) ONNX graphs and graphs with classifier-free guidance baked in.

bf16: onnxruntime's CPU provider has no bf16 ``Gemm`` / ``MatMul`` kernels, so the export's
parity check runs bf16 files in ONNX's reference evaluator (``onnx.reference``); the tests
check that, the full ``onnx.checker`` and the graph's structure (which ops stay fp32)."""

import json

import onnx
import pytest
import torch
from onnx import TensorProto, helper, shape_inference

from ditkit import spec as S
from ditkit.builder import build, use_backend
from ditkit.runtime.denoiser import Denoiser
from ditkit.deploy.engines import OrtDenoiser
from ditkit.deploy.export import TOLERANCE, ExportError, ExportGraph, export_onnx, unsupported_types
from ditkit.runtime.samplers import Guided, sample
from tests.conftest import EXAMPLES
from tests.runtime.conftest import perturbed

TINY = EXAMPLES / "tiny"
FULL = (TensorProto.FLOAT, TensorProto.DOUBLE)
# ops that must never see fp16 / bf16 inputs: trig of the noise / position / RoPE features,
# and the statistics of the norms (mean of squares, rsqrt, LayerNorm)
KEEP_FP32 = {"Cos", "Sin", "ReduceMean", "LayerNormalization", "Sqrt", "Reciprocal", "Log"}


def _input_types(proto) -> list[tuple[str, int]]:
    """``(op_type, element type of its first input)`` for every node."""
    g = shape_inference.infer_shapes(proto).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    return [(n.op_type, types.get(n.input[0], 0)) for n in g.node if n.input]


def _check_reduced_graph(result, reduced: int) -> onnx.ModelProto:
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["ditkit.opset"] == str(result.opset)
    nodes = _input_types(proto)
    bad = [
        (op, TensorProto.DataType.Name(t)) for op, t in nodes if op in KEEP_FP32 and t not in FULL
    ]
    assert not bad, bad
    assert any(op == "Cos" for op, _ in nodes)
    # the bulk really is reduced precision: the matmuls and the stored weights
    mm = [t for op, t in nodes if op in ("MatMul", "Gemm")]
    assert sum(t == reduced for t in mm) >= 0.75 * len(mm)
    # (fp32 initializers are folded constants: frequency tables, the Fourier features' cast)
    sizes = {reduced: 0, **{t: 0 for t in FULL}}
    for t in proto.graph.initializer:
        if t.data_type in sizes:
            sizes[t.data_type] += int(torch.tensor(list(t.dims)).prod())
    assert sizes[reduced] >= 0.9 * sum(sizes.values())
    # graph inputs and outputs stay fp32
    for v in [*proto.graph.input[:2], *proto.graph.output]:
        assert v.type.tensor_type.elem_type == TensorProto.FLOAT
    return proto


def _check_parity_rows(result, precision: str):
    tol = TOLERANCE[precision]
    assert len(result.parity) == 4
    for p in result.parity:
        assert p["max_abs_diff"] <= tol * max(1.0, p["scale"])
        assert p["max_abs_diff"] > 1e-5  # it did compute in reduced precision


def test_unsupported_types_names_the_op_and_the_first_opset_allowing_it():
    def graph(elem, opset):
        node = helper.make_node("Cos", ["a"], ["b"])
        g = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("a", elem, [2])],
            [helper.make_tensor_value_info("b", elem, [2])],
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])

    assert unsupported_types(graph(TensorProto.BFLOAT16, 18), 18) == [("Cos", "bfloat16", 22)]
    assert unsupported_types(graph(TensorProto.BFLOAT16, 22), 22) == []
    assert unsupported_types(graph(TensorProto.FLOAT16, 18), 18) == []
    assert unsupported_types(graph(TensorProto.FLOAT, 18), 18) == []


@pytest.mark.slow
def test_bf16_dit_export_checks_structure_and_parity(tmp_path):
    result = export_onnx(
        perturbed("tiny-dit"), S.DDPMObjective(), tmp_path / "bf16.onnx", precision="bf16"
    )
    assert result.opset == 18  # nothing needed a newer opset
    _check_reduced_graph(result, TensorProto.BFLOAT16)
    _check_parity_rows(result, "bf16")
    # onnxruntime CPU cannot run bf16 Gemm, so parity ran in onnx.reference (and says so)
    assert all(
        p["runtime"].startswith("onnx.reference") and "bf16" in p["runtime"] for p in result.parity
    )


@pytest.mark.slow
def test_bf16_hdit_export_checks_structure_and_parity(tmp_path):
    result = export_onnx(
        perturbed("tiny-hdit-neighborhood"),
        S.EDMObjective(),
        tmp_path / "bf16.onnx",
        precision="bf16",
    )
    _check_reduced_graph(result, TensorProto.BFLOAT16)
    _check_parity_rows(result, "bf16")


@pytest.mark.slow
def test_fp16_exports_keep_trig_and_norms_fp32_and_run_in_onnxruntime(tmp_path):
    for name, objective in (
        ("tiny-hdit-neighborhood", S.EDMObjective()),
        ("tiny-dit", S.DDPMObjective()),
    ):
        result = export_onnx(
            perturbed(name), objective, tmp_path / f"{name}.onnx", precision="fp16"
        )
        _check_reduced_graph(result, TensorProto.FLOAT16)
        _check_parity_rows(result, "fp16")
        assert all(p["runtime"] == "onnxruntime CPU" for p in result.parity)


@pytest.mark.slow
def test_an_op_without_bf16_raises_the_opset_or_fails_naming_it(tmp_path, monkeypatch):
    """Undo the fp32 Fourier features (cos/sin of a bf16 tensor): the default opset is raised
    to 22 (bf16 Cos/Sin), an explicit --opset 18 is a clear error."""
    from ditkit.builder import conditioning

    def bf16_forward(self, x):
        f = 2 * 3.141592653589793 * x.to(self.weight.dtype) @ self.weight.T
        return self.proj(torch.cat([f.cos(), f.sin()], dim=-1))

    monkeypatch.setattr(conditioning.FourierEmbed, "forward", bf16_forward)
    model = perturbed("tiny-hdit-global")
    with pytest.raises(
        ExportError,
        match="opset 18 has no Cos for bfloat16.*Cos supports bfloat16 from opset 22.*--opset",
    ):
        export_onnx(
            model, S.EDMObjective(), tmp_path / "a.onnx", precision="bf16", opset=18, check=False
        )
    assert not (tmp_path / "a.onnx").exists()
    result = export_onnx(
        model, S.EDMObjective(), tmp_path / "b.onnx", precision="bf16", check=False
    )
    assert result.opset == 22
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 22


# -------------------------------------------------------------------------------- CFG graph


@pytest.fixture(scope="module")
def dit_cfg(tmp_path_factory):
    """tiny DiT (learned sigma) exported with CFG on its first 3 channels, as DiT does."""
    model = perturbed("tiny-dit")
    path = tmp_path_factory.mktemp("cfg") / "dit-cfg.onnx"
    result = export_onnx(model, S.DDPMObjective(), path, cfg=True, cfg_channels=3)
    return model, result


def test_cfg_graph_inputs_metadata_and_parity(dit_cfg):
    model, result = dit_cfg
    proto = onnx.load(str(result.path))
    assert [i.name for i in proto.graph.input] == ["x", "sigma", "class_labels", "cfg_scale"]
    scale = proto.graph.input[3].type.tensor_type
    assert scale.elem_type == TensorProto.FLOAT and scale.shape.dim[0].dim_param
    assert [o.name for o in proto.graph.output] == ["denoised", "var_values"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["ditkit.cfg"])["channels"] == 3
    assert meta["ditkit.cfg_channels"] == "3"
    assert all(p["max_abs_diff"] <= 1e-4 * max(1, p["scale"]) for p in result.parity)


def test_cfg_graph_equals_the_samplers_eager_guidance(dit_cfg):
    model, result = dit_cfg
    ort = OrtDenoiser(result.path)
    assert ort.guides_inside and ort.cfg_channels == 3
    eager = Denoiser(model, S.DDPMObjective())
    g = torch.Generator().manual_seed(2)
    x, labels = torch.randn(3, 4, 8, 10, generator=g), torch.tensor([0, 5, 9])
    for w in (1.0, 4.0):
        with torch.no_grad():
            want, want_var = Guided(eager, labels, {}, w, cfg_channels=3)(x, 3.0)
        got, got_var = ort.guided(x, torch.full((3,), 3.0), labels, w)
        assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))
        assert float((got_var - want_var).abs().max()) <= 1e-4
    # guidance changes the output, the 4th channel is the conditional one
    with torch.no_grad():
        cond, _ = eager.denoise(x, torch.full((3,), 3.0), labels)
    guided, _ = ort.guided(x, torch.full((3,), 3.0), labels, 4.0)
    assert float((guided[:, :3] - cond[:, :3]).abs().max()) > 1e-3
    assert float((guided[:, 3:] - cond[:, 3:]).abs().max()) <= 1e-4 * max(
        1.0, float(cond.abs().max())
    )
    # per-sample scales: sample i guided with scale i
    ws = torch.tensor([1.0, 2.0, 6.0])
    per, _ = ort.guided(x, torch.full((3,), 3.0), labels, ws)
    for i, w in enumerate(ws.tolist()):
        one, _ = ort.guided(x[i : i + 1], torch.full((1,), 3.0), labels[i : i + 1], w)
        assert torch.allclose(per[i : i + 1], one, atol=1e-5)


def test_sampling_with_the_cfg_graph_equals_eager_sampling(dit_cfg):
    model, result = dit_cfg
    ort = OrtDenoiser(result.path)
    eager = Denoiser(model, S.DDPMObjective())
    kw = dict(
        steps=5,
        sampler="ddpm",
        seed=4,
        class_labels=[1, 2],
        cfg_scale=3.0,
        cfg_channels=3,
        cfg_interval=(0.5, 50.0),
    )
    a = sample(eager, (2, 4, 8, 8), **kw)
    b = sample(ort, (2, 4, 8, 8), **kw)
    assert ort.calls == 5  # one graph call per evaluation, guided or not
    assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(a.abs().max()))
    assert not torch.allclose(a, sample(eager, (2, 4, 8, 8), **{**kw, "cfg_scale": 1.0}), atol=1e-3)
    with pytest.raises(ValueError, match="exported with CFG on 3 channels"):
        sample(ort, (2, 4, 8, 8), **{**kw, "cfg_channels": None})


def test_cfg_needs_a_null_class_and_valid_channels():
    data = S.to_data(S.load(TINY / "tiny-dit.yaml"), full=True)
    data["conditioning"]["classes"]["null_class"] = False
    model = build(S.validate(data))
    with pytest.raises(ExportError, match="--cfg: .*no null class"):
        ExportGraph(model, S.DDPMObjective(), cfg=True)
    model = build(S.load(TINY / "tiny-dit.yaml"))
    with pytest.raises(ExportError, match="--cfg-channels 5: must be in 1..4"):
        ExportGraph(model, S.DDPMObjective(), cfg=True, cfg_channels=5)
    with pytest.raises(ExportError, match="--cfg-channels needs --cfg"):
        ExportGraph(model, S.DDPMObjective(), cfg_channels=3)


@pytest.mark.slow
def test_hdit_cfg_graph_with_aux_samples_like_eager(tmp_path):
    """CFG graph of a spec with auxiliary conditioning: the aux input is batched into both
    passes, as the eager sampler does."""
    model = perturbed("tiny-hdit-neighborhood")
    result = export_onnx(model, S.EDMObjective(), tmp_path / "cfg.onnx", cfg=True)
    ort = OrtDenoiser(result.path)
    assert ort.input_names == ["x", "sigma", "class_labels", "aug_cond", "cfg_scale"]
    aux = {"aug_cond": torch.randn(2, 9, generator=torch.Generator().manual_seed(0))}
    kw = dict(steps=4, sampler="heun", seed=1, class_labels=[3, 7], cfg_scale=2.5, cond=aux)
    with use_backend("gather"):
        a = sample(Denoiser(model, S.EDMObjective()), (2, 3, 16, 20), **kw)
    b = sample(ort, (2, 3, 16, 20), **kw)
    assert float((a - b).abs().max()) <= 2e-4 * max(1.0, float(a.abs().max()))


@pytest.mark.slow
def test_cli_export_cfg(tmp_path, capsys):
    from ditkit.cli import main
    from ditkit.runtime.checkpoint import save_checkpoint

    model = perturbed("tiny-dit")
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(
        ckpt,
        model.state_dict(),
        model.spec,
        objective=S.DDPMObjective(),
        metadata={"ditkit.cfg_channels": "3"},
    )
    out = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "--out", str(out), "--bake-cfg", "--no-check"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["ditkit.cfg"])["channels"] == 3  # from the checkpoint
    assert (
        main(["export", str(ckpt), "--out", str(tmp_path / "x.onnx"), "--cfg-channels", "3"]) == 2
    )
    assert "--cfg-channels needs --cfg" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
