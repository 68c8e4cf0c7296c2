"""``ditkit sample``, ``ditkit export``, ``ditkit trt build`` and ``ditkit bench sample``.

    ditkit sample model.safetensors --steps 50 --sampler heun --cfg 4 --classes 1,2,3,4 --out grid.png
    ditkit sample model.onnx --steps 50 --out grid.png            # the exported engine
    ditkit sample latent-model.safetensors --vae vae/ --out grid.png  # decode latents
    ditkit export model.safetensors --out model.onnx --dynamic batch,resolution
    ditkit trt build model.onnx --profile 1x256x256/4x512x512/8x1024x1024 --precision fp16
    ditkit bench sample examples/tiny/tiny-hdit-neighborhood.yaml --resolutions 16 32
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .files import atomic_path


def add_parser(subparsers) -> None:
    from .samplers import SAMPLERS, SCHEDULES

    p = subparsers.add_parser(
        "sample", help="draw samples from a checkpoint (or exported .onnx) into a PNG grid",
        description="Sample a ditkit checkpoint (.safetensors) or an ONNX file written by "
                    "`ditkit export`; writes a PNG grid (and optionally one PNG per sample).")
    p.add_argument("checkpoint", help="ditkit checkpoint (.safetensors) or exported .onnx")
    p.add_argument("--steps", type=int, default=50, help="number of noise levels (default 50)")
    p.add_argument("--sampler", default="heun", choices=SAMPLERS)
    p.add_argument("--schedule", default="native", choices=SCHEDULES)
    p.add_argument("--eta", type=float, default=None,
                   help="ddim / dpmpp_3m_sde noise (default 0 / 1)")
    p.add_argument("--cfg", type=float, default=1.0,
                   help="classifier-free guidance scale (1 = the conditional model)")
    p.add_argument("--cfg-interval", default=None, metavar="LO,HI",
                   help="guide only for sigma in [LO, HI]")
    p.add_argument("--cfg-channels", type=int, default=None,
                   help="guide only the first N channels (DiT: 3; default: the checkpoint's "
                        "ditkit.cfg_channels metadata, else all)")
    p.add_argument("--classes", default=None,
                   help="comma-separated labels, one per sample (repeated to --num), or "
                        "'random'; default: unconditional (the null class)")
    p.add_argument("--num", type=int, default=None,
                   help="number of samples (default: the number of --classes, else 16)")
    p.add_argument("--resolution", default=None, help="H or HxW (default: the spec's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="grid.png", help="PNG grid to write (default grid.png)")
    p.add_argument("--individual", default=None, metavar="DIR",
                   help="also write each sample as DIR/000000.png, ...")
    p.add_argument("--autoencoder", default=None,
                   help="latent-space models: a local TorchScript file mapping latents "
                        "(B, C, h, w) to images in [-1, 1]")
    p.add_argument("--vae", default=None,
                   help="latent-space models: a local diffusers AutoencoderKL folder "
                        "(save_pretrained) that decodes the samples (pip install 'ditkit[vae]')")
    p.add_argument("--latent-scale", type=float, default=None,
                   help="latents are divided by this before decoding (default: the --vae "
                        "config's scaling_factor; 0.18215 with --autoencoder)")
    p.add_argument("--objective", default=None, choices=["edm", "ddpm_eps", "x0", "flow"],
                   help="the objective, for a checkpoint that does not record one")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)

    p = subparsers.add_parser(
        "export", help="export a checkpoint or spec to ONNX (torch.export -> ONNX, checked)",
        description="Export the denoiser (model + preconditioning) to ONNX through "
                    "torch.export, then run onnx.checker, check the dynamic dims and compare "
                    "onnxruntime against eager at 2 resolutions x 2 batch sizes.")
    p.add_argument("source", help="ditkit checkpoint (.safetensors), spec file or preset name "
                   "(a spec is exported with random weights)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default 18, raised automatically when an op needs a newer "
                        "one for the chosen precision)")
    p.add_argument("--dynamic", default="batch,resolution",
                   help="dynamic dims: batch, resolution, both (default) or 'none'")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--target", default="onnxruntime",
                   help="onnxruntime or tensorrt-10.x / tensorrt-10.N (op allow-list)")
    p.add_argument("--resolution", default=None, help="example H or HxW (default: the spec's)")
    p.add_argument("--objective", default=None, choices=["edm", "ddpm_eps", "x0", "flow"],
                   help="objective when the source does not record one (default: edm for "
                        "fourier noise embeddings, ddpm_eps for sinusoidal ones)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the onnxruntime parity runs (the other checks always run)")
    p.add_argument("--perturb-zero-layers", action="store_true",
                   help="an untrained spec's zero-initialised layers make parity trivial: "
                        "also check an export of a copy with those weights perturbed")
    p.add_argument("--cfg", action="store_true",
                   help="bake classifier-free guidance in: inputs x, sigma, class_labels, "
                        "cfg_scale; the conditional and null-class passes run batched inside")
    p.add_argument("--cfg-channels", type=int, default=None,
                   help="with --cfg: guide only the first N channels (DiT: 3; default: the "
                        "checkpoint's ditkit.cfg_channels metadata, else all)")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "trt", help="TensorRT engines (`ditkit trt build`)",
        description="TensorRT 10 engines from exported ONNX files.")
    trt = p.add_subparsers(dest="trt", metavar="ACTION", required=True)
    b = trt.add_parser("build", help="build (or fetch from the cache) a TensorRT engine")
    b.add_argument("onnx", help="the .onnx file written by `ditkit export`")
    b.add_argument("--profile", required=True, action="append",
                   help="MIN/OPT/MAX shapes, each BxH[xW] (e.g. 1x256/2x512/4x1024); "
                        "repeat for more profiles")
    b.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    b.add_argument("--out", default=None, help="engine file (default: next to the ONNX)")
    b.add_argument("--cache-dir", default=None, help="engine + timing cache folder")
    b.add_argument("--workspace-gib", type=float, default=None)
    b.add_argument("--refit-from", default=None,
                   help="an existing refittable engine: refit its weights from the ONNX instead "
                        "of rebuilding (same graph, new weights)")
    b.set_defaults(func=cmd_trt_build)

    from ditkit.builder.bench import bench_group

    p = bench_group(subparsers).add_parser(
        "sample", help="per-step latency and peak memory: eager, torch.compile, onnxruntime",
        description="Per denoiser evaluation (one sampling step), median of repeats.")
    p.add_argument("spec", help="spec file or preset (random weights), or a checkpoint")
    p.add_argument("--resolutions", nargs="+", default=None,
                   help="H or HxW values (default: the spec's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--engines", default="eager,onnxruntime",
                   help="comma-separated from eager, compile, onnxruntime, tensorrt")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and onnxruntime alike (default: torch's)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_bench_sample)


# -------------------------------------------------------------------------------- helpers


def _objective(name: str | None, spec):
    from ditkit import spec as S

    if name is None:
        name = "edm" if spec.conditioning.noise.kind == "fourier" else "ddpm_eps"
        print(f"note: no objective recorded; using {name} (pass --objective to choose)",
              file=sys.stderr)
    return {"edm": S.EDMObjective, "ddpm_eps": S.DDPMObjective, "x0": S.X0Objective,
            "flow": S.FlowObjective}[name]()


def _load(source: str, objective: str | None, device: str = "cpu"):
    """``(model, objective, metadata, checkpoint hash or None)`` from a checkpoint or a spec."""
    from ditkit.builder import build
    from ditkit.cli import UsageError, load_spec

    from .checkpoint import load_model, model_hash

    path = Path(source)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise UsageError(f"{source}: no such checkpoint")
        try:
            model, ckpt = load_model(path, device=device)
        except ValueError as err:
            raise UsageError(str(err)) from None
        obj = ckpt.objective or _objective(objective, ckpt.spec)
        return model, obj, ckpt.metadata, model_hash(ckpt.tensors)
    spec = load_spec(source)
    return build(spec, device=device).eval(), _objective(objective, spec), {}, None


def _parse_interval(text: str | None):
    from ditkit.cli import UsageError

    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--cfg-interval {text!r}: use LO,HI (two sigmas), e.g. 0.3,5") from None
    if not 0 <= lo < hi:
        raise UsageError(f"--cfg-interval {text!r}: need 0 <= LO < HI")
    return lo, hi


def _labels(text: str | None, num: int | None, spec, seed: int):
    import torch

    from ditkit.cli import UsageError

    classes = spec.conditioning.classes
    if text is None:
        return None, num or 16
    if classes is None:
        raise UsageError("--classes: this model has no class conditioning (conditioning.classes)")
    if text == "random":
        n = num or 16
        g = torch.Generator().manual_seed(seed + 1)
        return torch.randint(0, classes.count, (n,), generator=g), n
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--classes {text!r}: use comma-separated integers or 'random'") from None
    bad = [v for v in values if not 0 <= v < classes.count]
    if not values or bad:
        raise UsageError(f"--classes: labels must be in [0, {classes.count}); got "
                         f"{bad or values}")
    n = num or len(values)
    return torch.tensor([values[i % len(values)] for i in range(n)]), n


# -------------------------------------------------------------------------------- sample


def cmd_sample(args) -> int:
    from ditkit.cli import UsageError, parse_resolution
    from ditkit.spec import SpecError

    from .denoiser import Denoiser
    from .export import ExportError, check_shape
    from .samplers import sample

    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: use at least 1")
    if args.num is not None and args.num < 1:
        raise UsageError(f"--num {args.num}: use at least 1 sample")
    from .samplers import check_device

    check_device(args.device)
    source = Path(args.checkpoint)
    if source.suffix == ".onnx":
        from .engines import OrtDenoiser

        if not source.is_file():
            raise UsageError(f"{source}: no such ONNX file")
        den = OrtDenoiser(source, device=args.device)
        spec, meta = den.spec, den.metadata
    else:
        model, objective, meta, _ = _load(args.checkpoint, args.objective, args.device)
        den = Denoiser(model, objective)
        spec = model.spec
    res = parse_resolution(args.resolution) or tuple(spec.input.resolution)
    labels, n = _labels(args.classes, args.num, spec, args.seed)
    try:
        check_shape(spec, (n, spec.input.channels, *res), getattr(den, "rules", None),
                    "--resolution")
    except ExportError as err:
        raise UsageError(str(err)) from None
    cfg_channels = args.cfg_channels
    if cfg_channels is None and "ditkit.cfg_channels" in meta:
        cfg_channels = int(meta["ditkit.cfg_channels"])
    if args.cfg != 1.0 and labels is None:
        raise UsageError("--cfg needs --classes (guidance contrasts a class with the null class)")
    try:
        x = sample(den, (n, spec.input.channels, *res), steps=args.steps, sampler=args.sampler,
                   schedule=args.schedule, eta=args.eta, seed=args.seed, class_labels=labels,
                   cfg_scale=args.cfg, guidance_interval=_parse_interval(args.cfg_interval),
                   cfg_channels=cfg_channels, device=args.device,
                   progress=not args.no_progress)
    except ValueError as err:
        if isinstance(err, SpecError):
            raise
        raise UsageError(str(err)) from None
    images = _to_images(x, spec, args)
    from .images import save_grid, save_png

    if images is None:
        return 0
    save_grid(images, args.out)
    shown = f"{res[0]}x{res[1]}"
    if tuple(images.shape[-2:]) != tuple(res):
        shown += f" latents decoded to {images.shape[-2]}x{images.shape[-1]}"
    print(f"wrote {args.out} ({n} samples, {shown}, {args.sampler}, {args.steps} "
          f"steps, cfg {args.cfg}, seed {args.seed})")
    if args.individual:
        from .images import image_grid

        folder = Path(args.individual)
        for i in range(n):
            save_png(image_grid(images[i:i + 1], 1, pad=0), folder / f"{i:06d}.png")
        print(f"wrote {n} images to {folder}/")
    return 0


def _to_images(x, spec, args):
    """Pixel models: the samples. Latent models: decoded by ``--vae`` or ``--autoencoder``,
    else the latents are saved as a tensor file next to ``--out`` and no image is written."""
    import torch

    from ditkit.cli import UsageError

    if spec.input.space != "latent":
        if args.vae or args.autoencoder:
            flag = "--vae" if args.vae else "--autoencoder"
            raise UsageError(f"{flag}: {spec.name} is a pixel-space model (input.space: pixel); "
                             "its samples are images already, drop the flag")
        return x
    if args.vae is not None and args.autoencoder is not None:
        raise UsageError("--vae and --autoencoder: give one decoder, not both")
    if args.vae is not None:
        return _decode_vae(x, spec, args)
    if args.autoencoder is None:
        latents = Path(args.out).with_suffix(".latents.pt")
        with atomic_path(latents) as tmp:
            torch.save(x.cpu(), tmp)
        print(f"{spec.name} samples latents ({spec.input.channels} channels); no image was "
              f"written because no --autoencoder or --vae was given (ditkit downloads nothing). "
              f"Latents saved to {latents}; decode them with --vae VAE_FOLDER (a local "
              "diffusers AutoencoderKL) or --autoencoder DECODER.pt (TorchScript).",
              file=sys.stderr)
        return None
    path = Path(args.autoencoder)
    if not path.is_file():
        raise UsageError(f"--autoencoder {path}: no such file")
    try:
        decoder = torch.jit.load(str(path), map_location=args.device).eval()
    except Exception as err:
        raise UsageError(f"--autoencoder {path}: not a TorchScript file ({err})") from None
    scale = 0.18215 if args.latent_scale is None else args.latent_scale
    with torch.no_grad():
        return decoder(x / scale).float().clamp(-1, 1)


def _decode_vae(x, spec, args):
    """Latent samples -> images with a local diffusers AutoencoderKL."""
    from ditkit.cli import UsageError

    from .autoencoder import AutoencoderError, load_autoencoder

    try:
        vae = load_autoencoder(args.vae, device=args.device)
    except AutoencoderError as err:
        raise UsageError(f"--vae {err}") from None
    if vae.latent_channels != spec.input.channels:
        raise UsageError(f"--vae {args.vae}: the autoencoder has {vae.latent_channels} latent "
                         f"channels but the model's input.channels is {spec.input.channels}; "
                         "use the autoencoder the training latents were encoded with")
    if vae.factor != spec.input.latent_factor:
        print(f"note: the autoencoder downsamples by {vae.factor} but the spec's "
              f"input.latent_factor is {spec.input.latent_factor}", file=sys.stderr)
    if args.latent_scale is not None:
        vae.scale = args.latent_scale
    return vae.decode(x)


# -------------------------------------------------------------------------------- export


def cmd_export(args) -> int:
    from ditkit.cli import UsageError, parse_resolution

    from .export import ExportError, export_onnx

    dynamic = () if args.dynamic == "none" else tuple(
        d.strip() for d in args.dynamic.split(",") if d.strip())
    model, objective, meta, h = _load(args.source, args.objective)
    extra = {k: v for k, v in meta.items() if k == "ditkit.cfg_channels"}
    cfg_channels = args.cfg_channels
    if args.cfg and cfg_channels is None and meta.get("ditkit.cfg_channels"):
        cfg_channels = int(meta["ditkit.cfg_channels"])
    try:
        result = export_onnx(model, objective, args.out, opset=args.opset,
                             dynamic=dynamic, precision=args.precision, target=args.target,
                             resolution=parse_resolution(args.resolution), checkpoint_hash=h,
                             metadata=extra, check=not args.no_check, cfg=args.cfg,
                             cfg_channels=cfg_channels, log=print,
                             perturb_zero_layers=args.perturb_zero_layers)
    except ExportError as err:
        raise UsageError(str(err)) from None
    rule = result.rule
    print(f"valid resolutions: height {rule[0].text()}, width {rule[1].text()} "
          f"(dynamic: {','.join(result.dynamic) or 'none'}); {result.seconds:.1f} s")
    return 0


# -------------------------------------------------------------------------------- trt


def cmd_trt_build(args) -> int:
    from ditkit.cli import UsageError

    from . import tensorrt as T

    try:
        profiles = [T.parse_profile(p) for p in args.profile]
        path = T.build_engine(args.onnx, profiles, precision=args.precision, out=args.out,
                              cache_dir=args.cache_dir, workspace_gib=args.workspace_gib,
                              refit_from=args.refit_from, log=print)
    except (T.TensorRTUnavailable, ValueError) as err:
        raise UsageError(str(err)) from None
    print(f"engine: {path}")
    return 0


# -------------------------------------------------------------------------------- bench


def cmd_bench_sample(args) -> int:
    from ditkit.cli import UsageError, parse_resolution

    from .engines import ENGINES, bench_sample, format_rows

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = set(engines) - set(ENGINES)
    if bad:
        raise UsageError(f"--engines {','.join(sorted(bad))}: choose from {', '.join(ENGINES)}")
    model, objective, _, _ = _load(args.spec, None if Path(args.spec).suffix == ".safetensors"
                                   else "edm" if _noise(args.spec) == "fourier" else "ddpm_eps")
    resolutions = [parse_resolution(r) for r in args.resolutions] if args.resolutions else [
        tuple(model.spec.input.resolution)]
    rows = bench_sample(model, objective, resolutions, engines=engines, batch=args.batch,
                        repeats=args.repeats, device=args.device, threads=args.threads,
                        log=lambda m: print(m, file=sys.stderr))
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _noise(ref: str) -> str:
    from ditkit.cli import load_spec

    return load_spec(ref).conditioning.noise.kind
