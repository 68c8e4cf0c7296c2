"""Conditioning: noise level, class label and auxiliary inputs -> one vector per sample."""

from __future__ import annotations

import math

import torch
from torch import nn

from ditkit import spec as S

from .norm import Norm
from .tags import MAPPING, tag_module


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                      shift: int = 0) -> torch.Tensor:
    """DiT's sinusoidal features, ``[cos(t f), sin(t f)]`` with ``f_k = max_period^(-k/half)``
    (``shift`` 1: ``-k/(half - 1)``, diffusers' ``downscale_freq_shift``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / (half - shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class SinusoidalEmbed(nn.Module):
    """DiT's TimestepEmbedder: sinusoidal features -> Linear -> SiLU -> Linear.

    ``activation="geglu"``: the first Linear has ``2 width`` outputs, ``value * GELU(gate)``
    (MDiT). ``extra_features``: width of features concatenated after the timestep features
    (sinusoidal auxiliary inputs) before the first Linear."""

    def __init__(self, width: int, frequency_dim: int = 256, max_period: float = 10000.0,
                 scale: float = 1.0, activation: str = "silu", extra_features: int = 0,
                 frequency_shift: int = 0):
        super().__init__()
        self.frequency_dim, self.max_period, self.scale = frequency_dim, max_period, scale
        self.frequency_shift = frequency_shift
        self.activation = activation
        gated = activation == "geglu"
        self.fc1 = nn.Linear(frequency_dim + extra_features, width * (2 if gated else 1))
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(width, width)

    def init_special(self) -> None:
        nn.init.normal_(self.fc1.weight, std=0.02)
        nn.init.normal_(self.fc2.weight, std=0.02)

    def forward(self, t: torch.Tensor,
                extra: torch.Tensor | None = None) -> torch.Tensor:  # (B,) -> (B, width)
        feats = timestep_features(t * self.scale, self.frequency_dim, self.max_period,
                                  self.frequency_shift)
        if extra is not None:
            feats = torch.cat([feats, extra.to(feats.dtype)], dim=-1)
        h = self.fc1(feats.to(self.fc1.weight.dtype))
        if self.activation == "geglu":
            value, gate = h.chunk(2, dim=-1)
            h = value * nn.functional.gelu(gate)
        else:
            h = self.act(h)
        return self.fc2(h)


def sinusoidal_features(x: torch.Tensor, features: int, freq_min: float,
                        freq_max: float) -> torch.Tensor:
    """(B, dims) -> (B, dims * features): ``[cos(x f_k), sin(x f_k)]`` per dim, ``f_k``
    geometric from ``freq_min`` to ``freq_max`` (``features / 2`` of them)."""
    half = features // 2
    steps = torch.arange(half, dtype=torch.float32, device=x.device) / max(half - 1, 1)
    freqs = freq_min * (freq_max / freq_min) ** steps  # (half,)
    args = x.float()[..., None] * freqs  # (B, dims, half)
    return torch.cat([args.cos(), args.sin()], dim=-1).flatten(1)


class FourierEmbed(nn.Module):
    """Random Fourier features ``[cos 2pi x W^T, sin 2pi x W^T]`` then a bias-free Linear.

    ``weight`` is a random buffer drawn at build time; it is part of the checkpoint. The
    features are computed in (at least) fp32 whatever the model's dtype: ``2 pi x W`` reaches
    hundreds of radians, which fp16 / bf16 cannot resolve, and ONNX opsets < 22 have no bf16
    ``Cos`` / ``Sin``."""

    def __init__(self, in_features: int, width: int, std: float = 1.0):
        super().__init__()
        self.std = std
        self.register_buffer("weight", torch.randn(width // 2, in_features) * std)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, width)
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        f = 2 * math.pi * x.to(dtype) @ self.weight.to(dtype).T
        return self.proj(torch.cat([f.cos(), f.sin()], dim=-1).to(self.proj.weight.dtype))


class FourierNoiseEmbed(FourierEmbed):
    """HDiT's noise embedding: sigma -> Fourier features of ``ln(sigma) / 4``."""

    def __init__(self, width: int, std: float = 1.0):
        super().__init__(1, width, std)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, width)
        return super().forward(torch.log(sigma)[:, None] / 4)


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

    ``noise``: the module for the spec's noise embedding, chosen by ``build()``
    (:class:`SinusoidalEmbed` takes ``noise_level`` as a timestep, :class:`FourierNoiseEmbed`
    takes sigma, :class:`~ditkit.builder.fno.FNOEmbed` a flow time); sinusoidal auxiliary
    features are passed to it as ``extra`` (only a :class:`SinusoidalEmbed` built with
    ``extra_features`` accepts them). Embeddings are summed, then optionally mapped. Missing
    labels use the null class; missing auxiliary inputs are zeros.

    ``classes.inject``: ``vector`` sums the class embedding into the vector; ``memory`` keeps it
    as a separate token (:meth:`class_vector`, for cross-attention); ``prefix`` holds
    ``class_tokens`` (:class:`~ditkit.builder.upsample.ClassTokens`) instead."""

    def __init__(self, width: int, noise: nn.Module, classes: S.Classes | None,
                 aux: list[tuple[str, int, float]], mapping: tuple[int, int, float] | None,
                 embedding_std: float, class_tokens: nn.Module | None = None):
        super().__init__()
        self.width, self.noise, self.embedding_std = width, noise, embedding_std
        self.classes = classes.count if classes else None
        self.null_class = bool(classes and classes.null_class)
        self.class_inject = classes.inject if classes else "vector"
        self.class_embed = (nn.Embedding(classes.rows, width)
                            if classes and classes.inject != "prefix" else None)
        self.class_tokens = class_tokens
        self.aux_names = [a[0] for a in aux]
        self.aux_dims = {a[0]: a[1] for a in aux}
        # optional 4th entry: {"embed": "sinusoidal", "features", "freq_min", "freq_max",
        # "dropout"} (MDiT); plain (name, dims, std) triples are HDiT's Fourier embeddings
        opts = {a[0]: (a[3] if len(a) > 3 else {}) for a in aux}
        self.aux_dropout = {n: float(o.get("dropout", 0.0)) for n, o in opts.items()}
        self.aux_sinusoidal = {n: (o["features"], o["freq_min"], o["freq_max"])
                               for n, o in opts.items() if o.get("embed") == "sinusoidal"}
        self.aux = nn.ModuleDict({a[0]: FourierEmbed(a[1], width, a[2]) for a in aux
                                  if a[0] not in self.aux_sinusoidal})
        self.mapping = MappingNetwork(width, *mapping) if mapping else None
        tag_module(self, MAPPING)  # the whole conditioning path learns at the mapping LR

    def init_special(self) -> None:
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=self.embedding_std)

    def forward(self, noise_level: torch.Tensor, class_labels: torch.Tensor | None = None,
                **aux: torch.Tensor) -> torch.Tensor:
        b = noise_level.shape[0]
        unknown = set(aux) - set(self.aux_names)
        if unknown:
            raise ValueError(f"unknown conditioning input(s) {sorted(unknown)}; the spec's "
                             f"conditioning.aux declares {self.aux_names or 'none'}")
        values = {}
        for name in self.aux_names:
            value = aux.get(name)
            if value is None:  # zeros still go through the embedding (k-diffusion's behaviour)
                value = torch.zeros(b, self.aux_dims[name], device=noise_level.device)
            if self.training and self.aux_dropout[name] > 0:
                keep = torch.rand(b, 1, device=value.device) >= self.aux_dropout[name]
                value = value * keep
            values[name] = value
        if self.aux_sinusoidal:
            extra = torch.cat([sinusoidal_features(values[n], *args)
                               for n, args in self.aux_sinusoidal.items()], dim=-1)
            emb = self.noise(noise_level, extra)
        else:
            emb = self.noise(noise_level)
        class_labels = self.labels(class_labels, b, noise_level.device)
        if class_labels is not None and self.class_inject == "vector":
            emb = emb + self.class_embed(class_labels)
        for name in self.aux_names:
            if name not in self.aux_sinusoidal:
                emb = emb + self.aux[name](values[name].to(emb.dtype))
        return self.mapping(emb) if self.mapping is not None else emb

    def labels(self, class_labels: torch.Tensor | None, b: int,
               device: torch.device) -> torch.Tensor | None:
        """The labels to use: the given ones, or the null class when omitted."""
        if not self.classes:
            if class_labels is not None:
                raise ValueError("class_labels given but the spec has no `conditioning.classes`")
            return None
        if class_labels is None:
            if not self.null_class:
                raise ValueError("this model needs class_labels (its spec has no null class)")
            class_labels = torch.full((b,), self.classes, dtype=torch.long, device=device)
        return class_labels

    def class_vector(self, class_labels: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, width)
        return self.class_embed(class_labels)
