"""Per-step latency of one denoiser under each engine: eager, ``torch.compile``, onnxruntime
(and whether TensorRT is available). ``ditkit bench sample`` prints these rows."""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ditkit.builder import use_backend
from ditkit.deploy.engines import OrtDenoiser
from ditkit.deploy.export import export_onnx
from ditkit.deploy.ort_providers import ProviderError, check_available
from ditkit.runtime.denoiser import Denoiser, compile_denoiser
from ditkit.runtime.denoiser import compile_mode as compile_mode_of
from ditkit.runtime.samplers import Guided
from ditkit.spec.sampling import Sampling

ENGINES = (
    "eager",
    "eager-bf16",
    "compile",
    "onnxruntime",
    "onnxruntime-int8",
    "onnxruntime-openvino",
    "onnxruntime-openvino-bf16",
    "tensorrt",
)
#: the onnxruntime engines: (quantization of the exported file, execution provider on the CPU)
ORT_ENGINES = {
    "onnxruntime": (None, "cpu"),
    "onnxruntime-int8": ("int8", "cpu"),
    "onnxruntime-openvino": (None, "openvino"),
    "onnxruntime-openvino-bf16": (None, "openvino-bf16"),
}


BENCH_SIGMA = 2.0
"""The noise level every timed step is evaluated at (the network's cost does not depend on
it)."""


