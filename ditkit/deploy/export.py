"""Export a denoiser to ONNX through ``torch.export``, then check the file before trusting it.

Why ``torch.export`` first: ``torch.onnx.export`` alone can silently specialise a shape (a Python
branch on a dimension, an example batch of 1) and still write a file that *claims* dynamic dims.
``torch.export.export`` with explicit :class:`torch.export.Dim` constraints instead fails loudly
when the model specialises, and the ``ExportedProgram`` is then converted to ONNX.

The exported graph is the whole denoiser (preconditioning included, in fp32; fp16 / bf16
graphs run the network in the reduced type with the noise embeddings, RoPE and norm statistics
in fp32 -- see ``ditkit.builder`` -- and the opset is raised when an op needs it for its type):

=====================  ========================  =====================================
input / output         shape                     meaning
=====================  ========================  =====================================
``x``                  ``(batch, C, H, W)`` f32  the noisy input, VE convention
``sigma``              ``(batch,)`` f32          the VE noise level
``class_labels``       ``(batch,)`` int64        only when the spec has classes (null
                                                 class = ``classes.count``)
aux inputs             ``(batch, dims)`` f32     one per ``conditioning.aux`` entry, named
                                                 as in the spec (zeros = not given)
``cfg_scale``          ``(batch,)`` f32          only with ``cfg=True`` (guidance baked in)
``denoised``           ``(batch, C, H, W)`` f32  the x0 estimate
``var_values``         ``(batch, C, H, W)`` f32  only for learned-sigma DDPM models
=====================  ========================  =====================================

``H`` and ``W`` are dynamic within the spec's valid resolutions (an arithmetic progression
``min + k * step`` derived from ``ModelSpec.check_resolution``; ``step`` is the patch size times
the merges, times any window size that must tile a grid); a shape outside the rule is an error
before anything is traced. After export, always: ``onnx.checker`` full check, the declared
dynamic dims are symbolic, onnxruntime parity vs eager at two resolutions (one non-square) and two
batch sizes, the op allow-list of the target runtime, and ``metadata_props`` carrying the spec,
objective, checkpoint hash and resolution rule.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from ditkit import spec as S
from ditkit.builder import kernels, use_backend
from ditkit.deploy.graph_io import MAX_SIDE, AxisRule, ExportError, check_shape, ort_session  # noqa: F401
from ditkit.deploy.ort_fusion import (
    INT8_NOTE,
    gelu_translation,
    optimize_graph,
    quantize_int8,
    translation_table,
)
from ditkit.errors import require
from ditkit.files import atomic_path
from ditkit.runtime.checkpoint import CFG_CHANNELS_KEY, OBJECTIVE_KEY, SPEC_KEY, VERSION_KEY
from ditkit.runtime.denoiser import Denoiser
from ditkit.runtime.samplers import cfg_combine

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_OPSET = 18

# fp32 parity is the project's 1e-4; reduced precision is judged against fp32 eager with a
# tolerance relative to the output scale (measured values: docs/guides/deployment.md)
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}
# ``quantize="int8"`` (int8 linear layers, opt-in): max |diff| vs fp32 eager relative to the
# output scale, as for fp16 / bf16 (measured values: docs/guides/deployment.md)
INT8_TOLERANCE = 1e-1


# -------------------------------------------------------------------------------- shape rules


def resolution_rule(spec: S.ModelSpec, search: int = 48) -> tuple[AxisRule, AxisRule]:
    """Per-axis rules ``(height, width)`` read off ``spec.check_resolution``: the valid sizes
    from 2 to ``search`` multiples of the basic multiple must form one arithmetic progression."""
    mh, mw = spec.resolution_multiple()
    h0, w0 = spec.input.resolution
    rules = []
    for axis, m in ((0, mh), (1, mw)):
        # from 2 multiples and >= 8: every level's grid has >= 2 tokens a side (a size-1 axis
        # is a special case to torch.export and a degenerate one for the model)
        sizes = [m * k for k in range(max(2, -(-8 // m)), search + 1)]
        ok = [
            n for n in sizes if not spec.check_resolution((n, w0 * 4) if axis == 0 else (h0 * 4, n))
        ]
        if not ok:
            raise ExportError(
                f"no valid {'height' if axis == 0 else 'width'} up to "
                f"{sizes[-1]} for spec {spec.name}"
            )
        step = 0
        for a, b in zip(ok, ok[1:]):
            step = math.gcd(step, b - a)
        step = step or m
        lo = ok[0]
        if any((n - lo) % step == 0 and n not in ok for n in sizes if n >= lo):
            raise ExportError(
                f"the valid {'heights' if axis == 0 else 'widths'} of spec "
                f"{spec.name} are not one progression ({ok[:8]}...); export "
                "with --dynamic batch (fixed resolution)"
            )
        # at least two of whatever "step" tiles (e.g. two attention windows a side): one is
        # a special case in some modules (a guard the probe below would trip on)
        lo = next(n for n in ok if n >= min(2 * step, ok[-1]))
        rules.append(AxisRule(lo, step))
    return rules[0], rules[1]


# -------------------------------------------------------------------------------- targets

# Ops the TensorRT 10 ONNX parser (onnx-tensorrt, operators.md) imports, for the ops a
# ditkit graph can contain; versioned ones map to the first TensorRT 10.x minor that parses them.
_TRT10_OPS = frozenset(
    """
