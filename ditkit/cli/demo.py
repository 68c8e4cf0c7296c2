"""``ditkit demo``: train the tiny HDiT on digits (CPU), sample and evaluate it
(the job itself is ``ditkit.train.demo``)."""

from __future__ import annotations

import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny HDiT on digits (CPU), sample and evaluate it")
    p.add_argument("--spec", default=None,
                   help="model spec to train instead of examples/tiny/tiny-hdit-digits.yaml "
                   "(1 or 3 channels, 10 classes)")
    p.add_argument("--out", default=None, help="run folder (default: runs/demo-<time>)")
    p.add_argument("--steps", type=int, default=None, help="override the training steps")
    p.add_argument("--samples", type=int, default=None,
                   help="override the number of evaluation samples (evaluation.count)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: a model this small gains little from "
                   "more, and threads spin-waiting on a shared machine are several times slower)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ditkit.train.demo import demo_experiment, run_demo, summary
    from ditkit.train.loop import TrainingError

    from .common import UsageError, load_spec

    spec = load_spec(args.spec, "--spec") if args.spec else None
    exp = demo_experiment(spec, args.steps, args.samples,
                          source=f"demo experiment with {args.spec}")
    if args.threads is not None:
        if args.threads <= 0:
            raise UsageError(f"--threads {args.threads}: must be positive")
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    try:
        result = run_demo(exp, out)
    except TrainingError as err:
        print(f"error: {err}")
        return 1
    print(summary(result))
    return 0
