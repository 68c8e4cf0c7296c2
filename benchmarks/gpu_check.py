"""One prepared GPU check: tests, training throughput, attention kernels, sampling latency, engines.

    python benchmarks/gpu_check.py OUT_DIR [--dry-run] [--only STAGES] [--budget-s 360]
                                   [--cap STAGE=SECONDS ...]

Stages, in order (each under a time cap; the whole run under ``--budget-s``):

``env``        torch / CUDA / GPU / triton / natten / onnxruntime providers / tensorrt versions.
``tests``      ``pytest -m gpu`` (the GPU-marked tests), output in ``OUT_DIR/tests.log``.
``train``      training throughput (img/s, MFU from the accounting's GMACs) of ``hdit-imagenet-128``
               and ``dit-b-2`` in bf16 autocast with AdamW, the fastest neighborhood backend
               (natten if importable, else compiled flex), eager and ``torch.compile``.
``attention``  neighborhood-attention kernels on CUDA: flex, tiled, gather, masked (and natten if
               importable), forward and forward+backward, time and peak memory, 64^2-256^2 tokens.
``sample``     one sampling step (a denoiser evaluation, batch 1, bf16) of ``hdit-imagenet-128`` at
               256^2, 512^2 and 1024^2: eager, CUDA graph (captured eager), ``torch.compile``.
``onnx``       ``ditkit export`` of the same model, then onnxruntime CUDA / TensorRT where they
               import (otherwise the rows say why not).

Results: ``OUT_DIR/results.json`` (every row, every stage's status and time) and
``OUT_DIR/results.md`` (one table per stage), rewritten after every stage, so a run cut short
keeps what it measured. Each stage runs in a child process that reports every row as it is
measured (``OUT_DIR/progress.jsonl``); a stage that outlives its cap is killed and the next one
starts in a fresh child, its finished rows kept.

``--dry-run`` runs every stage at toy sizes on CPU (tiny specs, a few steps, ``torch.compile``
with the ``eager`` backend, ``pytest --collect-only``); what needs CUDA is recorded as
"skipped: no CUDA". CI runs it (``tests/test_gpu_check.py``) so the script does not rot.

Works with torch >= 2.6 (the GPU image these checks were prepared for has 2.11); on a machine
without pydantic see ``benchmarks/fetch_gpu_wheels.sh`` and docs/guides/gpu-check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere: the tree's ditkit first
    sys.path.insert(0, str(ROOT))

STAGES = ("env", "tests", "train", "attention", "sample", "onnx")
#: seconds per stage on a GPU (the sum stays inside the default budget of 6 minutes, which leaves
#: the machine's start inside an 8-minute lease)
CAPS = {"env": 20, "tests": 60, "train": 100, "attention": 50, "sample": 70, "onnx": 60}
DRY_CAPS = {"env": 20, "tests": 40, "train": 40, "attention": 30, "sample": 40, "onnx": 60}

#: dense bf16 tensor-core peak (FLOP/s, no sparsity) from NVIDIA's data sheets, for MFU
PEAK_BF16 = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),
    ("A100", 312.0e12),
    ("L40S", 362.0e12),
    ("A10G", 70.0e12),
    ("L4", 121.0e12),
)


# -------------------------------------------------------------------------------- child side


class Reporter:
    """Appends one JSON line per event to ``progress.jsonl`` (flushed at once)."""

    def __init__(self, out: Path):
        self.path = out / "progress.jsonl"

    def emit(self, **event) -> None:
        event["t"] = time.time()
        with open(self.path, "a") as f:
            f.write(json.dumps(event, default=str) + "\n")
            f.flush()

    def row(self, stage: str, **row) -> None:
        self.emit(event="row", stage=stage, row=row)


class Ctx:
    """What every stage gets: the output folder, the device, sizes and its deadline."""

    def __init__(self, out: Path, dry: bool, deadline: float, report: Reporter, stage: str):
        import torch

        self.out, self.dry, self.deadline, self.report, self.stage = (
            out,
            dry,
            deadline,
            report,
            stage,
        )
        from ditkit.device import pick_device  # the commands' own --device rule

        self.cuda = torch.cuda.is_available() and not dry
        self.device = pick_device("cuda" if self.cuda else "cpu")

    def left(self) -> float:
        return self.deadline - time.time()

    def row(self, **row) -> None:
        self.report.row(self.stage, **row)

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn, warmup: int, repeats: int, max_s: float | None = None) -> float:
        """Median milliseconds of ``fn()`` after ``warmup`` calls (stops early at ``max_s``)."""
        for _ in range(warmup):
            fn()
        self.sync()
        times, start = [], time.perf_counter()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
            if max_s is not None and time.perf_counter() - start > max_s:
                break
        return 1e3 * statistics.median(times)

    def peak_reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self, base: int = 0) -> float | None:
        import torch

        if not self.cuda:
            return None
        return round((torch.cuda.max_memory_allocated(self.device) - base) / 2**20, 1)


def _why(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def _oom(err: BaseException) -> bool:
    return "out of memory" in str(err).lower()


def _free_cuda():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- env


def stage_env(ctx: Ctx) -> None:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "dry_run": ctx.dry,
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            peak_bf16_tflops=(_peak(p.name) or 0) / 1e12 or None,
        )
    for mod in ("triton", "natten", "onnxruntime", "onnx", "onnxscript", "tensorrt", "pydantic"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "imported")
        except Exception as err:  # noqa: BLE001 -- any import failure is a finding
            info[mod] = f"not importable ({_why(err)})"
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except Exception:  # noqa: BLE001
        pass
    try:
        info["ditkit_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except Exception:  # noqa: BLE001
        info["ditkit_commit"] = None
    from ditkit.builder import kernels

    info["neighborhood_backend_auto"] = kernels.resolve_backend(ctx.device)
    for k, v in info.items():
        ctx.row(key=k, value=v)


def _peak(name: str) -> float | None:
    for key, flops in PEAK_BF16:
        if key in name:
            return flops
    return None


# ---- tests


def stage_tests(ctx: Ctx) -> None:
    # only the files that mark tests `gpu` (collecting the whole suite costs ~20 s of imports)
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if "mark.gpu" in p.read_text()
    )
    if not files:
        ctx.row(
            command="pytest -m gpu",
            exit_code=None,
            summary="no gpu-marked tests found",
            seconds=0.0,
            log=None,
        )
        return
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        "-rs",
        *files,
    ]
    if ctx.dry:
        cmd.append("--collect-only")
    log = ctx.out / "tests.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
    }
    t0 = time.time()
    with open(log, "w") as f:  # written as pytest goes: a run cut at the cap keeps its log
        try:
            rc = subprocess.run(
                cmd,
                cwd=ROOT,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=max(5.0, ctx.left() - 3),
            ).returncode
        except subprocess.TimeoutExpired:
            rc = None
            f.write("\n[gpu_check] pytest stopped at the stage's time cap\n")
    text = log.read_text()
    summary = next(
        (
            ln.strip("= ")
            for ln in reversed(text.splitlines())
            if any(
                w in ln
                for w in (
                    "passed",
                    "failed",
                    "skipped",
                    "error",
                    "no tests ran",
                    "collected",
                    "selected",
                )
            )
        ),
        "",
    )
    ctx.row(
        command=" ".join(cmd[1:]),
        exit_code=rc,
        summary=summary,
        seconds=round(time.time() - t0, 1),
        log="tests.log",
    )


# ---- train


def stage_train(ctx: Ctx) -> None:
    import torch

    from ditkit import spec as S
    from ditkit.builder import describe, kernels

    if ctx.dry:
        cases = [
            ("examples/tiny/tiny-hdit-neighborhood.yaml", S.EDMObjective(), 2),
            ("examples/tiny/tiny-dit.yaml", S.DDPMObjective(), 2),
        ]
        warmup, steps = 1, 2
    else:
        cases = [
            ("examples/hdit/hdit-imagenet-128.yaml", S.EDMObjective(), 64),
            ("examples/dit/dit-b-2.yaml", S.DDPMObjective(), 128),
        ]
        warmup, steps = 3, 10
    peak = _peak(torch.cuda.get_device_name(ctx.device)) if ctx.cuda else None
    # eager for both models first: the compiled runs (slow to compile) come last
    for compiled in (False, True):
        for path, objective, batch in cases:
            spec = S.load(ROOT / path)
            backend = kernels.resolve_backend(ctx.device)
            if ctx.dry and compiled and path != cases[-1][0]:
                continue  # dry run: one compiled model (the smallest) keeps the path alive
            row = dict(
                model=spec.name,
                resolution=list(spec.input.resolution),
                batch=batch,
                compile=compiled,
                precision="bf16 autocast" if ctx.cuda else "fp32",
                neighborhood_backend=backend,
                img_per_s=None,
                mfu=None,
                peak_mib=None,
                step_ms=None,
                note="",
            )
            if ctx.left() < 10:
                row["note"] = "skipped: stage time cap reached"
                ctx.row(**row)
                continue
            try:
                _train_case(ctx, spec, objective, batch, compiled, warmup, steps, row)
                gmacs = describe(spec).gmacs
                row["gmacs_fwd"] = float(f"{gmacs:.4g}")
                if peak and row["img_per_s"]:
                    # training = forward + backward = 3x the forward's multiply-adds, 2 FLOPs each
                    row["mfu"] = round(row["img_per_s"] * 6 * gmacs * 1e9 / peak, 4)
                elif not ctx.cuda:
                    row["note"] = (row["note"] + "; " if row["note"] else "") + "MFU: no CUDA"
            except Exception as err:  # noqa: BLE001 -- a failing case is a row
                row["note"] = ("OOM at this batch: " if _oom(err) else "failed: ") + _why(err)
                traceback.print_exc()
            ctx.row(**row)
            _free_cuda()


def _train_case(ctx, spec, objective, batch, compiled, warmup, steps, row) -> None:
    import torch

    from ditkit.builder import build, kernels
    from ditkit.training.objectives import DiffusionLoss

    dev = ctx.device
    torch.manual_seed(0)
    model = build(spec).to(dev).train()
    net = model
    if compiled:
        # dry run: dynamo's graph capture without inductor's code generation (seconds on CPU)
        net = torch.compile(model, backend="eager" if ctx.dry else "inductor")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if ctx.cuda else {}))
    loss_fn = DiffusionLoss(objective, spec)
    gen = torch.Generator().manual_seed(0)
    c, (h, w) = spec.input.channels, spec.input.resolution
    x0 = (torch.rand(batch, c, h, w, generator=gen) * 2 - 1).to(dev)
    classes = spec.conditioning.classes
    labels = torch.randint(0, classes.count, (batch,), generator=gen).to(dev) if classes else None
    cond = {a.name: torch.zeros(batch, a.dims, device=dev) for a in spec.conditioning.aux}

    def step():
        with (
            torch.autocast(dev.type, dtype=torch.bfloat16, enabled=ctx.cuda),
            kernels.use_backend("auto"),
        ):
            loss, _ = loss_fn(net, x0, labels, gen, 0, **cond)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # first step: compilation, autotuning, allocator growth
    ctx.sync()
    if compiled:
        row["note"] = f"first step {time.perf_counter() - t0:.1f} s (compile)"
    ctx.peak_reset()
    ms = ctx.timed(step, warmup - 1, steps, max_s=max(5.0, ctx.left() - 15))
    row["step_ms"] = round(ms, 2)
    row["img_per_s"] = round(batch / ms * 1e3, 1)
    row["peak_mib"] = ctx.peak_mib()


# ---- attention


def stage_attention(ctx: Ctx) -> None:
    import torch

    from ditkit.builder import kernels

    if ctx.dry:
        grids, batch, heads, d_head, dtype, repeats = (14,), 1, 2, 16, torch.float32, 1
    else:
        grids, batch, heads, d_head, dtype, repeats = (64, 128, 256), 1, 6, 64, torch.bfloat16, 5
    backends = ["flex", "tiled", "gather", "masked"]
    if kernels.natten_available():
        backends.insert(0, "natten")
    ks, dil = (7, 7), (1, 1)
    for grid in grids:
        for backend in backends:
            for mode in ("fwd", "fwd+bwd"):
                row = dict(
                    backend=backend,
                    tokens=f"{grid}x{grid}",
                    mode=mode,
                    batch=batch,
                    heads=heads,
                    d_head=d_head,
                    dtype=str(dtype).replace("torch.", ""),
                    ms=None,
                    peak_mib=None,
                    note="",
                )
                grad = mode == "fwd+bwd"
                need = _attention_gib(backend, grid, batch, heads, d_head, dtype)
                free = torch.cuda.mem_get_info(ctx.device)[0] / 2**30 if ctx.cuda else 8.0
                if ctx.left() < 5:
                    row["note"] = "skipped: stage time cap reached"
                elif not ctx.cuda and grad and backend in ("flex", "natten"):
                    row["note"] = "skipped: no CUDA (no CPU backward)"
                elif need > 0.8 * free:
                    row["note"] = f"skipped: needs ~{need:.0f} GiB > 80% of {free:.0f} GiB free"
                else:
                    try:
                        _attention_case(
                            ctx,
                            backend,
                            grid,
                            batch,
                            heads,
                            d_head,
                            dtype,
                            ks,
                            dil,
                            grad,
                            repeats,
                            row,
                        )
                    except Exception as err:  # noqa: BLE001
                        row["note"] = ("OOM: " if _oom(err) else "failed: ") + _why(err)
                ctx.row(**row)
                _free_cuda()


def _attention_gib(backend, grid, batch, heads, d_head, dtype) -> float:
    """Rough working memory of forward+backward (to skip cases that cannot fit)."""
    import torch

    n, bh, el = grid * grid, batch * heads, 4 if dtype == torch.float32 else 2
    if backend == "masked":  # the n x n mask, scores and their gradient per head
        return n * n * (1 + 3 * el * bh) / 2**30
    return bh * n * d_head * el * 60 / 2**30  # O(n): gathered / tiled copies and gradients


def _attention_case(
    ctx, backend, grid, batch, heads, d_head, dtype, ks, dil, grad, repeats, row
) -> None:
    import torch

    from ditkit.builder import kernels

    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, grid, grid, d_head, generator=g)
        .to(ctx.device, dtype)
        .requires_grad_(grad)
        for _ in range(3)
    )

    def run():
        with torch.set_grad_enabled(grad), kernels.use_backend(backend):
            out = kernels.neighborhood_attention(q, k, v, ks, dil, d_head**-0.5)
            if grad:
                out.backward(torch.ones_like(out))

    run()  # compile / autotune / plans outside the measurement
    ctx.sync()
    base = torch.cuda.memory_allocated(ctx.device) if ctx.cuda else 0
    ctx.peak_reset()
    run()
    ctx.sync()
    row["peak_mib"] = ctx.peak_mib(base)
    row["ms"] = round(ctx.timed(run, 0, repeats, max_s=10), 3)


# ---- sample


def stage_sample(ctx: Ctx) -> None:
    import torch

    from ditkit import spec as S
    from ditkit.builder import build
    from ditkit.runtime.denoiser import Denoiser

    if ctx.dry:
        path, resolutions, repeats = "examples/tiny/tiny-hdit-neighborhood.yaml", (16, 32), 1
    else:
        path, resolutions, repeats = "examples/hdit/hdit-imagenet-128.yaml", (256, 512, 1024), 10
    spec = S.load(ROOT / path)
    torch.manual_seed(0)
    model = build(spec).to(ctx.device).eval()
    den = Denoiser(model, S.EDMObjective())
    engines = ("eager", "cuda_graph", "compile")
    # eager and CUDA graphs at every resolution first; torch.compile (a compile per resolution)
    # last, so a slow compile cannot starve the cheap rows
    order = [(e, r) for e in engines[:2] for r in resolutions] + [
        ("compile", r) for r in (resolutions[:1] if ctx.dry else resolutions)
    ]
    compiled = None
    for engine, res in order:
        row = dict(
            model=spec.name,
            engine=engine,
            resolution=f"{res}x{res}",
            batch=1,
            precision="bf16 autocast" if ctx.cuda else "fp32",
            ms_per_step=None,
            peak_mib=None,
            note="",
        )
        if ctx.left() < 8:
            row["note"] = "skipped: stage time cap reached"
            ctx.row(**row)
            continue
        if engine == "cuda_graph" and not ctx.cuda:
            row["note"] = "skipped: no CUDA"
            ctx.row(**row)
            continue
        try:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, spec.input.channels, res, res, generator=g).to(ctx.device)
            s = torch.full((1,), 2.0, device=ctx.device)
            y = (
                torch.zeros(1, dtype=torch.long, device=ctx.device)
                if (spec.conditioning.classes)
                else None
            )

            def call(fn, x=x, s=s, y=y):  # this iteration's inputs, bound
                with (
                    torch.no_grad(),
                    torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.cuda),
                ):
                    return fn(x, s, y)

            ctx.peak_reset()
            if engine == "eager":
                row["ms_per_step"] = round(ctx.timed(lambda: call(den), 2, repeats, 20), 3)
            elif engine == "cuda_graph":
                graph, static_out = _capture(ctx, lambda: call(den))
                row["ms_per_step"] = round(ctx.timed(graph.replay, 2, repeats, 20), 3)
                del graph, static_out
            else:
                if compiled is None:
                    compiled = torch.compile(
                        den, dynamic=False, backend="eager" if ctx.dry else "inductor"
                    )
                t0 = time.perf_counter()
                call(compiled)
                ctx.sync()
                row["note"] = f"compile {time.perf_counter() - t0:.1f} s"
                row["ms_per_step"] = round(ctx.timed(lambda c=compiled: call(c), 2, repeats, 20), 3)
            row["peak_mib"] = ctx.peak_mib()
        except Exception as err:  # noqa: BLE001
            row["note"] = ("OOM: " if _oom(err) else "failed: ") + _why(err)
            traceback.print_exc()
        ctx.row(**row)
        _free_cuda()


def _capture(ctx, fn):
    """A CUDA graph of ``fn`` (warmed up on a side stream first, as PyTorch requires)."""
    import torch

    stream = torch.cuda.Stream(ctx.device)
    stream.wait_stream(torch.cuda.current_stream(ctx.device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(ctx.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


# ---- onnx


def stage_onnx(ctx: Ctx) -> None:
    import tempfile

    import torch

    from ditkit import spec as S
    from ditkit.builder import build
    from ditkit.deploy.export import export_onnx

    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except Exception as err:  # noqa: BLE001
        ort, providers = None, []
        ctx.row(engine="onnxruntime", note=f"skipped: onnxruntime not importable ({_why(err)})")
    try:
        import tensorrt  # noqa: F401

        trt_note = None
    except Exception as err:  # noqa: BLE001
        trt_note = f"skipped: tensorrt not importable ({_why(err)})"
    if ctx.dry:  # the smallest graph: a one-block tiny DiT, fixed resolution (export is slow)
        path, res, precision, dynamic = "examples/tiny/tiny-dit.yaml", 8, "fp32", ("batch",)
    else:  # the 4M-parameter benchmark HDiT: tracing hdit-imagenet-128 takes minutes of CPU
        path, res, precision, dynamic = (
            "benchmarks/specs/hdit-bench-4m.yaml",
            256,
            "fp16",
            ("batch", "resolution"),
        )
    spec = S.load(ROOT / path)
    if ctx.dry:
        spec = spec.model_copy(update={"levels": [spec.levels[0].model_copy(update={"middle": 1})]})
    objective = spec.default_objective
    torch.manual_seed(0)
    model = build(spec).eval()
    tmp = tempfile.TemporaryDirectory(prefix="gpu-check-")
    onnx_path = Path(tmp.name) / "model.onnx"
    t0 = time.perf_counter()
    try:
        export_onnx(
            model,
            objective,
            onnx_path,
            check=False,
            precision=precision,
            resolution=tuple(spec.input.resolution),
            dynamic=dynamic,
        )
        ctx.row(
            engine="export",
            model=spec.name,
            precision=precision,
            seconds=round(time.perf_counter() - t0, 1),
            mb=round(onnx_path.stat().st_size / 1e6, 1),
            note="ok (CPU trace)",
        )
    except Exception as err:  # noqa: BLE001
        ctx.row(engine="export", model=spec.name, precision=precision, note=f"failed: {_why(err)}")
        traceback.print_exc()
        return
    runs = []
    if ort is not None:
        if ctx.cuda and "CUDAExecutionProvider" in providers:
            runs.append(("onnxruntime-cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]))
        else:
            ctx.row(
                engine="onnxruntime-cuda",
                model=spec.name,
                note=(
                    "skipped: no CUDA"
                    if not ctx.cuda
                    else "skipped: this onnxruntime has no CUDAExecutionProvider "
                    f"({', '.join(providers)})"
                ),
            )
        if ctx.dry:  # the toy stand-in: the same code path on the CPU provider
            runs.append(("onnxruntime-cpu", ["CPUExecutionProvider"]))
    for engine, prov in runs:
        _ort_case(ctx, engine, prov, onnx_path, spec, res, model, objective)
    if trt_note or not ctx.cuda:
        ctx.row(engine="tensorrt", model=spec.name, note=trt_note or "skipped: no CUDA")
    else:
        _trt_case(ctx, onnx_path, spec, res)
    tmp.cleanup()


def _ort_case(ctx, engine, providers, onnx_path, spec, res, model, objective) -> None:
    import torch

    from ditkit.runtime.denoiser import Denoiser
    from ditkit.deploy.engines import OrtDenoiser

    row = dict(
        engine=engine,
        model=spec.name,
        resolution=f"{res}x{res}",
        batch=1,
        ms_per_step=None,
        max_abs_diff_vs_eager=None,
        note="",
    )
    try:
        dev = ctx.device if "CUDAExecutionProvider" in providers else torch.device("cpu")
        runner = OrtDenoiser(onnx_path, device=dev, providers=providers)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, spec.input.channels, res, res, generator=g).to(dev)
        s = torch.full((1,), 2.0, device=dev)
        y = torch.zeros(1, dtype=torch.long, device=dev)
        row["ms_per_step"] = round(
            ctx.timed(lambda: runner.denoise(x, s, y), 2, 1 if ctx.dry else 10, 20), 3
        )
        out = runner.denoise(x, s, y)[0].float().cpu()
        with torch.no_grad():
            ref = Denoiser(model, objective)(x.cpu(), s.cpu(), y.cpu())
        row["max_abs_diff_vs_eager"] = float((out - ref).abs().max())
        row["note"] = "IO binding" if dev.type == "cuda" else "CPU stand-in (dry run)"
    except Exception as err:  # noqa: BLE001
        row["note"] = f"failed: {_why(err)}"
        traceback.print_exc()
    ctx.row(**row)


def _trt_case(ctx, onnx_path, spec, res) -> None:
    import torch

    from ditkit.deploy.tensorrt import TrtDenoiser, build_engine, parse_profile

    row = dict(
        engine="tensorrt",
        model=spec.name,
        resolution=f"{res}x{res}",
        batch=1,
        ms_per_step=None,
        note="",
    )
    try:
        t0 = time.perf_counter()
        engine = build_engine(
            onnx_path,
            [parse_profile(f"1x{res}/1x{res}/1x{res}")],
            precision="fp16",
            cache_dir=ctx.out / "trt-cache",
            log=print,
        )
        build_s = time.perf_counter() - t0
        runner = TrtDenoiser(engine, onnx_path)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, spec.input.channels, res, res, generator=g).to(ctx.device)
        s = torch.full((1,), 2.0, device=ctx.device)
        y = torch.zeros(1, dtype=torch.long, device=ctx.device)
        row["ms_per_step"] = round(ctx.timed(lambda: runner.denoise(x, s, y), 2, 10, 20), 3)
        row["note"] = f"engine build {build_s:.0f} s"
    except Exception as err:  # noqa: BLE001
        row["note"] = f"failed: {_why(err)}"
        traceback.print_exc()
    ctx.row(**row)


STAGE_FUNCS = {
    "env": stage_env,
    "tests": stage_tests,
    "train": stage_train,
    "attention": stage_attention,
    "sample": stage_sample,
    "onnx": stage_onnx,
}


def child(out: Path, stages: list[str], dry: bool, caps: dict[str, float]) -> int:
    """Run ``stages`` in this process, reporting each start, row and end."""
    import torch

    report = Reporter(out)
    if dry:
        torch.set_num_threads(1)
    for stage in stages:
        report.emit(event="start", stage=stage)
        ctx = Ctx(out, dry, time.time() + caps[stage], report, stage)
        if os.environ.get("DITKIT_GPU_CHECK_HANG") == stage:  # tests: a stage that never ends
            time.sleep(3600)
        try:
            STAGE_FUNCS[stage](ctx)
            report.emit(event="end", stage=stage, status="ok")
        except Exception as err:  # noqa: BLE001 -- the next stage still runs
            traceback.print_exc()
            report.emit(event="end", stage=stage, status=f"failed: {_why(err)}")
    return 0


# -------------------------------------------------------------------------------- parent side


def read_progress(out: Path) -> list[dict]:
    path = out / "progress.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            pass
    return events


def collect(events: list[dict], parent_notes: dict[str, str]) -> dict:
    """Stages (status, seconds) and their rows, from the progress events."""
    stages: dict[str, dict] = {}
    for e in events:
        st = stages.setdefault(e["stage"], {"status": "running", "seconds": None, "rows": []})
        if e["event"] == "start":
            st["_t0"] = e["t"]
        elif e["event"] == "row":
            st["rows"].append(e["row"])
        elif e["event"] == "end":
            st["status"] = e["status"]
            st["seconds"] = round(e["t"] - st.get("_t0", e["t"]), 1)
    for name, note in parent_notes.items():
        st = stages.setdefault(name, {"status": "running", "seconds": None, "rows": []})
        if st["status"] == "running" or name not in {e["stage"] for e in events}:
            st["status"] = note
    for st in stages.values():
        st.pop("_t0", None)
    return stages


def write_results(out: Path, meta: dict, stages: dict) -> None:
    doc = {"meta": meta, "stages": stages}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(out / "results.json")
    tmp = out / "results.md.tmp"
    tmp.write_text(markdown(meta, stages))
    tmp.replace(out / "results.md")


def markdown(meta: dict, stages: dict) -> str:
    lines = [
        f"# ditkit GPU check{' (dry run, CPU, toy sizes)' if meta.get('dry_run') else ''}",
        "",
        f"{meta.get('started')}; total {meta.get('seconds', '?')} s; "
        f"command: `{meta.get('command')}`",
        "",
    ]
    env = {r["key"]: r["value"] for r in stages.get("env", {}).get("rows", [])}
    if env:
        lines.append(
            f"GPU: {env.get('gpu', 'none')}; torch {env.get('torch')} (CUDA "
            f"{env.get('cuda_runtime')}); python {env.get('python')}; triton "
            f"{env.get('triton')}; natten {env.get('natten')}; onnxruntime "
            f"{env.get('onnxruntime')} {env.get('onnxruntime_providers', '')}; "
            f"tensorrt {env.get('tensorrt')}; neighborhood backend (auto): "
            f"{env.get('neighborhood_backend_auto')}; ditkit {env.get('ditkit_commit')}"
        )
        lines.append("")
    for name in STAGES:
        st = stages.get(name)
        if st is None or name == "env":
            continue
        lines += [f"## {name}", "", f"status: {st['status']}; {st['seconds']} s", ""]
        rows = st["rows"]
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("| " + " | ".join("---" for _ in cols) + " |")
            for r in rows:
                lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
            lines.append("")
    if "train" in stages:
        lines.append(
            "MFU = img/s x 6 x forward GMACs / dense bf16 peak of the GPU's data sheet "
            "(one multiply-add = 2 FLOPs here; training = 3x the forward)."
        )
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v).replace("|", "/")


def parent(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "progress.jsonl").unlink(missing_ok=True)
    caps = dict(DRY_CAPS if args.dry_run else CAPS)
    for item in args.cap or []:
        name, _, sec = item.partition("=")
        if name not in STAGES or not sec:
            raise SystemExit(f"--cap {item!r}: use STAGE=SECONDS with STAGE in {', '.join(STAGES)}")
        caps[name] = float(sec)
    todo = [s for s in STAGES if s in (args.only.split(",") if args.only else STAGES)]
    unknown = set(args.only.split(",")) - set(STAGES) if args.only else set()
    if unknown:
        raise SystemExit(f"--only {','.join(sorted(unknown))}: choose from {', '.join(STAGES)}")
    start = time.time()
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "dry_run": args.dry_run,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "budget_s": args.budget_s,
        "caps_s": caps,
    }
    notes: dict[str, str] = {}
    while todo:
        left = args.budget_s - (time.time() - start)
        if left < 5:
            for s in todo:
                notes[s] = "skipped: total budget spent"
            break
        child_caps = {s: min(caps[s], left) for s in todo}
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            str(out),
            "--stages",
            ",".join(todo),
            "--caps",
            json.dumps(child_caps),
        ]
        if args.dry_run:
            cmd.append("--dry-run")
        proc = subprocess.Popen(cmd, start_new_session=True)
        current, t_stage, seen = None, time.time(), 0
        while proc.poll() is None:
            time.sleep(0.2)
            events = read_progress(out)
            started = [e for e in events if e["event"] == "start"]
            ended = {e["stage"] for e in events if e["event"] == "end"}
            if started and started[-1]["stage"] != current:
                current, t_stage = started[-1]["stage"], started[-1]["t"]
            over_stage = (
                current is not None
                and current not in ended
                and (time.time() - t_stage > caps[current] + 10)
            )
            over_total = time.time() - start > args.budget_s + 10
            if over_stage or over_total:
                os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started
                proc.wait()
                stage = current or todo[0]
                notes[stage] = (
                    f"killed at its {caps[stage]:.0f} s cap"
                    if over_stage
                    else "killed: total budget spent"
                )
                break
            if len(events) != seen:  # new rows: results on disk stay current
                seen = len(events)
                write_results(
                    out, {**meta, "seconds": round(time.time() - start, 1)}, collect(events, notes)
                )
        events = read_progress(out)
        done = {e["stage"] for e in events if e["event"] == "end"} | set(notes)
        nxt = [s for s in todo if s not in done]
        if nxt and nxt[0] == todo[0]:  # the child died without finishing its first stage
            notes[todo[0]] = f"child exited with code {proc.returncode}"
            nxt = nxt[1:]
        elif nxt:  # it died inside a later stage: that stage is lost, the rest go on
            cur = next((e["stage"] for e in reversed(events) if e["event"] == "start"), None)
            if cur in nxt and cur not in notes:
                notes[cur] = f"child exited with code {proc.returncode}"
                nxt.remove(cur)
        todo = nxt
        write_results(
            out, {**meta, "seconds": round(time.time() - start, 1)}, collect(events, notes)
        )
    meta["seconds"] = round(time.time() - start, 1)
    stages = collect(read_progress(out), notes)
    write_results(out, meta, stages)
    (out / "progress.jsonl").unlink(missing_ok=True)  # everything is in results.json now
    print((out / "results.md").read_text())
    bad = [n for n, st in stages.items() if st["status"] != "ok"]
    print(
        f"[gpu_check] wrote {out / 'results.json'} and {out / 'results.md'} in "
        f"{meta['seconds']} s" + (f"; stages not ok: {', '.join(bad)}" if bad else "")
    )
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="folder for results.json, results.md and tests.log")
    ap.add_argument(
        "--dry-run", action="store_true", help="every stage at toy sizes on CPU (what CI runs)"
    )
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="whole-run limit in seconds (default 360; dry run 240)",
    )
    ap.add_argument("--cap", action="append", help="per-stage cap, STAGE=SECONDS (repeatable)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stages", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--caps", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(Path(args.child), args.stages.split(","), args.dry_run, json.loads(args.caps))
    if not args.out:
        ap.error("give the output folder, e.g. `python benchmarks/gpu_check.py gpu-results`")
    if args.budget_s is None:
        args.budget_s = 240.0 if args.dry_run else 360.0
    return parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
