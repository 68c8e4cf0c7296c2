"""Attention as one onnxruntime kernel in graphs exported for onnxruntime (and, below, GELU
and RMSNorm in forms onnxruntime fuses, GEGLU without its split copy, the opt-in int8 export).

``torch.onnx`` writes ``scaled_dot_product_attention`` as separate ONNX nodes (MatMul, Mul,
Softmax, MatMul, and a Where for a boolean mask), so onnxruntime materialises every score
matrix and walks it four times. At 512^2 pixels the global level of a patch-4 HDiT has 4,096
tokens: 4 heads x 4096^2 fp32 scores are 268 MB per block, and that graph took twice as long as
eager PyTorch's fused (flash) kernel. onnxruntime ships a fused attention kernel for CPU, the
contrib op ``com.microsoft::MultiHeadAttention`` (flash attention when no bias is given), so an
export for onnxruntime maps the aten op onto it (``translation_table``):

- ``q, k, v`` ``(A, N, S, D)`` are viewed as ``(A N, S, D)`` with ``num_heads = 1`` (a reshape,
  no transpose): the op's heads attribute must be a constant, and the ``tiled`` neighborhood
  backend's "heads" axis is its tile count, which depends on the resolution;
- a mask (the ``tiled`` backend's ``(1, tiles, T^2, L^2)`` boolean or additive one) becomes the
  op's ``attention_bias`` ``(A N, 1, S, L)``, ``-inf`` where a key is masked;
- anything else (causal, dropout) keeps onnxscript's own translation.

Only fp32 graphs for the onnxruntime target use it (TensorRT and other runtimes do not know
the contrib op; onnxruntime's CPU kernel is fp32). Parity with eager is checked by the export
like any other graph. Kernel timings behind these choices: ``benchmarks/ort_kernels.py``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

DOMAIN = "com.microsoft"


def _mha_op():
    """The contrib op as an onnxscript ``Op`` (with a schema written here: onnx does not know
    the ``com.microsoft`` domain)."""
    import onnxscript
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MultiHeadAttention",
        DOMAIN,
        1,
        inputs=[
            param("query", "T"),
            param("key", "T", param_option=optional),
            param("value", "T", param_option=optional),
            param("bias", "T", param_option=optional),
            param("key_padding_mask", "M", param_option=optional),
            param("attention_bias", "T", param_option=optional),
        ],
        outputs=[param("output", "T")],
        type_constraints=[
            ("T", ["tensor(float)"], "float tensors"),
            ("M", ["tensor(int32)"], "mask"),
        ],
        attributes=[
            OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "heads"),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "logit scale"),
        ],
    )
    return onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), "MultiHeadAttention", schema)


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: aten SDPA -> MultiHeadAttention
    (empty where this onnxscript lacks what it needs; the export is then unfused)."""

    try:  # onnxscript's internals: without them the export keeps the plain ONNX ops
        from onnxscript import opset18 as op
        from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention

        mha = _mha_op()
    except (ImportError, AttributeError, TypeError):
        return {}

    def sdpa(
        query,
        key,
        value,
        attn_mask=None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ):
        d = query.shape[-1]
        if (
            is_causal
            or dropout_p
            or enable_gqa
            or len(query.shape) != 4
            or not isinstance(d, int)
            or key.shape[1] != query.shape[1]
        ):
            return aten_scaled_dot_product_attention(
                query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
            )
        scale = float(d**-0.5 if scale is None else scale)
        minus_one = op.Constant(value_ints=[-1])

        def fold(t):  # (A, N, S, D) -> (A N, S, D): the heads go into the batch
            return op.Reshape(t, op.Concat(minus_one, op.Shape(t, start=2), axis=0))

        bias = None
        if attn_mask is not None:
            if attn_mask.dtype == query.dtype:
                bias = attn_mask
            else:  # boolean: True = attend
                # onnxscript's op stubs type each input by its ONNX type constraint, which the
                # symbolic tensors here do not carry: hence the ignores in this function
                zero = op.CastLike(op.Constant(value_float=0.0), query)  # type: ignore[type-var]
                bias = op.Where(
                    attn_mask,
                    zero,
                    op.CastLike(  # type: ignore[type-var]
                        op.Constant(value_float=float("-inf")), query
                    ),
                )
            scores = op.Concat(op.Shape(query, end=3), op.Shape(key, start=2, end=3), axis=0)
            bias = op.Reshape(
                op.Expand(bias, scores),  # (A N, 1, S, L)
                op.Concat(  # type: ignore[arg-type, type-var]
                    op.Constant(value_ints=[-1, 1]),
                    op.Shape(query, start=2, end=3),
                    op.Shape(key, start=2, end=3),
                    axis=0,
                ),
            )
        out = mha(fold(query), fold(key), fold(value), None, None, bias, num_heads=1, scale=scale)
        return op.Reshape(out, op.Shape(query))

    return {torch.ops.aten.scaled_dot_product_attention.default: sdpa}


