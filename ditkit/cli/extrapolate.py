"""``ditkit extrapolate``: sample, score and measure a model at resolutions it never saw.

The runner is ``ditkit.runtime.extrapolate_report``; the command may hand it the digits/shapes
metrics of ``ditkit.train.evaluate``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .common import UsageError, load_spec, parse_resolution


def add_parser(sub) -> None:
    p = sub.add_parser(
        "extrapolate", help="adapt a model to other resolutions under several policies; "
                            "write a report (grids, metrics, table, cost plot)")
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
    p.add_argument("--attention-backend", default="auto",
                   help="neighborhood-attention kernel (ditkit.builder.use_backend): auto, "
                        "gather, tiled, masked, flex, natten")
    p.add_argument("--no-measure", action="store_true", help="skip latency / memory")
    p.add_argument("--metrics", choices=("auto", "shapes", "digits", "none"), default="auto",
                   help="score samples with the digits/shapes classifier (auto: the data kind "
                        "of the experiment.yaml beside the checkpoint, if any)")
    p.add_argument("--eval-count", type=int, default=100,
                   help="samples scored per (policy, resolution) when metrics are on")
    p.add_argument("--eval-resolutions", nargs="*", default=None,
                   help="score only these resolutions (default: all)")
    p.add_argument("--finetuned", nargs="*", default=[], metavar="CKPT",
                   help="extra rows: checkpoints already at their resolution, e.g. from a "
                        "`finetune` run (labelled with their policy and trainable patterns)")
    p.set_defaults(func=run_extrapolate)


def _data_kind(ckpt_path: Path) -> tuple[str | None, int]:
    """The data kind and class count of the run that wrote a checkpoint (its folder's
    ``experiment.yaml``), or ``(None, 0)``."""
    import yaml

    exp = ckpt_path.parent / "experiment.yaml"
    if not exp.is_file():
        return None, 0
    data = (yaml.safe_load(exp.read_text()) or {}).get("data") or {"kind": "digits"}
    return data.get("kind"), int(data.get("classes", 10))


def _finetuned_row(path: str, objective):
    from pydantic import TypeAdapter

    from ditkit import spec as S
    from ditkit.runtime.checkpoint import load_checkpoint
    from ditkit.runtime.extrapolate_report import policy_label
    from ditkit.train.finetune import METADATA_KEY

    if not Path(path).is_file():
        raise UsageError(f"--finetuned {path}: no such checkpoint")
    ckpt = load_checkpoint(path)
    meta = ckpt.metadata.get(METADATA_KEY)
    if meta:
        record = json.loads(meta)
        pol = TypeAdapter(S.Policy).validate_python(record["policy"])
        label = (f"{policy_label(pol)} + fine-tune {','.join(record['patterns'])} "
                 f"({ckpt.metadata.get('ditkit.step', '?')} steps)")
    else:
        label = Path(path).stem
    return label, ckpt.spec, ckpt.tensors


def run_extrapolate(args) -> int:
    from ditkit.runtime.extrapolate_report import parse_policy, run

    policies = [parse_policy(p) for p in args.policies]
    resolutions = [parse_resolution(r) for r in args.resolutions]
    curve = [parse_resolution(r) for r in args.curve] if args.curve else None
    if args.eval_count < 0:
        raise UsageError(f"--eval-count {args.eval_count}: use 0 (no metrics) or more")
    tensors = objective = None
    kind, classes = None, 10
    if args.source.endswith(".safetensors"):
        from ditkit.runtime.checkpoint import load_checkpoint

        if not Path(args.source).is_file():
            raise UsageError(f"{args.source}: no such checkpoint")
        ckpt = load_checkpoint(args.source)
        spec, tensors, objective = ckpt.spec, ckpt.tensors, ckpt.objective
        if objective is None:
            print("note: the checkpoint records no objective, so no samples are drawn")
        kind, classes = _data_kind(Path(args.source))
    else:
        spec = load_spec(args.source)
    if args.metrics != "auto":
        kind = None if args.metrics == "none" else args.metrics
    evaluate = None
    if kind in ("shapes", "digits") and objective is not None and args.eval_count:
        from ditkit.train.evaluate import ResolutionMetrics

        if spec.conditioning.classes is None:
            raise UsageError("--metrics: the scores need a class-conditional model; use "
                             "--metrics none")
        evaluate = ResolutionMetrics(kind, classes)
    extra = [_finetuned_row(p, objective) for p in args.finetuned]
    out = Path(args.out)
    from ditkit.builder import use_backend

    try:
        backend = use_backend(args.attention_backend)
        backend.__enter__()
    except ValueError as err:
        raise UsageError(f"--attention-backend: {err}") from None
    try:
        rows = run(spec, tensors, objective, policies, resolutions, out, steps=args.steps,
                   sampler=args.sampler, seed=args.seed, samples=args.samples,
                   device=args.device, measure=not args.no_measure, curve=curve,
                   evaluate=evaluate, eval_count=args.eval_count, extra=extra,
                   eval_resolutions=[parse_resolution(r) for r in args.eval_resolutions]
                   if args.eval_resolutions is not None else None)
    finally:
        backend.__exit__(None, None, None)
    for r in rows:
        note = f"  ({r.error})" if r.error else ""
        lat = f"{r.latency_ms:8.1f} ms" if r.latency_ms is not None else " " * 11
        score = (f"  acc {r.metrics['accuracy']:.1%} FD {r.metrics['frechet']:.2f}"
                 if r.metrics else "")
        print(f"{r.policy:28s} {r.resolution[0]:>5}x{r.resolution[1]:<5} {r.gmacs:10.2f} GMACs"
              f" {lat}{score}{note}")
    print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return 0
