"""``ditkit train``: train an experiment (YAML), or resume a run folder; ``torchrun`` for
several processes."""

from __future__ import annotations

import sys
from pathlib import Path

from ditkit.cli.common import (UsageError, add_device, add_json, add_progress, add_set, add_threads,
                     load_experiment_source, positive, setup_compute)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train an experiment (YAML); torchrun for several processes",
                       description="Train an experiment spec. Under torchrun (WORLD_SIZE > 1) "
                       "it runs DDP or FSDP2 (the experiment's distributed.strategy), gloo on "
                       "CPU / nccl on CUDA; only rank 0 writes.")
    p.add_argument("experiment", help="experiment file (.yaml/.json), or a run folder to resume")
    p.add_argument("--out", help="run folder (default: runs/<experiment name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in the run folder")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: accept an experiment that differs from the run's in "
                        "what is trained (recorded in RUN/resume-changes.json)")
    p.add_argument("--steps", type=int, help="training steps (short for --set training.steps=N)")
    add_set(p, "experiment; the run folder's experiment.yaml records the result")
    add_device(p)
    add_threads(p)
    add_progress(p)
    add_json(p, "print one JSON object (step, checkpoint, run folder, seconds) at the end")
    p.set_defaults(func=run)


def run(args) -> int:
    from ditkit.data.datasets import DataError
    from ditkit.train.loop import TrainingError, TrainingSetupError, train

    overrides = list(args.overrides)
    if args.steps is not None:
        positive(args.steps, "--steps")
        overrides.append(f"training.steps={args.steps}")
    exp, run = load_experiment_source(args.experiment, overrides)
    setup_compute(args)
    run = Path(args.out) if args.out else (run or Path("runs") / exp.name)
    try:
        result = train(exp, run, resume=args.resume, progress=not args.no_progress,
                       device=args.device, allow_changes=args.allow_changes)
    except DataError as err:
        raise UsageError(str(err)) from None
    except TrainingSetupError:  # the run cannot start as asked: a UserError, exit 2
        raise
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.fingerprints and len(set(result.fingerprints)) > 1:
        print(f"error: ranks ended with different weights: {result.fingerprints}",
              file=sys.stderr)
        return 1
    import os

    if int(os.environ.get("RANK", "0")) == 0 and args.json:
        import json

        print(json.dumps({"experiment": exp.name, "step": result.step,
                          "checkpoint": str(result.checkpoint), "run": str(run),
                          "wall_s": round(result.wall_s, 3), "device": args.device,
                          "threads": args.threads}))
    elif int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {exp.name} to step {result.step} in {result.wall_s:.1f} s; "
              f"checkpoint {result.checkpoint}; outputs in {run}")
    return 0