def gelu_translation() -> dict:
    """``aten.gelu`` (exact, ``approximate="none"``) -> ``com.microsoft::Gelu``: one pass
    instead of onnxscript's ``Div, Erf, Add, Mul, Mul`` (an order onnxruntime's own Gelu fusion
    does not recognise). The tanh form keeps onnxscript's translation."""

    try:
        import onnxscript
        from onnx.defs import OpSchema
        from onnxscript.function_libs.torch_lib.ops.nn import aten_gelu
    except (ImportError, AttributeError):
        return {}
    param = OpSchema.FormalParameter
    schema = OpSchema(
        "Gelu",
        DOMAIN,
        1,
        inputs=[param("X", "T")],
        outputs=[param("Y", "T")],
        type_constraints=[("T", ["tensor(float)"], "float tensors")],
    )
    gelu_op = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), "Gelu", schema)

    def gelu(self, approximate: str = "none"):
        if approximate != "none":
            return aten_gelu(self, approximate)
        return gelu_op(self)

    return {torch.ops.aten.gelu.default: gelu}


# ------------------------------------------------------------------------ graph rewrites
#
# Exact rewrites of the exported graph into forms onnxruntime's CPU provider runs in fewer
# passes. They keep every node a standard ONNX op (the file still passes ``onnx.checker``):
#
# - RMSNorm ``x * rsqrt(mean(x^2) + eps)`` is written by the exporter as ``Pow, ReduceMean,
#   Add, Sqrt, Reciprocal, Mul``, which onnxruntime does not fuse; rewritten as ``..., Sqrt,
#   Div(x, .), Mul(., ones)``, its ``SimplifiedLayerNormFusion`` makes it one
#   ``SimplifiedLayerNormalization`` kernel when the session loads. Cosine attention's
#   ``q * (s * rsqrt(sum(q^2) + eps))`` is the same op: ``rsqrt(sum + eps) = D^-1/2
#   rsqrt(mean + eps / D)``, so it becomes the fused norm, scaled by ``D^-1/2`` (its weight)
#   and then by ``s``.
# - ``MatMul(x, W)`` followed by a ``Split`` of its last axis (GEGLU's value / gate) becomes one
#   ``MatMul`` per part with the matching columns of ``W``: the same products, without the
#   copy the ``Split`` makes. Attention's ``qkv`` projection (``MatMul``, ``Reshape`` to
#   ``(B, H, W, 3, heads, D)``, ``Transpose`` to ``(3, B, heads, H, W, D)``, three ``Slice`` +
#   ``Squeeze``) likewise becomes three ``MatMul``s, each reshaped and transposed on its own.


def optimize_graph(model_proto) -> dict[str, int]:
    """Apply the rewrites above to ``model_proto`` in place; returns how many of each."""
    counts = {"rms_norm": 0, "cosine_norm": 0, "split_matmul": 0, "qkv_matmul": 0}
    g = _Graph(model_proto.graph)
    for node in list(model_proto.graph.node):
        if node.op_type == "Mul":
            kind = _rewrite_norm(g, node)
            if kind:
                counts[kind] += 1
        elif node.op_type == "Split":
            counts["split_matmul"] += _rewrite_split_matmul(g, node)
        elif node.op_type == "Transpose":
            counts["qkv_matmul"] += _rewrite_qkv(g, node)
    _drop_dead(model_proto.graph)
    return counts


