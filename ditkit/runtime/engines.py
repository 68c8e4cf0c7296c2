"""onnxruntime engines that the samplers drive exactly like the eager denoiser.

:class:`OrtDenoiser` opens an ONNX file written by ``ditkit export`` and reads everything it
needs from the file's ``metadata_props`` (the spec, the objective, the resolution rule), so
``sample(OrtDenoiser("model.onnx"), ...)`` needs no other file. On CUDA it uses IO binding:
inputs and outputs stay on the GPU as torch tensors and the sampling loop never copies through
the host (that path has not been executed here: these machines have no GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ditkit import spec as S
from ditkit.errors import UserError

from .denoiser import NoiseRange

_TORCH_TO_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def default_providers(device: str | torch.device = "cpu") -> list[str]:
    """CUDA (then CPU) on a CUDA device when onnxruntime has it; CPU otherwise."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if torch.device(device).type == "cuda":
        order = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        chosen = [p for p in order if p in available]
        if not chosen:
            raise RuntimeError("device cuda asked for, but this onnxruntime has no CUDA "
                               "provider; install onnxruntime-gpu (`pip install ditkit[gpu]`)")
        return chosen + ["CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(path: str | Path, providers: list | None = None, threads: int | None = None):
    """An ``InferenceSession`` with full graph optimisation."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such ONNX file (write one with `ditkit export`)")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    providers = providers or ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as err:  # noqa: BLE001 - onnxruntime's own exception classes
        raise onnx_error(path, err, providers) from None


class OnnxModelError(UserError):
    """An ONNX file that onnxruntime cannot load or run here."""


def onnx_error(path: Path, err: Exception, providers: list) -> OnnxModelError:
    """A one-line explanation of an onnxruntime failure to load/run ``path``."""
    text = str(err)
    kind = type(err).__name__
    names = [p if isinstance(p, str) else p[0] for p in providers]
    if kind == "InvalidProtobuf" or "Protobuf parsing failed" in text:
        return OnnxModelError(f"{path}: not an ONNX model (the file does not parse as one); "
                              "`ditkit export` writes ONNX files, `ditkit sample` also takes "
                              "a .safetensors checkpoint")
    if kind == "NotImplemented" or "NOT_IMPLEMENTED" in text:
        bf16 = "bfloat16" in text or "bf16" in text.lower()
        hint = ("this bf16 graph needs a runtime with bf16 kernels: onnxruntime CUDA "
                "(--device cuda) or TensorRT; for onnxruntime on CPU export it with "
                "--precision fp32" if bf16 or "CUDAExecutionProvider" not in names else
                "export it with --precision fp32")
        first = text.strip().splitlines()[0][:200] if text.strip() else kind
        return OnnxModelError(f"{path}: onnxruntime ({', '.join(names)}) cannot run an "
                              f"operation of this graph ({first}); {hint}")
    first = text.strip().splitlines()[0][:300] if text.strip() else kind
    return OnnxModelError(f"{path}: onnxruntime cannot load this model ({kind}: {first})")


def graph_feeds(x: torch.Tensor, sigma, class_labels, scale, cond: dict, *, names: list[str],
                null_class: int | None, aux: dict[str, int]) -> dict[str, torch.Tensor]:
    """The inputs of an exported graph (named ``names``) as torch tensors on ``x``'s device:
    ``sigma`` expanded to ``(B,)``, the null class for missing labels, zeros for missing
    auxiliary inputs (as the model does), ``cfg_scale`` (1 = conditional) for a ``--cfg``
    graph. Shared by the onnxruntime and TensorRT runners."""
    unknown = sorted(set(cond) - set(aux))
    if unknown:
        raise ValueError(f"unknown auxiliary input(s) {unknown}; this graph takes "
                         f"{sorted(aux) or 'none'}")
    b = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(b)
    feeds = {"x": x.float(), "sigma": sigma.float()}
    if "class_labels" in names:
        if class_labels is None:
            if null_class is None:
                raise ValueError("this model needs class_labels (its spec has no null class)")
            class_labels = torch.full((b,), null_class, dtype=torch.long)
        feeds["class_labels"] = class_labels.to(x.device, torch.long)
    elif class_labels is not None:
        raise ValueError("class_labels given but the model has no class conditioning")
    for name, dims in aux.items():
        value = cond.get(name)
        value = (torch.zeros(b, dims, device=x.device) if value is None else
                 torch.as_tensor(value, device=x.device).float())
        if value.shape != (b, dims):
            raise ValueError(f"auxiliary input {name}: expected shape ({b}, {dims}), got "
                             f"{tuple(value.shape)}")
        feeds[name] = value
    if "cfg_scale" in names:
        w = torch.as_tensor(1.0 if scale is None else scale, dtype=torch.float32,
                            device=x.device)
        feeds["cfg_scale"] = w.expand(b) if w.ndim == 0 else w
    return {k: v.contiguous() for k, v in feeds.items()}


def aux_inputs(inputs) -> dict[str, int]:
    """``{name: dims}`` of the auxiliary conditioning inputs among a graph's ``(name, shape)``
    inputs (every input but x, sigma, class_labels and cfg_scale)."""
    return {name: int(shape[1]) for name, shape in inputs
            if name not in ("x", "sigma", "class_labels", "cfg_scale")}


class OrtDenoiser:
    """A ``ditkit export`` ONNX file as a sampler denoiser: ``denoise(x, sigma, labels) ->
    (x0, var_values | None)``, plus ``noise_range`` and ``null_class`` from its metadata.

    ``device``: where the torch tensors the sampler passes live (``cpu`` or ``cuda[:i]``)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 providers: list | None = None, threads: int | None = None):
        from .checkpoint import spec_from_metadata
        from .export import AxisRule

        self.path = Path(path)
        self.device = torch.device(device)
        self.session = ort_session(self.path, providers or default_providers(self.device),
                                   threads)
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        spec, objective = spec_from_metadata(meta, str(self.path))
        if objective is None:
            raise ValueError(f"{self.path}: no ditkit.objective in its metadata_props; "
                             "re-export it with `ditkit export`")
        self.spec: S.ModelSpec = spec
        self.objective = objective
        self.metadata = meta
        self.noise_range = NoiseRange.of(objective)
        classes = spec.conditioning.classes
        self.null_class = classes.count if classes is not None and classes.null_class else None
        rule = json.loads(meta.get("ditkit.resolution_rule", "{}"))
        self.rules = None
        if rule:
            self.rules = tuple(AxisRule(rule[a]["min"], rule[a]["step"], rule[a]["max"])
                               for a in ("height", "width"))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # auxiliary conditioning inputs (name -> dims), as the graph declares them
        self.aux = aux_inputs((i.name, i.shape) for i in self.session.get_inputs())
        # a graph exported with --cfg batches both passes itself (see samplers.Guided)
        self.guides_inside = "cfg_scale" in self.input_names
        cfg = json.loads(meta.get("ditkit.cfg", "{}"))
        self.cfg_channels = cfg.get("channels")
        self.calls = 0

    @property
    def learned_variance(self) -> bool:
        return "var_values" in self.output_names

    def __call__(self, x, sigma, class_labels=None, **cond):
        return self.denoise(x, sigma, class_labels, **cond)[0]

    def denoise(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None,
                **cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x0, var_values | None)``; a ``--cfg`` graph runs with ``cfg_scale = 1`` (the
        conditional output)."""
        return self._run(x, sigma, class_labels, None, cond)

    def guided(self, x: torch.Tensor, sigma, class_labels: torch.Tensor, scale,
               **cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Classifier-free guidance inside a graph exported with ``--cfg``: one call, both
        passes batched in the graph. ``scale``: a number or ``(B,)``."""
        if not self.guides_inside:
            raise ValueError(f"{self.path} was exported without --cfg (no cfg_scale input)")
        if class_labels is None:
            raise ValueError("classifier-free guidance needs class_labels")
        return self._run(x, sigma, class_labels, scale, cond)

    def _run(self, x, sigma, class_labels, scale, cond):
        from .export import check_shape

        check_shape(self.spec, tuple(x.shape), self.rules, "x")
        feeds = graph_feeds(x, sigma, class_labels, scale, cond, names=self.input_names,
                            null_class=self.null_class, aux=self.aux)
        self.calls += 1
        if x.device.type == "cuda":
            outs = self._run_bound(feeds, x)
        else:
            try:
                raw = self.session.run(self.output_names, {k: v.contiguous().cpu().numpy()
                                                           for k, v in feeds.items()})
            except Exception as err:  # noqa: BLE001 - e.g. NOT_IMPLEMENTED bf16 kernels
                raise onnx_error(self.path, err, self.session.get_providers()) from None
            outs = [torch.from_numpy(r).to(x.dtype) for r in raw]
        return outs[0], (outs[1] if len(outs) > 1 else None)

    def _run_bound(self, feeds: dict, x: torch.Tensor) -> list[torch.Tensor]:
        """IO binding: bind torch CUDA buffers as inputs and preallocated outputs."""
        binding = self.session.io_binding()
        keep = []
        for name, t in feeds.items():
            t = t.contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", t.device.index or 0, _TORCH_TO_NP[t.dtype],
                               tuple(t.shape), t.data_ptr())
        outs = []
        for name in self.output_names:
            o = torch.empty(x.shape, dtype=torch.float32, device=x.device)
            binding.bind_output(name, "cuda", o.device.index or 0, np.float32, tuple(o.shape),
                                o.data_ptr())
            outs.append(o)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return [o.to(x.dtype) for o in outs]


