"""``ditkit convert``: other checkpoint formats -> ditkit checkpoints, and back.

ditkit convert --from dit DiT-XL-2-256x256.pt --out dit-xl-2.safetensors
ditkit convert --from k-diffusion model.safetensors --out hdit.safetensors
ditkit convert --to k-diffusion hdit.safetensors --out model.safetensors
ditkit convert --to diffusers dit.safetensors --out dit-diffusers/
ditkit convert --from diffusers dit-diffusers/ --out dit.safetensors
ditkit convert --from k-diffusion config.json --out spec.yaml --experiment exp.yaml
"""

from __future__ import annotations

from pathlib import Path

from .common import UsageError, checkpoint_path, load_spec


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert DiT / k-diffusion / MPDiT / diffusers checkpoints to ditkit "
        "ones and back; k-diffusion configs to specs",
        description="Convert a checkpoint trained elsewhere into a self-describing ditkit "
        "checkpoint (safetensors + spec), or a ditkit checkpoint back to its source "
        "format. .pt/.pth files are read with torch.load(weights_only=True).",
    )
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument(
        "--from",
        dest="source",
        metavar="FORMAT",
        help="source format of CHECKPOINT: dit, k-diffusion, mpdit, diffusers (a "
        "DiTTransformer2DModel folder); with k-diffusion, a .json CHECKPOINT is a "
        "config: --out gets its spec (.yaml/.json)",
    )
    way.add_argument(
        "--to",
        dest="target",
        metavar="FORMAT",
        help="write the ditkit CHECKPOINT in this format instead (k-diffusion: "
        "a .safetensors gets its config in the metadata; a .pt is a bare state "
        "dict; diffusers: --out is a folder DiTTransformer2DModel.from_pretrained "
        "loads)",
    )
    p.add_argument(
        "checkpoint",
        help="input file (.pt/.pth/.safetensors), diffusers folder, or k-diffusion config (.json)",
    )
    p.add_argument("--out", required=True, help="output file (.safetensors, or .pt with --to)")
    p.add_argument(
        "--preset",
        help="use this spec (spec file, ditkit checkpoint or preset name) "
        "instead of inferring one; every tensor is still checked against it",
    )
    p.add_argument(
        "--heads",
        type=int,
        help="DiT: number of attention heads (cannot be read "
        "from the weights of a non-standard width)",
    )
    p.add_argument(
        "--classes",
        type=int,
        help="DiT: number of classes (default: rows of the label table minus the null row)",
    )
    p.add_argument(
        "--key",
        help="entry of a training checkpoint dict to read (default: the "
        "EMA weights, e.g. 'ema' / 'model_ema', else 'model')",
    )
    p.add_argument("--name", help="name of the spec written into the checkpoint")
    p.add_argument(
        "--experiment",
        metavar="FILE",
        help="k-diffusion config: also write the "
        "training experiment (objective, data, optimizer, EMA) to FILE",
    )
    p.add_argument(
        "--data",
        metavar="FOLDER",
        help="k-diffusion config with --experiment: "
        "train on this image folder instead of the config's dataset",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    """Convert; on any error the ``--out`` this run made (file or folder) is removed, so a
    failed conversion never leaves a checkpoint behind."""
    out = Path(args.out)
    existed = out.exists() or out.is_symlink()
    try:
        return _run(args)
    except BaseException:
        if not existed and (out.exists() or out.is_symlink()):
            import shutil

            if out.is_dir() and not out.is_symlink():
                shutil.rmtree(out, ignore_errors=True)
            else:
                out.unlink(missing_ok=True)
        raise


def _run(args) -> int:
    from ditkit.runtime import convert as C
    from ditkit.runtime.checkpoint import load_checkpoint

    out = Path(args.out)
    if args.source == "k-diffusion" and Path(args.checkpoint).suffix == ".json":
        return _config(args)
    for name in ("experiment", "data"):
        if getattr(args, name) is not None:
            raise UsageError(
                f"--{name} applies to a k-diffusion config (--from k-diffusion CONFIG.json) only"
            )
    if args.source is not None:
        if out.suffix != ".safetensors":
            raise UsageError(f"--out {args.out}: a ditkit checkpoint is a .safetensors file")
        hints = {}
        if args.preset:
            hints["preset"] = load_spec(args.preset, "--preset")
        if args.heads is not None:
            if args.heads <= 0:
                raise UsageError(f"--heads {args.heads}: use a positive number of heads")
            hints["n_heads"] = args.heads
        if args.classes is not None:
            hints["classes"] = args.classes
        if args.name:
            hints["name"] = args.name
        C.source_module(args.source)  # ConversionError / SpecError say what is wrong
        spec = C.convert(args.checkpoint, args.source, out, key=args.key, **hints)
        ckpt = load_checkpoint(out)
        n = sum(t.numel() for t in ckpt.tensors.values())
        digest = C.conversion_hash(ckpt.tensors, ckpt.spec, ckpt.objective)
        print(
            f"wrote {out}: {spec.name}, {len(ckpt.tensors)} tensors, {n:,} values, "
            f"sha256 {digest[:16]} (weights, spec and objective)"
        )
        return 0
    for name in ("preset", "heads", "classes", "key", "name"):
        if getattr(args, name) is not None:
            raise UsageError(f"--{name} applies to --from only")
    C.source_module(args.target)
    source = args.checkpoint
    if args.target == "diffusers":  # a run folder: its newest EMA weights
        source = checkpoint_path(args.checkpoint, "CHECKPOINT")
    C.export(source, args.target, out)
    print(f"wrote {out} ({args.target} layout)")
    return 0


def _config(args) -> int:
    """``--from k-diffusion CONFIG.json``: the spec (and experiment) of a config."""
    from ditkit.runtime.convert import kdiffusion_config as KC

    for name in ("preset", "heads", "classes", "key"):
        if getattr(args, name) is not None:
            raise UsageError(f"--{name} applies to checkpoints, not to a k-diffusion config")
    if args.data is not None and args.experiment is None:
        raise UsageError("--data applies with --experiment (the spec has no dataset)")
    t = KC.convert_config(
        args.checkpoint, args.out, experiment=args.experiment, name=args.name, data_path=args.data
    )
    print(t.table())
    n = KC.parameter_count(t.spec)
    print(
        f"wrote {args.out}: {t.spec.name}, {n:,} parameters"
        + (f"; {args.experiment} (model: {args.out})" if args.experiment else "")
        + f". See it: ditkit describe {args.out} (--diagram)"
    )
    return 0