class _Graph:
    """Producer / consumer maps, small constants and value shapes of an ONNX graph."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.graph, self.np, self.numpy_helper = graph, np, numpy_helper
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}
        self.inits = {i.name: i for i in graph.initializer}
        self.consts = {
            name: numpy_helper.to_array(i)
            for name, i in self.inits.items()
            if int(np.prod(i.dims)) <= 16
        }
        for n in graph.node:
            if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.shapes = {}
        for v in [*graph.input, *graph.value_info, *graph.output]:
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
                self.shapes[v.name] = [
                    d.dim_value if d.HasField("dim_value") else None
                    for d in v.type.tensor_type.shape.dim
                ]
        self.fresh = 0

    def node(self, name, op_type):
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op_type else None

    def scalar(self, name):
        v = self.consts.get(name)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None

    def name(self, base: str) -> str:
        self.fresh += 1
        return f"ortfuse_{base}_{self.fresh}"

    def constant(self, base: str, array):
        from onnx import numpy_helper

        name = self.name(base)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def replace(self, old, new_nodes) -> None:
        """Put ``new_nodes`` where ``old`` was (keeps the graph topologically sorted)."""
        nodes = self.graph.node
        at = next(i for i, n in enumerate(nodes) if n is old)
        del nodes[at]
        for k, n in enumerate(new_nodes):
            nodes.insert(at + k, n)
        for n in new_nodes:
            for o in n.output:
                self.producer[o] = n


def _last_axis_reduce(g: _Graph, node, x: str) -> bool:
    """Whether a Reduce* ``node`` reduces only the last axis of ``x``, keeping dims."""
    axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    if axes is None and len(node.input) > 1:
        v = g.consts.get(node.input[1])
        axes = None if v is None else [int(a) for a in v.reshape(-1)]
    keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
    rank = len(g.shapes.get(x) or [])
    return bool(keep) and axes is not None and len(axes) == 1 and axes[0] in (-1, rank - 1)


def _inv_rms(g: _Graph, r: str):
    """``(x, reduce op, eps)`` when ``r`` is ``Reciprocal(Sqrt(Add(Reduce(Pow(x, 2)), eps)))``
    over the last axis of ``x``; else None."""
    rec = g.node(r, "Reciprocal")
    sqrt = rec and g.node(rec.input[0], "Sqrt")
    add = sqrt and g.node(sqrt.input[0], "Add")
    if not add:
        return None
    for red_in, eps_in in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        eps = g.scalar(eps_in)
        red = g.producer.get(red_in)
        if eps is None or red is None or red.op_type not in ("ReduceMean", "ReduceSum"):
            continue
        pow_ = g.node(red.input[0], "Pow")
        if pow_ is None or g.scalar(pow_.input[1]) != 2.0:
            continue
        x = pow_.input[0]
        if _last_axis_reduce(g, red, x):
            return x, red.op_type, eps
    return None


def _rewrite_norm(g: _Graph, mul) -> str | None:
    np = g.np
    a, b = mul.input
    for x, other in ((a, b), (b, a)):
        found = _inv_rms(g, other)  # x * rsqrt(mean(x^2) + eps)
        scale = None
        if found is None:  # x * (s * rsqrt(sum(x^2) + eps))
            inner = g.node(other, "Mul")
            if inner is None:
                continue
            for r, s in ((inner.input[0], inner.input[1]), (inner.input[1], inner.input[0])):
                found = _inv_rms(g, r)
                if found is not None:
                    scale = s
                    break
        if found is None or found[0] != x:
            continue
        _, reduce, eps = found
        dim = (g.shapes.get(x) or [None])[-1]
        if not dim:
            return None
        if (reduce == "ReduceSum") != (scale is not None):
            return None  # a pattern these rewrites do not cover
        from onnx import helper

        weight = np.ones(dim, np.float32)
        if reduce == "ReduceSum":  # sum(x^2) + eps = D (mean(x^2) + eps / D)
            eps, weight = eps / dim, weight * np.float32(dim**-0.5)
        two = g.constant("two", np.array(2.0, np.float32))
        axes = g.constant("axes", np.array([-1], np.int64))
        eps_c = g.constant("eps", np.array(eps, np.float32))
        w = g.constant("weight", weight)
        p, m, e, s, d = (g.name(k) for k in ("pow", "mean", "add", "sqrt", "div"))
        out = mul.output[0]
        normed = g.name("normed") if scale is not None else out
        nodes = [
            helper.make_node("Pow", [x, two], [p]),
            helper.make_node("ReduceMean", [p, axes], [m], keepdims=1),
            helper.make_node("Add", [m, eps_c], [e]),
            helper.make_node("Sqrt", [e], [s]),
            helper.make_node("Div", [x, s], [d]),
            helper.make_node("Mul", [d, w], [normed]),
        ]
        if scale is not None:
            nodes.append(helper.make_node("Mul", [normed, scale], [out]))
        for n in nodes:
            n.name = g.name(n.op_type.lower())
        g.replace(mul, nodes)
        return "rms_norm" if scale is None else "cosine_norm"
    return None


def _rewrite_split_matmul(g: _Graph, split) -> int:
    np, nh = g.np, g.numpy_helper
    y = split.input[0]
    mm = g.node(y, "MatMul")
    if mm is None or len(g.consumers.get(y, [])) != 1 or y in g.outputs:
        return 0
    w_init = g.inits.get(mm.input[1])
    rank = len(g.shapes.get(y) or [])
    axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
    if w_init is None or len(w_init.dims) != 2 or rank < 2 or axis not in (-1, rank - 1):
        return 0
    n = len(split.output)
    cols = w_init.dims[1]
    if len(split.input) > 1 and split.input[1]:
        sizes = g.consts.get(split.input[1])
        if sizes is None:
            return 0
        sizes = [int(v) for v in sizes.reshape(-1)]
    elif cols % n == 0:
        sizes = [cols // n] * n
    else:
        return 0
    if sum(sizes) != cols:
        return 0
    from onnx import helper

    w = nh.to_array(w_init)
    nodes, start = [], 0
    for out, size in zip(split.output, sizes):
        part = g.constant("weight", np.ascontiguousarray(w[:, start : start + size]))
        nodes.append(helper.make_node("MatMul", [mm.input[0], part], [out], name=g.name("matmul")))
        start += size
    g.replace(split, nodes)
    return 1


def _rewrite_qkv(g: _Graph, transpose) -> int:
    np, nh = g.np, g.numpy_helper
    from onnx import helper

    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
    reshape = g.node(transpose.input[0], "Reshape")
    mm = reshape and g.node(reshape.input[0], "MatMul")
    shape = reshape and g.node(reshape.input[1], "Concat")
    if (
        perm != [3, 0, 4, 1, 2, 5]
        or mm is None
        or shape is None
        or len(shape.input) != 6
        or g.scalar(shape.input[3]) != 3
        or mm.input[1] not in g.inits
        or len(g.consumers.get(mm.output[0], [])) != 1
        or len(g.consumers.get(reshape.output[0], [])) != 1
    ):
        return 0
    parts = {}  # index along the "3" axis -> the Squeeze that yields it
    for sl in g.consumers.get(transpose.output[0], []):
        if sl.op_type != "Slice" or len(sl.input) < 4:
            return 0
        start, end, axes = (g.consts.get(n) for n in sl.input[1:4])
        steps = g.consts.get(sl.input[4]) if len(sl.input) > 4 and sl.input[4] else None
        users = g.consumers.get(sl.output[0], [])
        if (
            start is None
            or end is None
            or axes is None
            or axes.reshape(-1).tolist() != [0]
            or (steps is not None and steps.reshape(-1).tolist() != [1])
            or end.reshape(-1)[0] != start.reshape(-1)[0] + 1
            or len(users) != 1
            or users[0].op_type != "Squeeze"
            or sl.output[0] in g.outputs
        ):
            return 0
        sq = users[0]
        sq_axes = g.consts.get(sq.input[1]) if len(sq.input) > 1 else None
        if sq_axes is None or sq_axes.reshape(-1).tolist() != [0]:
            return 0
        parts[int(start.reshape(-1)[0])] = sq
    w = nh.to_array(g.inits[mm.input[1]])
    if sorted(parts) != [0, 1, 2] or w.ndim != 2 or w.shape[1] % 3:
        return 0
    width = w.shape[1] // 3
    heads, d_head = g.scalar(shape.input[4]), g.scalar(shape.input[5])
    if (
        len(g.shapes.get(mm.output[0]) or [0] * 4) != 4
        or heads is None
        or d_head is None
        or heads * d_head != width
    ):
        return 0  # the Reshape must split only the last axis, as (3, heads, D)
    dims = g.name("qkv_shape")
    nodes = [
        helper.make_node(
            "Concat",
            [shape.input[i] for i in (0, 1, 2, 4, 5)],
            [dims],
            axis=0,
            name=g.name("concat"),
        )
    ]
    for i, sq in sorted(parts.items()):
        part = g.constant("weight", np.ascontiguousarray(w[:, i * width : (i + 1) * width]))
        y, r = g.name("qkv"), g.name("qkv_view")
        nodes += [
            helper.make_node("MatMul", [mm.input[0], part], [y], name=g.name("matmul")),
            helper.make_node("Reshape", [y, dims], [r], name=g.name("reshape")),
            helper.make_node(
                "Transpose", [r], [sq.output[0]], perm=[0, 3, 1, 2, 4], name=g.name("transpose")
            ),
        ]
        sq.output[0] = g.name("unused")  # the old path is dead from here on
    g.replace(transpose, nodes)
    return 1


def _drop_dead(graph) -> None:
    """Remove nodes none of whose outputs are used, then unused initializers."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    names = used | {o for n in graph.node for o in n.output}
    infos = [v for v in graph.value_info if v.name in names]
    if len(infos) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(infos)


