"""Conditioning: noise level, class label and auxiliary inputs -> one vector per sample."""

from __future__ import annotations

import math

import torch
from torch import nn

from .norm import Norm


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's sinusoidal features, ``[cos(t f), sin(t f)]`` with ``f_k = max_period^(-k/half)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class SinusoidalEmbed(nn.Module):
    """DiT's TimestepEmbedder: sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, width: int, frequency_dim: int = 256, max_period: float = 10000.0,
                 scale: float = 1.0):
        super().__init__()
        self.frequency_dim, self.max_period, self.scale = frequency_dim, max_period, scale
        self.fc1 = nn.Linear(frequency_dim, width)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(width, width)

    def init_special(self) -> None:
        nn.init.normal_(self.fc1.weight, std=0.02)
        nn.init.normal_(self.fc2.weight, std=0.02)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, width)
        feats = timestep_features(t * self.scale, self.frequency_dim, self.max_period)
        return self.fc2(self.act(self.fc1(feats.to(self.fc1.weight.dtype))))


class FourierEmbed(nn.Module):
    """Random Fourier features ``[cos 2pi x W^T, sin 2pi x W^T]`` then a bias-free Linear.

    ``weight`` is a random buffer drawn at build time; it is part of the checkpoint."""

    def __init__(self, in_features: int, width: int, std: float = 1.0):
        super().__init__()
        self.std = std
        self.register_buffer("weight", torch.randn(width // 2, in_features) * std)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, width)
        f = 2 * math.pi * x.to(self.weight.dtype) @ self.weight.T
        return self.proj(torch.cat([f.cos(), f.sin()], dim=-1).to(self.proj.weight.dtype))


class MappingBlock(nn.Module):
    """Residual ``RMSNorm -> GEGLU up -> dropout -> down (zero-init)``."""

    def __init__(self, width: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.norm = Norm(width, "rms", eps=1e-6, affine=True)
        self.up = nn.Linear(width, 2 * d_ff, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(d_ff, width, bias=False)

    def init_special(self) -> None:
        nn.init.zeros_(self.down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.up(self.norm(x)).chunk(2, dim=-1)
        return x + self.down(self.dropout(value * nn.functional.gelu(gate)))


class MappingNetwork(nn.Module):
    """HDiT: ``RMSNorm -> depth x MappingBlock -> RMSNorm``."""

    def __init__(self, width: int, depth: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.in_norm = Norm(width, "rms", eps=1e-6, affine=True)
        self.blocks = nn.ModuleList(MappingBlock(width, d_ff, dropout) for _ in range(depth))
        self.out_norm = Norm(width, "rms", eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


class Conditioning(nn.Module):
    """``noise_level`` (+ class labels, + auxiliary vectors) -> ``(B, width)``.

    ``noise_kind``: ``sinusoidal`` takes ``noise_level`` as a timestep; ``fourier`` takes sigma
    and embeds ``ln(sigma) / 4``. Embeddings are summed, then optionally mapped.
    Missing labels use the null class; missing auxiliary inputs are zeros."""

    def __init__(self, width: int, noise_kind: str, noise_args: dict, classes: int | None,
                 null_class: bool, aux: list[tuple[str, int, float]],
                 mapping: tuple[int, int, float] | None, embedding_std: float):
        super().__init__()
        self.width, self.noise_kind = width, noise_kind
        if noise_kind == "sinusoidal":
            self.noise = SinusoidalEmbed(width, **noise_args)
        else:
            self.noise = FourierEmbed(1, width, **noise_args)
        self.classes, self.null_class, self.embedding_std = classes, null_class, embedding_std
        self.class_embed = (nn.Embedding(classes + int(null_class), width)
                            if classes else None)
        self.aux_names = [name for name, _, _ in aux]
        self.aux_dims = {name: dims for name, dims, _ in aux}
        self.aux = nn.ModuleDict({name: FourierEmbed(dims, width, std) for name, dims, std in aux})
        self.mapping = MappingNetwork(width, *mapping) if mapping else None

    def init_special(self) -> None:
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=self.embedding_std)

    def forward(self, noise_level: torch.Tensor, class_labels: torch.Tensor | None = None,
                **aux: torch.Tensor) -> torch.Tensor:
        b = noise_level.shape[0]
        if self.noise_kind == "fourier":
            emb = self.noise(torch.log(noise_level)[:, None] / 4)
        else:
            emb = self.noise(noise_level)
        if self.class_embed is not None:
            if class_labels is None:
                if not self.null_class:
                    raise ValueError("this model needs class_labels (its spec has no null class)")
                class_labels = torch.full((b,), self.classes, dtype=torch.long,
                                          device=noise_level.device)
            emb = emb + self.class_embed(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels given but the spec has no `conditioning.classes`")
        unknown = set(aux) - set(self.aux_names)
        if unknown:
            raise ValueError(f"unknown conditioning input(s) {sorted(unknown)}; the spec's "
                             f"conditioning.aux declares {self.aux_names or 'none'}")
        for name in self.aux_names:
            value = aux.get(name)
            if value is None:  # zeros still go through the embedding (k-diffusion's behaviour)
                value = emb.new_zeros(b, self.aux_dims[name])
            emb = emb + self.aux[name](value)
        return self.mapping(emb) if self.mapping is not None else emb