Abs Acos Add And ArgMax ArgMin Asin Atan AveragePool BatchNormalization Cast Ceil Clip Concat
Constant ConstantOfShape Conv ConvTranspose Cos CumSum DepthToSpace Div Einsum Elu Equal Erf
Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool Greater
GreaterOrEqual GroupNormalization HardSigmoid Identity If InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax MatMul Max Mean Min Mod Mul Neg
Not Or Pad Pow Range Reciprocal ReduceL1 ReduceL2 ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round ScatterElements ScatterND Shape
Sigmoid Sign Sin Size Slice Softmax Softplus SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
Tile TopK Transpose Trilu Unsqueeze Where Xor
""".split()
)
_TRT10_VERSIONED = {"Attention": 14, "RMSNormalization": 15}  # TensorRT 10.14 / 10.15


def allow_list(target: str, opset: int) -> frozenset[str]:
    """``domain::op`` names the target runtime runs at ``opset``.

    ``onnxruntime``: the CPU execution provider's registered kernels (from onnxruntime itself);
    ``tensorrt-10.x`` (``x`` a minor version or ``x``): the TensorRT 10 parser's operator list,
    with the opset-23 ``Attention`` from 10.14 and ``RMSNormalization`` from 10.15."""
    if target == "onnxruntime":
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        return frozenset(
            (k.domain or "ai.onnx") + "::" + k.op_name
            for k in ort_c.get_all_opkernel_def()
            if k.provider == "CPUExecutionProvider"
        )
    if target.startswith("tensorrt-10."):
        minor_text = target.removeprefix("tensorrt-10.")
        if minor_text == "x":
            minor = 0  # unknown minor: only what every 10.x parses
        elif minor_text.isdigit():
            minor = int(minor_text)
        else:
            raise ExportError(
                f"--target {target!r}: use tensorrt-10.x or tensorrt-10.N (e.g. tensorrt-10.8)"
            )
        ops = set(_TRT10_OPS) | {op for op, m in _TRT10_VERSIONED.items() if minor >= m}
        return frozenset("ai.onnx::" + op for op in ops)
    raise ExportError(
        f"--target {target!r}: choose onnxruntime or tensorrt-10.x "
        "(tensorrt-10.N for a specific minor)"
    )


# -------------------------------------------------------------------------------- the graph


class _Cast(nn.Module):
    """Runs ``model`` in ``dtype`` with fp32 in and out, so the preconditioning (and the
    combination ``c_skip x + c_out F``) stays fp32 in reduced-precision graphs."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype
        self.spec = getattr(model, "spec", None)

    def forward(self, x, noise_level, class_labels=None, **cond):
        return self.model(x.to(self.dtype), noise_level, class_labels, **cond).float()


