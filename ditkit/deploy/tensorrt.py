"""TensorRT 10 engines for exported denoisers -- written against the documented TensorRT 10
Python API and **never executed here**: TensorRT's libraries come from NVIDIA's own package
index, which these machines cannot reach. ``tensorrt`` is imported lazily, inside the functions
that need it; everything else in ditkit works without it, and the tests of this module skip with
a reason where it is missing (the pure-Python parts -- profile parsing, the cache key -- are
tested everywhere).

- :func:`build_engine`: ONNX -> serialized engine with one optimization profile per
  ``--profile`` (min/opt/max of batch, height, width for ``x``; ``sigma`` and ``class_labels``
  follow the batch), precision flags, a persistent timing cache, and an engine cache keyed by
  (ONNX sha256, profiles, precision, TensorRT version, GPU name and compute capability).
  ``refit_from``: an engine built with the REFIT flag gets the ONNX file's weights instead of a
  rebuild (same graph, new weights -- e.g. a later checkpoint of the same spec).
- :class:`TrtDenoiser`: the engine as a sampler denoiser (``denoise``, ``noise_range``,
  ``null_class``, read from the ONNX metadata), torch CUDA tensors bound directly, and a CUDA
  graph captured per fixed input shape.
- :func:`compile_torch_tensorrt`: the ``torch_tensorrt`` alternative (dynamo IR).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ditkit.deploy.export import ExportGraph, example_inputs
from ditkit.deploy.graph_io import aux_inputs, check_shape, graph_feeds, rules_from_metadata
from ditkit.errors import UserError
from ditkit.files import atomic_path
from ditkit.runtime.checkpoint import spec_from_metadata
from ditkit.runtime.denoiser import NoiseRange


class TensorRTUnavailable(RuntimeError):
    """``tensorrt`` (or a CUDA device) is missing."""


class TensorRTError(UserError):
    """A build profile, ONNX file or engine request that cannot work (the message says why)."""


def _trt():
    try:
        import tensorrt as trt
    except ImportError:
        from ditkit.errors import missing_text

        raise TensorRTUnavailable(
            missing_text("tensorrt", "building a TensorRT 10 engine on a CUDA GPU")
            + "; `ditkit export --target tensorrt-10.x` still writes an ONNX file TensorRT's "
            "parser accepts"
        ) from None
    if not trt.__version__.startswith("10."):
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} found; ditkit targets TensorRT 10")
    return trt


# -------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Shape:
    batch: int
    height: int
    width: int

    def text(self) -> str:
        return f"{self.batch}x{self.height}x{self.width}"


@dataclass(frozen=True)
class Profile:
    min: Shape
    opt: Shape
    max: Shape


def parse_profile(text: str) -> Profile:
    """``MIN/OPT/MAX`` with each ``BxH`` or ``BxHxW`` (e.g. ``1x256/2x512/4x1024x768``), or by
    the names of the exported graph's dimensions: ``batch=1/2/4,height=256/512/1024`` (with
    ``width=...``; a missing width is the height, a missing batch 1/1/1)."""
    if "=" in text:
        return _parse_named_profile(text)
    parts = text.split("/")
    if len(parts) != 3:
        raise TensorRTError(
            f"--profile {text!r}: use MIN/OPT/MAX, each BxH or BxHxW, e.g. "
            "1x256/2x512/4x1024, or batch=1/2/4,height=256/512/1024"
        )
    shapes = []
    for part in parts:
        try:
            nums = [int(v) for v in part.lower().split("x")]
        except ValueError:
            nums = []
        if len(nums) not in (2, 3) or min(nums) <= 0:
            raise TensorRTError(f"--profile {text!r}: {part!r} is not BxH or BxHxW")
        shapes.append(Shape(nums[0], nums[1], nums[-1]))
    return _ordered(text, *shapes)


def _parse_named_profile(text: str) -> Profile:
    values: dict[str, list[int]] = {}
    for item in text.split(","):
        name, _, spec = item.partition("=")
        name = name.strip().lower()
        if name not in ("batch", "height", "width") or name in values:
            raise TensorRTError(
                f"--profile {text!r}: {name!r} is not one of batch, height, width (each once)"
            )
        try:
            nums = [int(v) for v in spec.split("/")]
        except ValueError:
            nums = []
        if len(nums) != 3 or min(nums) <= 0:
            raise TensorRTError(f"--profile {text!r}: {name} needs MIN/OPT/MAX, e.g. 256/512/1024")
        values[name] = nums
    if "height" not in values:
        raise TensorRTError(f"--profile {text!r}: give height=MIN/OPT/MAX")
    batch = values.get("batch", [1, 1, 1])
    width = values.get("width", values["height"])
    return _ordered(text, *(Shape(batch[i], values["height"][i], width[i]) for i in range(3)))


def _ordered(text: str, lo: Shape, opt: Shape, hi: Shape) -> Profile:
    for f in ("batch", "height", "width"):
        if not getattr(lo, f) <= getattr(opt, f) <= getattr(hi, f):
            raise TensorRTError(f"--profile {text!r}: {f} must satisfy min <= opt <= max")
    return Profile(lo, opt, hi)


def check_profile(profile: Profile, rules) -> None:
    """Every corner must be a valid shape of the exported model (its resolution rule)."""
    for s in (profile.min, profile.opt, profile.max):
        for n, rule, name in ((s.height, rules[0], "height"), (s.width, rules[1], "width")):
            if not rule.valid(n):
                raise TensorRTError(
                    f"--profile: {name} {n} is not a valid size for this model ({rule.text()})"
                )


# -------------------------------------------------------------------------------- cache


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def engine_cache_key(
    onnx_sha256: str, profiles: list[Profile], precision: str, trt_version: str, gpu: str
) -> str:
    """What an engine depends on: the graph and weights, the shapes it was tuned for, the
    precision, the TensorRT version and the GPU (engines are not portable across either)."""
    data = json.dumps(
        {
            "onnx": onnx_sha256,
            "precision": precision,
            "trt": trt_version,
            "gpu": gpu,
            "profiles": [[p.min.text(), p.opt.text(), p.max.text()] for p in profiles],
        },
        sort_keys=True,
    )
    return hashlib.sha256(data.encode()).hexdigest()[:24]


def gpu_identity() -> str:

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines need a CUDA GPU; none is visible")
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{p.name} sm_{p.major}{p.minor}"


def _atomic_write(path: Path, data: bytes) -> None:

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


# -------------------------------------------------------------------------------- build


def build_engine(
    onnx_path: str | os.PathLike,
    profiles: list[Profile],
    *,
    precision: str = "fp16",
    out: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    workspace_gib: float | None = None,
    refit_from: str | os.PathLike | None = None,
    log=print,
) -> Path:
    """Build (or take from the engine cache, or refit) a TensorRT engine for ``onnx_path``."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise TensorRTError(f"{onnx_path}: no such ONNX file (write one with `ditkit export`)")
    if not profiles:
        raise TensorRTError("give at least one --profile MIN/OPT/MAX")
    rules = _rules_of(onnx_path)
    for p in profiles:
        check_profile(p, rules)
    trt = _trt()
    gpu = gpu_identity()
    digest = file_sha256(onnx_path)
    key = engine_cache_key(digest, profiles, precision, trt.__version__, gpu)
    cache = Path(cache_dir) if cache_dir else onnx_path.parent / ".trt-cache"
    cached = cache / f"{onnx_path.stem}-{key}.engine"
    out = Path(out) if out else onnx_path.with_suffix(f".{precision}.engine")
    logger = trt.Logger(trt.Logger.WARNING)

    if refit_from is not None:
        data = _refit(trt, logger, Path(refit_from), onnx_path)
        _atomic_write(out, data)
        log(f"refitted {refit_from} with the weights of {onnx_path} -> {out}")
        return out
    if cached.is_file():
        _atomic_write(out, cached.read_bytes())
        log(f"engine cache hit ({cached.name})")
        return out

    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(
            f"TensorRT's ONNX parser rejected {onnx_path}: {errors} (re-export "
            "with --target tensorrt-10.N for your TensorRT minor version)"
        )
    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    config.set_flag(trt.BuilderFlag.REFIT)  # so later checkpoints can be refitted in
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name in names:
            if name == "x":
                c = network.get_input(names.index("x")).shape[1]
                prof.set_shape(
                    "x", *[(s.batch, c, s.height, s.width) for s in (p.min, p.opt, p.max)]
                )
            else:  # sigma, class_labels, cfg_scale: (batch,); aux inputs: (batch, dims)
                rest = tuple(network.get_input(names.index(name)).shape)[1:]
                prof.set_shape(name, *[(b, *rest) for b in (p.min.batch, p.opt.batch, p.max.batch)])
        config.add_optimization_profile(prof)

    timing_key = hashlib.sha256((trt.__version__ + gpu).encode()).hexdigest()[:16]
    timing_path = cache / f"timing-{timing_key}.cache"
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    log(
        f"building TensorRT {trt.__version__} engine ({precision}, {len(profiles)} profile(s)) "
        f"on {gpu} ..."
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build an engine for {onnx_path} (see its log)")
    data = bytes(serialized)
    _atomic_write(timing_path, bytes(config.get_timing_cache().serialize()))
    _atomic_write(cached, data)
    _atomic_write(out, data)
    return out


def _refit(trt, logger, engine_path: Path, onnx_path: Path) -> bytes:
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise TensorRTError(f"{engine_path}: not a TensorRT engine for this TensorRT/GPU")
    if not engine.refittable:
        raise TensorRTError(
            f"{engine_path}: built without REFIT; rebuild it with `ditkit trt "
            "build` (which sets it)"
        )
    refitter = trt.Refitter(engine, logger)
    onnx_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not onnx_refitter.refit_from_file(str(onnx_path)):
        errors = "; ".join(str(onnx_refitter.get_error(i)) for i in range(onnx_refitter.num_errors))
        raise TensorRTError(
            f"cannot refit {engine_path} from {onnx_path}: {errors} (the graphs "
            "differ; build a new engine)"
        )
    if not refitter.refit_cuda_engine():
        raise TensorRTError(
            f"refitting {engine_path} failed (missing weights: {refitter.get_missing_weights()})"
        )
    return bytes(engine.serialize())


def _rules_of(onnx_path: Path):
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if "ditkit.resolution_rule" not in meta:
        raise TensorRTError(f"{onnx_path}: no ditkit metadata; export it with `ditkit export`")
    return rules_from_metadata(meta)


# -------------------------------------------------------------------------------- runner


class TrtDenoiser:
    """A TensorRT engine as a sampler denoiser. ``onnx_path`` supplies the metadata (spec,
    objective); inputs are torch CUDA tensors, bound by address; the first call at a new shape
    sets the shapes and captures a CUDA graph that later calls replay."""

    def __init__(
        self, engine_path: str | os.PathLike, onnx_path: str | os.PathLike, cuda_graphs: bool = True
    ):
        import onnx

        trt = _trt()
        proto = onnx.load(str(onnx_path), load_external_data=False)
        meta = {p.key: p.value for p in proto.metadata_props}
        self.spec, self.objective = spec_from_metadata(meta, str(onnx_path))
        self.noise_range = NoiseRange.of(self.objective)
        self.null_class = self.spec.null_label
        self.rules = _rules_of(Path(onnx_path))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(
            Path(engine_path).read_bytes()
        )
        if self.engine is None:
            raise TensorRTError(f"{engine_path}: not a TensorRT engine for this TensorRT/GPU")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [
            n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT
        ]
        self.cuda_graphs = cuda_graphs
        self._graphs: dict = {}
        self.stream = torch.cuda.Stream()
        self.aux = aux_inputs(
            (i.name, [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in proto.graph.input
        )
        self.guides_inside = "cfg_scale" in self.names
        self.cfg_channels = json.loads(meta.get("ditkit.cfg", "{}")).get("channels")

    @property
    def learned_variance(self) -> bool:
        return "var_values" in self.outputs

    def guided(self, x, sigma, class_labels, scale, **cond):
        """CFG inside an engine built from a ``--cfg`` graph (see ``OrtDenoiser.guided``)."""
        if not self.guides_inside:
            raise TensorRTError("this engine's graph was exported without --cfg")
        return self._run(x, sigma, class_labels, scale, cond)

    def denoise(self, x, sigma, class_labels=None, **cond):
        return self._run(x, sigma, class_labels, None, cond)

    def _run(self, x, sigma, class_labels, scale, cond):

        check_shape(self.spec, tuple(x.shape), self.rules, "x")
        feeds = graph_feeds(
            x,
            sigma,
            class_labels,
            scale,
            cond,
            names=self.names,
            null_class=self.null_class,
            aux=self.aux,
        )
        key = tuple(x.shape)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._prepare(key, feeds)
        inputs, outputs, graph = entry
        for name, t in feeds.items():
            inputs[name].copy_(t)
        with torch.cuda.stream(self.stream):
            if graph is not None:
                graph.replay()
            else:
                self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        outs = [outputs[n].clone() for n in self.outputs]
        return outs[0].to(x.dtype), (outs[1].to(x.dtype) if len(outs) > 1 else None)

    def _prepare(self, key, feeds):

        inputs = {n: torch.empty_like(t) for n, t in feeds.items()}
        for n, t in inputs.items():
            self.context.set_input_shape(n, tuple(t.shape))
            self.context.set_tensor_address(n, t.data_ptr())
        outputs = {
            n: torch.empty(key, dtype=torch.float32, device=feeds["x"].device) for n in self.outputs
        }
        for n, t in outputs.items():
            self.context.set_tensor_address(n, t.data_ptr())
        graph = None
        with torch.cuda.stream(self.stream):
            self.context.execute_async_v3(self.stream.cuda_stream)  # warm-up (and allocations)
        self.stream.synchronize()
        if self.cuda_graphs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self.context.execute_async_v3(self.stream.cuda_stream)
        entry = (inputs, outputs, graph)
        self._graphs = {key: entry}  # one shape at a time: addresses are per context
        return entry


def compile_torch_tensorrt(denoiser, example_shape, precision: str = "fp16"):
    """The torch_tensorrt path: ``torch_tensorrt.compile`` (dynamo IR) of the export graph at a
    fixed example shape; returns a callable ``(x, sigma[, class_labels]) -> outputs``."""
    try:
        import torch_tensorrt
    except ImportError:
        from ditkit.errors import missing_text

        raise TensorRTUnavailable(
            missing_text("torch_tensorrt", "the torch_tensorrt engine")
            + " (torch-tensorrt must match your torch)"
        ) from None

    graph = ExportGraph(denoiser.model, denoiser.objective).cuda().eval()
    args = tuple(
        a.cuda() for a in example_inputs(graph, example_shape[0], tuple(example_shape[2:]))
    )
    dtypes = {
        "fp32": {torch.float32},
        "fp16": {torch.float16, torch.float32},
        "bf16": {torch.bfloat16, torch.float32},
    }[precision]
    return torch_tensorrt.compile(graph, ir="dynamo", inputs=list(args), enabled_precisions=dtypes)
