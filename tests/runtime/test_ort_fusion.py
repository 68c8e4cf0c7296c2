"""Attention exported for onnxruntime as its fused ``com.microsoft::MultiHeadAttention`` kernel
(``ditkit/deploy/ort_fusion.py``): same numbers as PyTorch's SDPA, with and without the masks
the ``tiled`` neighborhood backend passes, at sizes other than the traced ones."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ditkit.deploy.ort_fusion import translation_table  # noqa: E402


class Global(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=0.3)


class Masked(torch.nn.Module):
    """The tiled backend's call: (A, tiles, T^2, D) against (A, tiles, L^2, D), with a 4-D
    mask (1, tiles, T^2, L^2) shared by the batch; boolean or additive."""

    def __init__(self, additive: bool):
        super().__init__()
        self.additive = additive

    def forward(self, q, k, v, keep):
        mask = keep
        if self.additive:
            mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)


def _export(module, args, dynamic, path):
    ep = torch.export.export(module, args, dynamic_shapes=dynamic)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            ep,
            args,
            dynamo=True,
            opset_version=18,
            optimize=True,
            custom_translation_table=translation_table(),
        )
    prog.save(str(path))
    ops = {(n.domain or "ai.onnx") + "::" + n.op_type for n in prog.model_proto.graph.node}
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), ops


def _run(sess, *tensors):
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: t.numpy() for n, t in zip(names, tensors)})[0]


def test_global_attention_becomes_one_fused_node(tmp_path):
    from torch.export import Dim

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g) for _ in range(3))
    b, s = Dim("b", min=1, max=64), Dim("s", min=2, max=4096)
    sess, ops = _export(Global(), (q, k, v), ({0: b, 2: s},) * 3, tmp_path / "g.onnx")
    assert "com.microsoft::MultiHeadAttention" in ops
    assert "ai.onnx::Softmax" not in ops and "ai.onnx::MatMul" not in ops
    for shape in ((2, 3, 40, 16), (1, 3, 97, 16)):  # the traced size and another one
        q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
        ref = F.scaled_dot_product_attention(q, k, v, scale=0.3)
        assert np.abs(_run(sess, q, k, v) - ref.numpy()).max() < 1e-5


@pytest.mark.parametrize("additive", [False, True])
def test_masked_attention_becomes_one_fused_node(tmp_path, additive):
    from torch.export import Dim

    g = torch.Generator().manual_seed(1)

    def inputs(a, tiles):
        q = torch.randn(a, tiles, 16, 8, generator=g)
        k, v = (torch.randn(a, tiles, 36, 8, generator=g) for _ in range(2))
        keep = torch.rand(1, tiles, 16, 36, generator=g) < 0.4
        keep[..., 0] = True  # never an empty row (the tiled backend guarantees it)
        return q, k, v, keep

    t = Dim("tiles", min=2, max=1024)
    sess, ops = _export(
        Masked(additive), inputs(2, 5), ({1: t}, {1: t}, {1: t}, {1: t}), tmp_path / "m.onnx"
    )
    assert "com.microsoft::MultiHeadAttention" in ops and "ai.onnx::Softmax" not in ops
    for a, tiles in ((2, 5), (2, 11)):
        q, k, v, keep = inputs(a, tiles)
        ref = Masked(additive)(q, k, v, keep)
        assert np.abs(_run(sess, q, k, v, keep) - ref.numpy()).max() < 1e-5


def test_only_fp32_onnxruntime_exports_fuse_and_trace_tiled():
    from ditkit.builder import kernels
    from ditkit.deploy.export import export_backend, fuses_attention

    assert fuses_attention("onnxruntime", "fp32")
    assert not fuses_attention("onnxruntime", "fp16") and not fuses_attention("onnxruntime", "bf16")
    assert not fuses_attention("tensorrt-10.x", "fp32")
    assert export_backend("onnxruntime", "fp32") == "tiled"
    assert export_backend("tensorrt-10.8", "fp32") is None  # exportable_backend(): gather
    with kernels.use_backend("gather"):  # an explicit choice around the export wins
        assert export_backend("onnxruntime", "fp32") is None


def test_the_onnxruntime_export_of_tiny_hdit_uses_the_fused_kernel(hdit_export):
    ops = set(hdit_export[1].ops)
    # global and neighborhood attention alike: no decomposed softmax left in the graph
    assert "com.microsoft::MultiHeadAttention" in ops and "ai.onnx::Softmax" not in ops


# ------------------------------------------------------------------ element-wise rewrites


class NormGelu(torch.nn.Module):
    """The builder's RMSNorm, cosine q/k scaling and GEGLU (with a tanh GELU MLP beside it,
    which must keep its own translation)."""

    def __init__(self):
        super().__init__()
        from ditkit.builder.ffn import GEGLU, GeluMLP
        from ditkit.builder.norm import RMSNorm

        self.norm = RMSNorm(24)
        self.head_norm = RMSNorm(24, affine=True)
        self.ffn = GEGLU(24, 40, bias=False)
        self.mlp = GeluMLP(24, 16, approximate="tanh")
        self.s = torch.nn.Parameter(torch.tensor([3.0, 7.0]))

    def forward(self, x):  # (B, H, W, 24)
        h = self.norm(x)
        q = h.view(*h.shape[:3], 2, 12)
        s = self.s.sqrt()[:, None]  # CosineLogits's form, per head
        q = q * (s * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6))
        return self.head_norm(x + self.ffn(q.flatten(3)) + self.mlp(h))


def test_norms_and_gelu_are_rewritten_into_kernels_onnxruntime_fuses(tmp_path):
    """RMSNorm and cosine scaling end as onnxruntime ``SimplifiedLayerNormalization`` kernels,
    exact GELU as ``com.microsoft::Gelu``, GEGLU's ``MatMul + Split`` as two MatMuls; the
    file still passes onnx.checker and matches PyTorch at traced and other sizes."""
    import onnx
    from torch.export import Dim

    from ditkit.deploy.ort_fusion import gelu_translation, optimize_graph

    torch.manual_seed(0)
    module = NormGelu().eval()
    with torch.no_grad():
        module.head_norm.scale.mul_(1.5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, 24, generator=g) * 3
    h, w = Dim("h", min=2, max=64), Dim("w", min=2, max=64)
    ep = torch.export.export(module, (x,), dynamic_shapes=({1: h, 2: w},))
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(
            ep,
            (x,),
            dynamo=True,
            opset_version=18,
            optimize=True,
            custom_translation_table=gelu_translation(),
        ).model_proto
    counts = optimize_graph(proto)
    assert counts == {"rms_norm": 2, "cosine_norm": 1, "split_matmul": 1, "qkv_matmul": 0}
    onnx.checker.check_model(proto, full_check=True)
    ops = {(n.domain or "ai.onnx") + "::" + n.op_type for n in proto.graph.node}
    assert "com.microsoft::Gelu" in ops and "ai.onnx::Reciprocal" not in ops
    assert "ai.onnx::Erf" not in ops and "ai.onnx::Tanh" in ops  # only the tanh MLP left
    path, optimized = tmp_path / "n.onnx", tmp_path / "n.opt.onnx"
    onnx.save(proto, str(path))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(optimized)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert fused.count("SimplifiedLayerNormalization") == 3 and "ReduceSum" not in fused
    for shape in ((2, 5, 6, 24), (2, 9, 3, 24)):
        x = torch.randn(*shape, generator=g) * 3
        with torch.no_grad():
            ref = module(x)
        assert np.abs(_run(sess, x) - ref.numpy()).max() < 1e-5


def test_the_tiny_hdit_export_has_no_unfused_gelu_or_cosine_sum_left(hdit_export):
    ops = set(hdit_export[1].ops)  # its parity with eager (1e-4) is checked by the export
    assert "com.microsoft::Gelu" in ops
    assert "ai.onnx::Erf" not in ops and "ai.onnx::ReduceSum" not in ops


class Qkv(torch.nn.Module):
    """``Attention.forward``'s qkv split: one projection viewed as (B, H, W, 3, heads, D),
    permuted to (3, B, heads, H, W, D) and unbound."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(24, 72, bias=False)

    def forward(self, x):  # (B, H, W, 24)
        b, hh, ww, _ = x.shape
        q, k, v = self.qkv(x).view(b, hh, ww, 3, 2, 12).permute(3, 0, 4, 1, 2, 5).unbind(0)
        return q * k.sin() + v.cos()


def test_the_qkv_projection_becomes_three_matmuls_without_a_split(tmp_path):
    from torch.export import Dim

    from ditkit.deploy.ort_fusion import optimize_graph

    torch.manual_seed(0)
    module = Qkv().eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 6, 24, generator=g)
    h, w = Dim("h", min=2, max=64), Dim("w", min=2, max=64)
    ep = torch.export.export(module, (x,), dynamic_shapes=({1: h, 2: w},))
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(
            ep, (x,), dynamo=True, opset_version=18, optimize=True
        ).model_proto
    assert optimize_graph(proto)["qkv_matmul"] == 1
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMul") == 3 and "Slice" not in ops and "Split" not in ops
    path = tmp_path / "qkv.onnx"
    import onnx

    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((2, 5, 6, 24), (2, 3, 8, 24)):
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            ref = module(x)
        assert np.abs(_run(sess, x) - ref.numpy()).max() < 1e-5
