"""``ditkit sample``: draw samples from a checkpoint (or an exported .onnx) into a PNG grid.

    ditkit sample model.safetensors --steps 50 --sampler heun --cfg 4 --classes 1,2,3,4 --out grid.png
    ditkit sample model.onnx --steps 50 --out grid.png            # the exported engine
    ditkit sample latent-model.safetensors --vae vae/ --out grid.png  # decode latents
    ditkit sample model.safetensors --num 50000 --classes random --npz samples.npz  # for FID
"""

from __future__ import annotations

import sys
from pathlib import Path

from ditkit.spec.objective import OBJECTIVE_KINDS
from ditkit.spec.sampling import DEFAULT_SAMPLER, SAMPLERS, SCHEDULES

from ditkit.cli.common import (UsageError, add_device, add_json, add_progress, add_set, add_threads,
                     deprecated, load_model_source, parse_interval, parse_labels, parse_list,
                     parse_resolution, positive, resolve_source, setup_compute)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample", help="draw samples from a checkpoint (or exported .onnx) into a PNG grid",
        description="Sample a ditkit checkpoint (.safetensors), a run folder (its newest "
                    "checkpoint), an ONNX file written by `ditkit export`, or a spec / preset "
                    "(random weights); writes a PNG grid (and optionally one PNG per sample).")
    p.add_argument("checkpoint", help="checkpoint (.safetensors), run folder, exported .onnx, "
                   "or spec file / preset name (random weights)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (noise levels)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS, help="sampler")
    p.add_argument("--schedule", default="native", choices=SCHEDULES, help="step schedule")
    p.add_argument("--eta", type=float, default=None,
                   help="noise of the ancestral / SDE samplers (default 1; ddim and "
                   "dpm_adaptive 0)")
    p.add_argument("--sigma-min", type=float, default=None,
                   help="lowest non-zero noise level (default: the objective's, e.g. a "
                   "converted k-diffusion config's sigma_min)")
    p.add_argument("--sigma-max", type=float, default=None,
                   help="highest noise level (default: the objective's)")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance scale (1 = the conditional model)")
    p.add_argument("--cfg-interval", default=None, metavar="LO,HI",
                   help="guide only for sigma in [LO, HI]")
    p.add_argument("--cfg-channels", type=int, default=None,
                   help="guide only the first N channels (DiT: 3; default: the checkpoint's "
                        "ditkit.cfg_channels metadata, else all)")
    p.add_argument("--classes", default=None,
                   help="comma-separated labels, one per sample (repeated to --count), or "
                        "'random'; default: unconditional (the null class)")
    p.add_argument("--count", type=int, default=None,
                   help="number of samples (default: the number of --classes, else 16)")
    p.add_argument("--cols", type=int, default=None,
                   help="grid columns (default: one per label of --classes, so each column "
                        "is one class; a single class, random or no labels: a square grid)")
    p.add_argument("--resolution", default=None, help="H or HxW (default: the spec's)")
    p.add_argument("--policy", default=None,
                   help="adapt the model to --resolution first, as `ditkit extrapolate` does: "
                   "as_is (the default: the same weights on a bigger grid), core_patch, "
                   "add_levels[:share_weights=true], local_core:kernel_size=K, "
                   "as_is:rope=extrapolate")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--out", default="grid.png", help="PNG grid to write")
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
    p.add_argument("--objective", default=None, choices=OBJECTIVE_KINDS,
                   help="the objective, for a checkpoint that does not record one (default: "
                        "the one the model's noise embedding is made for)")
    p.add_argument("--compile", nargs="?", const="auto", default=None, metavar="MODE",
                   help="torch.compile each step into one graph (not for .onnx); MODE: auto "
                        "(reduce-overhead on CUDA), default, reduce-overhead, "
                        "max-autotune-no-cudagraphs, max-autotune")
    p.add_argument("--npz", default=None, metavar="FILE",
                   help="write all --count samples to FILE (uint8 NHWC arr_0 + labels arr_1, "
                        "the ADM evaluator's format) instead of a grid; batched, resumable "
                        "(rerun the same command), split across processes under torchrun")
    p.add_argument("--batch", type=int, default=32,
                   help="with --npz: samples per sampler call (default 32); chunk k uses seed "
                        "SEED + k, so the samples depend on it (not on the process count)")
    p.add_argument("--ort-provider", default="cpu", metavar="PROVIDER",
                   help="with an exported .onnx file on the CPU: cpu (onnxruntime's kernels, "
                        "default), openvino (the OpenVINO execution provider, f32) or "
                        "openvino-bf16 (bf16 on the CPU's AMX units, an approximation); needs "
                        "pip install onnxruntime-ep-openvino")
    add_set(p, "spec (spec files and presets only)")
    add_device(p)
    add_threads(p)
    add_progress(p)
    add_json(p, "print one JSON object (what was written, the settings) instead of the "
                "text lines")
    deprecated(p, "--cfg", "--cfg-scale", type=float)
    deprecated(p, "--num", "--count", type=int)
    p.set_defaults(func=run)


def run(args) -> int:
    from ditkit.runtime.checkpoint import cfg_channels_of
    from ditkit.runtime.denoiser import COMPILE_MODES, Denoiser, compile_denoiser
    from ditkit.deploy.graph_io import ExportError, check_shape
    from ditkit.runtime.samplers import sample
    from ditkit.spec import SpecError

    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: use at least 1")
    positive(args.count, "--count")
    positive(args.cols, "--cols")
    for flag, value in (("--sigma-min", args.sigma_min), ("--sigma-max", args.sigma_max)):
        if value is not None and not 0 < value < float("inf"):
            raise UsageError(f"{flag} {value}: use a positive, finite noise level")
    if args.sigma_min is not None and args.sigma_max is not None \
            and args.sigma_min >= args.sigma_max:
        raise UsageError(f"--sigma-min {args.sigma_min} must be below --sigma-max "
                         f"{args.sigma_max}")
    from ditkit.deploy.ort_providers import check_provider

    check_provider(args.ort_provider)
    source = resolve_source(args.checkpoint, ("checkpoint", "run", "onnx", "file", "preset"))
    if args.ort_provider != "cpu" and source.kind != "onnx":
        raise UsageError(f"--ort-provider {args.ort_provider}: picks how onnxruntime runs an "
                         f"exported .onnx file; {args.checkpoint} is not one (export it with "
                         "`ditkit export`, or drop --ort-provider)")
    proc = None
    if args.npz:  # under torchrun: join the process group first, it picks the device
        from ditkit.evaluate.npz import processes

        if source.kind not in ("checkpoint", "run", "onnx"):
            raise UsageError(f"--npz: {args.checkpoint} is a spec (random weights); give a "
                             "checkpoint, a run folder or an exported .onnx file")
        proc = processes(args.device)
        args.device = proc.device
    setup_compute(args)
    model_hash = None
    if source.kind == "onnx":
        from ditkit.deploy.engines import OrtDenoiser

        if args.overrides:
            raise UsageError("--set: an exported .onnx graph is fixed; --set applies to spec "
                             "files and presets")
        if args.policy is not None:
            raise UsageError("--policy: an exported .onnx graph is fixed; adapt the "
                             "checkpoint (ditkit sample CHECKPOINT --policy ...) or export the "
                             "adapted model")
        den = OrtDenoiser(source.path, device=args.device, threads=args.threads,
                          ort_provider=args.ort_provider)
        spec, meta = den.spec, den.metadata
    else:
        model, objective, meta, model_hash = load_model_source(
            args.checkpoint, args.objective, args.device, args.overrides)
        if args.policy is not None:
            model = adapted_model(model, args.policy, parse_resolution(args.resolution)
                                  or tuple(model.spec.input.resolution), args.device)
        den = Denoiser(model, objective)
        spec = model.spec
        if args.compile is not None:
            if args.compile not in COMPILE_MODES:
                raise UsageError(f"--compile {args.compile}: choose one of "
                                 f"{', '.join(COMPILE_MODES)}")
            compile_denoiser(den, args.compile, args.device)
    res = parse_resolution(args.resolution) or tuple(spec.input.resolution)
    labels, n = parse_labels(args.classes, args.count, spec, args.seed)
    try:
        check_shape(spec, (n, spec.input.channels, *res), den.rules,
                    "--resolution")
    except ExportError as err:
        raise UsageError(str(err)) from None
    cfg_channels = args.cfg_channels
    if cfg_channels is None:
        cfg_channels = cfg_channels_of(meta)
    if args.cfg_scale != 1.0 and labels is None:
        raise UsageError("--cfg-scale needs --classes (guidance contrasts a class with the null "
                         "class)")
    if args.npz:
        return _run_npz(args, den, spec, res, labels, n, cfg_channels, proc,
                        model_hash or _file_hash(source.path))
    try:
        x = sample(den, (n, spec.input.channels, *res), steps=args.steps, sampler=args.sampler,
                   schedule=args.schedule, eta=args.eta, seed=args.seed, class_labels=labels,
                   cfg_scale=args.cfg_scale, guidance_interval=parse_interval(args.cfg_interval),
                   cfg_channels=cfg_channels, device=args.device,
                   progress=not args.no_progress, sigma_min=args.sigma_min,
                   sigma_max=args.sigma_max)
    except ValueError as err:
        if isinstance(err, SpecError):
            raise
        raise UsageError(str(err)) from None
    images = _to_images(x, spec, args)
    from ditkit.runtime.images import save_grid, save_png

    if images is None:
        return 0
    cols = args.cols
    if cols is None and labels is not None and args.classes != "random":
        listed = len(parse_list(args.classes))
        if listed > 1:  # labels cycle through the list: each column holds one class
            cols = min(n, listed)
    save_grid(images, args.out, ncol=cols)
    shown = f"{res[0]}x{res[1]}"
    if tuple(images.shape[-2:]) != tuple(res):
        shown += f" latents decoded to {images.shape[-2]}x{images.shape[-1]}"
    if not args.json:
        engine = "" if args.ort_provider == "cpu" else f", onnxruntime {args.ort_provider}"
        print(f"wrote {args.out} ({n} samples, {shown}, {args.sampler}, {args.steps} "
              f"steps, cfg-scale {args.cfg_scale}, seed {args.seed}{engine})")
    if args.individual:
        from ditkit.runtime.images import image_grid

        folder = Path(args.individual)
        for i in range(n):
            save_png(image_grid(images[i:i + 1], 1, pad=0), folder / f"{i:06d}.png")
        if not args.json:
            print(f"wrote {n} images to {folder}/")
    if args.json:
        import json

        print(json.dumps({"out": str(args.out), "individual": args.individual, "count": n,
                          "resolution": list(res), "image": list(images.shape[-2:]),
                          "sampler": args.sampler, "steps": args.steps,
                          "cfg_scale": args.cfg_scale, "seed": args.seed,
                          "device": args.device, "threads": args.threads,
                          "ort_provider": args.ort_provider if source.kind == "onnx" else None}))
    return 0


def _run_npz(args, den, spec, res, labels, n, cfg_channels, proc, source_hash: str) -> int:
    """``--npz``: :func:`ditkit.evaluate.npz.sample_npz` with the command's settings."""
    from ditkit.evaluate.npz import sample_npz

    if args.batch < 1:
        raise UsageError(f"--batch {args.batch}: must be positive")
    decode, identity = None, {"source": source_hash}
    if args.ort_provider != "cpu":  # bf16 draws differ from f32 ones: a resume must match
        identity["ort_provider"] = args.ort_provider
    if spec.input.space == "latent":
        from ditkit.runtime.autoencoder import latent_decoder

        decode, identity["decoder"] = latent_decoder(
            spec.input.channels, vae=args.vae, autoencoder=args.autoencoder,
            latent_scale=args.latent_scale, device=args.device)
    elif args.vae or args.autoencoder:
        raise UsageError(f"{'--vae' if args.vae else '--autoencoder'}: {spec.name} is a "
                         "pixel-space model; its samples are images already, drop the flag")
    try:
        result = sample_npz(den, args.npz, num=n, shape=(spec.input.channels, *res),
                            steps=args.steps, sampler=args.sampler, seed=args.seed,
                            batch=args.batch, class_labels=labels, cfg_scale=args.cfg_scale,
                            schedule=args.schedule, eta=args.eta,
                            guidance_interval=parse_interval(args.cfg_interval),
                            cfg_channels=cfg_channels, decode=decode, identity=identity,
                            proc=proc, progress=not args.no_progress)
    except ValueError as err:  # a sampler argument the model cannot take (as for a grid)
        from ditkit.spec import SpecError

        if isinstance(err, SpecError):
            raise
        raise UsageError(str(err)) from None
    finally:
        proc.close()
    if proc.main:
        done = f"{result.reused} of them drawn by an earlier run, " if result.reused else ""
        extra = " + labels arr_1" if labels is not None else ""
        print(f"wrote {args.npz}: arr_0 {result.shape} uint8{extra} ({n} samples, {done}"
              f"{args.sampler}, {args.steps} steps, cfg-scale {args.cfg_scale}, seed {args.seed}, "
              f"batch {args.batch}, {proc.world} process(es))")
    return 0


def _file_hash(path: Path) -> str:
    """sha256 of a file's bytes (an ONNX file: what a resumed --npz run must sample from)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _to_images(x, spec, args):
    """Pixel models: the samples. Latent models: decoded by ``--vae`` or ``--autoencoder``,
    else the latents are saved as a tensor file next to ``--out`` and no image is written."""
    import torch

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
        from ditkit.files import atomic_path

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
    from ditkit.runtime.autoencoder import AutoencoderError, load_autoencoder

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


def adapted_model(model, text: str, resolution: tuple[int, int], device: str):
    """``model`` adapted to ``resolution`` under the policy ``text``
    (:func:`ditkit.runtime.extrapolate.adapt`: carried weights exactly, new ones initialised
    with seed 0, as in the report)."""
    from ditkit.builder import build
    from ditkit.runtime.extrapolate import adapt
    from ditkit.evaluate.report import parse_policy

    policy = parse_policy(text, flag="--policy")
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    adapted = adapt(model.spec, tensors, policy, tuple(resolution))
    new = build(adapted.spec, device=device)
    new.load_state_dict(adapted.tensors)
    return new.eval()
