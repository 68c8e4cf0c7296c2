"""``ditkit sample``: draw samples from a checkpoint (or an exported .onnx) into a PNG grid.

    ditkit sample model.safetensors --steps 50 --sampler heun --cfg-scale 4 --classes 1,2,3,4
    ditkit sample model.onnx --steps 50 --out grid.png            # the exported engine
    ditkit sample latent-model.safetensors --vae vae/ --out grid.png  # decode latents
    ditkit sample model.safetensors --count 50000 --classes random --npz samples.npz  # for FID
    ditkit sample run/ --stages 8,16:2.0 --policy as_is   # draft at 8x8, refine at 16x16

It parses the flags, builds one :class:`~ditkit.spec.sampling.Sampling` (the shared group of
:func:`ditkit.cli.common.add_sampling`) and calls the library: :mod:`ditkit.runtime.draw`
for a grid, :func:`ditkit.evaluate.npz.sample_npz` for ``--npz``. Both get the same Sampling.
"""

from __future__ import annotations

import sys

from ditkit.cli.common import (
    UsageError,
    add_device,
    add_json,
    add_progress,
    add_sampling,
    add_set,
    add_stages,
    add_threads,
    deprecated,
    load_model_source,
    parse_labels,
    parse_list,
    parse_resolution,
    positive,
    resolve_source,
    sampling_from_args,
    setup_compute,
)
from ditkit.spec.objective import OBJECTIVE_KINDS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="draw samples from a checkpoint (or exported .onnx) into a PNG grid",
        description="Sample a ditkit checkpoint (.safetensors), a run folder (its newest "
        "checkpoint), an ONNX file written by `ditkit export`, or a spec / preset "
        "(random weights); writes a PNG grid (and optionally one PNG per sample).",
    )
    p.add_argument(
        "checkpoint",
        help="checkpoint (.safetensors), run folder, exported .onnx, "
        "or spec file / preset name (random weights)",
    )
    add_sampling(
        p,
        steps=50,
        seed=0,
        cfg_channels_help="guide only the first N channels (DiT: 3; default: the "
        "checkpoint's ditkit.cfg_channels metadata, else all)",
    )
    p.add_argument(
        "--classes",
        default=None,
        help="comma-separated labels, one per sample (repeated to --count), or "
        "'random'; default: unconditional (the null class)",
    )
    p.add_argument(
        "--count",
        type=int,
        default=None,
        help="number of samples (default: the number of --classes, else 16)",
    )
    p.add_argument(
        "--cols",
        type=int,
        default=None,
        help="grid columns (default: one per label of --classes, so each column "
        "is one class; a single class, random or no labels: a square grid)",
    )
    p.add_argument(
        "--resolution",
        default=None,
        help="H or HxW (default: the last of --stages, else the spec's)",
    )
    add_stages(p)
    p.add_argument(
        "--policy",
        default=None,
        help="adapt the model to --resolution first, as `ditkit extrapolate` does: "
        "as_is (the default: the same weights on a bigger grid), core_patch, "
        "add_levels[:share_weights=true], local_core:kernel_size=K, "
        "as_is:rope=extrapolate",
    )
    p.add_argument("--out", default="grid.png", help="PNG grid to write")
    p.add_argument(
        "--individual",
        default=None,
        metavar="DIR",
        help="also write each sample as DIR/000000.png, ...",
    )
    p.add_argument(
        "--autoencoder",
        default=None,
        help="latent-space models: a local TorchScript file mapping latents "
        "(B, C, h, w) to images in [-1, 1]",
    )
    p.add_argument(
        "--vae",
        default=None,
        help="latent-space models: a local diffusers AutoencoderKL folder "
        "(save_pretrained) that decodes the samples (pip install 'ditkit[vae]')",
    )
    p.add_argument(
        "--latent-scale",
        type=float,
        default=None,
        help="latents are divided by this before decoding (default: the --vae "
        "config's scaling_factor; 0.18215 with --autoencoder)",
    )
    p.add_argument(
        "--objective",
        default=None,
        choices=OBJECTIVE_KINDS,
        help="the objective, for a checkpoint that does not record one (default: "
        "the one the model's noise embedding is made for)",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="auto",
        default=None,
        metavar="MODE",
        help="torch.compile each step into one graph (not for .onnx); MODE: auto "
        "(reduce-overhead on CUDA), default, reduce-overhead, "
        "max-autotune-no-cudagraphs, max-autotune",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16"),
        help="eager PyTorch only: bf16 runs the network under bf16 autocast (the "
        "CPU's AMX / AVX-512-BF16 units, a GPU's tensor cores): an "
        "approximation, recorded in --npz settings (default fp32)",
    )
    p.add_argument(
        "--npz",
        default=None,
        metavar="FILE",
        help="write all --count samples to FILE (uint8 NHWC arr_0 + labels arr_1, "
        "the ADM evaluator's format) instead of a grid; batched, resumable "
        "(rerun the same command), split across processes under torchrun",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=32,
        help="with --npz: samples per sampler call (default 32); chunk k uses seed "
        "SEED + k, so the samples depend on it (not on the process count)",
    )
    p.add_argument(
        "--ort-provider",
        default="cpu",
        metavar="PROVIDER",
        help="with an exported .onnx file on the CPU: cpu (onnxruntime's kernels, "
        "default), openvino (the OpenVINO execution provider, f32) or "
        "openvino-bf16 (bf16 on the CPU's AMX units, an approximation); needs "
        "pip install onnxruntime-ep-openvino",
    )
    add_set(p, "spec (spec files and presets only)")
    add_device(p)
    add_threads(p)
    add_progress(p)
    add_json(p, "print one JSON object (what was written, the settings) instead of the text lines")
    deprecated(p, "--cfg", "--cfg-scale", type=float)
    deprecated(p, "--num", "--count", type=int)
    p.set_defaults(func=run)


