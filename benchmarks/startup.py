"""Start-up time of the ``ditkit`` command: each command's ``--help`` and the light commands,
each run as a fresh process, median of ``--repeats`` runs (a benchmark, not a test).

    python benchmarks/startup.py                 # all commands, 5 runs each
    python benchmarks/startup.py --repeats 9 --json startup.json

The reference rows time ``python -c pass`` (the interpreter alone) and ``python -c "import
torch"`` (what every command paid before ``ditkit/cli`` imported torch lazily). The 1-minute load
average is printed before and after: on a busy machine the medians are not start-up alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "examples/tiny/tiny-hdit-neighborhood.yaml"


def cases() -> list[tuple[str, list[str]]]:
    py = [sys.executable]
    cli = py + ["-m", "ditkit.cli"]
    out = [
        ("python -c pass", py + ["-c", "pass"]),
        ("python -c 'import torch'", py + ["-c", "import torch"]),
        ("ditkit --help", cli + ["--help"]),
        ("ditkit --version", cli + ["--version"]),
        ("ditkit presets", cli + ["presets"]),
        ("ditkit schema", cli + ["schema"]),
        (f"ditkit validate {EXAMPLE}", cli + ["validate", EXAMPLE]),
        (f"ditkit describe {EXAMPLE}", cli + ["describe", EXAMPLE]),
    ]
    sys.path.insert(0, str(ROOT))
    from ditkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        out.append((f"ditkit {name} --help", cli + [name, "--help"]))
        inner = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for action in inner:
            for child in action.choices:
                out.append((f"ditkit {name} {child} --help", cli + [name, child, "--help"]))
    return out


def time_once(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        argv, cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.decode()[-400:]}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=5, help="runs per command (median)")
    ap.add_argument("--only", default=None, help="comma-separated substrings of the rows to run")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    rows = []
    for label, argv in cases():
        if args.only and not any(s in label for s in args.only.split(",")):
            continue
        time_once(argv)  # warm the page cache
        times = [time_once(argv) for _ in range(args.repeats)]
        rows.append(
            {
                "command": label,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "runs": len(times),
            }
        )
        print(
            f"{label:58s} {rows[-1]['median_s']:6.2f} s  (min {min(times):.2f}, "
            f"max {max(times):.2f})",
            flush=True,
        )
    load1 = os.getloadavg()[0]
    print(
        f"{os.cpu_count()} CPUs; 1-min load average {load0:.2f} before, {load1:.2f} after; "
        f"median of {args.repeats} runs each"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "load_before": load0, "load_after": load1}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
