"""``ditkit train`` and ``ditkit evaluate`` (registered in ``ditkit.cli.COMMAND_MODULES``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train an experiment (YAML); torchrun for several processes",
                       description="Train an experiment spec. Under torchrun (WORLD_SIZE > 1) "
                       "it runs DDP, gloo on CPU / nccl on CUDA; only rank 0 writes.")
    p.add_argument("experiment", help="experiment file (.yaml/.json), or a run folder to resume")
    p.add_argument("--out", help="run folder (default: runs/<experiment name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in the run folder")
    p.add_argument("--steps", type=int, help="override training.steps")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="digits: label accuracy and Frechet distance of samples")
    p.add_argument("checkpoint", help="a ditkit checkpoint (.safetensors) or a run folder "
                   "(its newest checkpoint's EMA weights)")
    p.add_argument("--count", type=int, default=500, help="samples (labels cycle 0..9)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--sampler", default="heun")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--grid", help="also write the first 100 samples as a PNG grid")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)


def _usage(msg: str):
    from ditkit.cli import UsageError

    return UsageError(msg)


def load_for_training(ref: str, steps: int | None = None):
    """``(experiment, run folder guess)`` from an experiment file or a run folder."""
    from ditkit.spec import experiment as E

    path = Path(ref)
    if path.is_dir():
        if not (path / "experiment.yaml").is_file():
            raise _usage(f"{path}: a folder, but not a run folder (no experiment.yaml)")
        exp, run = E.load_experiment(path / "experiment.yaml"), path
    else:
        exp, run = E.load_experiment(path), None
        if exp.data.kind == "image_folder" and not Path(exp.data.path).is_absolute():
            data = exp.data.model_copy(update={"path": str((path.parent / exp.data.path)
                                                           .resolve())})
            exp = exp.model_copy(update={"data": data})
        ft = exp.finetune
        if ft is not None and ft.source_model is None and not Path(ft.checkpoint).is_absolute():
            ft = ft.model_copy(update={"checkpoint": str((path.parent / ft.checkpoint).resolve())})
            exp = exp.model_copy(update={"finetune": ft})
    if steps is not None:
        if steps <= 0:
            raise _usage(f"--steps {steps}: must be a positive number of steps")
        exp = exp.model_copy(update={"training": exp.training.model_copy(
            update={"steps": steps})})
    return exp, run


def cmd_train(args) -> int:
    from .data import DataError
    from .loop import TrainingError, train

    exp, run = load_for_training(args.experiment, args.steps)
    run = Path(args.out) if args.out else (run or Path("runs") / exp.name)
    try:
        result = train(exp, run, resume=args.resume, progress=not args.no_progress,
                       device=args.device)
    except DataError as err:
        raise _usage(str(err)) from None
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.fingerprints and len(set(result.fingerprints)) > 1:
        print(f"error: ranks ended with different weights: {result.fingerprints}",
              file=sys.stderr)
        return 1
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {exp.name} to step {result.step} in {result.wall_s:.1f} s; "
              f"checkpoint {result.checkpoint}; outputs in {run}")
    return 0


def resolve_checkpoint(ref: str) -> Path:
    from .checkpoints import latest_checkpoint

    path = Path(ref)
    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise _usage(f"{path}: no checkpoints (expected checkpoints/step-*/ema.safetensors)")
        return found[1] / "ema.safetensors"
    if not path.is_file():
        raise _usage(f"{path}: no such checkpoint file or run folder")
    return path


def cmd_evaluate(args) -> int:
    from ditkit.runtime.checkpoint import load_model

    from .evaluate import evaluate_model
    from .logs import image_grid, save_png

    path = resolve_checkpoint(args.checkpoint)
    if args.count < 10:
        raise _usage(f"--count {args.count}: use at least 10 (one per class)")
    try:
        model, ckpt = load_model(path, device=args.device)
    except ValueError as err:
        raise _usage(str(err)) from None
    if ckpt.objective is None:
        raise _usage(f"{path}: the checkpoint stores no objective (ditkit.objective metadata); "
                     "evaluate needs it to sample")
    try:
        report, images, _ = evaluate_model(model, ckpt.spec, ckpt.objective, count=args.count,
                                           steps=args.steps, sampler=args.sampler,
                                           cfg_scale=args.cfg_scale, seed=args.seed,
                                           device=args.device, progress=not args.json)
    except ValueError as err:
        raise _usage(f"{path}: {err}") from None
    if args.grid:
        save_png(image_grid(images[:100], 10, scale=2), Path(args.grid))
    if args.json:
        print(json.dumps({"checkpoint": str(path), **report.to_json()}, indent=2))
    else:
        print(f"{path}: {report.format()}")
    return 0