def run(args) -> int:
    from ditkit.deploy.ort_providers import check_provider
    from ditkit.runtime.draw import cfg_channels_from, decoder_for, draw
    from ditkit.runtime.shape_rule import check_shape

    sampling = sampling_from_args(args)
    positive(args.count, "--count")
    positive(args.cols, "--cols")
    positive(args.batch, "--batch")
    check_provider(args.ort_provider)
    source = resolve_source(args.checkpoint, ("checkpoint", "run", "onnx", "file", "preset"))
    if args.ort_provider != "cpu" and source.kind != "onnx":
        raise UsageError(
            f"--ort-provider {args.ort_provider}: picks how onnxruntime runs an "
            f"exported .onnx file; {args.checkpoint} is not one (export it with "
            "`ditkit export`, or drop --ort-provider)"
        )
    proc = None
    if args.npz:  # under torchrun: join the process group first, it picks the device
        from ditkit.evaluate.npz import processes

        if source.kind not in ("checkpoint", "run", "onnx"):
            raise UsageError(
                f"--npz: {args.checkpoint} is a spec (random weights); give a "
                "checkpoint, a run folder or an exported .onnx file"
            )
        proc = processes(args.device)
        args.device = proc.device
    setup_compute(args)
    if sampling.stages:  # the last stage is the output's size
        last = "x".join(str(v) for v in sampling.stages[-1].resolution)
        if args.resolution is None:
            args.resolution = last
        elif parse_resolution(args.resolution) != tuple(sampling.stages[-1].resolution):
            raise UsageError(
                f"--resolution {args.resolution}: the last of --stages samples "
                f"{last}; end --stages at the output resolution or drop "
                "--resolution"
            )
    den, spec, meta, source_hash = _denoiser(args, source)
    res = parse_resolution(args.resolution) or tuple(spec.input.resolution)
    _check_size(args, spec, res)
    labels, n = parse_labels(args.classes, args.count, spec, sampling.seed)
    check_shape(spec, (n, spec.input.channels, *res), den.rules, "--resolution")
    if sampling.cfg_scale != 1.0 and labels is None:
        raise UsageError(
            "--cfg-scale needs --classes (guidance contrasts a class with the null class)"
        )
    sampling = cfg_channels_from(sampling, meta)
    decode, decoder = decoder_for(
        spec,
        vae=args.vae,
        autoencoder=args.autoencoder,
        latent_scale=args.latent_scale,
        device=args.device,
        required=bool(args.npz),
    )
    if args.npz:
        return _run_npz(
            args, den, spec, res, labels, n, sampling, decode, decoder, proc, source_hash
        )
    images = draw(
        den,
        spec,
        sampling,
        count=n,
        resolution=res,
        class_labels=labels,
        decode=decode,
        device=args.device,
        progress=not args.no_progress,
    )
    if spec.input.space == "latent" and decode is None:
        return _kept_latents(images, spec, args.out)
    _write(args, images, spec, res, labels, n, sampling, source.kind)
    return 0


