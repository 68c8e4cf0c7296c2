"""Image grids: tensors in [-1, 1] -> PNG files (used by sampling, previews and reports)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

from ditkit.files import atomic_path
from ditkit.spec.limits import check_run_bytes, grid_bytes


def image_grid(
    images: torch.Tensor, ncol: int | None = None, pad: int = 1, scale: int = 1
) -> np.ndarray:
    """``(N, C, H, W)`` in [-1, 1] -> ``(rows*(H+pad)+pad, cols*(W+pad)+pad, 3)`` uint8 on a
    white background; 1-channel images are shown grey, more than 3 channels keep the first 3."""

    n = images.shape[0]
    field = f"--cols {ncol}" if ncol else f"--count {n}"
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    check_run_bytes(
        grid_bytes(n, ncol, images.shape[-2] * scale, images.shape[-1] * scale),
        field,
        f"a grid of {n:,} image(s) in {ncol:,} column(s)",
    )
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 2:
        x = torch.cat([x, x[:, :1]], dim=1)
    x = x[:, :3]
    if scale > 1:
        x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    n, _, h, w = x.shape
    rows = -(-n // ncol)
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = x[i].permute(1, 2, 0).numpy()
    return grid


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Atomic PNG write (temporary file + rename)."""

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def save_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    ncol: int | None = None,
    pad: int = 1,
    scale: int | None = None,
) -> None:
    """Save a grid; small images are upscaled (nearest) to at least ~64 px for viewing."""
    if scale is None:
        scale = max(1, 64 // max(images.shape[-2:]))
    save_png(image_grid(images, ncol, pad, scale), path)
