"""How close a spec runs to this machine's matmul peak: a roofline table.

    python benchmarks/roofline.py benchmarks/specs/hdit-bench-4m.yaml --resolutions 256 512 \
        --batch 1 --threads 1 [--precision fp32|bf16] [--modes forward sample train] [--profile]

In one process, side by side:

1. the machine's fp32 and bf16 matmul peaks (``torch.mm`` of ``--peak-size``² matrices, best of
   ``--repeats``; bf16 runs on the CPU's AMX / AVX-512-BF16 units where it has them; on a CPU
   without them an fp32 run measures the emulated bf16 peak at 256² only);
2. the achieved throughput of the spec at each resolution and batch size:
   - ``forward``: one network evaluation (``no_grad``);
   - ``sample``: one classifier-free-guided sampling step (the conditional and the unconditional
     halves in one batch of ``2 x batch``, ``no_grad``), what a sampler pays per step;
   - ``train``: forward + backward of an MSE loss + one AdamW step (counted as 3 x forward);
   with the multiply-adds from ``describe`` (``ditkit.builder.describe``: linear layers and the
   attention products, counted algorithmically). GFLOP/s count 2 FLOPs per multiply-add, as the
   peaks do, so the share of the peak is a plain ratio;
3. with ``--profile``, the 10 operators that take the most self CPU time in the measured mode,
   so the next optimisation is visible.

The shares are measured in the same run as the peaks, so they survive a busy or a different
machine better than absolute times. Measure at 1 thread, or at 2 threads on an idle machine
only (a 2-thread OpenMP team stalls when another job holds a core). ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ditkit import spec as S
from ditkit.builder import build, describe
from ditkit.device import cpu_has_bf16

MODES = ("forward", "sample", "train")
MODE_FACTOR = {"forward": 1.0, "sample": 2.0, "train": 3.0}  # x forward MACs at batch B
#: matrix side of the bf16 peak in an fp32 run on a CPU without bf16 units (emulated bf16)
BF16_EMULATED_SIZE = 256


def _best_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(dtype: torch.dtype, size: int, repeats: int) -> float:
    """GFLOP/s of ``torch.mm`` on ``size x size`` matrices in ``dtype`` (best of ``repeats``)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dtype)
    b = torch.randn(size, size, generator=g).to(dtype)
    seconds = _best_seconds(lambda: torch.mm(a, b), repeats)
    return 2 * size**3 / seconds / 1e9


def _autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _inputs(spec: S.ModelSpec, batch: int, resolution: tuple[int, int]):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, spec.input.channels, *resolution, generator=g)
    level = torch.rand(batch, generator=g) + 0.5
    labels = (
        torch.arange(batch) % spec.conditioning.classes.count if spec.conditioning.classes else None
    )
    return x, level, labels


def step_fn(
    model, spec: S.ModelSpec, mode: str, batch: int, resolution: tuple[int, int], precision: str
):
    """A closure running one step of ``mode``."""
    x, level, labels = _inputs(spec, batch, resolution)
    if mode == "forward":

        def run():
            with torch.no_grad(), _autocast(precision):
                model(x, level, labels)

        return run
    if mode == "sample":
        xx, ll = torch.cat([x, x]), torch.cat([level, level])
        null = spec.conditioning.classes.count if spec.conditioning.classes else None
        yy = (
            torch.cat([labels, torch.full_like(labels, null)])
            if labels is not None and null is not None
            else None
        )

        def run():
            with torch.no_grad(), _autocast(precision):
                model(xx, ll, yy)

        return run
    if mode == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        target = torch.randn_like(x)

        def run():
            with _autocast(precision):
                loss = (model(x, level, labels).float() - target).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run
    raise SystemExit(f"--modes: unknown mode {mode!r}; use {', '.join(MODES)}")


