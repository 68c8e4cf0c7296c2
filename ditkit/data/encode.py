"""Images -> latent shards for latent-space training (``ditkit encode``), and image folders ->
webdataset shards (``ditkit shards``).

``encode_images`` reads an image folder, webdataset shards or the bundled digits at the image
resolution, encodes them with a local diffusers ``AutoencoderKL``
(:mod:`ditkit.runtime.autoencoder`) and writes ``latents-000000.safetensors`` (or ``.npz``)
shards holding ``latents`` ``(N, C, h, w)`` float32 -- already multiplied by the autoencoder's
scaling factor -- and ``labels`` ``(N,)`` int64 when the source has classes. Each shard is
written atomically; ``encode.json`` summarises the run. Train on them with
``data: {kind: latents, path: DIR}``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ditkit.data.datasets import (
    IMAGE_SUFFIXES,
    LATENT_SUFFIXES,
    DataError,
    ImageFolder,
    WebDataset,
    digits_tensor,
)
from ditkit.files import atomic_path
from ditkit.runtime.autoencoder import load_autoencoder
from ditkit.spec import experiment as E


@dataclass
class EncodeResult:
    out: str
    count: int
    shards: list[str]
    latent_shape: list[int]
    scale_factor: float
    shift_factor: float
    mode: str
    classes: list[str] | None
    image_resolution: list[int]


def image_source(source: str, resolution: tuple[int, int], channels: int):
    """``(iterator of (image (C, H, W), label or None), count, class names or None)`` for
    ``digits``, an image folder, or webdataset shards (a .tar file, brace pattern or glob)."""
    if source == "digits":
        x, y = digits_tensor(resolution, 1)
        if channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return ((x[i], int(y[i])) for i in range(len(y))), len(y), [str(i) for i in range(10)]
    path = Path(source)
    if path.is_dir():
        ds = ImageFolder(E.ImageFolderData(path=str(path), flip=False), resolution, channels)
        labelled = ds.num_classes is not None
        return (
            ((img, int(lab) if labelled else None) for img, lab in (ds[i] for i in range(len(ds)))),
            len(ds),
            ds.classes or None,
        )
    if not path.exists() and not any(c in source for c in "*?[{"):
        raise DataError(
            f"{source}: no such folder or shard file; give an image folder (class = "
            "sub-folder), webdataset shards (.tar files: a path, brace pattern or "
            "glob) or `digits`"
        )
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise DataError(f"{source}: give a folder of images (class = sub-folder), not one image")
    web = WebDataset(E.WebDatasetData(shards=source, flip=False), resolution, channels)
    labelled = all(s.label is not None for i in range(len(web.shards)) for s in web.samples(i))
    return (((img, lab if labelled else None) for img, lab in web), len(web), None)


def encode_images(
    source: str,
    vae_path: str | Path,
    out: str | Path,
    resolution: tuple[int, int],
    *,
    batch_size: int = 16,
    shard_size: int = 4096,
    fmt: str = "safetensors",
    mode: str = "mean",
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> EncodeResult:
    """Encode ``source`` into latent shards under ``out`` (see the module docstring). Raises
    :class:`DataError` (bad source / output) or ``AutoencoderError`` (bad autoencoder)."""

    if fmt not in ("safetensors", "npz"):
        raise DataError(f"--format {fmt!r}: use safetensors or npz")
    if mode not in ("mean", "sample"):
        raise DataError(f"--mode {mode!r}: use mean or sample")
    out = Path(out)
    if out.is_dir() and any(p.suffix in LATENT_SUFFIXES for p in out.iterdir()):
        raise DataError(f"--out {out} already holds latent shards; choose an empty folder")
    vae = load_autoencoder(vae_path, device)
    h, w = resolution
    if h % vae.factor or w % vae.factor:
        f = vae.factor
        raise DataError(
            f"--resolution {h}x{w}: must be a multiple of the autoencoder's "
            f"downsampling factor {f} (e.g. {max(f, h // f * f)}x{max(f, w // f * f)})"
        )
    items, count, classes = image_source(source, resolution, vae.image_channels)
    if count == 0:
        raise DataError(f"{source}: no images to encode")
    generator = torch.Generator(device=vae.device).manual_seed(seed)
    meta = {
        "ditkit.scale_factor": repr(vae.scale),
        "ditkit.shift_factor": repr(vae.shift),
        "ditkit.autoencoder": str(vae_path),
        "ditkit.source": source,
        "ditkit.mode": mode,
        "ditkit.image_resolution": f"{h}x{w}",
    }
    if classes:
        meta["ditkit.classes"] = json.dumps(classes)
    shards: list[str] = []
    buf_z: list[torch.Tensor] = []
    buf_y: list[int | None] = []
    latent_shape: list[int] = []

    def write(z: torch.Tensor, y: list[int | None]) -> None:
        path = out / f"latents-{len(shards):06d}.{fmt}"
        tensors = {"latents": z.contiguous()}
        if y and y[0] is not None:
            tensors["labels"] = torch.tensor(y, dtype=torch.int64)
        with atomic_path(path) as tmp:
            if fmt == "safetensors":
                save_file(tensors, tmp, metadata=meta)
            else:
                with open(tmp, "wb") as f:
                    # mypy matches a **dict against savez's allow_pickle: bool keyword
                    np.savez(f, **{k: v.numpy() for k, v in tensors.items()})  # type: ignore[arg-type]
        shards.append(str(path))

    def flush(final: bool) -> None:
        if len(buf_y) < shard_size and not (final and buf_y):
            return  # concatenate only when a shard is full (no quadratic copying)
        z = torch.cat(buf_z)
        while len(z) >= shard_size or (final and len(z)):
            write(z[:shard_size], buf_y[:shard_size])
            z = z[shard_size:]
            del buf_y[:shard_size]
        buf_z[:] = [z] if len(z) else []

    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=count, desc="encode", unit="img", disable=not progress, dynamic_ncols=True)
    batch_x: list[torch.Tensor] = []
    batch_y: list[int | None] = []

    def run_batch() -> None:
        z = vae.encode(torch.stack(batch_x), mode=mode, generator=generator)
        latent_shape[:] = list(z.shape[1:])
        buf_z.append(z)
        buf_y.extend(batch_y)
        bar.update(len(batch_x))
        batch_x.clear()
        batch_y.clear()
        flush(final=False)

    try:
        for img, label in items:
            batch_x.append(img)
            batch_y.append(label)
            if len(batch_x) == batch_size:
                run_batch()
        if batch_x:
            run_batch()
        flush(final=True)
    finally:
        bar.close()
    result = EncodeResult(
        out=str(out),
        count=count,
        shards=shards,
        latent_shape=latent_shape,
        scale_factor=vae.scale,
        shift_factor=vae.shift,
        mode=mode,
        classes=classes,
        image_resolution=[h, w],
    )
    with atomic_path(out / "encode.json") as tmp:
        Path(tmp).write_text(
            json.dumps(
                {**asdict(result), "autoencoder": str(vae_path), "source": source, "seed": seed},
                indent=2,
            )
            + "\n"
        )
    return result


__all__ = ["encode_images", "image_source", "EncodeResult"]