# ------------------------------------------------------------------------ int8 (opt-in)

INT8_NOTE = (
    "int8 dynamic: the token-wise linear layers' MatMul weights int8 per output "
    "channel, activations uint8 per tensor at run time (onnxruntime.quantization."
    "quantize_dynamic); patch embedding, output projection, conditioning MLP, "
    "attention, norms and everything else fp32"
)


def quantize_int8(model_proto):
    """The fp32 graph with the token-wise linear layers (``MatMul`` of a ``(B, H, W, C)``
    input by a weight) quantized dynamically to int8 (``onnxruntime.quantization.
    quantize_dynamic``, weights per output channel, activations per tensor); the first and
    last of them (patch embedding, output projection), the conditioning MLP, attention
    (``MultiHeadAttention``), norms and everything else stay fp32. An approximation, opt-in
    (``ditkit export --quantize int8``): the export checks it against fp32 eager at
    ``export.INT8_TOLERANCE``."""

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = model_proto.graph
    weights = {i.name for i in graph.initializer}
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*graph.input, *graph.value_info]
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")
    }
    for k, n in enumerate(graph.node):  # quantize_dynamic picks nodes by name
        n.name = n.name or f"ortfuse_node_{k}"
    # token-wise linear layers only ((B, H, W, C) inputs): the conditioning MLP's (B, C) rows
    # cost nothing and feed every modulation; the first (patch embedding) and the last
    # (output projection) touch pixels and stay fp32 too
    tokens = [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and n.input[1] in weights and ranks.get(n.input[0], 0) >= 3
    ]
    nodes = tokens[1:-1]
    if not nodes:
        return model_proto
    quiet = logging.getLogger()  # quantize_dynamic warns through the root logger
    level = quiet.level
    with tempfile.TemporaryDirectory(prefix="ditkit-int8-") as tmp:
        out = Path(tmp) / "int8.onnx"
        quiet.setLevel(logging.ERROR)
        try:
            quantize_dynamic(
                model_proto,
                out,
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=nodes,
                per_channel=True,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
        finally:
            quiet.setLevel(level)
        return onnx.load(str(out))
