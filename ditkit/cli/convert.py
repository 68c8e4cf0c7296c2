"""``ditkit convert``: other checkpoint formats -> ditkit checkpoints, and back.

    ditkit convert --from dit DiT-XL-2-256x256.pt --out dit-xl-2.safetensors
    ditkit convert --from k-diffusion model.safetensors --out hdit.safetensors
    ditkit convert --to k-diffusion hdit.safetensors --out model.safetensors
"""

from __future__ import annotations

from pathlib import Path

from .common import UsageError, load_spec


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert DiT / k-diffusion / MPDiT checkpoints to ditkit ones and back",
        description="Convert a checkpoint trained elsewhere into a self-describing ditkit "
                    "checkpoint (safetensors + spec), or a ditkit checkpoint back to its source "
                    "format. .pt/.pth files are read with torch.load(weights_only=True).")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="source", metavar="FORMAT",
                     help="source format of CHECKPOINT: dit, k-diffusion, mpdit")
    way.add_argument("--to", dest="target", metavar="FORMAT",
                     help="write the ditkit CHECKPOINT in this format instead (k-diffusion: "
                     "a .safetensors gets its config in the metadata; a .pt is a bare state "
                     "dict)")
    p.add_argument("checkpoint", help="input file (.pt/.pth/.safetensors)")
    p.add_argument("--out", required=True, help="output file (.safetensors, or .pt with --to)")
    p.add_argument("--preset", help="use this spec (spec file, ditkit checkpoint or preset name) "
                   "instead of inferring one; every tensor is still checked against it")
    p.add_argument("--heads", type=int, help="DiT: number of attention heads (cannot be read "
                   "from the weights of a non-standard width)")
    p.add_argument("--classes", type=int, help="DiT: number of classes (default: rows of the "
                   "label table minus the null row)")
    p.add_argument("--key", help="entry of a training checkpoint dict to read (default: the "
                   "EMA weights, e.g. 'ema' / 'model_ema', else 'model')")
    p.add_argument("--name", help="name of the spec written into the checkpoint")
    p.set_defaults(func=run)


def run(args) -> int:
    from ditkit.runtime import convert as C
    from ditkit.runtime.checkpoint import load_checkpoint

    out = Path(args.out)
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
        print(f"wrote {out}: {spec.name}, {len(ckpt.tensors)} tensors, {n:,} values, "
              f"sha256 {digest[:16]} (weights, spec and objective)")
        return 0
    for name in ("preset", "heads", "classes", "key", "name"):
        if getattr(args, name) is not None:
            raise UsageError(f"--{name} applies to --from only")
    C.source_module(args.target)
    C.export(args.checkpoint, args.target, out)
    print(f"wrote {out} ({args.target} layout)")
    return 0
