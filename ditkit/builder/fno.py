"""FNO time embedding (MPDiT): a Fourier neural operator over a small 1-D grid around t.

Why an operator instead of sinusoidal features: the embedding is a learned smooth function of
t (the grid is shifted by t, then mixed by truncated spectral convolutions), so nearby times
get nearby embeddings whatever the frequency content the model needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpectralConv1d(nn.Module):
    """Keep the lowest ``modes`` rFFT coefficients, mix channels per mode with a complex weight
    ``(in, out, modes)`` (stored as real and imaginary parts), inverse rFFT. Runs in fp32."""

    def __init__(self, channels: int, modes: int):
        super().__init__()
        self.modes = modes
        self.weights_real = nn.Parameter(torch.randn(channels, channels, modes))
        self.weights_imag = nn.Parameter(torch.randn(channels, channels, modes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, N) -> (B, C, N)
        n = x.shape[-1]
        xf = torch.fft.rfft(x.float(), dim=-1)[..., :self.modes]  # (B, C, modes)
        re, im = xf.real, xf.imag
        wr, wi = self.weights_real.float(), self.weights_imag.float()
        out_re = torch.einsum("bim,iom->bom", re, wr) - torch.einsum("bim,iom->bom", im, wi)
        out_im = torch.einsum("bim,iom->bom", re, wi) + torch.einsum("bim,iom->bom", im, wr)
        pad = n // 2 + 1 - self.modes
        spec = torch.complex(F.pad(out_re, (0, pad)), F.pad(out_im, (0, pad)))
        return torch.fft.irfft(spec, n=n, dim=-1).to(x.dtype)


class FNOEmbed(nn.Module):
    """``t -> grid(points in [-1, 1]) + t -> Linear(1, width) -> depth x (spectral conv +
    pointwise conv, GELU between) -> mean over the grid -> Linear(width, out)``."""

    def __init__(self, out_width: int, points: int = 32, modes: int = 16, width: int = 32,
                 depth: int = 3):
        super().__init__()
        self.points = points
        self.lift = nn.Linear(1, width)
        self.spectral = nn.ModuleList(SpectralConv1d(width, modes) for _ in range(depth))
        self.pointwise = nn.ModuleList(nn.Conv1d(width, width, 1) for _ in range(depth))
        self.proj = nn.Linear(width, out_width)

    def init_special(self) -> None:
        for s in self.spectral:
            nn.init.normal_(s.weights_real)
            nn.init.normal_(s.weights_imag)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, out_width)
        grid = torch.linspace(-1, 1, self.points, device=t.device, dtype=torch.float32)
        grid = grid[None, :] + t.float()[:, None]  # (B, points)
        h = self.lift(grid[..., None].to(self.lift.weight.dtype)).transpose(1, 2)  # (B, W, N)
        last = len(self.spectral) - 1
        for i, (spec, point) in enumerate(zip(self.spectral, self.pointwise)):
            h = spec(h) + point(h)
            if i < last:
                h = F.gelu(h)
        return self.proj(h.mean(dim=-1))  # (B, out_width)
