"""A tiny randomly initialised diffusers AutoencoderKL (downsampling 2, 4 latent channels),
saved with ``save_pretrained`` -- the local autoencoder the latent tests use (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest


def save_tiny_vae(folder: Path, seed: int = 0, scaling_factor: float = 0.5) -> Path:
    diffusers = pytest.importorskip(
        "diffusers", reason="diffusers is not installed (pip install 'ditkit[vae]')"
    )
    import torch

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=[8, 16],
        layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=scaling_factor,
    )
    vae.save_pretrained(str(folder))
    return folder