# -------------------------------------------------------------------------------- benchmark

ENGINES = ("eager", "compile", "onnxruntime", "tensorrt")


def bench_sample(model, objective, resolutions, *, engines=("eager", "onnxruntime"),
                 batch: int = 1, repeats: int = 10, device: str = "cpu",
                 threads: int | None = None, log=None) -> list[dict]:
    """Per-step latency (one denoiser evaluation at a fixed sigma, median of ``repeats`` after
    2 warm-up calls) of each engine at each resolution. Peak memory: CUDA
    ``max_memory_allocated``; on CPU the process's peak resident set after the engine ran (a
    high-water mark: it never goes down, so later rows include earlier ones)."""
    import resource
    import statistics
    import tempfile
    import time

    from ditkit.builder import use_backend

    from .denoiser import Denoiser
    from .export import export_onnx

    say = log or (lambda m: None)
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    threads = threads or torch.get_num_threads()
    model = model.to(dev).eval()
    eager = Denoiser(model, objective)
    rows = []
    tmp = tempfile.TemporaryDirectory(prefix="ditkit-bench-")
    ort = None

    def timed(fn, x, s, y):
        for _ in range(2):
            fn(x, s, y)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x, s, y)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return statistics.median(times) * 1e3, peak

    for res in resolutions:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, model.spec.input.channels, *res, generator=g).to(dev)
        s = torch.full((batch,), 2.0, device=dev)
        classes = model.spec.conditioning.classes
        y = torch.zeros(batch, dtype=torch.long, device=dev) if classes else None
        for engine in engines:
            row = {"engine": engine, "resolution": f"{res[0]}x{res[1]}", "batch": batch,
                   "device": str(dev), "threads": threads, "ms_per_step": None,
                   "peak_mib": None, "note": ""}
            try:
                with torch.no_grad(), use_backend("auto"):
                    if engine == "eager":
                        row["ms_per_step"], row["peak_mib"] = timed(
                            lambda a, b, c: eager(a, b, c), x, s, y)
                    elif engine == "compile":
                        compiled = torch.compile(eager, dynamic=False)
                        t0 = time.perf_counter()
                        compiled(x, s, y)
                        row["note"] = f"compile {time.perf_counter() - t0:.1f} s"
                        row["ms_per_step"], row["peak_mib"] = timed(
                            lambda a, b, c: compiled(a, b, c), x, s, y)
                    elif engine == "onnxruntime":
                        if ort is None:
                            path = Path(tmp.name) / "model.onnx"
                            say("exporting to ONNX for onnxruntime ...")
                            export_onnx(model.cpu(), objective, path, check=False,
                                        resolution=tuple(resolutions[0]))
                            model.to(dev)
                            ort = OrtDenoiser(path, device=dev, threads=threads)
                        row["ms_per_step"], row["peak_mib"] = timed(
                            lambda a, b, c: ort.denoise(a, b, c), x, s, y)
                    elif engine == "tensorrt":
                        from .tensorrt import TensorRTUnavailable, _trt

                        try:
                            _trt()
                        except TensorRTUnavailable as err:
                            row["note"] = str(err).split(":")[0]
                            rows.append(row)
                            continue
                        row["note"] = "use `ditkit trt build` then TrtDenoiser (not automated)"
                    else:
                        raise ValueError(f"unknown engine {engine!r}; choose from "
                                         f"{', '.join(ENGINES)}")
            except ValueError:
                raise
            except Exception as err:  # an engine that cannot run here is a row, not a crash
                row["note"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            say(f"{engine} {row['resolution']}: {row['ms_per_step']} ms {row['note']}")
            rows.append(row)
    tmp.cleanup()
    for row in rows:
        base = next((r for r in rows if r["engine"] == "eager"
                     and r["resolution"] == row["resolution"]), None)
        row["vs_eager"] = (round(row["ms_per_step"] / base["ms_per_step"], 3)
                           if base and base["ms_per_step"] and row["ms_per_step"] else None)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = ("engine", "resolution", "batch", "ms/step", "x eager", "peak MiB", "note")
    lines = [head]
    for r in rows:
        lines.append((r["engine"], r["resolution"], str(r["batch"]),
                      "-" if r["ms_per_step"] is None else f"{r['ms_per_step']:.2f}",
                      "-" if r.get("vs_eager") is None else f"{r['vs_eager']:.2f}",
                      "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}", r["note"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
