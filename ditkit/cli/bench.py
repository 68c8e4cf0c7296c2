"""``ditkit bench``: a group of benchmarks.

- ``ditkit bench attention``: time and peak memory of each neighborhood-attention backend
  (``ditkit.builder.bench``).
- ``ditkit bench sample``: per-step latency and peak memory of eager, torch.compile and
  onnxruntime (``ditkit.runtime.bench``).

Another benchmark is one more ``group.add_parser(...)`` in :func:`add_parser`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import (UsageError, load_model_source, parse_list, parse_resolution,
                     resolve_source)

DEFAULT_GRIDS = "32,64,128,256"


def add_parser(sub) -> None:
    parser = sub.add_parser("bench", help="benchmarks (`ditkit bench -h` lists them)")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    group = parser.add_subparsers(dest="bench", metavar="BENCH")

    p = group.add_parser(
        "attention", help="time and peak memory of the neighborhood-attention backends",
        description="Time and peak memory of each neighborhood backend.")
    p.add_argument("--backends", default=None,
                   help="comma-separated (default: gather,tiled,masked on CPU; "
                        "natten,flex,gather,tiled,masked on CUDA)")
    p.add_argument("--grids", default=DEFAULT_GRIDS,
                   help="square token-grid sides, comma-separated (default: 32,64,128,256)")
    p.add_argument("--kernel", type=int, default=7)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop timing a case after this many seconds (default: 20)")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="skip cases estimated to need more (default: half the free memory)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=run_attention)

    p = group.add_parser(
        "sample", help="per-step latency and peak memory: eager, torch.compile, onnxruntime",
        description="Per denoiser evaluation (one sampling step), median of repeats.")
    p.add_argument("spec", help="spec file or preset (random weights), or a checkpoint")
    p.add_argument("--resolutions", nargs="+", default=None,
                   help="H or HxW values (default: the spec's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--engines", default="eager,onnxruntime",
                   help="comma-separated from eager, compile, onnxruntime, tensorrt")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and onnxruntime alike (default: torch's)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=run_sample)


def run_attention(args) -> int:
    import torch

    from ditkit.builder import kernels
    from ditkit.builder.bench import format_table, run
    from ditkit.runtime.files import atomic_path

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; use --device cpu")
    default = "natten,flex,gather,tiled,masked" if device.type == "cuda" else "gather,tiled,masked"
    backends = parse_list(args.backends or default)
    choices = [x for x in kernels.NEIGHBORHOOD_BACKENDS if x != "auto"]
    for b in backends:
        if b not in choices:
            raise UsageError(f"--backends: unknown backend {b!r}; choose from "
                             f"{', '.join(choices)}")
        if b == "natten" and not kernels.natten_available():
            raise UsageError("--backends: natten is not installed; drop it or install natten")
    try:
        grids = [int(g) for g in parse_list(args.grids)]
    except ValueError:
        grids = []
    if not grids or min(grids) < args.kernel:
        raise UsageError(f"--grids {args.grids!r}: comma-separated token-grid sides, each at "
                         f"least the kernel ({args.kernel}), e.g. 32,64,128,256")
    if args.kernel < 1 or args.kernel % 2 == 0:
        raise UsageError(f"--kernel {args.kernel}: neighborhood kernels must be odd, e.g. 7")
    rows = run(backends, grids, args.kernel, args.batch, args.heads, args.d_head, device,
               args.repeats, args.max_seconds, args.memory_limit_gib)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({torch.get_num_threads()} threads)")
    print(format_table(rows, name, args.kernel, args.heads, args.d_head, args.batch))
    if args.json:
        from dataclasses import asdict

        with atomic_path(Path(args.json)) as tmp:
            Path(tmp).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


def run_sample(args) -> int:
    from ditkit.runtime.bench import ENGINES, bench_sample, format_rows

    from .common import load_spec

    engines = parse_list(args.engines)
    bad = set(engines) - set(ENGINES)
    if bad:
        raise UsageError(f"--engines {','.join(sorted(bad))}: choose from {', '.join(ENGINES)}")
    src = resolve_source(args.spec, ("file", "preset", "checkpoint", "run"))
    objective = None
    if src.kind in ("file", "preset"):
        noise = load_spec(args.spec).conditioning.noise.kind
        objective = "edm" if noise == "fourier" else "ddpm_eps"
    model, objective, _, _ = load_model_source(args.spec, objective)
    resolutions = [parse_resolution(r, "--resolutions") for r in args.resolutions] \
        if args.resolutions else [tuple(model.spec.input.resolution)]
    rows = bench_sample(model, objective, resolutions, engines=engines, batch=args.batch,
                        repeats=args.repeats, device=args.device, threads=args.threads,
                        log=lambda m: print(m, file=sys.stderr))
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0
