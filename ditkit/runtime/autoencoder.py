"""A diffusers ``AutoencoderKL`` loaded from a *local* folder: images <-> latents.

Latent-space models (``input.space: latent``) train on latents that ``ditkit encode`` wrote
with :meth:`Autoencoder.encode`, and ``ditkit sample --vae`` turns their samples back into
images with :meth:`Autoencoder.decode`. The convention is the one diffusers pipelines use:
stored latents are ``(z - shift_factor) * scaling_factor`` with ``z`` the encoder's posterior
mean (or a sample of it), so their scale is close to 1 and the diffusion objectives'
``sigma_data`` fits.

Nothing is downloaded: the folder must hold what ``AutoencoderKL.save_pretrained`` writes
(``config.json`` + weights), or be a pipeline folder with such a ``vae/`` sub-folder.
diffusers is an optional dependency (``pip install 'ditkit[vae]'``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ditkit.errors import UserError, require


class AutoencoderError(UserError):
    """The autoencoder cannot be loaded or used (missing package, folder, weights)."""


@dataclass
class Autoencoder:
    vae: Any  # diffusers' AutoencoderKL (an optional dependency: encode/decode untyped here)
    path: Path
    scale: float
    """``scaling_factor``: stored latents are ``(z - shift) * scale``."""
    shift: float
    factor: int
    """Spatial downsampling: an image of ``H x W`` gives latents of ``H/factor x W/factor``."""
    latent_channels: int
    image_channels: int

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, mode: str = "mean", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(B, image_channels, H, W)`` in [-1, 1] -> scaled latents ``(B, C, H/f, W/f)``
        (float32, on the CPU). ``mode``: ``mean`` (the posterior mean) or ``sample`` (a draw
        from the posterior with ``generator``)."""
        if images.shape[1] != self.image_channels:
            raise AutoencoderError(
                f"the autoencoder takes {self.image_channels}-channel images, got {images.shape[1]}"
            )
        h, w = images.shape[-2:]
        if h % self.factor or w % self.factor:
            raise AutoencoderError(
                f"image size {h}x{w} is not a multiple of the autoencoder's "
                f"downsampling factor {self.factor}"
            )
        dist = self.vae.encode(
            images.to(self.device, next(self.vae.parameters()).dtype)
        ).latent_dist
        if mode == "mean":
            z = dist.mean
        elif mode == "sample":
            z = dist.sample(generator=generator)
        else:
            raise AutoencoderError(f"mode {mode!r}: use mean or sample")
        return ((z.float() - self.shift) * self.scale).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """Scaled latents ``(B, C, h, w)`` -> images ``(B, image_channels, h*f, w*f)`` in
        [-1, 1] (float32, on the CPU), ``batch`` at a time."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise AutoencoderError(
                f"the autoencoder at {self.path} decodes "
                f"{self.latent_channels}-channel latents, got shape "
                f"{tuple(latents.shape)}"
            )
        dtype = next(self.vae.parameters()).dtype
        out = []
        for start in range(0, latents.shape[0], batch):
            z = latents[start : start + batch].float() / self.scale + self.shift
            out.append(self.vae.decode(z.to(self.device, dtype)).sample.float().clamp(-1, 1).cpu())
        return torch.cat(out)


def _import_autoencoder_kl():

    return require("diffusers", "the autoencoder (--vae)", AutoencoderError).AutoencoderKL


def _config_folder(path: Path) -> tuple[Path, str | None]:
    """``(folder, subfolder)`` holding the AutoencoderKL ``config.json``."""
    if not path.exists():
        raise AutoencoderError(
            f"{path}: no such folder (a local AutoencoderKL folder written by "
            "save_pretrained; ditkit downloads nothing)"
        )
    if not path.is_dir():
        raise AutoencoderError(
            f"{path}: not a folder; give the folder that holds the "
            "autoencoder's config.json and weights"
        )
    if (path / "config.json").is_file():
        return path, None
    if (path / "vae" / "config.json").is_file():
        return path, "vae"
    raise AutoencoderError(
        f"{path}: no config.json (nor vae/config.json); expected a folder "
        "written by AutoencoderKL.save_pretrained (config.json + "
        "diffusion_pytorch_model.safetensors)"
    )


def load_autoencoder(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Autoencoder:
    """Load ``AutoencoderKL`` from a local folder (``local_files_only``), in eval mode."""
    path = Path(path)
    folder, sub = _config_folder(path)
    config_file = folder / (sub or "") / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise AutoencoderError(f"{config_file}: not a readable JSON config ({err})") from None
    cls_name = config.get("_class_name", "AutoencoderKL")
    if cls_name != "AutoencoderKL":
        raise AutoencoderError(f"{config_file}: holds a {cls_name}, not an AutoencoderKL")
    AutoencoderKL = _import_autoencoder_kl()
    try:
        vae = AutoencoderKL.from_pretrained(
            str(folder),
            subfolder=sub,
            local_files_only=True,
            torch_dtype=dtype,
            low_cpu_mem_usage=False,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AutoencoderError(
            f"{path}: cannot load the AutoencoderKL ({first}); the folder "
            "needs config.json and its weights "
            "(diffusion_pytorch_model.safetensors)"
        ) from None
    vae = vae.to(device).eval().requires_grad_(False)
    cfg = vae.config
    return Autoencoder(
        vae=vae,
        path=path,
        scale=float(cfg.scaling_factor or 1.0),
        shift=float(getattr(cfg, "shift_factor", None) or 0.0),
        factor=2 ** (len(cfg.block_out_channels) - 1),
        latent_channels=int(cfg.latent_channels),
        image_channels=int(cfg.in_channels),
    )


def latent_decoder(
    latent_channels: int,
    *,
    vae: str | Path | None = None,
    autoencoder: str | Path | None = None,
    latent_scale: float | None = None,
    device: str | torch.device = "cpu",
):
    """A function ``latents (B, C, h, w) -> images in [-1, 1]`` for a latent-space model's
    samples, loaded once: ``vae`` a local diffusers AutoencoderKL folder (its config's
    ``scaling_factor`` unless ``latent_scale``), or ``autoencoder`` a TorchScript file mapping
    unscaled latents to images (latents divided by ``latent_scale``, default 0.18215).
    Returns ``(decode, identity)``, ``identity`` naming the decoder (JSON data)."""
    if (vae is None) == (autoencoder is None):
        raise AutoencoderError(
            "a latent-space model's samples need one decoder: a --vae "
            "folder or an --autoencoder TorchScript file"
        )
    if vae is not None:
        ae = load_autoencoder(vae, device=device)
        if ae.latent_channels != latent_channels:
            raise AutoencoderError(
                f"{vae}: the autoencoder has {ae.latent_channels} latent "
                f"channels but the model's input.channels is "
                f"{latent_channels}; use the autoencoder the training "
                "latents were encoded with"
            )
        if latent_scale is not None:
            ae.scale = latent_scale
        return ae.decode, {"vae": str(Path(vae).resolve()), "latent_scale": ae.scale}
    assert autoencoder is not None  # exactly one of vae / autoencoder (checked above)
    path = Path(autoencoder)
    if not path.is_file():
        raise AutoencoderError(f"{path}: no such TorchScript file")
    try:
        net = torch.jit.load(str(path), map_location=device).eval()
    except Exception as err:  # noqa: BLE001 -- torch.jit raises many kinds
        raise AutoencoderError(f"{path}: not a TorchScript file ({err})") from None
    scale = 0.18215 if latent_scale is None else latent_scale

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        return net(latents / scale).float().clamp(-1, 1)

    return decode, {"autoencoder": str(path.resolve()), "latent_scale": scale}


__all__ = ["Autoencoder", "AutoencoderError", "load_autoencoder", "latent_decoder"]
