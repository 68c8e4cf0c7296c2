"""``ditkit bench``: a group of benchmarks.

- ``ditkit bench attention``: time and peak memory of each neighborhood-attention backend
  (``ditkit.builder.bench``).
- ``ditkit bench sample``: per-step latency and peak memory of eager, torch.compile and
  onnxruntime (``ditkit.deploy.bench``).

Another benchmark is one more ``group.add_parser(...)`` in :func:`add_parser`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ditkit.cli.common import (
    DEPRECATED_IN,
    UsageError,
    add_device,
    add_progress,
    add_sampling,
    add_set,
    add_threads,
    list_arg,
    load_model_source,
    numbers,
    parse_list,
    parse_resolution,
    resolve_source,
    sampling_from_args,
    setup_compute,
)

DEFAULT_GRIDS = "32,64,128,256"


def add_parser(sub) -> None:
    parser = sub.add_parser("bench", help="benchmarks (`ditkit bench -h` lists them)")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    group = parser.add_subparsers(dest="bench", metavar="BENCH")

    p = group.add_parser(
        "attention",
        help="time and peak memory of the neighborhood-attention backends",
        description="Time and peak memory of each neighborhood backend.",
    )
    p.add_argument(
        "--backends",
        default=None,
        help="comma-separated (default: gather,tiled,masked on CPU; "
        "natten,flex,gather,tiled,masked on CUDA)",
    )
    p.add_argument(
        "--grids",
        default=DEFAULT_GRIDS,
        help="square token-grid sides, comma-separated (default: 32,64,128,256)",
    )
    p.add_argument("--kernel", type=int, default=7, help="neighborhood kernel size")
    p.add_argument("--heads", type=int, default=2, help="attention heads")
    p.add_argument("--d-head", type=int, default=64, help="dimensions per head")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=20.0,
        help="stop timing a case after this many seconds (default: 20)",
    )
    p.add_argument(
        "--memory-limit-gib",
        type=float,
        default=None,
        help="skip cases estimated to need more (default: half the free memory)",
    )
    _common(p)
    p.set_defaults(func=run_attention)

    p = group.add_parser(
        "sample",
        help="per-step latency and peak memory: eager, torch.compile, onnxruntime",
        description="Per sampling step (one denoiser evaluation; the guided pair with "
        "--cfg-scale other than 1), median of repeats. The sampling flags are those "
        "of `ditkit sample`; --cfg-scale, --cfg-channels and --seed change what a "
        "step computes.",
    )
    p.add_argument("spec", help="spec file or preset (random weights), or a checkpoint")
    p.add_argument(
        "--resolutions",
        nargs="+",
        default=None,
        help="comma-separated H or HxW values (default: the spec's)",
    )
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument(
        "--engines",
        default="eager,onnxruntime",
        help="comma-separated from eager, eager-bf16 (autocast), compile, "
        "onnxruntime, onnxruntime-int8 (int8 linear layers, an approximation), "
        "onnxruntime-openvino, onnxruntime-openvino-bf16 (the OpenVINO "
        "execution provider in f32 / bf16, an approximation), tensorrt",
    )
    p.add_argument(
        "--compile-mode",
        default="auto",
        help="torch.compile mode of the compile engine (auto: reduce-overhead on "
        "CUDA, default on CPU)",
    )
    p.add_argument("--repeats", type=int, default=10, help="timed runs (median)")
    add_sampling(
        p, steps=50, seed=0, cfg_channels_help="with --cfg-scale: guide only the first N channels"
    )
    add_set(p, "spec (spec files and presets only)")
    _common(p)
    p.set_defaults(func=run_sample)


def _common(p) -> None:
    add_device(p)
    add_threads(p)
    add_progress(p)
    p.add_argument(
        "--json",
        nargs="?",
        const=True,
        default=False,
        metavar="FILE",
        help="print the rows as JSON instead of the table (a FILE argument, the "
        "old form, writes them there: deprecated, use --json > FILE)",
    )


def _write_json(args, rows) -> bool:
    """``--json``: print the rows (True); ``--json FILE``: the deprecated form, also write
    them to FILE and print the table (False)."""
    from ditkit.files import atomic_path

    if args.json is True:
        print(json.dumps(rows, indent=2))
        return True
    if args.json:
        print(
            f"ditkit: --json FILE is deprecated, use --json > FILE (goes in ditkit "
            f"{DEPRECATED_IN})",
            file=sys.stderr,
        )
        with atomic_path(Path(args.json)) as tmp:
            Path(tmp).write_text(json.dumps(rows, indent=2) + "\n")
    return False


def run_attention(args) -> int:
    import os

    import torch

    from ditkit.builder import kernels
    from ditkit.builder.bench import format_table, run

    device = torch.device(setup_compute(args))
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the per-case CPU subprocesses too
    default = "natten,flex,gather,tiled,masked" if device.type == "cuda" else "gather,tiled,masked"
    backends = parse_list(args.backends or default)
    choices = [x for x in kernels.NEIGHBORHOOD_BACKENDS if x != "auto"]
    for b in backends:
        if b not in choices:
            raise UsageError(f"--backends: unknown backend {b!r}; choose from {', '.join(choices)}")
        if b == "natten" and not kernels.natten_available():
            raise UsageError("--backends: natten is not installed; drop it or install natten")
    grids = numbers(",".join(parse_list(args.grids))) or []
    if not grids or min(grids) < args.kernel:
        raise UsageError(
            f"--grids {args.grids!r}: comma-separated token-grid sides, each at "
            f"least the kernel ({args.kernel}), e.g. 32,64,128,256"
        )
    if args.kernel < 1 or args.kernel % 2 == 0:
        raise UsageError(f"--kernel {args.kernel}: neighborhood kernels must be odd, e.g. 7")
    rows = run(
        backends,
        grids,
        args.kernel,
        args.batch,
        args.heads,
        args.d_head,
        device,
        args.repeats,
        args.max_seconds,
        args.memory_limit_gib,
        progress=not (args.no_progress or args.json is True),
    )
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"CPU ({torch.get_num_threads()} threads)")
    )
    from dataclasses import asdict

    if not _write_json(args, [asdict(r) for r in rows]):
        print(format_table(rows, name, args.kernel, args.heads, args.d_head, args.batch))
    return 0


def run_sample(args) -> int:
    from ditkit.cli.common import load_spec
    from ditkit.deploy.bench import ENGINES, bench_sample, format_rows

    sampling = sampling_from_args(args)
    engines = parse_list(args.engines)
    bad = set(engines) - set(ENGINES)
    if bad:
        raise UsageError(f"--engines {','.join(sorted(bad))}: choose from {', '.join(ENGINES)}")
    from ditkit.runtime.denoiser import COMPILE_MODES

    if args.compile_mode not in COMPILE_MODES:
        raise UsageError(
            f"--compile-mode {args.compile_mode}: choose from {', '.join(COMPILE_MODES)}"
        )
    src = resolve_source(args.spec, ("file", "preset", "checkpoint", "run"))
    objective = None
    if src.kind in ("file", "preset"):
        objective = load_spec(args.spec, overrides=args.overrides).default_objective
    setup_compute(args)
    model, objective, _, _ = load_model_source(args.spec, objective, overrides=args.overrides)
    resolutions = (
        [parse_resolution(r, "--resolutions") for r in list_arg(args.resolutions, "--resolutions")]
        if args.resolutions
        else [tuple(model.spec.input.resolution)]
    )
    quiet = args.no_progress or args.json is True
    rows = bench_sample(
        model,
        objective,
        resolutions,
        sampling,
        engines=engines,
        batch=args.batch,
        repeats=args.repeats,
        device=args.device,
        threads=args.threads,
        log=None if quiet else (lambda m: print(m, file=sys.stderr)),
        compile_mode=args.compile_mode,
    )
    if not _write_json(args, rows):
        print(format_rows(rows))
    return 0
