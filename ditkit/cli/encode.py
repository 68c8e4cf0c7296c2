"""``ditkit encode``: images -> latent shards with a local AutoencoderKL."""

from __future__ import annotations

from ditkit.cli.common import (
    UsageError,
    add_device,
    add_progress,
    add_threads,
    parse_resolution,
    setup_compute,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "encode",
        help="images -> latent shards with a local AutoencoderKL",
        description="Encode images (an image folder, webdataset shards or "
        "`digits`) into latent shards for `data: {kind: latents}`, with a "
        "diffusers AutoencoderKL loaded from a local folder (pip install "
        "'ditkit[vae]'). Latents are stored multiplied by the autoencoder's "
        "scaling factor.",
    )
    p.add_argument(
        "source",
        help="image folder (class = sub-folder), webdataset shards (.tar "
        "path, brace pattern or glob) or `digits`",
    )
    p.add_argument("--vae", required=True, help="local AutoencoderKL folder (save_pretrained)")
    p.add_argument("--out", required=True, help="folder for latents-NNNNNN shards")
    p.add_argument(
        "--resolution",
        required=True,
        help="image H or HxW to resize/crop to (model input.resolution x the "
        "autoencoder's downsampling)",
    )
    p.add_argument("--batch", type=int, default=16, help="images per encoder call (default 16)")
    p.add_argument("--shard-size", type=int, default=4096, help="latents per shard")
    p.add_argument(
        "--format", default="safetensors", choices=["safetensors", "npz"], help="shard file format"
    )
    p.add_argument(
        "--mode",
        default="mean",
        choices=["mean", "sample"],
        help="posterior mean (default) or a seeded sample of it",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --mode sample")
    add_device(p)
    add_threads(p)
    add_progress(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ditkit.data.datasets import DataError
    from ditkit.data.encode import encode_images
    from ditkit.runtime.autoencoder import AutoencoderError

    for flag, value in (("--batch", args.batch), ("--shard-size", args.shard_size)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be positive")
    setup_compute(args)
    resolution = parse_resolution(args.resolution)
    assert resolution is not None  # --resolution is required
    try:
        r = encode_images(
            args.source,
            args.vae,
            args.out,
            resolution,
            batch_size=args.batch,
            shard_size=args.shard_size,
            fmt=args.format,
            mode=args.mode,
            seed=args.seed,
            device=args.device,
            progress=not args.no_progress,
        )
    except AutoencoderError as err:
        raise UsageError(f"--vae {err}") from None
    except DataError as err:
        raise UsageError(str(err)) from None
    c, h, w = r.latent_shape
    print(
        f"encoded {r.count} images ({r.image_resolution[0]}x{r.image_resolution[1]}) into "
        f"{len(r.shards)} shard(s) of {c}x{h}x{w} latents (x{r.scale_factor:g}) in {r.out}; "
        f"train with data: {{kind: latents, path: {r.out}}} and model input: "
        f"{{space: latent, channels: {c}, resolution: [{h}, {w}]}}"
    )
    return 0