class ExportGraph(nn.Module):
    """``(x, sigma[, class_labels][, aux...][, cfg_scale]) -> denoised[, var_values]`` -- what
    goes into the ONNX.

    Auxiliary conditioning inputs (``conditioning.aux``) are graph inputs named as in the
    spec, ``(batch, dims)`` fp32. ``cfg=True`` bakes classifier-free guidance in: the graph
    batches the conditional and the unconditional (null class) passes and returns
    ``u + cfg_scale (c - u)`` (:func:`ditkit.runtime.samplers.cfg_combine`, the samplers'
    formula; ``cfg_channels``: guide only the first N channels, DiT's 3)."""

    def __init__(
        self,
        model: nn.Module,
        objective,
        precision: str = "fp32",
        *,
        cfg: bool = False,
        cfg_channels: int | None = None,
    ):
        super().__init__()
        dtype = PRECISIONS[precision]
        inner = (
            model
            if dtype == torch.float32
            # a copy: the caller's model stays fp32
            else _Cast(copy.deepcopy(model).to(dtype), dtype)
        )
        self.denoiser = Denoiser(inner, objective)
        self.spec = cast(S.ModelSpec, model.spec)  # every ditkit model carries its spec
        self.has_labels = self.spec.conditioning.classes is not None
        self.has_variance = Denoiser(model, objective).learned_variance
        self.aux = [(a.name, a.dims) for a in self.spec.conditioning.aux]
        taken = [a for a, _ in self.aux if a in _FIXED_INPUTS]
        if taken:
            raise ExportError(
                f"conditioning.aux name(s) {taken} clash with the graph's own "
                f"inputs {list(_FIXED_INPUTS)}; rename them in the spec"
            )
        self.cfg, self.cfg_channels = cfg, cfg_channels
        if cfg:
            self.null_class = self.spec.null_label
            if self.null_class is None:
                raise ExportError(
                    f"--cfg: spec {self.spec.name} has no null class "
                    "(conditioning.classes.null_class), so there is no "
                    "unconditional pass to guide with; export without --cfg"
                )
            c = self.spec.input.channels
            if cfg_channels is not None and not 0 < cfg_channels <= c:
                raise ExportError(
                    f"--cfg-channels {cfg_channels}: must be in 1..{c} (the model's input channels)"
                )
        elif cfg_channels is not None:
            raise ExportError("--cfg-channels needs --cfg")

    def input_names(self) -> list[str]:
        return (
            ["x", "sigma"]
            + (["class_labels"] if self.has_labels else [])
            + [a for a, _ in self.aux]
            + (["cfg_scale"] if self.cfg else [])
        )

    def output_names(self) -> list[str]:
        return ["denoised"] + (["var_values"] if self.has_variance else [])

    def forward(self, *inputs: torch.Tensor):
        named = dict(zip(self.input_names(), inputs))
        x, sigma = named["x"], named["sigma"]
        labels = named.get("class_labels")
        cond = {a: named[a] for a, _ in self.aux}
        if self.cfg:
            assert labels is not None and self.null_class is not None  # cfg needs both
            null = torch.full_like(labels, self.null_class)
            x0, var = self.denoiser.denoise(
                torch.cat([x, x]),
                torch.cat([sigma, sigma]),
                torch.cat([labels, null]),
                **{k: torch.cat([v, v]) for k, v in cond.items()},
            )
            b = x.shape[0]  # slices, not chunk(2): chunk guards the batch size
            x0 = cfg_combine(x0[:b], x0[b:], named["cfg_scale"], self.cfg_channels)
            var = var[:b] if var is not None else None
        else:
            x0, var = self.denoiser.denoise(x, sigma, labels, **cond)
        if self.has_variance:
            return x0, var
        return x0


_FIXED_INPUTS = ("x", "sigma", "class_labels", "cfg_scale")