def bench_sample(
    model,
    objective,
    resolutions,
    sampling: Sampling | None = None,
    *,
    engines=("eager", "onnxruntime"),
    batch: int = 1,
    repeats: int = 10,
    device: str = "cpu",
    threads: int | None = None,
    log=None,
    compile_mode: str = "auto",
    **settings,
) -> list[dict]:
    """Per-step latency (the network work of one sampler step at sigma :data:`BENCH_SIGMA`,
    median of ``repeats`` after 2 warm-up calls) of each engine at each resolution.
    ``sampling`` (a :class:`ditkit.spec.sampling.Sampling`, or its fields one by one as
    ``settings``) sets what a step is: with ``cfg_scale != 1`` it is the guided pair of passes
    (twice the batch, on ``cfg_channels``), as a sampler runs it; its ``seed`` draws the input
    noise. Class-conditional models get label 0. The ``compile`` engine compiles each
    step into one graph in ``compile_mode`` (``runtime.denoiser.compile_mode``). Peak memory: CUDA
    ``max_memory_allocated``; on CPU the process's peak resident set after the engine ran (a
    high-water mark: it never goes down, so later rows include earlier ones).
    ``onnxruntime-int8``: the same export with ``quantize="int8"`` (linear layers in int8; an
    approximation, opt-in). ``onnxruntime-openvino[-bf16]``: the fp32 export run by onnxruntime
    with the OpenVINO execution provider in f32 (or bf16, an approximation;
    ``ort_providers``). ``eager-bf16``: eager under ``torch.autocast`` to bf16, the reduced-
    precision baseline to compare ``onnxruntime-openvino-bf16`` with."""

    sampling = Sampling.of(sampling, **settings)
    say = log or (lambda m: None)
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    threads = threads or torch.get_num_threads()
    model = model.to(dev).eval()
    eager = Denoiser(model, objective)
    rows = []
    tmp = tempfile.TemporaryDirectory(prefix="ditkit-bench-")
    sessions: dict[str, object] = {}
    files: dict[str | None, Path] = {}  # one export per quantization, shared by providers

    def timed(fn, x, s, y):
        for _ in range(2):
            fn(x, s, y)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fn(x, s, y)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        peak = (
            torch.cuda.max_memory_allocated() / 2**20
            if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        # process CPU time: on a machine shared with other jobs, the wall time of a step grows
        # with the time its threads wait for a core; with 1 thread the CPU time does not
        return statistics.median(times) * 1e3, peak, round(statistics.median(cpu) * 1e3, 3)

    def step(den):
        """One sampler step's network work on ``den`` (the guided pair under CFG)."""
        guided = Guided(den, y, {}, sampling.cfg_scale, None, sampling.cfg_channels)
        return lambda a, b, c: guided(a, BENCH_SIGMA)

    for res in resolutions:
        g = torch.Generator().manual_seed(sampling.seed)
        x = torch.randn(batch, model.spec.input.channels, *res, generator=g).to(dev)
        s = torch.full((batch,), BENCH_SIGMA, device=dev)
        classes = model.spec.conditioning.classes
        y = torch.zeros(batch, dtype=torch.long, device=dev) if classes else None
        for engine in engines:
            row = {
                "engine": engine,
                "resolution": f"{res[0]}x{res[1]}",
                "batch": batch,
                "device": str(dev),
                "threads": threads,
                "ms_per_step": None,
                "cpu_ms_per_step": None,
                "peak_mib": None,
                "note": "",
            }
            try:
                with torch.no_grad(), use_backend("auto"):
                    if engine == "eager":
                        row["ms_per_step"], row["peak_mib"], row["cpu_ms_per_step"] = timed(
                            step(eager), x, s, y
                        )
                    elif engine == "eager-bf16":
                        eager_step = step(eager)

                        def bf16(a, b, c, eager_step=eager_step):
                            with torch.autocast(dev.type, dtype=torch.bfloat16):
                                return eager_step(a, b, c)

                        row["ms_per_step"], row["peak_mib"], row["cpu_ms_per_step"] = timed(
                            bf16, x, s, y
                        )
                    elif engine == "compile":  # one graph per step (fullgraph)
                        compiled = compile_denoiser(Denoiser(model, objective), compile_mode, dev)
                        t0 = time.perf_counter()
                        step(compiled)(x, s, y)
                        row["note"] = (
                            f"compile {time.perf_counter() - t0:.1f} s, mode "
                            f"{compile_mode_of(compile_mode, dev, False)}"
                        )
                        row["ms_per_step"], row["peak_mib"], row["cpu_ms_per_step"] = timed(
                            step(compiled), x, s, y
                        )
                    elif engine in ORT_ENGINES:
                        quantize, provider = ORT_ENGINES[engine]
                        if engine not in sessions:
                            try:  # before the export: like tensorrt, a row that says why
                                check_available(provider)
                            except ProviderError as err:
                                row["note"] = str(err)
                                rows.append(row)
                                continue
                            if quantize not in files:  # one export per quantization
                                files[quantize] = Path(tmp.name) / f"{quantize or 'fp32'}.onnx"
                                say(f"exporting to ONNX for {engine} ...")
                                export_onnx(
                                    model.cpu(),
                                    objective,
                                    files[quantize],
                                    check=False,
                                    resolution=tuple(resolutions[0]),
                                    quantize=quantize,
                                )
                                model.to(dev)
                            sessions[engine] = OrtDenoiser(
                                files[quantize], device=dev, threads=threads, ort_provider=provider
                            )
                        row["ms_per_step"], row["peak_mib"], row["cpu_ms_per_step"] = timed(
                            step(sessions[engine]), x, s, y
                        )
                    elif engine == "tensorrt":
                        from ditkit.deploy.tensorrt import TensorRTUnavailable, _trt

                        try:
                            _trt()
                        except TensorRTUnavailable as err:
                            row["note"] = str(err).split(":")[0]
                            rows.append(row)
                            continue
                        row["note"] = "use `ditkit trt build` then TrtDenoiser (not automated)"
                    else:
                        raise ValueError(
                            f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}"
                        )
            except ValueError:
                raise
            except Exception as err:  # an engine that cannot run here is a row, not a crash
                row["note"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            say(f"{engine} {row['resolution']}: {row['ms_per_step']} ms {row['note']}")
            rows.append(row)
    tmp.cleanup()
    for row in rows:
        base = next(
            (r for r in rows if r["engine"] == "eager" and r["resolution"] == row["resolution"]),
            None,
        )
        row["vs_eager"] = (
            round(row["ms_per_step"] / base["ms_per_step"], 3)
            if base and base["ms_per_step"] and row["ms_per_step"]
            else None
        )
        row["cpu_vs_eager"] = (
            round(row["cpu_ms_per_step"] / base["cpu_ms_per_step"], 3)
            if base and base.get("cpu_ms_per_step") and row.get("cpu_ms_per_step")
            else None
        )
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (
        "engine",
        "resolution",
        "batch",
        "ms/step",
        "x eager",
        "CPU x eager",
        "peak MiB",
        "note",
    )
    lines = [head]
    for r in rows:
        lines.append(
            (
                r["engine"],
                r["resolution"],
                str(r["batch"]),
                "-" if r["ms_per_step"] is None else f"{r['ms_per_step']:.2f}",
                "-" if r.get("vs_eager") is None else f"{r['vs_eager']:.2f}",
                "-" if r.get("cpu_vs_eager") is None else f"{r['cpu_vs_eager']:.2f}",
                "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}",
                r["note"],
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
