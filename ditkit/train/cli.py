"""``ditkit train`` and ``ditkit evaluate`` (registered in ``ditkit.cli.COMMAND_MODULES``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


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
    p.add_argument("--steps", type=int, help="override training.steps")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate", help="digits: label accuracy and Frechet distance; folders: FID",
        description="With a checkpoint: sample digits and report label accuracy and a Frechet "
        "distance (see ditkit.train.evaluate). With --real DIR --fake DIR: FID between two "
        "folders of images through the standard Inception weights "
        "(pt_inception-2015-12-05-6726825d.pth); with a checkpoint and --real DIR: FID of "
        "--count samples against the folder. The weights must be on disk: --fid-weights, "
        "$DITKIT_FID_WEIGHTS, or torch's hub cache (nothing is downloaded).")
    p.add_argument("checkpoint", nargs="?", help="a ditkit checkpoint (.safetensors) or a run "
                   "folder (its newest checkpoint's EMA weights); omit it for --real/--fake FID")
    p.add_argument("--count", type=int, default=500, help="samples (labels cycle 0..9)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--sampler", default="heun")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--grid", help="also write the first 100 samples as a PNG grid")
    p.add_argument("--real", help="FID: folder of reference images (sub-folders included); "
                   "with a checkpoint, FID of --count samples against it")
    p.add_argument("--fake", help="FID: folder of generated images")
    p.add_argument("--fid-weights", help="FID: the Inception weights file (default: "
                   "$DITKIT_FID_WEIGHTS, else <torch hub dir>/checkpoints/"
                   "pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--fid-batch", type=int, default=8, help="FID: images per Inception batch")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("encode", help="images -> latent shards with a local AutoencoderKL",
                       description="Encode images (an image folder, webdataset shards or "
                       "`digits`) into latent shards for `data: {kind: latents}`, with a "
                       "diffusers AutoencoderKL loaded from a local folder (pip install "
                       "'ditkit[vae]'). Latents are stored multiplied by the autoencoder's "
                       "scaling factor.")
    p.add_argument("source", help="image folder (class = sub-folder), webdataset shards (.tar "
                   "path, brace pattern or glob) or `digits`")
    p.add_argument("--vae", required=True, help="local AutoencoderKL folder (save_pretrained)")
    p.add_argument("--out", required=True, help="folder for latents-NNNNNN shards")
    p.add_argument("--resolution", required=True,
                   help="image H or HxW to resize/crop to (model input.resolution x the "
                   "autoencoder's downsampling)")
    p.add_argument("--batch", type=int, default=16, help="images per encoder call (default 16)")
    p.add_argument("--shard-size", type=int, default=4096, help="latents per shard")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "npz"])
    p.add_argument("--mode", default="mean", choices=["mean", "sample"],
                   help="posterior mean (default) or a seeded sample of it")
    p.add_argument("--seed", type=int, default=0, help="seed for --mode sample")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("shards", help="image folder -> webdataset tar shards",
                       description="Write an image folder (class = sub-folder) as webdataset "
                       "tar shards (KEY.png/.jpg + KEY.cls) for `data: {kind: webdataset}`.")
    p.add_argument("folder", help="image folder (class = sub-folder, or flat: no labels)")
    p.add_argument("--out", required=True, help="folder for shard-NNNNNN.tar")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_shards)


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
        exp = exp.model_copy(update={"data": absolute_data_paths(exp.data, path.parent)})
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


def absolute_data_paths(data, base: Path):
    """``data`` with its paths (folders, shard patterns) made absolute from ``base`` (the
    experiment file's folder), so the run folder's experiment.yaml works from anywhere."""
    import os

    def fix(p: str) -> str:
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base.resolve(), p))

    if data.kind in ("image_folder", "latents"):
        return data.model_copy(update={"path": fix(data.path)})
    if data.kind == "webdataset":
        shards = fix(data.shards) if isinstance(data.shards, str) else [
            fix(p) for p in data.shards]
        return data.model_copy(update={"shards": shards})
    return data


def cmd_train(args) -> int:
    from .data import DataError
    from .loop import TrainingError, TrainingSetupError, train

    exp, run = load_for_training(args.experiment, args.steps)
    run = Path(args.out) if args.out else (run or Path("runs") / exp.name)
    try:
        result = train(exp, run, resume=args.resume, progress=not args.no_progress,
                       device=args.device, allow_changes=args.allow_changes)
    except DataError as err:
        raise _usage(str(err)) from None
    except TrainingSetupError as err:  # the run cannot start as asked: exit 2
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


def cmd_fid(args) -> int:
    """``--real DIR --fake DIR``: FID between folders; ``CHECKPOINT --real DIR``: FID of
    ``--count`` samples of the checkpoint against the folder."""
    from .fid import FIDError, fid_folders, fid_model

    if args.fid_batch <= 0:
        raise _usage(f"--fid-batch {args.fid_batch}: must be positive")
    if not args.real:
        raise _usage("FID needs --real DIR (reference images), and either --fake DIR or a "
                     "checkpoint to sample from")
    if args.checkpoint is not None and args.fake:
        raise _usage("give either a checkpoint to sample from or --fake DIR, not both")
    if args.checkpoint is None and not args.fake:
        raise _usage("FID needs --fake DIR (generated images) or a checkpoint to sample from")
    try:
        if args.fake:
            report = fid_folders(args.real, args.fake, args.fid_weights, batch=args.fid_batch,
                                 device=args.device, progress=not args.json)
        else:
            if args.count < 2:
                raise _usage(f"--count {args.count}: FID needs at least 2 samples")
            model, ckpt, path = _load_for_sampling(args.checkpoint, args.device)
            report = fid_model(model, ckpt.spec, ckpt.objective, args.real, count=args.count,
                               steps=args.steps, sampler=args.sampler,
                               cfg_scale=args.cfg_scale, seed=args.seed,
                               weights=args.fid_weights, batch=args.fid_batch,
                               device=args.device, progress=not args.json, source=str(path))
    except FIDError as err:
        raise _usage(str(err)) from None
    print(json.dumps(report.to_json(), indent=2) if args.json else report.format())
    return 0


def _load_for_sampling(ref: str, device: str):
    from ditkit.runtime.checkpoint import load_model

    path = resolve_checkpoint(ref)
    try:
        model, ckpt = load_model(path, device=device)
    except ValueError as err:
        raise _usage(str(err)) from None
    if ckpt.objective is None:
        raise _usage(f"{path}: the checkpoint stores no objective (ditkit.objective metadata); "
                     "evaluate needs it to sample")
    return model, ckpt, path


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_model
    from .logs import image_grid, save_png

    if args.real or args.fake:
        return cmd_fid(args)
    if args.checkpoint is None:
        raise _usage("give a checkpoint or run folder (digits evaluation), or --real DIR "
                     "--fake DIR (FID between two folders of images)")
    if args.count < 10:
        raise _usage(f"--count {args.count}: use at least 10 (one per class)")
    model, ckpt, path = _load_for_sampling(args.checkpoint, args.device)
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


def cmd_encode(args) -> int:
    from ditkit.cli import parse_resolution
    from ditkit.runtime.autoencoder import AutoencoderError

    from .data import DataError
    from .encode import encode_images

    for flag, value in (("--batch", args.batch), ("--shard-size", args.shard_size)):
        if value < 1:
            raise _usage(f"{flag} {value}: must be positive")
    try:
        r = encode_images(args.source, args.vae, args.out, parse_resolution(args.resolution),
                          batch_size=args.batch, shard_size=args.shard_size, fmt=args.format,
                          mode=args.mode, seed=args.seed, device=args.device,
                          progress=not args.no_progress)
    except AutoencoderError as err:
        raise _usage(f"--vae {err}") from None
    except DataError as err:
        raise _usage(str(err)) from None
    c, h, w = r.latent_shape
    print(f"encoded {r.count} images ({r.image_resolution[0]}x{r.image_resolution[1]}) into "
          f"{len(r.shards)} shard(s) of {c}x{h}x{w} latents (x{r.scale_factor:g}) in {r.out}; "
          f"train with data: {{kind: latents, path: {r.out}}} and model input: "
          f"{{space: latent, channels: {c}, resolution: [{h}, {w}]}}")
    return 0


def cmd_shards(args) -> int:
    from .data import DataError, image_folder_samples, write_shards

    if args.shard_size < 1:
        raise _usage(f"--shard-size {args.shard_size}: must be positive")
    out = Path(args.out)
    if out.is_dir() and any(out.glob("*.tar")):
        raise _usage(f"--out {out} already holds .tar shards; choose an empty folder")
    try:
        paths = write_shards(image_folder_samples(args.folder), out, args.shard_size,
                             progress=not args.no_progress)
    except DataError as err:
        raise _usage(str(err).replace("data.path: ", f"{args.folder}: ")) from None
    print(f"wrote {len(paths)} shard(s) to {out}; train with data: {{kind: webdataset, "
          f"shards: '{out}/shard-{{{0:06d}..{len(paths) - 1:06d}}}.tar'}}")
    return 0
