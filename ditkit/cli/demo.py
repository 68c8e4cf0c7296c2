"""``ditkit demo``: train the tiny HDiT on digits (CPU), sample and evaluate it
(the job itself is ``ditkit.training.demo``)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .common import (
    add_json,
    add_progress,
    add_set,
    add_threads,
    deprecated,
    load_spec,
    positive,
    setup_compute,
)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny HDiT on digits (CPU), sample and evaluate it")
    p.add_argument(
        "--spec",
        default=None,
        help="model spec to train instead of the demo's tiny-hdit-digits "
        "(1 or 3 channels, 10 classes)",
    )
    p.add_argument("--out", default=None, help="run folder (default: runs/demo-<time>)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (short for --set training.steps=N; default: the experiment's 1000)",
    )
    p.add_argument(
        "--count",
        type=int,
        default=None,
        help="evaluation samples (short for --set evaluation.count=N; default: the "
        "experiment's 500)",
    )
    add_set(
        p,
        "demo experiment (examples/experiments/demo-digits.yaml; shipped in the "
        "package as ditkit/training/assets/demo-digits.yaml)",
    )
    add_threads(p)
    add_progress(p)
    add_json(p, "print only the final JSON line of scores (the report goes to stderr)")
    deprecated(p, "--samples", "--count", type=int)
    p.set_defaults(func=run)


def run(args) -> int:
    from ditkit.training.demo import demo_experiment, run_demo, summary, summary_json
    from ditkit.training.loop import TrainingError

    positive(args.count, "--count")
    spec = load_spec(args.spec, "--spec") if args.spec else None
    exp = demo_experiment(
        spec,
        args.steps,
        args.count,
        source=f"demo experiment with {args.spec}",
        overrides=args.overrides,
    )
    setup_compute(args)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    try:
        result = run_demo(exp, out, log=log, progress=not args.no_progress)
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary_json(result)))
    else:
        print(summary(result))
    return 0