# -------------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    path: Path
    opset: int
    precision: str
    target: str
    dynamic: tuple[str, ...]
    rule: tuple[AxisRule, AxisRule]
    ops: list[str]
    parity: list[dict] = field(default_factory=list)
    parity_note: str | None = None
    """Set when the parity check compared outputs the network does not change (zero layers)."""
    metadata: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def example_inputs(
    graph: ExportGraph, batch: int, resolution: tuple[int, int], seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Distinct per-sample tensors (so a graph that mixes up the batch cannot pass)."""
    spec = graph.spec
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.input.channels, *resolution, generator=g)
    nr = graph.denoiser.noise_range
    lo, hi = math.log(max(nr.sigma_min, 1e-2)), math.log(min(nr.sigma_max, 50.0))
    sigma = torch.exp(lo + (hi - lo) * torch.rand(batch, generator=g)).float()
    args = [x, sigma]
    if graph.has_labels:
        assert spec.conditioning.classes is not None  # has_labels
        count = spec.conditioning.classes.count
        labels = torch.randint(0, count, (batch,), generator=g)
        if spec.null_label is not None:
            labels[-1] = spec.null_label
        args.append(labels)
    for _, dims in graph.aux:  # non-zero: a graph that drops them cannot pass
        args.append(torch.randn(batch, dims, generator=g))
    if graph.cfg:  # distinct scales, around the usual 1.5 - 5
        args.append(1.0 + 4.0 * torch.rand(batch, generator=g))
    return tuple(args)


def export_onnx(
    model: nn.Module,
    objective,
    out: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic: tuple[str, ...] = ("batch", "resolution"),
    precision: str = "fp32",
    target: str = "onnxruntime",
    resolution: tuple[int, int] | None = None,
    checkpoint_hash: str | None = None,
    metadata: dict[str, str] | None = None,
    check: bool = True,
    parity_resolutions: list[tuple[int, int]] | None = None,
    parity_batches: tuple[int, int] = (1, 3),
    cfg: bool = False,
    cfg_channels: int | None = None,
    log=None,
    perturb_zero_layers: bool = False,
    attention_backend: str | None = None,
    quantize: str | None = None,
) -> ExportResult:
    """Export ``model`` (a built ``DiffusionTransformer``) wrapped in its objective's denoiser
    to ``out`` and run the checks (``check=False`` skips the parity runs only).

    ``opset=None``: :data:`DEFAULT_OPSET`, raised automatically when an op in the graph needs
    a newer opset for its element type (e.g. a bf16 op); an explicit ``opset`` is kept and
    such an op is an error naming the opset that supports it. ``cfg``: bake classifier-free
    guidance in (see :class:`ExportGraph`). A model whose weight matrices include all-zero ones
    (an untrained spec: zero-initialised output layers) makes parity trivial: the result says
    so (``parity_note``), or with ``perturb_zero_layers`` a second export of a copy with those
    weights perturbed is checked too (rows with ``perturbed: True``). ``quantize="int8"``
    (fp32 onnxruntime exports only, opt-in): the linear layers' MatMuls run in int8
    (``ort_fusion.quantize_int8``; not exact: parity is checked at :data:`INT8_TOLERANCE`)."""
    start = time.perf_counter()
    auto_opset = opset is None
    if opset is None:
        opset = DEFAULT_OPSET
    say = log or (lambda msg: None)
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")

    for module in ("onnx", "onnxscript") + (("onnxruntime",) if check else ()):
        require(
            module,
            "exporting to ONNX"
            if module != "onnxruntime"
            else "the export's parity check (check=False / --no-check skips it)",
        )
    unknown = set(dynamic) - {"batch", "resolution"}
    if unknown:
        raise ExportError(f"--dynamic {','.join(sorted(unknown))}: choose from batch, resolution")
    allow = allow_list(target, opset)  # an unknown target fails before any work
    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize {quantize!r}: the only quantization is int8")
    if quantize and not fuses_attention(target, precision):
        raise ExportError(
            f"--quantize int8 is for fp32 onnxruntime exports (got --precision "
            f"{precision}, --target {target}); drop --quantize or export those"
        )
    spec = cast(S.ModelSpec, model.spec)  # every ditkit model carries its spec
    model = model.eval()
    rule = resolution_rule(spec) if "resolution" in dynamic else None
    res = cast(tuple[int, int], tuple(resolution or spec.input.resolution))
    check_shape(spec, (2, spec.input.channels, *res), rule, "--resolution")
    if rule is None:
        rule = (AxisRule(res[0], 1, res[0]), AxisRule(res[1], 1, res[1]))

    graph = ExportGraph(model, objective, precision, cfg=cfg, cfg_channels=cfg_channels)
    args = example_inputs(graph, 2, res)
    ep = _torch_export(
        graph, args, dynamic, rule, res, attention_backend or export_backend(target, precision)
    )
    _probe(ep, graph, dynamic, rule, res)
    say(
        f"torch.export: ok ({len(ep.graph.nodes)} nodes; runs at other batch sizes and resolutions)"
    )
    out = Path(out)
    fuse = fuses_attention(target, precision)
    model_proto = _to_onnx(ep, args, graph, opset, fuse)
    missing = unsupported_types(model_proto, opset)
    if missing and auto_opset and all(v is not None for _, _, v in missing):
        needed = max(v for _, _, v in missing if v is not None)  # all are (checked above)
        say(f"opset {opset} has no {_describe(missing)}: exporting at opset {needed}")
        opset = needed
        allow = allow_list(target, opset)
        model_proto = _to_onnx(ep, args, graph, opset, fuse)
        missing = unsupported_types(model_proto, opset)
    if missing:
        raise ExportError(
            f"opset {opset} has no {_describe(missing)} ({precision} graph); "
            + (
                "; ".join(
                    f"{op} supports {t} from opset {v}"
                    if v
                    else f"no opset up to {_max_opset()} supports {op} in {t}"
                    for op, t, v in missing
                )
            )
            + (
                "; export with --opset N or leave --opset out to pick it automatically"
                if not auto_opset
                else ""
            )
        )
    meta = _metadata(
        spec, objective, rule, dynamic, precision, target, opset, checkpoint_hash, metadata, graph
    )
    if quantize:
        meta["ditkit.quantize"] = INT8_NOTE
        model_proto = quantize_int8(model_proto)
    ops = sorted({(n.domain or "ai.onnx") + "::" + n.op_type for n in _all_nodes(model_proto)})
    refused = [op for op in ops if op not in allow]
    if refused:
        raise ExportError(
            f"target {target} (opset {opset}) cannot run op(s) "
            f"{', '.join(refused)}; export with --opset {22 if opset >= 23 else opset - 1} "
            "(Attention and RMSNormalization are opset-23 ops) or pick a newer "
            "target"
        )
    for k, v in meta.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = k, v
    _check_model(model_proto, dynamic, graph)
    _atomic_save_onnx(model_proto, out)
    say(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, opset {opset}, {len(ops)} op types)")
    result = ExportResult(out, opset, precision, target, tuple(dynamic), rule, ops, metadata=meta)
    if check:
        resolutions = parity_resolutions or parity_shapes(spec, rule, res, dynamic)
        batches = parity_batches if "batch" in dynamic else (2,)
        result.parity = check_parity(
            graph
            if precision == "fp32"
            else ExportGraph(model.float(), objective, "fp32", cfg=cfg, cfg_channels=cfg_channels),
            out,
            resolutions,
            batches,
            INT8_TOLERANCE if quantize else TOLERANCE[precision],
        )
        for p in result.parity:
            say(
                f"parity {p['batch']}x{p['resolution'][0]}x{p['resolution'][1]}: max |diff| "
                f"{p['max_abs_diff']:.2e} (output scale {p['scale']:.2f}, tol "
                f"{p['tolerance']:.0e}; {p['runtime']})"
            )
        zeros = zero_weights(model)
        if zeros and not perturb_zero_layers:  # an untrained spec: say what was compared
            result.parity_note = (
                f"{len(zeros)} weight matrices are all zero (zero-initialised layers of an "
                "untrained model), so the network adds nothing to the output and the parity "
                "above compared the graph's plumbing only, not its layers; export a trained "
                "checkpoint, or pass --perturb-zero-layers to check a copy with those weights "
                "perturbed"
            )
            say(result.parity_note)
        elif zeros:
            say(
                f"{len(zeros)} weight matrices are all zero (zero-initialised layers of an "
                "untrained model); checking a copy with those weights perturbed"
            )
            result.parity += perturbed_parity(
                model,
                objective,
                zeros,
                opset=opset,
                dynamic=dynamic,
                precision=precision,
                target=target,
                resolution=resolution,
                parity_resolutions=parity_resolutions,
                parity_batches=parity_batches,
                cfg=cfg,
                cfg_channels=cfg_channels,
                attention_backend=attention_backend,
                quantize=quantize,
                say=say,
            )
    result.seconds = time.perf_counter() - start
    return result


def zero_weights(model: nn.Module) -> list[str]:
    """Names of the weight matrices (2+ dims) that are all zero."""
    return [
        n
        for n, p in model.named_parameters()
        if p.ndim >= 2 and p.is_floating_point() and not bool(p.detach().any())
    ]


def perturbed_parity(
    model: nn.Module, objective, names: list[str], *, say, **options
) -> list[dict]:
    """Parity rows of the same export made from a copy of ``model`` whose ``names`` weights
    hold small seeded random values (the rows carry ``perturbed: True``)."""

    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in names:
            p = params[n]
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    with tempfile.TemporaryDirectory(prefix="ditkit-parity-") as tmp:
        twin_result = export_onnx(
            twin, objective, Path(tmp) / "perturbed.onnx", check=True, **options
        )
    rows = [{**row, "perturbed": True} for row in twin_result.parity]
    for r in rows:
        say(
            f"parity (zero layers perturbed) {r['batch']}x{r['resolution'][0]}x"
            f"{r['resolution'][1]}: max |diff| {r['max_abs_diff']:.2e} (output scale "
            f"{r['scale']:.2f}, tol {r['tolerance']:.0e}; {r['runtime']})"
        )
    return rows


def parity_shapes(
    spec: S.ModelSpec, rule: tuple[AxisRule, AxisRule], res: tuple[int, int], dynamic
) -> list[tuple[int, int]]:
    """The example resolution and, with dynamic resolution, a non-square one."""
    if "resolution" not in dynamic:
        return [res]
    h, w = res
    other = (h, w + rule[1].step) if h != w + rule[1].step else (h, w + 2 * rule[1].step)
    if h != w:
        other = (h + rule[0].step, w)
    return [res, other]


#: the neighborhood backend of onnxruntime fp32 exports (see ``export_backend``)
ORT_NEIGHBORHOOD_BACKEND = "tiled"


def fuses_attention(target: str, precision: str) -> bool:
    """Whether attention is written as onnxruntime's fused contrib op (``ort_fusion``): only
    in fp32 graphs for onnxruntime (TensorRT does not know the op; its CPU kernel is fp32)."""
    return target == "onnxruntime" and precision == "fp32"


def export_backend(target: str, precision: str) -> str | None:
    """The neighborhood backend an export traces when the caller chose none (``auto``): for
    onnxruntime fp32 graphs ``tiled`` -- dense tile x halo attention that onnxruntime runs as
    one fused kernel (``ort_fusion``), 3-5x less memory traffic than ``gather``'s k^2 copies of
    every key and value (measured in docs/measurements.md, "Sampling engines on CPU"); otherwise
    ``None``, i.e. ``kernels.exportable_backend()``'s own choice."""

    if kernels.current_backend() != "auto":
        return None  # an explicit use_backend(...) around the export wins
    return ORT_NEIGHBORHOOD_BACKEND if fuses_attention(target, precision) else None


def _torch_export(graph: ExportGraph, args, dynamic, rule, res, backend_name=None):

    shapes: dict = {}
    batch = Dim("batch", min=1, max=4096) if "batch" in dynamic else None
    xdims: dict = {}
    if batch is not None:
        xdims[0] = batch
    if "resolution" in dynamic:
        for axis, name, r in ((2, "height", rule[0]), (3, "width", rule[1])):
            if r.minimum % r.step == 0:  # H = step * k, k >= 2: no 0/1 specialisation
                k = Dim(f"{name}_k", min=r.minimum // r.step, max=r.maximum // r.step)
                xdims[axis] = r.step * k
            else:
                k = Dim(f"{name}_k", min=0, max=(r.maximum - r.minimum) // r.step)
                xdims[axis] = r.minimum + r.step * k
    shapes["x"] = xdims or None
    shapes["sigma"] = {0: batch} if batch is not None else None
    for name in graph.input_names()[2:]:  # labels, aux inputs, cfg_scale: (batch, ...)
        shapes[name] = {0: batch} if batch is not None else None
    ctx = kernels.exportable_backend(backend_name)
    names = graph.input_names()
    try:
        with ctx, torch.no_grad():
            # forward(*inputs): one entry (the varargs tuple) holding one spec per input
            return torch.export.export(
                graph, args, dynamic_shapes=(tuple(shapes[n] for n in names),), strict=False
            )
    except Exception as err:  # constraint violations, guards on a dynamic dim
        text = str(err).strip().splitlines()
        brief = "\n  ".join(text[:12])
        raise ExportError(
            f"torch.export failed for spec {graph.spec.name} with dynamic "
            f"{','.join(dynamic)}: the model specialises on a shape (a Python "
            f"branch on a size?). Export with a fixed resolution (--dynamic batch) "
            f"or fix the module.\n  {brief}"
        ) from err


def _probe(ep, graph: ExportGraph, dynamic, rule, res) -> None:
    """Run the ExportedProgram at shapes other than the example's. ``torch.export`` may turn a
    Python branch on a dynamic size into an input *guard* instead of an error; the ONNX
    conversion drops guards, so such a graph would compute wrong results at other shapes. The
    guard fires here instead, at the smallest valid shapes (cheap)."""
    shapes = []
    hs = [res[0]]
    ws = [res[1]]
    if "resolution" in dynamic:
        hs, ws = (
            [rule[0].minimum, rule[0].minimum + rule[0].step],
            [rule[1].minimum + rule[1].step, rule[1].minimum],
        )
    for b, h, w in zip(
        (1, 3) if "batch" in dynamic else (2, 2), hs * (2 // len(hs)), ws * (2 // len(ws))
    ):
        shapes.append((b, (h, w)))
    module = ep.module()
    for b, (h, w) in shapes:
        try:
            with torch.no_grad():
                module(*example_inputs(graph, b, (h, w), seed=7))
        except Exception as err:
            raise ExportError(
                f"the exported program of {graph.spec.name} does not run at batch {b}, "
                f"{h}x{w} although that shape is declared valid: the model specialised on the "
                f"example shape ({str(err).splitlines()[0][:300]}). A module branches in Python "
                "on a size; fix it, or export with a fixed resolution (--dynamic batch)"
            ) from err


def _to_onnx(ep, args, graph: ExportGraph, opset: int, fuse_attention: bool = False):

    table = None
    if fuse_attention:  # onnxruntime's fused attention kernel (see runtime/ort_fusion.py)
        table = {**translation_table(), **gelu_translation()} or None

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
    # a version conversion that fails logs its traceback there; the graph is then checked
    # for ops the opset lacks and that is reported as one ExportError (unsupported_types)
    logging.getLogger("onnxscript.version_converter").setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            ep,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=graph.input_names(),
            output_names=graph.output_names(),
            optimize=True,
            verbose=False,
            external_data=False,
            custom_translation_table=table,
        )
    assert program is not None  # dynamo=True always returns the program
    proto = program.model_proto
    name_dims(proto)
    if fuse_attention:  # exact rewrites onnxruntime's CPU provider runs in fewer passes
        optimize_graph(proto)
    return proto


DIM_NAMES = {0: "batch", 2: "height", 3: "width"}  # of x (B, C, H, W); outputs alike


def name_dims(model_proto) -> dict[str, str]:
    """Rename the exporter's symbolic dimensions (``s21``, ``4*s9``) of the graph's inputs and
    outputs to ``batch``, ``height`` and ``width``, read off ``x`` (every ``(batch, ...)`` input
    and the outputs share them), in place; the same names appear wherever the graph's value
    infos carry the same symbol. Returns ``{old: new}``."""
    inputs = {i.name: i for i in model_proto.graph.input}
    if "x" not in inputs:
        return {}
    dims = inputs["x"].type.tensor_type.shape.dim
    rename = {
        dims[axis].dim_param: name
        for axis, name in DIM_NAMES.items()
        if axis < len(dims) and dims[axis].dim_param
    }
    if not rename:
        return {}
    infos = [*model_proto.graph.input, *model_proto.graph.output, *model_proto.graph.value_info]
    for info in infos:
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
    return rename


def _all_nodes(model_proto):
    def walk(nodes):
        for n in nodes:
            yield n
            for a in n.attribute:
                if a.g is not None and len(a.g.node):
                    yield from walk(a.g.node)
                for sub in a.graphs:
                    yield from walk(sub.node)

    yield from walk(model_proto.graph.node)
    for fn in model_proto.functions:
        yield from walk(fn.node)


def _check_model(model_proto, dynamic, graph: ExportGraph) -> None:
    import onnx

    try:
        onnx.checker.check_model(model_proto, full_check=True)
    except Exception as err:
        raise ExportError(f"onnx.checker rejected the exported model: {err}") from err
    declared = {"batch": [0], "resolution": [2, 3]}
    inputs = {i.name: i for i in model_proto.graph.input}
    x = inputs["x"].type.tensor_type.shape.dim
    for key in dynamic:
        for axis in declared[key]:
            if not x[axis].dim_param or x[axis].HasField("dim_value"):
                raise ExportError(
                    f"dimension {axis} of input x was declared dynamic ({key}) "
                    f"but the ONNX graph fixed it to {x[axis].dim_value}"
                )
    for axis in (0, 2, 3):
        if not any(axis in declared[k] for k in dynamic) and not x[axis].HasField("dim_value"):
            raise ExportError(f"dimension {axis} of x should be static but is symbolic")
    names = [i.name for i in model_proto.graph.input]
    if names != graph.input_names():
        raise ExportError(
            f"the ONNX graph's inputs are {names}, expected "
            f"{graph.input_names()} (an input was dropped as unused?)"
        )
    if "batch" in dynamic:
        for name in names[1:]:
            dim = inputs[name].type.tensor_type.shape.dim[0]
            if not dim.dim_param or dim.HasField("dim_value"):
                raise ExportError(f"the batch dimension of input {name} is not symbolic")


def _metadata(
    spec,
    objective,
    rule,
    dynamic,
    precision,
    target,
    opset,
    checkpoint_hash,
    extra,
    graph: ExportGraph,
) -> dict[str, str]:

    meta = {
        SPEC_KEY: json.dumps(S.to_data(spec, full=True), separators=(",", ":")),
        VERSION_KEY: str(spec.spec_version),
        OBJECTIVE_KEY: json.dumps(S.to_data(objective, full=True), separators=(",", ":")),
        "ditkit.checkpoint_hash": checkpoint_hash or "none (randomly initialised model)",
        "ditkit.resolution_rule": json.dumps(
            {
                "height": {"min": rule[0].minimum, "step": rule[0].step, "max": rule[0].maximum},
                "width": {"min": rule[1].minimum, "step": rule[1].step, "max": rule[1].maximum},
                "dynamic": list(dynamic),
            }
        ),
        "ditkit.precision": precision,
        "ditkit.target": target,
        "ditkit.opset": str(opset),
        "ditkit.io": json.dumps(
            {
                "inputs": graph.input_names(),
                "outputs": graph.output_names(),
                "convention": "VE: x = x0 "
                "+ sigma * eps; outputs denoised (x0) [and var_values for learned-sigma DDPM]",
            }
        ),
        # auxiliary conditioning inputs, each (batch, dims) float32; zeros = "not given"
        "ditkit.aux": json.dumps([{"name": a, "dims": d} for a, d in graph.aux]),
    }
    if graph.cfg:
        meta["ditkit.cfg"] = json.dumps(
            {
                "input": "cfg_scale",
                "channels": graph.cfg_channels,
                "null_class": graph.null_class,
                "formula": "u + cfg_scale * (c - u), c/u = class_labels/null-class passes batched",
            }
        )
        # what the samplers' cfg_channels must be (the graph fixes it)
        meta[CFG_CHANNELS_KEY] = str(graph.cfg_channels) if graph.cfg_channels else ""
    for k, v in (extra or {}).items():
        meta.setdefault(k, str(v))
    if meta.get(CFG_CHANNELS_KEY) == "":
        del meta[CFG_CHANNELS_KEY]
    return meta


def unsupported_types(model_proto, opset: int) -> list[tuple[str, str, int | None]]:
    """``(op, element type, first opset that allows it or None)`` for every ``ai.onnx`` op of
    the main graph whose input or output element type the op's schema at ``opset`` does not
    allow (e.g. ``Cos`` in bf16 before opset 22). Types come from ONNX shape inference."""
    from onnx import TensorProto, defs, shape_inference

    inferred = shape_inference.infer_shapes(model_proto, check_type=False, strict_mode=False)
    g = inferred.graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*g.input, *g.output, *g.value_info]
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type
    }
    types.update({t.name: t.data_type for t in g.initializer})

    def allowed(op: str, version: int, io: str, index: int, elem: int) -> bool | None:
        try:
            schema = defs.get_schema(op, version, "")
        except defs.SchemaError:
            return None
        formals = schema.inputs if io == "in" else schema.outputs
        if not formals:
            return None
        type_str = formals[min(index, len(formals) - 1)].type_str
        ok = next(
            (c.allowed_type_strs for c in schema.type_constraints if c.type_param_str == type_str),
            [type_str],
        )
        return f"tensor({TensorProto.DataType.Name(elem).lower()})" in ok

    found: dict[tuple[str, str], int | None] = {}
    for node in g.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        for io, names in (("in", node.input), ("out", node.output)):
            for i, name in enumerate(names):
                elem = types.get(name)
                if not elem or allowed(node.op_type, opset, io, i, elem) is not False:
                    continue
                key = (node.op_type, TensorProto.DataType.Name(elem).lower())
                if key not in found:
                    found[key] = next(
                        (
                            v
                            for v in range(opset + 1, _max_opset() + 1)
                            if allowed(node.op_type, v, io, i, elem)
                        ),
                        None,
                    )
    return [(op, t, v) for (op, t), v in sorted(found.items())]


def _max_opset() -> int:
    from onnx import defs

    return defs.onnx_opset_version()


def _describe(missing) -> str:
    return ", ".join(f"{op} for {t}" for op, t, _ in missing)


def _atomic_save_onnx(model_proto, out: Path) -> None:
    import onnx

    with atomic_path(out) as tmp:
        onnx.save_model(model_proto, tmp)


# -------------------------------------------------------------------------------- parity


def check_parity(
    graph: ExportGraph, path: Path, resolutions, batches, tolerance: float
) -> list[dict]:
    """Run the ONNX file and eager fp32 on the same inputs; raise :class:`ExportError` when
    ``max |diff| > tolerance * max(1, max |eager|)``.

    The file runs in onnxruntime (CPU). onnxruntime's CPU provider has no bf16 kernels for
    ``Gemm`` / ``MatMul`` / ``Add`` ...; a graph it refuses for that reason runs in ONNX's own
    reference evaluator (``onnx.reference``, numpy with ``ml_dtypes`` bf16) instead, and the
    rows say which runtime ran (``runtime``)."""

    run, runtime = _parity_runner(path)
    rows = []
    for res in resolutions:
        for b in batches:
            args = example_inputs(graph, b, tuple(res), seed=1000 + b)
            with torch.no_grad(), use_backend("gather"):
                ref = graph(*args)
            ref = ref if isinstance(ref, tuple) else (ref,)
            feeds = {n: a.numpy() for n, a in zip(graph.input_names(), args)}
            got = run(feeds)
            diff = max(
                float((torch.from_numpy(np.asarray(g, dtype=np.float32)) - r.float()).abs().max())
                for g, r in zip(got, ref)
            )
            scale = max(float(r.abs().max()) for r in ref)
            row = {
                "resolution": tuple(res),
                "batch": b,
                "max_abs_diff": diff,
                "scale": scale,
                "tolerance": tolerance,
                "runtime": runtime,
            }
            rows.append(row)
            if not diff <= tolerance * max(1.0, scale):
                raise ExportError(
                    f"{runtime} output differs from eager at batch {b}, "
                    f"{res[0]}x{res[1]}: max |diff| {diff:.3e} > {tolerance:.0e} "
                    f"x output scale {scale:.3f} ({path} was written; do not "
                    "trust it)"
                )
    return rows


def _parity_runner(path: Path):
    """``(run(feeds) -> outputs, runtime name)``: onnxruntime CPU, or ``onnx.reference`` for
    a bf16 graph onnxruntime has no CPU kernels for."""
    try:
        sess = ort_session(path, providers=["CPUExecutionProvider"])
        return (lambda feeds: sess.run(None, feeds)), "onnxruntime CPU"
    except Exception as err:
        text = str(err)
        import onnx

        proto = onnx.load(str(path))
        meta = {p.key: p.value for p in proto.metadata_props}
        if "NOT_IMPLEMENTED" not in text or meta.get("ditkit.precision") != "bf16":
            raise
        from onnx.reference import ReferenceEvaluator

        op = (
            text.split("implementation for ")[-1].split(" node")[0]
            if ("implementation for " in text)
            else "some op"
        )
        ev = ReferenceEvaluator(proto)
        return (
            (lambda feeds: ev.run(None, feeds)),
            f"onnx.reference (onnxruntime CPU has no bf16 kernel for {op})",
        )
