"""``ditkit extrapolate``: sample, score and measure a model at resolutions it never saw.

The runner is ``ditkit.evaluate.report``; the command may hand it a
``ClassifierScorer`` of the run's data kind (digits or shapes) to score the samples.

    ditkit extrapolate run/ --resolutions 16,32 --policies as_is \
        --stages 8,16:2.0 8,32:2.0    # multi-stage rows beside the single-pass ones
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ditkit.cli.common import (
    UsageError,
    add_device,
    add_json,
    add_progress,
    add_sampling,
    add_set,
    add_stages,
    add_threads,
    checkpoint_path,
    deprecated,
    list_arg,
    load_spec,
    parse_resolution,
    positive,
    resolve_source,
    sampling_from_args,
    setup_compute,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "extrapolate",
        help="adapt a model to other resolutions under several policies; "
        "write a report (grids, metrics, table, cost plot)",
    )
    p.add_argument(
        "source",
        help="checkpoint (.safetensors) or run folder (samples + costs), "
        "or a spec file / preset name (costs and latency of random "
        "weights)",
    )
    p.add_argument(
        "--resolutions",
        nargs="+",
        required=True,
        help="targets, comma-separated H or HxW, e.g. 32,48x64",
    )
    p.add_argument(
        "--policies",
        nargs="+",
        default=["as_is"],
        help="comma-separated: as_is[:rope=keep|interpolate|extrapolate], "
        "local_core[:kernel_size=15], add_levels[:share_weights=true], "
        "core_patch[:factor=4,level=0]; any of them with rope_scaling=ntk|yarn "
        "(e.g. ntk(time_exponent=1.0): noise-dependent) and attention_scaling=entropy, "
        "e.g. core_patch:rope_scaling=ntk,attention_scaling=entropy",
    )
    p.add_argument("--out", default="extrapolation", help="report folder")
    p.add_argument(
        "--curve",
        nargs="*",
        default=None,
        help="comma-separated resolutions for the cost plot (default: --resolutions)",
    )
    add_sampling(p, steps=20, seed=0)
    add_stages(p, single=False)
    p.add_argument(
        "--stage-policies",
        nargs="+",
        default=None,
        metavar="POLICY",
        help="only these of --policies run the --stages chains (default: every policy)",
    )
    p.add_argument("--grid-count", type=int, default=8, help="images per grid")
    p.add_argument(
        "--attention-backend",
        default="auto",
        help="neighborhood-attention kernel (ditkit.builder.use_backend): auto, "
        "gather, tiled, masked, flex, natten",
    )
    p.add_argument("--no-measure", action="store_true", help="skip latency / memory")
    p.add_argument(
        "--latency-batch",
        type=int,
        default=1,
        help="batch of the timed forwards (a larger batch makes a small model's "
        "time compute-bound, so its slope means something)",
    )
    p.add_argument(
        "--metrics",
        choices=("auto", "shapes", "digits", "none"),
        default="auto",
        help="score samples with the digits/shapes classifier (auto: the data kind "
        "of the experiment.yaml beside the checkpoint, if any)",
    )
    p.add_argument(
        "--count",
        type=int,
        default=100,
        help="samples scored per (policy, resolution) when metrics are on",
    )
    p.add_argument(
        "--count-at",
        nargs="+",
        default=None,
        metavar="RES=N",
        help="a different --count at some resolutions, comma-separated, e.g. "
        "64=200 (fewer where each sample costs more)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=300,
        help="bootstrap rounds for the Fréchet intervals and paired tests",
    )
    p.add_argument(
        "--eval-resolutions",
        nargs="*",
        default=None,
        help="score only these resolutions, comma-separated (default: all)",
    )
    p.add_argument(
        "--finetuned",
        nargs="*",
        default=[],
        metavar="CKPT",
        help="extra rows: checkpoints (or run folders) already at their "
        "resolution, e.g. from a `finetune` run (labelled with their policy "
        "and trainable patterns)",
    )
    add_set(p, "spec (spec files and presets only)")
    add_device(p)
    add_threads(p)
    add_progress(p)
    add_json(p, "print the rows as one JSON object instead of the table")
    deprecated(p, "--samples", "--grid-count", type=int)
    deprecated(p, "--eval-count", "--count", type=int)
    p.set_defaults(func=run_extrapolate)


def policy_list(values, flag: str = "--policies") -> list[str]:
    """Comma-separated policies; a ``key=value`` item continues the policy before it
    (``core_patch:factor=4,level=0,as_is`` is two policies)."""
    out: list[str] = []
    for item in list_arg(values, flag):
        if "=" in item and ":" not in item and out:
            out[-1] += f",{item}"
        else:
            out.append(item)
    return out


def _data_kind(ckpt_path: Path) -> tuple[str | None, int]:
    """The data kind and class count of the run that wrote a checkpoint (its folder's
    ``experiment.yaml``), or ``(None, 0)``."""
    import yaml

    exp = ckpt_path.parent / "experiment.yaml"
    if not exp.is_file():
        return None, 0
    try:  # a hint only: a damaged experiment.yaml means "unknown", not a crash
        data = (yaml.safe_load(exp.read_text(encoding="utf-8")) or {}).get("data") or {
            "kind": "digits"
        }
        return data.get("kind"), int(data.get("classes", 10))
    except (yaml.YAMLError, UnicodeDecodeError, OSError, AttributeError, TypeError, ValueError):
        return None, 0


def _finetuned_row(path: str, objective):
    from pydantic import TypeAdapter

    from ditkit import spec as S
    from ditkit.evaluate.report import policy_label
    from ditkit.runtime.checkpoint import load_checkpoint
    from ditkit.training.finetune import METADATA_KEY

    file = checkpoint_path(path, "--finetuned")  # a checkpoint file or a run folder
    ckpt = load_checkpoint(file)
    meta = ckpt.metadata.get(METADATA_KEY)
    if meta:
        record = json.loads(meta)
        pol = TypeAdapter(S.Policy).validate_python(record["policy"])
        label = (
            f"{policy_label(pol)} + fine-tune {','.join(record['patterns'])} "
            f"({ckpt.metadata.get('ditkit.step', '?')} steps)"
        )
    else:
        label = Path(file).stem
    return label, ckpt.spec, ckpt.tensors


def run_extrapolate(args) -> int:
    from ditkit.evaluate.report import parse_chain_policies, parse_chains, parse_policy, run

    sampling = sampling_from_args(args)
    policies = [parse_policy(p) for p in policy_list(args.policies)]
    resolutions = [
        parse_resolution(r, "--resolutions") for r in list_arg(args.resolutions, "--resolutions")
    ]
    curve = (
        [parse_resolution(r, "--curve") for r in list_arg(args.curve, "--curve")]
        if args.curve
        else None
    )
    positive(args.count, "--count", allow_zero=True)
    positive(args.bootstrap, "--bootstrap")
    positive(args.latency_batch, "--latency-batch")
    count_at = {}
    for item in list_arg(args.count_at, "--count-at") if args.count_at else []:
        res_text, eq, n_text = item.partition("=")
        if not eq or not n_text.strip().isdigit():
            raise UsageError(f"--count-at {item!r}: expected RES=N, e.g. 64=200 or 64x48=100")
        count_at[parse_resolution(res_text, "--count-at")] = int(n_text)
    positive(args.grid_count, "--grid-count")
    tensors = objective = None
    kind, classes = None, 10
    source = resolve_source(args.source, ("file", "preset", "checkpoint", "run"))
    if source.kind in ("checkpoint", "run"):
        from ditkit.runtime.checkpoint import load_checkpoint

        if args.overrides:
            raise UsageError(
                f"--set: {args.source} is a checkpoint, whose weights fix the "
                "model; --set applies to spec files and presets"
            )
        path = checkpoint_path(args.source)
        ckpt = load_checkpoint(path)
        spec, tensors, objective = ckpt.spec, ckpt.tensors, ckpt.objective
        if objective is None:
            print(
                "note: the checkpoint records no objective, so no samples are drawn",
                file=sys.stderr,
            )
        kind, classes = _data_kind(path)
    else:
        spec = load_spec(args.source, overrides=args.overrides)
    setup_compute(args)
    if args.metrics != "auto":
        kind = None if args.metrics == "none" else args.metrics
    scorer = None
    if kind in ("shapes", "digits") and objective is not None and args.count:
        from ditkit.evaluate.report import ClassifierScorer

        if spec.conditioning.classes is None:
            raise UsageError(
                "--metrics: the scores need a class-conditional model; use --metrics none"
            )
        scorer = ClassifierScorer(kind, classes)
    chains = parse_chains(  # a chain ends at one of --resolutions; bad ones name --stages
        args.stages or [],
        resolutions,
        sampling,
        objective,
        samples=tensors is not None and objective is not None,
        flag="--stages",
    )
    stage_policies = None
    if args.stage_policies is not None:
        flag = "--stage-policies"
        stage_policies = [parse_policy(p, flag) for p in policy_list(args.stage_policies, flag)]
        # checked here, before anything is loaded or measured, in the command line's words
        parse_chain_policies(stage_policies, policies, chains, flag, "--policies", "--stages")
    extra = [_finetuned_row(p, objective) for p in list_arg(args.finetuned, "--finetuned")]
    out = Path(args.out)
    from ditkit.builder import use_backend

    backend = use_backend(args.attention_backend)  # a BackendError names the choices
    backend.__enter__()
    try:
        rows = run(
            spec,
            tensors,
            objective,
            policies,
            resolutions,
            out,
            sampling,
            samples=args.grid_count,
            device=args.device,
            measure=not args.no_measure,
            curve=curve,
            scorer=scorer,
            eval_count=args.count,
            extra=extra,
            eval_resolutions=[
                parse_resolution(r, "--eval-resolutions")
                for r in list_arg(args.eval_resolutions, "--eval-resolutions")
            ]
            if args.eval_resolutions is not None
            else None,
            progress=not (args.no_progress or args.json),
            count_at=count_at,
            bootstrap=args.bootstrap,
            latency_batch=args.latency_batch,
            chains=chains,
            chain_policies=stage_policies,
        )
    finally:
        backend.__exit__(None, None, None)
    if args.json:
        from dataclasses import asdict

        print(
            json.dumps(
                {"report": str(out / "report.md"), "rows": [asdict(r) for r in rows]},
                indent=2,
                default=str,
            )
        )
        return 0
    for r in rows:
        note = f"  ({r.error})" if r.error else ""
        lat = f"{r.latency_ms:8.1f} ms" if r.latency_ms is not None else " " * 11
        score = ""
        if r.metrics:
            lo, hi = r.metrics.get("accuracy_ci", (float("nan"),) * 2)
            score = (
                f"  acc {r.metrics['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] "
                f"FD {r.metrics['frechet']:.2f}"
            )
        print(
            f"{r.policy:28s} {r.resolution[0]:>5}x{r.resolution[1]:<5} {r.gmacs:10.2f} GMACs"
            f" {lat}{score}{note}"
        )
    print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return 0
