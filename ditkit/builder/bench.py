"""``ditkit bench attention``: time and peak memory of each neighborhood backend.

For each backend and token grid it runs the neighborhood kernel on ``(B, heads, H, W, d_head)``
inputs, forward (under ``no_grad``) and forward+backward, and reports the median time and the
peak memory above the inputs:

- CUDA: ``torch.cuda.max_memory_allocated`` in this process.
- CPU: each (backend, grid) runs in a fresh subprocess, whose peak resident set (``ru_maxrss``)
  is read before and after the measured call -- PyTorch keeps no CPU allocation statistics.

The command is ``ditkit bench attention`` (``ditkit/cli/bench.py``).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from ditkit.device import pick_device

from . import kernels

DEFAULT_GRIDS = (32, 64, 128, 256)
MODES = ("fwd", "fwd+bwd")


# --------------------------------------------------------------------------------------------
# measuring one case


@dataclass
class Row:
    backend: str
    grid: int
    mode: str
    ms: float | None = None
    peak_mib: float | None = None
    note: str = ""


def _inputs(grid, batch, heads, d_head, device, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    return [
        torch.randn(batch, heads, grid, grid, d_head, generator=g).to(device).requires_grad_(grad)
        for _ in range(3)
    ]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _measure(
    backend, grid, kernel, batch, heads, d_head, device, repeats, max_seconds, modes=MODES
):
    """Rows for ``modes`` of one backend at one grid, in this process."""
    ks, dil, scale = (kernel, kernel), (1, 1), d_head**-0.5
    rows = []
    for mode in modes:
        grad = mode == "fwd+bwd"
        if grad and backend in ("flex", "natten") and device.type == "cpu":
            rows.append(Row(backend, grid, mode, note="no CPU backward"))
            continue
        q, k, v = _inputs(grid, batch, heads, d_head, device, grad)

        def step(q=q, k=k, v=v, grad=grad):  # this iteration's inputs, bound
            with torch.set_grad_enabled(grad), kernels.use_backend(backend):
                out = kernels.neighborhood_attention(q, k, v, ks, dil, scale)
                if grad:
                    out.backward(torch.ones_like(out))
            _sync(device)

        _sync(device)
        if device.type == "cuda":
            step()  # compile / autotune outside the peak and the timing
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step()
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            _warm_up(backend, kernel, batch, heads, d_head, grad)  # one-time allocations
            base = _rss_peak_mib()
            step()  # the first call at this size: its peak is the case's working memory
            peak = max(0.0, _rss_peak_mib() - base)
        times, start = [], time.perf_counter()
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            if time.perf_counter() - start > max_seconds:
                break
        rows.append(
            Row(backend, grid, mode, 1000 * statistics.median(times), peak, f"{len(times)} runs")
        )
    return rows


def _warm_up(backend, kernel, batch, heads, d_head, grad):
    """Run the backend once on a small grid: lazy initialisation (thread pools, kernels) then
    does not count in the peak of the measured call."""
    q, k, v = _inputs(2 * kernel, batch, heads, d_head, torch.device("cpu"), grad)
    with torch.set_grad_enabled(grad), kernels.use_backend(backend):
        out = kernels.neighborhood_attention(q, k, v, (kernel, kernel), (1, 1), 1.0)
        if grad:
            out.backward(torch.ones_like(out))


def _estimate_gib(backend, grid, kernel, batch, heads, d_head) -> float:
    """Rough working memory of fwd+bwd, to skip cases that cannot fit."""
    n = grid * grid
    per_head = batch * heads
    if backend in ("masked", "flex"):  # the n x n mask and 2-3 n x n score tensors per head
        return (n * n * (1 + 12 * per_head)) / 2**30
    if backend == "tiled":  # tiles of 8x8 queries: (L/8)^2 copies of k, v; L^2 scores a query
        span = (8 + kernel - 1) ** 2
        return (
            per_head * n * (3 * span / 64 * d_head + 2 * d_head + 3 * span) * 4 + n * span
        ) / 2**30
    k2 = kernel * kernel  # gather: q, k, v, their gradients, the flat int64 index; chunks
    return (per_head * n * (8 * d_head * 4 + k2 * 8) + 4 * (64 << 20)) / 2**30


def _free_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


def _worker(payload: str) -> None:
    """Subprocess entry (CPU): measure one (backend, grid, mode) and print its row as JSON."""
    args = json.loads(payload)
    rows = _measure(
        args["backend"],
        args["grid"],
        args["kernel"],
        args["batch"],
        args["heads"],
        args["d_head"],
        torch.device("cpu"),
        args["repeats"],
        args["max_seconds"],
        modes=(args["mode"],),
    )
    print(json.dumps([asdict(r) for r in rows]))


def _measure_in_subprocess(backend, grid, kernel, batch, heads, d_head, repeats, max_seconds):
    """One fresh process per mode, so each mode's peak resident set is its own."""
    rows = []
    for mode in MODES:
        payload = json.dumps(
            dict(
                backend=backend,
                grid=grid,
                kernel=kernel,
                batch=batch,
                heads=heads,
                d_head=d_head,
                repeats=repeats,
                max_seconds=max_seconds,
                mode=mode,
            )
        )
        proc = subprocess.run(
            [sys.executable, "-m", "ditkit.builder.bench", "--worker", payload],
            capture_output=True,
            text=True,
            env={**os.environ},
        )
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            rows.append(Row(backend, grid, mode, note=f"failed: {why[:60]}"))
        else:
            rows += [Row(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]
    return rows


def run(
    backends,
    grids,
    kernel=7,
    batch=1,
    heads=2,
    d_head=64,
    device=None,
    repeats=5,
    max_seconds=20.0,
    memory_limit_gib=None,
    progress=True,
) -> list[Row]:
    """Measure every (backend, grid); cases estimated above the memory limit are skipped."""

    device = pick_device(str(device) if device is not None else "auto")  # ditkit.device
    limit = memory_limit_gib if memory_limit_gib is not None else _free_gib() / 2
    rows = []
    cases = [(b, g) for g in grids for b in backends]
    for backend, grid in tqdm(cases, desc="bench attention", disable=not progress):
        need = _estimate_gib(backend, grid, kernel, batch, heads, d_head)
        if need > limit:
            rows += [
                Row(backend, grid, m, note=f"skipped: needs ~{need:.0f} GiB > {limit:.0f} GiB")
                for m in MODES
            ]
        elif device.type == "cpu":
            rows += _measure_in_subprocess(
                backend, grid, kernel, batch, heads, d_head, repeats, max_seconds
            )
        else:
            rows += _measure(
                backend, grid, kernel, batch, heads, d_head, device, repeats, max_seconds
            )
    return rows


# --------------------------------------------------------------------------------------------
# report


def format_table(rows: list[Row], device_name: str, kernel, heads, d_head, batch) -> str:
    by = {(r.backend, r.grid, r.mode): r for r in rows}
    backends = list(dict.fromkeys(r.backend for r in rows))
    grids = sorted({r.grid for r in rows})

    def cell(r, what):
        if r is None or r.ms is None:
            return "-"
        return f"{r.ms:,.1f}" if what == "ms" else f"{r.peak_mib:,.0f}"

    head = ("backend", "tokens", "fwd ms", "fwd MiB", "fwd+bwd ms", "fwd+bwd MiB", "note")
    table = [head]
    for b in backends:
        for g in grids:
            f, fb = by.get((b, g, "fwd")), by.get((b, g, "fwd+bwd"))
            notes = sorted(
                {
                    r.note
                    for r in (f, fb)
                    if r is not None and r.note and not r.note.endswith("runs")
                }
            )
            table.append(
                (
                    b,
                    f"{g}x{g}",
                    cell(f, "ms"),
                    cell(f, "mib"),
                    cell(fb, "ms"),
                    cell(fb, "mib"),
                    "; ".join(notes),
                )
            )
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = [
        f"neighborhood attention, kernel {kernel}x{kernel}, {heads} heads x {d_head} dims, "
        f"batch {batch}, fp32 on {device_name}"
    ]
    for i, r in enumerate(table):
        lines.append(
            "  ".join(
                c.ljust(widths[j]) if j in (0, 1, 6) else c.rjust(widths[j])
                for j, c in enumerate(r)
            ).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(
        "MiB: peak memory above the inputs (CUDA allocator peak; on CPU the peak "
        "resident set of a fresh process)"
    )
    lines += _summary(by, backends, grids)
    return "\n".join(lines)


def _summary(by, backends, grids) -> list[str]:
    out = []
    for g in grids:
        ref = by.get(("masked", g, "fwd+bwd"))
        if ref is None or ref.ms is None:
            continue
        for b in backends:
            for mode in MODES:
                r, m = by.get((b, g, mode)), by.get(("masked", g, mode))
                if b != "masked" and r is not None and r.ms and m is not None and m.ms:
                    out.append(f"{b} {mode} at {g}x{g}: {m.ms / r.ms:.1f}x faster than masked")
    for b in backends:
        for lo, hi in zip(grids, grids[1:]):
            r0, r1 = by.get((b, lo, "fwd+bwd")), by.get((b, hi, "fwd+bwd"))
            if r0 and r1 and r0.peak_mib and r1.peak_mib:
                out.append(
                    f"{b} fwd+bwd peak memory {lo}x{lo} -> {hi}x{hi}: "
                    f"x{r1.peak_mib / r0.peak_mib:.2f} (tokens x{(hi / lo) ** 2:.0f})"
                )
    return out


if __name__ == "__main__":  # the per-case subprocess of run() on CPU
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        raise SystemExit(
            "usage: python -m ditkit.builder.bench --worker JSON "
            "(internal; the command is `ditkit bench attention`)"
        )
    _worker(sys.argv[2])
