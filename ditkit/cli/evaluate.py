"""``ditkit evaluate``: label accuracy and Frechet distance of a checkpoint's samples (digits or
shapes, after the run's data),
or FID, precision and recall between folders / ``.npz`` files (or of a checkpoint's samples
against one)."""

from __future__ import annotations

import json
from pathlib import Path

from ditkit.cli.common import (
    UsageError,
    add_device,
    add_json,
    add_progress,
    add_sampling,
    add_threads,
    checkpoint_path,
    sampling_from_args,
    setup_compute,
)

GUIDED_SCALE = 3.0  # the guided scale reported when neither --cfg-scale nor the run gives one
LABELLED = ("digits", "shapes")  # ditkit.spec.experiment.LABELLED_DATA; a test holds them equal


def run_experiment(path: Path) -> tuple[Path | None, dict]:
    """The ``experiment.yaml`` nearest above a checkpoint (its own folder, the run's, up to
    three levels) and its data, read as plain YAML (``{}`` when none or unreadable)."""
    for folder in (path.parent, *path.parents[:3]):
        exp = folder / "experiment.yaml"
        if exp.is_file():
            import yaml

            try:
                data = yaml.safe_load(exp.read_text())
            except (yaml.YAMLError, OSError, UnicodeDecodeError):
                return exp, {}
            return exp, data if isinstance(data, dict) else {}
    return None, {}


def label_data(choice: str, path: Path) -> tuple[str, int]:
    """The data whose classifier scores the samples, and its class count: ``--data`` when
    given, else the run's ``data.kind`` (digits when no experiment.yaml is found). A run on
    other data has no built-in classifier: a usage error that says what to use instead."""
    exp, data = run_experiment(path)
    raw = data.get("data")
    section = raw if isinstance(raw, dict) else {}
    kind = section.get("kind", "digits") if choice == "auto" else choice
    if kind not in LABELLED:
        raise UsageError(
            f"{exp}: data.kind is {kind!r}; label accuracy needs a built-in "
            "classifier (digits or shapes). Use --data digits|shapes if the model "
            "draws those, or FID: --real REF"
        )
    classes = section.get("classes", 10) if kind == "shapes" else 10
    if not isinstance(classes, int) or isinstance(classes, bool) or not 1 <= classes <= 10:
        classes = 10
    return kind, classes


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="digits or shapes: label accuracy and Frechet distance; folders or "
        ".npz: FID, precision, recall",
        description="With a checkpoint: sample the run's data (digits or shapes: --data, "
        "default the data.kind of the run's experiment.yaml) and report label accuracy and a "
        "Frechet distance on a classifier of real images (see ditkit.evaluate.classifier); "
        "without --cfg-scale, both unguided (scale 1) and guided (the run's "
        "evaluation.cfg_scale when its experiment.yaml gives one above "
        f"1, else {GUIDED_SCALE:g}). With --real REF --fake SAMPLES: FID, precision "
        "and recall between two sets of images (folders or .npz files) through the standard "
        "Inception weights (pt_inception-2015-12-05-6726825d.pth); with a checkpoint and "
        "--real REF: the same for --count samples against REF (at --cfg-scale, default 1). "
        "The weights must be on disk: --fid-weights, $DITKIT_FID_WEIGHTS, or torch's hub "
        "cache (nothing is downloaded).",
    )
    p.add_argument(
        "checkpoint",
        nargs="?",
        help="a ditkit checkpoint (.safetensors) or a run "
        "folder (its newest checkpoint's EMA weights); omit it for --real/--fake FID",
    )
    p.add_argument("--count", type=int, default=500, help="samples (labels cycle over the classes)")
    p.add_argument(
        "--data",
        choices=("auto", *LABELLED),
        default="auto",
        help="which real images the classifier learns: auto (the run's "
        "experiment.yaml data.kind; digits when there is none), digits or shapes",
    )
    add_sampling(
        p,
        steps=20,
        seed=1,
        cfg_scale_help="guidance scale (default: report unguided and guided, see above; FID: 1)",
    )
    add_device(p)
    add_threads(p)
    add_progress(p)
    p.add_argument(
        "--grid",
        help="also write the first 100 samples (of the last scale) as a "
        "PNG grid, one column per class",
    )
    p.add_argument(
        "--real",
        help="FID: reference images, a folder (sub-folders included) or "
        "an .npz (uint8 NHWC arr_0); with a checkpoint, FID of --count samples "
        "against it",
    )
    p.add_argument(
        "--fake", help="FID: generated images, a folder or an .npz (ditkit sample --npz)"
    )
    p.add_argument(
        "--pr-k",
        type=int,
        default=3,
        help="FID: also improved precision and "
        "recall with K-nearest-neighbour radii (default 3, as the ADM evaluator; "
        "0: FID only)",
    )
    p.add_argument(
        "--fid-weights",
        help="FID: the Inception weights file (default: "
        "$DITKIT_FID_WEIGHTS, else <torch hub dir>/checkpoints/"
        "pt_inception-2015-12-05-6726825d.pth)",
    )
    p.add_argument("--fid-batch", type=int, default=8, help="FID: images per Inception batch")
    add_json(p)
    p.set_defaults(func=run)