def _check_size(args, spec, res) -> None:
    """The memory of --count, --resolution and --batch, estimated before the labels or any
    sample is allocated (ditkit.spec.limits; --no-size-limits lifts it)."""
    from ditkit.spec.limits import check_sample_size

    listed = parse_list(args.classes) if args.classes not in (None, "random") else []
    n = args.count or len(listed) or 16
    if args.npz:
        check_sample_size(spec, n, res, batch=args.batch, keep=False)
    else:
        check_sample_size(spec, n, res)


def _denoiser(args, source):
    """``(denoiser, spec, metadata, source hash)`` of the command's source: an exported graph
    under onnxruntime, or a checkpoint / spec (``--policy``, ``--compile``) in eager PyTorch."""
    if source.kind == "onnx":
        from ditkit.deploy.engines import OrtDenoiser
        from ditkit.runtime.draw import file_sha256

        if args.overrides:
            raise UsageError(
                "--set: an exported .onnx graph is fixed; --set applies to spec files and presets"
            )
        if args.precision != "fp32":
            raise UsageError(
                f"--precision {args.precision}: applies to eager PyTorch; an "
                ".onnx graph has its precision (export --precision, or "
                "--ort-provider openvino-bf16 on the CPU)"
            )
        if args.policy is not None:
            raise UsageError(
                "--policy: an exported .onnx graph is fixed; adapt the "
                "checkpoint (ditkit sample CHECKPOINT --policy ...) or export the "
                "adapted model"
            )
        den = OrtDenoiser(
            source.path, device=args.device, threads=args.threads, ort_provider=args.ort_provider
        )
        return den, den.spec, den.metadata, file_sha256(source.path) if args.npz else None
    from ditkit.runtime.denoiser import COMPILE_MODES, Denoiser, compile_denoiser

    model, objective, meta, model_hash = load_model_source(
        args.checkpoint, args.objective, args.device, args.overrides
    )
    policy = None
    if args.policy is not None:
        from ditkit.evaluate.report import parse_policy

        policy = parse_policy(args.policy, flag="--policy")
    if args.precision == "bf16" and str(args.device).startswith("cpu"):
        from ditkit.device import cpu_has_bf16

        if not cpu_has_bf16():
            print(
                "note: this CPU has no bf16 units (amx_bf16 / avx512_bf16); --precision bf16 "
                "would be emulated and slower, sampling in fp32",
                file=sys.stderr,
            )
            args.precision = "fp32"
    if policy is None:
        den = Denoiser(model, objective, precision=args.precision)
    else:  # each --stages stage runs the model adapted to its own grid
        from ditkit.runtime.denoiser import AdaptingDenoiser
        from ditkit.runtime.extrapolate import adapt_model

        trained = model
        den = AdaptingDenoiser(
            lambda res: adapt_model(trained, policy, res, args.device),
            objective,
            parse_resolution(args.resolution) or tuple(model.spec.input.resolution),
            precision=args.precision,
        )
        model = den.model
    if args.compile is not None:
        if args.compile not in COMPILE_MODES:
            raise UsageError(f"--compile {args.compile}: choose one of {', '.join(COMPILE_MODES)}")
        compile_denoiser(den, args.compile, args.device)
    return den, model.spec, meta, model_hash


