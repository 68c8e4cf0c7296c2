"""Single-kernel timings behind the onnxruntime rewrites (docs/measurements.md, "onnxruntime at high
resolution"): CPU time per call, 1 thread by default, median of ``--repeats``.

    python benchmarks/ort_kernels.py [--threads 1] [--repeats 10]

- ``gelu``: exact GELU on a 1x128x128x384 tensor as the exporter writes it (``Div, Erf, Add,
  Mul, Mul``), as ``com.microsoft::Gelu``, and PyTorch's ``F.gelu``;
- ``rms``: RMSNorm on 1x128x128x128 as exported (``..., Sqrt, Reciprocal, Mul``: not fused)
  and in the ``..., Sqrt, Div, Mul(ones)`` form onnxruntime fuses into
  ``SimplifiedLayerNormalization``;
- ``neighborhood``: ``MultiHeadAttention`` on 2,048 problems of 16 queries x 100 keys (64 dims,
  the 4x4-tile neighborhood at 512^2): with the mask as ``attention_bias``, with the mask
  folded into 16 extra q.k dimensions (no bias), and with no mask at all (the floor).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

MS = h.make_opsetid("com.microsoft", 1)
OPSET_18 = h.make_opsetid("", 18)


def model(nodes, inputs, inits=(), opsets=(OPSET_18,)):
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info(n, T.FLOAT, s) for n, s in inputs],
        [h.make_tensor_value_info(nodes[-1].output[0], T.FLOAT, None)],
        list(inits),
    )
    m = h.make_model(g, opset_imports=list(opsets))
    m.ir_version = 9
    return m


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        c = time.process_time()
        fn()
        times.append(time.process_time() - c)
    return statistics.median(times) * 1e3


def session(m, threads):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    def go(m, feeds):  # CPU ms per run of model m
        sess = session(m, args.threads)
        return timed(lambda: sess.run(None, feeds), args.repeats)

    x = rng.standard_normal((1, 128, 128, 384)).astype(np.float32)
    c = [
        h.make_node("Constant", [], [n], value_float=v)
        for n, v in (("r2", 2**0.5), ("one", 1.0), ("half", 0.5))
    ]
    erf = model(
        c
        + [
            h.make_node("Div", ["x", "r2"], ["a"]),
            h.make_node("Erf", ["a"], ["e"]),
            h.make_node("Add", ["e", "one"], ["f"]),
            h.make_node("Mul", ["half", "f"], ["g"]),
            h.make_node("Mul", ["x", "g"], ["y"]),
        ],
        [("x", x.shape)],
    )
    fused = model(
        [h.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")],
        [("x", x.shape)],
        opsets=(h.make_opsetid("", 18), MS),
    )
    t = torch.from_numpy(x)
    print(
        f"gelu 1x128x128x384: exported Div/Erf/Add/Mul/Mul {go(erf, {'x': x}):.2f} ms, "
        f"com.microsoft::Gelu {go(fused, {'x': x}):.2f} ms, torch "
        f"{timed(lambda: torch.nn.functional.gelu(t), args.repeats):.2f} ms"
    )

    x = rng.standard_normal((1, 128, 128, 128)).astype(np.float32)
    inits = [
        nh.from_array(np.array(2.0, np.float32), "two"),
        nh.from_array(np.array([-1], np.int64), "ax"),
        nh.from_array(np.array(1e-6, np.float32), "eps"),
        nh.from_array(np.ones(128, np.float32), "w"),
    ]
    head = [
        h.make_node("Pow", ["x", "two"], ["p"]),
        h.make_node("ReduceMean", ["p", "ax"], ["m"], keepdims=1),
        h.make_node("Add", ["m", "eps"], ["a"]),
        h.make_node("Sqrt", ["a"], ["s"]),
    ]
    recip = model(
        head + [h.make_node("Reciprocal", ["s"], ["r"]), h.make_node("Mul", ["x", "r"], ["y"])],
        [("x", x.shape)],
        inits[:3],
    )
    div = model(
        head + [h.make_node("Div", ["x", "s"], ["d"]), h.make_node("Mul", ["d", "w"], ["y"])],
        [("x", x.shape)],
        inits,
    )
    print(
        f"rms norm 1x128x128x128: exported (Reciprocal, Mul) {go(recip, {'x': x}):.2f} ms, "
        f"rewritten (Div, Mul(ones) -> SimplifiedLayerNormalization) "
        f"{go(div, {'x': x}):.2f} ms"
    )

    p, s, n, d = 2048, 16, 100, 64

    def mha(dq, bias):
        ins = [("q", [p, s, dq]), ("k", [p, n, dq]), ("v", [p, n, d])]
        if bias:
            ins.append(("b", [p, 1, s, n]))
        node = h.make_node(
            "MultiHeadAttention",
            ["q", "k", "v", "", ""] + (["b"] if bias else []),
            ["o"],
            domain="com.microsoft",
            num_heads=1,
            scale=0.125,
        )
        return model([node], ins, opsets=(h.make_opsetid("", 18), MS))

    q = rng.standard_normal((p, s, d)).astype(np.float32)
    k, v = (rng.standard_normal((p, n, d)).astype(np.float32) for _ in range(2))
    keep = rng.random((p, 1, s, n)) < 0.5
    keep[..., 0] = True
    bias = np.where(keep, 0, -np.inf).astype(np.float32)
    q2 = np.concatenate([q, np.broadcast_to(np.eye(s, dtype=np.float32) * 8.0, (p, s, s))], -1)
    k2 = np.concatenate(
        [k, np.where(keep[:, 0], 0, -1e9).astype(np.float32).transpose(0, 2, 1)], -1
    )
    print(
        f"neighborhood MultiHeadAttention, {p} problems of {s}x{n}: mask as attention_bias "
        f"{go(mha(d, True), dict(q=q, k=k, v=v, b=bias)):.1f} ms, mask folded into q.k "
        f"{go(mha(d + s, False), dict(q=q2, k=k2, v=v)):.1f} ms, no mask "
        f"{go(mha(d, False), dict(q=q, k=k, v=v)):.1f} ms"
    )


if __name__ == "__main__":
    main()
