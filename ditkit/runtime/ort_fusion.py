"""Attention as one onnxruntime kernel in graphs exported for onnxruntime.

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
like any other graph.
"""

from __future__ import annotations

DOMAIN = "com.microsoft"


def _mha_op():
    """The contrib op as an onnxscript ``Op`` (with a schema written here: onnx does not know
    the ``com.microsoft`` domain)."""
    import onnxscript
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MultiHeadAttention", DOMAIN, 1,
        inputs=[param("query", "T"), param("key", "T", param_option=optional),
                param("value", "T", param_option=optional),
                param("bias", "T", param_option=optional),
                param("key_padding_mask", "M", param_option=optional),
                param("attention_bias", "T", param_option=optional)],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)"], "float tensors"),
                          ("M", ["tensor(int32)"], "mask")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "heads"),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "logit scale")])
    return onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), "MultiHeadAttention", schema)


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: aten SDPA -> MultiHeadAttention
    (empty where this onnxscript lacks what it needs; the export is then unfused)."""
    import torch

    try:  # onnxscript's internals: without them the export keeps the plain ONNX ops
        from onnxscript import opset18 as op
        from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention

        mha = _mha_op()
    except (ImportError, AttributeError, TypeError):
        return {}

    def sdpa(query, key, value, attn_mask=None, dropout_p: float = 0.0,
             is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False):
        d = query.shape[-1]
        if (is_causal or dropout_p or enable_gqa or len(query.shape) != 4
                or not isinstance(d, int) or key.shape[1] != query.shape[1]):
            return aten_scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                                     is_causal, scale, enable_gqa)
        scale = float(d ** -0.5 if scale is None else scale)
        minus_one = op.Constant(value_ints=[-1])

        def fold(t):  # (A, N, S, D) -> (A N, S, D): the heads go into the batch
            return op.Reshape(t, op.Concat(minus_one, op.Shape(t, start=2), axis=0))

        bias = None
        if attn_mask is not None:
            if attn_mask.dtype == query.dtype:
                bias = attn_mask
            else:  # boolean: True = attend
                zero = op.CastLike(op.Constant(value_float=0.0), query)
                bias = op.Where(attn_mask, zero,
                                op.CastLike(op.Constant(value_float=float("-inf")), query))
            scores = op.Concat(op.Shape(query, end=3), op.Shape(key, start=2, end=3), axis=0)
            bias = op.Reshape(op.Expand(bias, scores),  # (A N, 1, S, L)
                              op.Concat(op.Constant(value_ints=[-1, 1]),
                                        op.Shape(query, start=2, end=3),
                                        op.Shape(key, start=2, end=3), axis=0))
        out = mha(fold(query), fold(key), fold(value), None, None, bias, num_heads=1,
                  scale=scale)
        return op.Reshape(out, op.Shape(query))

    return {torch.ops.aten.scaled_dot_product_attention.default: sdpa}