def _kept_latents(latents, spec, out) -> int:
    """A latent-space model with no decoder: keep the latents next to ``--out``, say how to
    decode them."""
    from ditkit.runtime.draw import save_latents

    path = save_latents(latents, out)
    print(
        f"{spec.name} samples latents ({spec.input.channels} channels); no image was "
        f"written because no --autoencoder or --vae was given (ditkit downloads nothing). "
        f"Latents saved to {path}; decode them with --vae VAE_FOLDER (a local "
        "diffusers AutoencoderKL) or --autoencoder DECODER.pt (TorchScript).",
        file=sys.stderr,
    )
    return 0


def _write(args, images, spec, res, labels, n, sampling, kind) -> None:
    """The grid (one column per listed class), the single PNGs, the report line or JSON."""
    from ditkit.runtime.draw import save_images

    cols = args.cols
    if cols is None and labels is not None and args.classes != "random":
        listed = len(parse_list(args.classes))
        if listed > 1:  # labels cycle through the list: each column holds one class
            cols = min(n, listed)
    save_images(images, args.out, ncol=cols, individual=args.individual)
    shown = f"{res[0]}x{res[1]}"
    if tuple(images.shape[-2:]) != tuple(res):
        shown += f" latents decoded to {images.shape[-2]}x{images.shape[-1]}"
    if args.json:
        import json

        print(
            json.dumps(
                {
                    "out": str(args.out),
                    "individual": args.individual,
                    "count": n,
                    "resolution": list(res),
                    "image": list(images.shape[-2:]),
                    "sampler": sampling.sampler,
                    "steps": sampling.steps,
                    "cfg_scale": sampling.cfg_scale,
                    "seed": sampling.seed,
                    "sampling": sampling.recorded(),
                    "device": args.device,
                    "threads": args.threads,
                    "ort_provider": args.ort_provider if kind == "onnx" else None,
                }
            )
        )
        return
    engine = "" if args.ort_provider == "cpu" else f", onnxruntime {args.ort_provider}"
    print(f"wrote {args.out} ({n} samples, {shown}, {sampling.describe()}{engine})")
    if args.individual:
        print(f"wrote {n} images to {args.individual}/")


def _run_npz(
    args, den, spec, res, labels, n, sampling, decode, decoder, proc, source_hash: str
) -> int:
    """``--npz``: :func:`ditkit.evaluate.npz.sample_npz` with the command's Sampling."""
    from ditkit.evaluate.npz import sample_npz

    identity = {"source": source_hash}
    if args.ort_provider != "cpu":  # bf16 draws differ from f32 ones: a resume must match
        identity["ort_provider"] = args.ort_provider
    if getattr(den, "precision", "fp32") != "fp32":
        identity["precision"] = den.precision
    if decoder:
        identity["decoder"] = decoder
    try:
        result = sample_npz(
            den,
            args.npz,
            sampling,
            num=n,
            shape=(spec.input.channels, *res),
            batch=args.batch,
            class_labels=labels,
            decode=decode,
            identity=identity,
            proc=proc,
            progress=not args.no_progress,
        )
    finally:
        proc.close()
    if proc.main:
        done = f"{result.reused} of them drawn by an earlier run, " if result.reused else ""
        extra = " + labels arr_1" if labels is not None else ""
        print(
            f"wrote {args.npz}: arr_0 {result.shape} uint8{extra} ({n} samples, {done}"
            f"{sampling.describe()}, batch {args.batch}, {proc.world} process(es))"
        )
    return 0