def profile_top(fn, count: int = 10) -> list[dict]:
    """The ``count`` operators with the most self CPU time in one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "self_ms": e.self_cpu_time_total / 1e3,
            "calls": e.count,
            "share": e.self_cpu_time_total / total,
        }
        for e in events[:count]
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="a spec file or preset name")
    ap.add_argument(
        "--resolutions",
        type=int,
        nargs="+",
        default=None,
        help="square resolutions (default: the spec's own)",
    )
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-size", type=int, default=4096)
    ap.add_argument("--profile", action="store_true", help="top-10 operators per row")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    spec = S.load(args.spec)
    resolutions = (
        [(r, r) for r in args.resolutions] if args.resolutions else [tuple(spec.input.resolution)]
    )
    for res in resolutions:
        issues = spec.check_resolution(res, "--resolutions")
        if issues:
            print(f"error: {issues[0][0]}: {issues[0][1]}", file=sys.stderr)
            return 2

    # without bf16 units an emulated bf16 mm of 4096^2 takes minutes: an fp32 run then measures
    # the (emulated) bf16 peak on a small matrix only, for the record
    bf16_size = (
        args.peak_size
        if args.precision == "bf16" or cpu_has_bf16()
        else min(args.peak_size, BF16_EMULATED_SIZE)
    )
    peaks = {
        "fp32": matmul_peak(torch.float32, args.peak_size, args.repeats),
        "bf16": matmul_peak(torch.bfloat16, bf16_size, args.repeats),
    }
    peak = peaks[args.precision]
    print(f"# roofline: {spec.name}, {args.precision}, {args.threads} thread(s)\n")
    print(
        f"matmul peak ({args.peak_size}², best of {args.repeats}): fp32 {peaks['fp32']:.3g} "
        f"GFLOP/s, bf16 {peaks['bf16']:.3g} GFLOP/s ({peaks['bf16'] / peaks['fp32']:.2f}x"
        + (
            ""
            if cpu_has_bf16()
            else f"; this CPU has no bf16 units: bf16 is emulated, measured at {bf16_size}²"
        )
        + ")\n"
    )
    model = build(spec)
    model.train()
    rows = []
    for res in resolutions:
        gmacs = describe(spec, res).gmacs  # batch 1, one forward
        for batch in args.batch:
            for mode in args.modes:
                fn = step_fn(model, spec, mode, batch, res, args.precision)
                seconds = statistics.median(
                    [_best_seconds(fn, 1, warmup=1 if i == 0 else 0) for i in range(args.repeats)]
                )
                gflop = 2 * gmacs * batch * MODE_FACTOR[mode]
                row = {
                    "resolution": list(res),
                    "batch": batch,
                    "mode": mode,
                    "precision": args.precision,
                    "threads": args.threads,
                    "ms": seconds * 1e3,
                    "gflop": gflop,
                    "gflops": gflop / seconds,
                    "share_of_peak": gflop / seconds / peak,
                    "share_of_fp32_peak": gflop / seconds / peaks["fp32"],
                }
                if args.profile:
                    row["top_ops"] = profile_top(fn)
                rows.append(row)

    bf16 = args.precision == "bf16"
    print(
        "| resolution | batch | mode | ms | GFLOP | GFLOP/s | share of fp32 peak |"
        + (" share of bf16 peak |" if bf16 else "")
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if bf16 else ""))
    for r in rows:
        print(
            f"| {r['resolution'][0]}² | {r['batch']} | {r['mode']} | {r['ms']:.1f} | "
            f"{r['gflop']:.3g} | {r['gflops']:.3g} | {r['share_of_fp32_peak']:.2f} |"
            + (f" {r['share_of_peak']:.2f} |" if bf16 else "")
        )
    if args.profile:
        for r in rows:
            print(f"\n## top operators: {r['resolution'][0]}², batch {r['batch']}, {r['mode']}\n")
            print("| op | self ms | calls | share |\n| --- | ---: | ---: | ---: |")
            for op in r["top_ops"]:
                print(f"| `{op['op']}` | {op['self_ms']:.1f} | {op['calls']} | {op['share']:.0%} |")
    if args.json:
        args.json.write_text(
            json.dumps({"spec": spec.name, "peaks_gflops": peaks, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
