"""``ditkit trt build``: TensorRT 10 engines from exported ONNX files.

ditkit trt build model.onnx --profile 1x256x256/4x512x512/8x1024x1024 --precision fp16
"""

from __future__ import annotations

from .common import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "trt",
        help="TensorRT engines (`ditkit trt build`)",
        description="TensorRT 10 engines from exported ONNX files.",
    )
    trt = p.add_subparsers(dest="trt", metavar="ACTION", required=True)
    b = trt.add_parser("build", help="build (or fetch from the cache) a TensorRT engine")
    b.add_argument("onnx", help="the .onnx file written by `ditkit export`")
    b.add_argument(
        "--profile",
        required=True,
        action="append",
        help="MIN/OPT/MAX shapes, each BxH[xW] (e.g. 1x256/2x512/4x1024); repeat for more profiles",
    )
    b.add_argument(
        "--precision",
        default="fp16",
        choices=["fp32", "fp16", "bf16"],
        help="the engine's precision",
    )
    b.add_argument("--out", default=None, help="engine file (default: next to the ONNX)")
    b.add_argument("--cache-dir", default=None, help="engine + timing cache folder")
    b.add_argument(
        "--workspace-gib",
        type=float,
        default=None,
        help="TensorRT workspace limit in GiB (default: TensorRT's)",
    )
    b.add_argument(
        "--refit-from",
        default=None,
        help="an existing refittable engine: refit its weights from the ONNX instead "
        "of rebuilding (same graph, new weights)",
    )
    b.set_defaults(func=run_build)


def run_build(args) -> int:
    from ditkit.deploy import tensorrt as T

    try:
        profiles = [T.parse_profile(p) for p in args.profile]
        path = T.build_engine(
            args.onnx,
            profiles,
            precision=args.precision,
            out=args.out,
            cache_dir=args.cache_dir,
            workspace_gib=args.workspace_gib,
            refit_from=args.refit_from,
            log=print,
        )
    except T.TensorRTUnavailable as err:  # TensorRTError is a UserError already
        raise UsageError(str(err)) from None
    print(f"engine: {path}")
    return 0
