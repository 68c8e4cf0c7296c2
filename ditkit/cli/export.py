"""``ditkit export``: a checkpoint or spec -> ONNX (torch.export -> ONNX, checked).

ditkit export model.safetensors --out model.onnx --dynamic batch,resolution
"""

from __future__ import annotations

from ditkit.cli.common import (
    UsageError,
    add_json,
    add_set,
    add_threads,
    deprecated,
    load_model_source,
    parse_resolution,
    setup_compute,
)
from ditkit.spec.objective import OBJECTIVE_KINDS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint or spec to ONNX (torch.export -> ONNX, checked)",
        description="Export the denoiser (model + preconditioning) to ONNX through "
        "torch.export, then run onnx.checker, check the dynamic dims and compare "
        "onnxruntime against eager at 2 resolutions x 2 batch sizes.",
    )
    p.add_argument(
        "source",
        help="ditkit checkpoint (.safetensors), spec file or preset name "
        "(a spec is exported with random weights)",
    )
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument(
        "--opset",
        type=int,
        default=None,
        help="ONNX opset (default 18, raised automatically when an op needs a newer "
        "one for the chosen precision)",
    )
    p.add_argument(
        "--dynamic",
        default="batch,resolution",
        help="dynamic dims: batch, resolution, both (default) or 'none'",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "fp16", "bf16"],
        help="type the network runs in",
    )
    p.add_argument(
        "--target",
        default="onnxruntime",
        help="onnxruntime or tensorrt-10.x / tensorrt-10.N (op allow-list)",
    )
    p.add_argument("--resolution", default=None, help="example H or HxW (default: the spec's)")
    p.add_argument(
        "--objective",
        default=None,
        choices=OBJECTIVE_KINDS,
        help="objective when the source does not record one (default: the one the "
        "model's noise embedding is made for: edm for fourier, flow for fno, "
        "ddpm_eps for sinusoidal)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the onnxruntime parity runs (the other checks always run)",
    )
    p.add_argument(
        "--perturb-zero-layers",
        action="store_true",
        help="an untrained spec's zero-initialised layers make parity trivial: "
        "also check an export of a copy with those weights perturbed",
    )
    p.add_argument(
        "--bake-cfg",
        action="store_true",
        help="bake classifier-free guidance in: inputs x, sigma, class_labels, "
        "cfg_scale; the conditional and null-class passes run batched inside",
    )
    p.add_argument(
        "--cfg-channels",
        type=int,
        default=None,
        help="with --bake-cfg: guide only the first N channels (DiT: 3; default: the "
        "checkpoint's ditkit.cfg_channels metadata, else all)",
    )
    p.add_argument(
        "--quantize",
        default=None,
        choices=["int8"],
        help="opt-in, fp32 onnxruntime exports: run the linear layers' MatMuls in "
        "int8 (dynamic quantization; faster on CPUs with VNNI/AMX, not exact: "
        "parity is checked at 1e-1 of the output scale)",
    )
    add_set(p, "spec (spec files and presets only)")
    add_threads(p)
    add_json(
        p,
        "print one JSON object (file, opset, dynamic dims, resolution rule, parity) "
        "instead of the log",
    )
    deprecated(p, "--cfg", "--bake-cfg", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ditkit.deploy.export import ExportError, export_onnx
    from ditkit.runtime.checkpoint import CFG_CHANNELS_KEY, cfg_channels_of

    dynamic = (
        ()
        if args.dynamic == "none"
        else tuple(d.strip() for d in args.dynamic.split(",") if d.strip())
    )
    setup_compute(args)
    model, objective, meta, h = load_model_source(
        args.source, args.objective, overrides=args.overrides
    )
    extra = {k: v for k, v in meta.items() if k == CFG_CHANNELS_KEY}
    cfg_channels = args.cfg_channels
    if args.bake_cfg and cfg_channels is None:
        cfg_channels = cfg_channels_of(meta)
    try:
        result = export_onnx(
            model,
            objective,
            args.out,
            opset=args.opset,
            dynamic=dynamic,
            precision=args.precision,
            target=args.target,
            resolution=parse_resolution(args.resolution),
            checkpoint_hash=h,
            metadata=extra,
            check=not args.no_check,
            cfg=args.bake_cfg,
            cfg_channels=cfg_channels,
            log=None if args.json else print,
            perturb_zero_layers=args.perturb_zero_layers,
            quantize=args.quantize,
        )
    except ExportError as err:
        raise UsageError(str(err)) from None
    rule = result.rule
    if args.json:
        import json

        print(
            json.dumps(
                {
                    "out": str(result.path),
                    "opset": result.opset,
                    "precision": result.precision,
                    "target": result.target,
                    "dynamic": list(result.dynamic),
                    "resolution_rule": {
                        name: {"min": r.minimum, "step": r.step, "max": r.maximum}
                        for name, r in zip(("height", "width"), rule)
                    },
                    "parity": result.parity,
                    "seconds": round(result.seconds, 3),
                },
                default=list,
            )
        )
        return 0
    print(
        f"valid resolutions: height {rule[0].text()}, width {rule[1].text()} "
        f"(dynamic: {','.join(result.dynamic) or 'none'}); {result.seconds:.1f} s"
    )
    return 0
