"""Eager speed of this tree against another revision, side by side in one process.

    OMP_NUM_THREADS=1 python benchmarks/eager_ab.py benchmarks/specs/hdit-bench-4m.yaml \
        --base HEAD~3 --resolutions 256 512 --batch 1 --modes forward --threads 1 --repeats 5
    OMP_NUM_THREADS=1 python benchmarks/eager_ab.py examples/tiny/tiny-hdit-shapes16.yaml \
        --base HEAD~3 --batch 64 --modes train --threads 1 --repeats 5

``--base`` (a git revision) is extracted with ``git archive`` into a temporary folder as the
package ``ditkit_base`` (every ``ditkit`` name in it renamed), so both trees load in this
process. The spec is built by both, the base model gets this tree's weights, and then, per
resolution and mode, the two models run alternately (``--repeats`` rounds of one step each,
after a warm-up of each), so a change in the machine's load hits both alike. It prints the
median ms of each, their ratio, the fastest run of each, the largest output difference relative
to the output's scale (the two must compute the same function), and each one's share of the fp32
matmul peak measured in the same process (``benchmarks/roofline.py``'s ``matmul_peak`` and
multiply-add count). Both models share the process's allocator settings
(``ditkit.device.tune_cpu_allocator``), so the comparison covers code changes only.
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from roofline import MODE_FACTOR, matmul_peak, step_fn  # noqa: E402

from ditkit import spec as S  # noqa: E402
from ditkit.builder import build, describe  # noqa: E402


def extract_base(rev: str, into: Path) -> None:
    """``rev``'s ``ditkit/`` as ``into/ditkit_base`` with every ``ditkit`` name renamed."""
    archive = into / "base.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "archive", rev, "ditkit"], cwd=ROOT, stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    (into / "ditkit").rename(into / "ditkit_base")
    for py in (into / "ditkit_base").rglob("*.py"):
        py.write_text(re.sub(r"\bditkit\b", "ditkit_base", py.read_text()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--base", required=True, help="git revision to compare with")
    ap.add_argument("--resolutions", type=int, nargs="+", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--modes", nargs="+", default=["forward"], choices=list(MODE_FACTOR))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-size", type=int, default=2048)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="ditkit-ab-"))
    extract_base(args.base, tmp)
    sys.path.insert(0, str(tmp))
    base_spec_mod = importlib.import_module("ditkit_base.spec")
    base_build = importlib.import_module("ditkit_base.builder").build

    spec = S.load(args.spec)
    torch.manual_seed(0)
    new = build(spec)
    old = base_build(base_spec_mod.load(args.spec))
    # zero-initialised layers get small random weights, so every path carries signal
    with torch.no_grad():
        for p in new.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    old.load_state_dict(new.state_dict())
    resolutions = (
        [(r, r) for r in args.resolutions] if args.resolutions else [tuple(spec.input.resolution)]
    )
    peak = matmul_peak(torch.float32, args.peak_size, 3)
    print(
        f"# {spec.name}: this tree vs {args.base}, {args.threads} thread(s), fp32 peak "
        f"{peak:.1f} GFLOP/s ({args.peak_size}²)\n"
    )
    print(
        "| resolution | batch | mode | base ms | new ms | new / base | min: base / new ms "
        "| max diff / scale |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    print_rows = []
    for res in resolutions:
        gmacs = describe(spec, res).gmacs
        for batch in args.batch:
            x = torch.randn(
                batch, spec.input.channels, *res, generator=torch.Generator().manual_seed(1)
            )
            level = torch.full((batch,), 1.3)
            labels = (
                torch.arange(batch) % spec.conditioning.classes.count
                if spec.conditioning.classes
                else None
            )
            with torch.no_grad():
                a, b = new(x, level, labels), old(x, level, labels)
            diff = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
            for mode in args.modes:
                fns = {
                    "new": step_fn(new, spec, mode, batch, res, "fp32"),
                    "base": step_fn(old, spec, mode, batch, res, "fp32"),
                }
                times: dict[str, list[float]] = {"new": [], "base": []}
                for fn in fns.values():
                    fn()
                for _ in range(args.repeats):
                    for name, fn in fns.items():
                        t0 = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t0)
                ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                low = {k: min(v) * 1e3 for k, v in times.items()}
                gflop = 2 * gmacs * batch * MODE_FACTOR[mode]
                print(
                    f"| {res[0]}² | {batch} | {mode} | {ms['base']:.1f} | {ms['new']:.1f} | "
                    f"{ms['new'] / ms['base']:.2f} | {low['base']:.1f} / {low['new']:.1f} | "
                    f"{diff:.1e} |",
                    flush=True,
                )
                print_rows.append((res, batch, mode, gflop, ms))
    peak_after = matmul_peak(torch.float32, args.peak_size, 3)
    print(f"\nfp32 peak after the rows: {peak_after:.1f} GFLOP/s; shares use the higher one\n")
    top = max(peak, peak_after)
    print("| resolution | batch | mode | GFLOP | base GFLOP/s (share) | new GFLOP/s (share) |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for res, batch, mode, gflop, ms in print_rows:
        gb, gn = gflop / ms["base"] * 1e3, gflop / ms["new"] * 1e3
        print(
            f"| {res[0]}² | {batch} | {mode} | {gflop:.3g} | {gb:.1f} ({gb / top:.2f}) | "
            f"{gn:.1f} ({gn / top:.2f}) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
