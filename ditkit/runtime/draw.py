"""Samples as images: what ``ditkit sample`` does between loading a model and printing, as
functions a Python user can call.

    from ditkit.runtime.draw import decoder_for, draw, save_images
    from ditkit.spec.sampling import Sampling

    decode, _ = decoder_for(spec, vae="vae/")          # None for a pixel-space model
    images = draw(denoiser, spec, Sampling(steps=20, cfg_scale=4), count=8,
                  class_labels=[1, 2, 3, 4], decode=decode)
    save_images(images, "grid.png", ncol=4)

A latent-space model's samples need a decoder (:func:`decoder_for`: a local diffusers
AutoencoderKL folder or a TorchScript file); without one :func:`draw` returns the latents and
:func:`save_latents` keeps them.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Callable, cast

import torch

from ditkit import spec as S
from ditkit.files import atomic_path
from ditkit.runtime.autoencoder import AutoencoderError, latent_decoder
from ditkit.runtime.checkpoint import cfg_channels_of
from ditkit.runtime.images import image_grid, save_grid, save_png
from ditkit.runtime.multistage import sample_staged
from ditkit.runtime.shape_rule import check_shape
from ditkit.spec.limits import check_sample_size
from ditkit.spec.sampling import Sampling

LATENT_SUFFIX = ".latents.pt"


def cfg_channels_from(sampling: Sampling, metadata: dict[str, str]) -> Sampling:
    """``sampling`` with ``cfg_channels`` taken from a checkpoint's (or exported graph's)
    ``ditkit.cfg_channels`` metadata when the settings leave it open (a converted DiT guides 3
    of its 4 channels)."""

    if sampling.cfg_channels is not None:
        return sampling
    channels = cfg_channels_of(metadata)
    return sampling if channels is None else Sampling.of(sampling, cfg_channels=channels)


def decoder_for(
    spec: S.ModelSpec,
    *,
    vae: str | Path | None = None,
    autoencoder: str | Path | None = None,
    latent_scale: float | None = None,
    device: str | torch.device = "cpu",
    required: bool = False,
) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, dict]:
    """``(decode, identity)`` for ``spec``'s samples: ``decode`` maps latents to images in
    [-1, 1] (``None``: a pixel-space model, or a latent one with no decoder given, which
    ``required`` refuses), ``identity`` names the decoder (JSON data, what an ``.npz``
    records). A decoder for a pixel-space model, or two decoders, is an
    :class:`AutoencoderError`."""
    if spec.input.space != "latent":
        if vae is not None or autoencoder is not None:
            flag = "--vae" if vae is not None else "--autoencoder"
            raise AutoencoderError(
                f"{flag}: {spec.name} is a pixel-space model (input.space: "
                "pixel); its samples are images already, drop the flag"
            )
        return None, {}
    if vae is not None and autoencoder is not None:
        raise AutoencoderError("--vae and --autoencoder: give one decoder, not both")
    if vae is None and autoencoder is None:
        if required:
            raise AutoencoderError(
                f"{spec.name} samples latents ({spec.input.channels} "
                "channels): images need one decoder, --vae VAE_FOLDER (a local "
                "diffusers AutoencoderKL) or --autoencoder DECODER.pt "
                "(TorchScript)"
            )
        return None, {}
    decode, identity = latent_decoder(
        spec.input.channels,
        vae=vae,
        autoencoder=autoencoder,
        latent_scale=latent_scale,
        device=device,
    )
    ae = getattr(decode, "__self__", None)  # a diffusers AutoencoderKL (Autoencoder.decode)
    if ae is not None and ae.factor != spec.input.latent_factor:
        warnings.warn(
            f"the autoencoder downsamples by {ae.factor} but the spec's "
            f"input.latent_factor is {spec.input.latent_factor}",
            stacklevel=2,
        )
    return decode, identity


def draw(
    denoiser,
    spec: S.ModelSpec,
    sampling: Sampling,
    *,
    count: int,
    resolution: tuple[int, int] | None = None,
    class_labels=None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device="cpu",
    progress: bool = False,
) -> torch.Tensor:
    """``count`` samples of ``spec`` at ``resolution`` (default: the spec's) from
    ``denoiser`` with ``sampling``, decoded by ``decode`` when given: images ``(N, C, H, W)``
    in [-1, 1] (a latent-space model without ``decode``: its latents). The shape is checked
    against the model's (or the exported graph's) resolution rule first (with ``stages``:
    each stage's shape; :mod:`ditkit.runtime.multistage`)."""

    res = cast("tuple[int, int]", tuple(resolution or spec.input.resolution))
    shape = (count, spec.input.channels, *res)
    check_sample_size(spec, count, res)  # before anything is allocated
    rules = getattr(denoiser, "rules", None)
    x = sample_staged(
        denoiser,
        shape,
        sampling,
        class_labels=class_labels,
        device=device,
        progress=progress,
        check=lambda s: check_shape(
            spec, s, rules, "--stages" if sampling.stages else "--resolution"
        ),
    )
    return x if decode is None else decode(x)


def save_latents(latents: torch.Tensor, out: str | Path) -> Path:
    """Write ``latents`` (a plain tensor, loadable with ``torch.load(weights_only=True)``)
    next to ``out`` as ``<out stem>.latents.pt``, atomically; returns that path."""

    path = Path(out).with_suffix(LATENT_SUFFIX)
    with atomic_path(path) as tmp:
        torch.save(latents.detach().cpu(), tmp)
    return path


def save_images(
    images: torch.Tensor,
    out: str | Path | None = None,
    *,
    ncol: int | None = None,
    individual: str | Path | None = None,
) -> list[Path]:
    """Write ``images`` (``(N, C, H, W)`` in [-1, 1]) as a PNG grid ``out`` (``ncol``
    columns; default square) and, with ``individual``, one PNG per image
    (``individual/000000.png``, ...). Returns the paths written."""

    written = []
    if out is not None:
        save_grid(images, out, ncol=ncol)
        written.append(Path(out))
    if individual is not None:
        folder = Path(individual)
        for i in range(images.shape[0]):
            save_png(image_grid(images[i : i + 1], 1, pad=0), folder / f"{i:06d}.png")
            written.append(folder / f"{i:06d}.png")
    return written


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (an exported graph: what a resumed ``.npz`` run must sample
    from)."""

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = [
    "draw",
    "decoder_for",
    "cfg_channels_from",
    "save_images",
    "save_latents",
    "file_sha256",
    "LATENT_SUFFIX",
]
