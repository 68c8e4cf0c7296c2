"""``ditkit extrapolate``: sample and measure a model at resolutions it never saw."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "extrapolate", help="adapt a model to other resolutions under several policies; "
                            "write a report (grids, table, cost plot)")
    p.add_argument("source", help="ditkit checkpoint (.safetensors: samples + costs), or a spec "
                                  "file / preset name (costs and latency of random weights)")
    p.add_argument("--resolutions", nargs="+", required=True, help="targets, H or HxW")
    p.add_argument("--policies", nargs="+", default=["as_is"],
                   help="as_is[:rope=keep|interpolate|extrapolate] local_core[:kernel_size=15] "
                        "add_levels[:share_weights=true] core_patch[:factor=4,level=0]")
    p.add_argument("--out", default="extrapolation", help="report folder")
    p.add_argument("--curve", nargs="*", default=None,
                   help="resolutions for the cost plot (default: --resolutions)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="heun")
    p.add_argument("--samples", type=int, default=8, help="images per grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-measure", action="store_true", help="skip latency / memory")
    p.set_defaults(func=cmd_extrapolate)


def cmd_extrapolate(args) -> int:
    from ditkit.cli import UsageError, load_spec, parse_resolution

    from .extrapolate_report import parse_policy, run

    policies = [parse_policy(p) for p in args.policies]
    resolutions = [parse_resolution(r) for r in args.resolutions]
    curve = [parse_resolution(r) for r in args.curve] if args.curve else None
    tensors = objective = None
    if args.source.endswith(".safetensors"):
        from .checkpoint import load_checkpoint

        if not Path(args.source).is_file():
            raise UsageError(f"{args.source}: no such checkpoint")
        ckpt = load_checkpoint(args.source)
        spec, tensors, objective = ckpt.spec, ckpt.tensors, ckpt.objective
        if objective is None:
            print("note: the checkpoint records no objective, so no samples are drawn")
    else:
        spec = load_spec(args.source)
    out = Path(args.out)
    rows = run(spec, tensors, objective, policies, resolutions, out, steps=args.steps,
               sampler=args.sampler, seed=args.seed, samples=args.samples, device=args.device,
               measure=not args.no_measure, curve=curve)
    for r in rows:
        note = f"  ({r.error})" if r.error else ""
        lat = f"{r.latency_ms:8.1f} ms" if r.latency_ms is not None else " " * 11
        print(f"{r.policy:28s} {r.resolution[0]:>5}x{r.resolution[1]:<5} {r.gmacs:10.2f} GMACs"
              f" {lat}{note}")
    print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return 0