def guidance_scales(cfg_scale: float | None, spec, path: Path) -> list[float]:
    """The scales to report: the one asked for, else 1 and a guided one (the run's
    ``evaluation.cfg_scale`` when above 1, else :data:`GUIDED_SCALE`); only 1 for a model
    without a null class (nothing to guide against)."""
    if cfg_scale is not None:
        return [cfg_scale]
    classes = spec.conditioning.classes
    if classes is None or not classes.null_class:
        return [1.0]
    guided = GUIDED_SCALE
    section = run_experiment(path)[1].get("evaluation")
    section = section if isinstance(section, dict) else {}
    nested = section.get("sampling")  # evaluation: {sampling: {cfg_scale: ...}}, or flat (older)
    scale = (nested if isinstance(nested, dict) else section).get("cfg_scale")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 1:
        guided = float(scale)
    return [1.0, guided]


def run(args) -> int:
    from ditkit.evaluate.classifier import evaluate_model
    from ditkit.training.logs import image_grid, save_png

    if args.real or args.fake:
        return run_fid(args)
    if args.checkpoint is None:
        raise UsageError(
            "give a checkpoint or run folder (digits / shapes evaluation), or "
            "--real DIR --fake DIR (FID between two folders of images)"
        )
    if args.count < 1:
        raise UsageError(f"--count {args.count}: use at least one sample per class")
    base = sampling_from_args(args, cfg_scale=1.0)  # the scales are settled below
    setup_compute(args)
    model, ckpt, path = _load_for_sampling(args.checkpoint, args.device)
    data, classes = label_data(args.data, path)
    if args.count < classes:
        raise UsageError(
            f"--count {args.count}: use at least {classes} (one per class of the {data})"
        )
    scales = guidance_scales(args.cfg_scale, ckpt.spec, path)
    settings = {
        "data": data,
        "count": args.count,
        "sampler": base.sampler,
        "steps": base.steps,
        "cfg_scales": scales,
        "seed": base.seed,
        "device": args.device,
        "threads": args.threads,
        "sampling": base.recorded(),
    }
    if not args.json:
        shown = " and ".join(f"{s:g}" for s in scales)
        extras = "".join(f", {e}" for e in base.extras())
        print(
            f"evaluating {path} on {data}: {args.count} samples (labels cycle "
            f"0..{classes - 1}), {base.sampler} {base.steps} steps, cfg-scale {shown}, seed "
            f"{base.seed}{extras}, {args.device}, {args.threads} thread(s)",
            flush=True,
        )
    results = []
    for scale in scales:
        report, images, _ = evaluate_model(
            model,
            ckpt.spec,
            ckpt.objective,
            count=args.count,
            sampling=sampling_from_args(args, cfg_scale=scale),
            device=args.device,
            progress=not (args.json or args.no_progress),
            data=data,
            classes=classes,
        )
        results.append({"cfg_scale": scale, **report.to_json()})
        if not args.json:
            label = "unguided" if scale == 1 else "guided"
            print(f"  cfg-scale {scale:g} ({label}): {report.format()}")
    if args.grid:
        save_png(image_grid(images[:100], 10, scale=2), Path(args.grid))
    if args.json:
        # the first result (unguided, or the scale asked for) at the top level, as before;
        # every scale's report in "results"
        print(
            json.dumps(
                {"checkpoint": str(path), **results[0], "settings": settings, "results": results},
                indent=2,
            )
        )
    return 0


def run_fid(args) -> int:
    """``--real DIR --fake DIR``: FID between folders; ``CHECKPOINT --real DIR``: FID of
    ``--count`` samples of the checkpoint against the folder."""
    from ditkit.evaluate.fid import fid_folders, fid_model

    if args.fid_batch <= 0:
        raise UsageError(f"--fid-batch {args.fid_batch}: must be positive")
    if args.pr_k < 0:
        raise UsageError(f"--pr-k {args.pr_k}: use a positive K, or 0 for FID only")
    k = args.pr_k or None
    if not args.real:
        raise UsageError(
            "FID needs --real DIR (reference images), and either --fake DIR or a "
            "checkpoint to sample from"
        )
    if args.checkpoint is not None and args.fake:
        raise UsageError("give either a checkpoint to sample from or --fake DIR, not both")
    if args.checkpoint is None and not args.fake:
        raise UsageError("FID needs --fake DIR (generated images) or a checkpoint to sample from")
    setup_compute(args)
    if args.fake:
        report = fid_folders(
            args.real,
            args.fake,
            args.fid_weights,
            batch=args.fid_batch,
            device=args.device,
            progress=not (args.json or args.no_progress),
            k=k,
        )
    else:
        if args.count < 2:
            raise UsageError(f"--count {args.count}: FID needs at least 2 samples")
        sampling = sampling_from_args(
            args, cfg_scale=1.0 if args.cfg_scale is None else args.cfg_scale
        )
        model, ckpt, path = _load_for_sampling(args.checkpoint, args.device)
        report = fid_model(
            model,
            ckpt.spec,
            ckpt.objective,
            args.real,
            count=args.count,
            sampling=sampling,
            weights=args.fid_weights,
            batch=args.fid_batch,
            device=args.device,
            progress=not (args.json or args.no_progress),
            source=str(path),
            k=k,
        )
    print(json.dumps(report.to_json(), indent=2) if args.json else report.format())
    return 0


def _load_for_sampling(ref: str, device: str):
    from ditkit.runtime.checkpoint import load_model

    path = checkpoint_path(ref)
    model, ckpt = load_model(path, device=device)  # a CheckpointError says what is wrong
    if ckpt.objective is None:
        raise UsageError(
            f"{path}: the checkpoint stores no objective (ditkit.objective metadata); "
            "evaluate needs it to sample"
        )
    return model, ckpt, path
