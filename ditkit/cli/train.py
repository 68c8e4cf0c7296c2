"""``ditkit train``: train an experiment (YAML), or resume a run folder; ``torchrun`` for
several processes.

Exit status: 0 done; 2 bad input, or the run folder is in use by another process; 1 the run
failed (a non-finite loss, the machine refused); 75 (``EXIT_PREEMPTED``) stopped by SIGTERM or
SIGUSR1 after writing a checkpoint: run the same command with ``--resume auto`` to continue."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ditkit.cli.common import (
    UsageError,
    add_device,
    add_json,
    add_progress,
    add_set,
    add_threads,
    load_experiment_source,
    positive,
    setup_compute,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train an experiment (YAML); torchrun for several processes",
        description="Train an experiment spec. Under torchrun (WORLD_SIZE > 1) "
        "it runs DDP or FSDP2 (the experiment's distributed.strategy), gloo on "
        "CPU / nccl on CUDA; only rank 0 writes.",
    )
    p.add_argument(
        "experiment", nargs="?", help="experiment file (.yaml/.json), or a run folder to resume"
    )
    p.add_argument("--out", help="run folder (default: runs/<experiment name>)")
    p.add_argument(
        "--resume",
        nargs="?",
        action=ResumeAction,
        default=False,
        metavar="auto",
        help="continue from the newest complete checkpoint in the run folder; "
        "--resume auto: continue when there is one, else start (for jobs a "
        "scheduler or torchrun --max-restarts restarts after preemption; "
        "SIGTERM/SIGUSR1 checkpoint and exit 75)",
    )
    p.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: accept an experiment that differs from the run's in "
        "what is trained (recorded in RUN/resume-changes.json)",
    )
    p.add_argument("--steps", type=int, help="training steps (short for --set training.steps=N)")
    add_set(p, "experiment; the run folder's experiment.yaml records the result")
    add_device(p)
    add_threads(p)
    add_progress(p)
    add_json(p, "print one JSON object (step, checkpoint, run folder, seconds) at the end")
    p.set_defaults(func=run)


class ResumeAction(argparse.Action):
    """``--resume`` (True) or ``--resume auto``. ``--resume RUN`` (the experiment given right
    after the flag, as before ``auto`` existed) still means ``--resume`` with ``RUN``."""

    def __call__(self, parser, namespace, value, option_string=None):
        if value is None or value == "auto":
            namespace.resume = value or True
        else:
            namespace.resume = True
            namespace.resume_positional = value


def run(args) -> int:
    from ditkit.data.datasets import DataError
    from ditkit.training.loop import (
        EXIT_PREEMPTED,
        Preempted,
        TrainingError,
        TrainingSetupError,
        train,
    )

    stray = getattr(args, "resume_positional", None)
    if stray is not None:
        if args.experiment is not None:
            raise UsageError(
                f"--resume {stray}: --resume takes no value but `auto`; give the "
                f"experiment once ({args.experiment})"
            )
        args.experiment = stray
    if args.experiment is None:
        raise UsageError("train: give an experiment file (.yaml/.json) or a run folder")

    overrides = list(args.overrides)
    if args.steps is not None:
        positive(args.steps, "--steps")
        overrides.append(f"training.steps={args.steps}")
    exp, run = load_experiment_source(args.experiment, overrides)
    setup_compute(args)
    run = Path(args.out) if args.out else (run or Path("runs") / exp.name)
    try:
        result = train(
            exp,
            run,
            resume=args.resume,
            progress=not args.no_progress,
            device=args.device,
            allow_changes=args.allow_changes,
        )
    except DataError as err:
        raise UsageError(str(err)) from None
    except TrainingSetupError:  # the run cannot start as asked: a UserError, exit 2
        raise
    except Preempted as err:  # checkpointed; the scheduler (or torchrun) restarts it
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"ditkit train: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.fingerprints and len(set(result.fingerprints)) > 1:
        print(f"error: ranks ended with different weights: {result.fingerprints}", file=sys.stderr)
        return 1

    if int(os.environ.get("RANK", "0")) == 0 and args.json:
        import json

        print(
            json.dumps(
                {
                    "experiment": exp.name,
                    "step": result.step,
                    "checkpoint": str(result.checkpoint),
                    "run": str(run),
                    "wall_s": round(result.wall_s, 3),
                    "device": args.device,
                    "threads": args.threads,
                }
            )
        )
    elif int(os.environ.get("RANK", "0")) == 0:
        print(
            f"trained {exp.name} to step {result.step} in {result.wall_s:.1f} s; "
            f"checkpoint {result.checkpoint}; outputs in {run}"
        )
    return 0
