"""Conditioning: noise level, class label and auxiliary inputs -> one vector per sample.

One class per spec variant, chosen by :func:`build_conditioning`:

- the noise embedding (``conditioning.noise``): :class:`SinusoidalEmbed` (DiT; its gated form
  :class:`GatedSinusoidalEmbed`, MDiT), :class:`FourierNoiseEmbed` (HDiT), :class:`FNOEmbed`
  (MPDiT). Each is called as ``noise(noise_level, extra)``; ``extra`` holds the sinusoidal
  features of auxiliary inputs, which only the sinusoidal embeddings take (the spec checks it);
- the class injection (``conditioning.classes.inject``): :class:`ClassVector` (summed into the
  vector), :class:`ClassMemory` (a token for cross-attention), :class:`ClassTokens` (prefix
  tokens beside the grid), or :class:`NoClasses`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import assert_never

import torch
import torch.nn.functional as F
from torch import nn

from ditkit import spec as S

from .norm import RMSNorm
from .tags import MAPPING, tag_module


def timestep_features(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, shift: int = 0
) -> torch.Tensor:
    """DiT's sinusoidal features, ``[cos(t f), sin(t f)]`` with ``f_k = max_period^(-k/half)``
    (``shift`` 1: ``-k/(half - 1)``, diffusers' ``downscale_freq_shift``)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=t.device)
        / (half - shift)
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class SinusoidalEmbed(nn.Module):
    """``noise: {kind: sinusoidal}`` (DiT's TimestepEmbedder): sinusoidal features -> Linear ->
    SiLU -> Linear. ``extra_features``: width of the auxiliary features concatenated after the
    timestep features before the first Linear."""

    gated = False

    def __init__(
        self,
        width: int,
        frequency_dim: int = 256,
        max_period: float = 10000.0,
        scale: float = 1.0,
        extra_features: int = 0,
        frequency_shift: int = 0,
    ):
        super().__init__()
        self.frequency_dim, self.max_period, self.scale = frequency_dim, max_period, scale
        self.frequency_shift = frequency_shift
        self.fc1 = nn.Linear(frequency_dim + extra_features, width * (2 if self.gated else 1))
        self.fc2 = nn.Linear(width, width)

    def init_special(self) -> None:
        nn.init.normal_(self.fc1.weight, std=0.02)
        nn.init.normal_(self.fc2.weight, std=0.02)

    def activate(self, h: torch.Tensor) -> torch.Tensor:  # (B, width)
        return F.silu(h)

    def fraction(self, t: torch.Tensor) -> None:
        """A timestep's noise fraction needs the objective's schedule, which the network does
        not know: none (noise-dependent RoPE scaling refuses these models)."""
        return None

    def forward(
        self, t: torch.Tensor, extra: Sequence[torch.Tensor] = ()
    ) -> torch.Tensor:  # (B,) -> (B, width)
        feats = timestep_features(
            t * self.scale, self.frequency_dim, self.max_period, self.frequency_shift
        )
        for e in extra:  # (B, features) per sinusoidal auxiliary input
            feats = torch.cat([feats, e.to(feats.dtype)], dim=-1)
        h = self.fc1(feats.to(self.fc1.weight.dtype))
        return self.fc2(self.activate(h))


class GatedSinusoidalEmbed(SinusoidalEmbed):
    """``noise: {kind: sinusoidal, activation: geglu}`` (MDiT): the first Linear has
    ``2 width`` outputs, ``value * GELU(gate)``."""

    gated = True

    def activate(self, h: torch.Tensor) -> torch.Tensor:  # (B, 2 width) -> (B, width)
        value, gate = h.chunk(2, dim=-1)
        return value * F.gelu(gate)


def sinusoidal_features(
    x: torch.Tensor, features: int, freq_min: float, freq_max: float
) -> torch.Tensor:
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

    weight: torch.Tensor  # a buffer (typed here: nn.Module's __getattr__ is untyped)

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
    """``noise: fourier`` (HDiT): sigma -> Fourier features of ``ln(sigma) / 4``."""

    def __init__(self, width: int, std: float = 1.0):
        super().__init__(1, width, std)

    def forward(
        self, sigma: torch.Tensor, extra: Sequence[torch.Tensor] = ()
    ) -> torch.Tensor:  # (B,) -> (B, width)
        return super().forward(torch.log(sigma)[:, None] / 4)

    def fraction(self, sigma: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,) in [0, 1)
        """The noise fraction ``sigma / (1 + sigma)`` (the rectified-flow time of sigma)."""
        sigma = sigma.float()
        return sigma / (1 + sigma)


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
        xf = torch.fft.rfft(x.float(), dim=-1)[..., : self.modes]  # (B, C, modes)
        re, im = xf.real, xf.imag
        wr, wi = self.weights_real.float(), self.weights_imag.float()
        out_re = torch.einsum("bim,iom->bom", re, wr) - torch.einsum("bim,iom->bom", im, wi)
        out_im = torch.einsum("bim,iom->bom", re, wi) + torch.einsum("bim,iom->bom", im, wr)
        pad = n // 2 + 1 - self.modes
        spec = torch.complex(F.pad(out_re, (0, pad)), F.pad(out_im, (0, pad)))
        return torch.fft.irfft(spec, n=n, dim=-1).to(x.dtype)


class FNOEmbed(nn.Module):
    """``noise: fno`` (MPDiT): a Fourier neural operator over a small 1-D grid around the flow
    time -- a learned smooth function of t (the grid is shifted by t, then mixed by truncated
    spectral convolutions), so nearby times get nearby embeddings whatever the frequency
    content the model needs: ``t -> grid(points in [-1, 1]) + t -> Linear(1, width) -> depth x
    (spectral conv + pointwise conv, GELU between) -> mean over the grid -> Linear(width,
    out)``."""

    def __init__(
        self, out_width: int, points: int = 32, modes: int = 16, width: int = 32, depth: int = 3
    ):
        super().__init__()
        self.points = points
        self.lift = nn.Linear(1, width)
        self.spectral = nn.ModuleList(SpectralConv1d(width, modes) for _ in range(depth))
        self.pointwise = nn.ModuleList(nn.Conv1d(width, width, 1) for _ in range(depth))
        self.proj = nn.Linear(width, out_width)

    def init_special(self) -> None:
        for s in self.spectral:  # ModuleList items are Modules to mypy: Tensor | Module below
            nn.init.normal_(s.weights_real)  # type: ignore[arg-type]
            nn.init.normal_(s.weights_imag)  # type: ignore[arg-type]

    def fraction(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,)
        """The noise fraction: the flow time itself (``time_scale`` 1 assumed), in [0, 1]."""
        return t.float().clamp(0.0, 1.0)

    def forward(
        self, t: torch.Tensor, extra: Sequence[torch.Tensor] = ()
    ) -> torch.Tensor:  # (B,) -> (B, out_width)
        grid = torch.linspace(-1, 1, self.points, device=t.device, dtype=torch.float32)
        grid = grid[None, :] + t.float()[:, None]  # (B, points)
        h = self.lift(grid[..., None].to(self.lift.weight.dtype)).transpose(1, 2)  # (B, W, N)
        last = len(self.spectral) - 1
        for i, (spec, point) in enumerate(zip(self.spectral, self.pointwise)):
            h = spec(h) + point(h)
            if i < last:
                h = F.gelu(h)
        return self.proj(h.mean(dim=-1))  # (B, out_width)


# --------------------------------------------------------------------------------------------
# class labels


class ClassVector(nn.Embedding):
    """``classes.inject: vector`` (DiT, HDiT): the class embedding is summed into the vector."""

    def reset(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)

    def add(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # (B, width)
        return emb + self(labels)

    def memory(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}


class ClassMemory(ClassVector):
    """``classes.inject: memory`` (MDiT): the class embedding is a token of the
    cross-attention memory (``label``), not part of the vector."""

    def add(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return emb

    def memory(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"label": self(labels)}  # (B, width)


class NoClasses(nn.Module):
    """No class embedding in the vector or the memory: no classes, or ``inject: prefix``
    (the labels become :class:`ClassTokens`)."""

    def reset(self, std: float) -> None:
        pass

    def add(self, emb: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return emb

    def memory(self, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {}


class ClassTokens(nn.Module):
    """``classes.inject: prefix`` (MPDiT): ``tokens`` learned tokens per class (a ``(classes +
    null, tokens * d)`` table, MPDiT's layout), looked up and viewed as ``(B, tokens, d)``."""

    def __init__(self, classes: S.Classes, d_model: int, std: float = 0.02):
        super().__init__()
        self.classes, self.null_class = classes.count, classes.null_class
        self.tokens, self.std = classes.tokens, std
        self.table = nn.Embedding(classes.rows, classes.tokens * d_model)

    def init_special(self) -> None:
        nn.init.normal_(self.table.weight, std=self.std)

    def forward(self, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        e = self.table(labels)  # (B, T * D)
        return e.view(e.shape[0], self.tokens, -1).to(dtype)  # (B, T, D)


class NoClassTokens(nn.Module):
    """No prefix tokens (``inject`` is not ``prefix``)."""

    def forward(self, labels: torch.Tensor | None, dtype: torch.dtype) -> None:
        return None


# --------------------------------------------------------------------------------------------
# the conditioning vector


class MappingBlock(nn.Module):
    """Residual ``RMSNorm -> GEGLU up -> dropout -> down (zero-init)``."""

    def __init__(self, width: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.norm = RMSNorm(width, eps=1e-6, affine=True)
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
        self.in_norm = RMSNorm(width, eps=1e-6, affine=True)
        self.blocks = nn.ModuleList(MappingBlock(width, d_ff, dropout) for _ in range(depth))
        self.out_norm = RMSNorm(width, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


class Conditioning(nn.Module):
    """``noise_level`` (+ class labels, + auxiliary vectors) -> ``(B, width)``.

    ``noise``: the noise embedding module; ``class_embed``: the class injection
    (:class:`ClassVector`, :class:`ClassMemory` or :class:`NoClasses`), ``class_tokens``:
    :class:`ClassTokens` or :class:`NoClassTokens`; ``aux``: a :class:`FourierEmbed` per
    Fourier auxiliary input (summed into the vector); ``aux_sinusoidal``: ``name -> (features,
    freq_min, freq_max)`` of the sinusoidal ones (features given to the noise embedding).
    Embeddings are summed, then optionally mapped. Missing labels use the null class; missing
    auxiliary inputs are zeros."""

    class_embed: ClassVector | NoClasses  # typed here: nn.Module's __getattr__ is untyped

    def __init__(
        self,
        width: int,
        noise: nn.Module,
        classes: S.Classes | None,
        class_embed: ClassVector | NoClasses,
        class_tokens: nn.Module,
        aux: nn.ModuleDict,
        aux_sinusoidal: dict[str, tuple[int, float, float]],
        aux_dims: dict[str, int],
        aux_dropout: dict[str, float],
        mapping: nn.Module | None,
        embedding_std: float,
    ):
        super().__init__()
        self.width, self.noise, self.embedding_std = width, noise, embedding_std
        self.classes = classes.count if classes else None
        self.null_class = bool(classes and classes.null_class)
        self.class_embed = class_embed
        self.class_tokens = class_tokens
        self.aux_names = list(aux_dims)
        self.aux_dims, self.aux_dropout = dict(aux_dims), dict(aux_dropout)
        self.aux_sinusoidal = dict(aux_sinusoidal)
        self.aux = aux
        self.mapping = mapping
        tag_module(self, MAPPING)  # the whole conditioning path learns at the mapping LR

    def init_special(self) -> None:
        self.class_embed.reset(self.embedding_std)

    def forward(
        self,
        noise_level: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        **aux: torch.Tensor,
    ) -> torch.Tensor:
        b = noise_level.shape[0]
        unknown = set(aux) - set(self.aux_names)
        if unknown:
            raise ValueError(
                f"unknown conditioning input(s) {sorted(unknown)}; the spec's "
                f"conditioning.aux declares {self.aux_names or 'none'}"
            )
        values = {}
        for name in self.aux_names:
            value = aux.get(name)
            if value is None:  # zeros still go through the embedding (k-diffusion's behaviour)
                value = torch.zeros(b, self.aux_dims[name], device=noise_level.device)
            if self.training and self.aux_dropout[name] > 0:
                keep = torch.rand(b, 1, device=value.device) >= self.aux_dropout[name]
                value = value * keep
            values[name] = value
        extra = [sinusoidal_features(values[n], *args) for n, args in self.aux_sinusoidal.items()]
        emb = self.noise(noise_level, extra)  # (B, width)
        class_labels = self.labels(class_labels, b, noise_level.device)
        # labels are None only without classes, where class_embed is NoClasses
        emb = self.class_embed.add(emb, class_labels)  # type: ignore[arg-type]
        for name, embed in self.aux.items():
            emb = emb + embed(values[name].to(emb.dtype))
        return self.mapping(emb) if self.mapping is not None else emb

    def labels(
        self, class_labels: torch.Tensor | None, b: int, device: torch.device
    ) -> torch.Tensor | None:
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


def build_noise(cond: S.Conditioning, width: int) -> nn.Module:
    """The module of ``conditioning.noise``."""
    match cond.noise:
        case S.SinusoidalNoise(
            frequency_dim=fd, max_period=mp, scale=sc, activation=act, frequency_shift=shift
        ):
            extra = sum(a.dims * a.features for a in cond.aux if a.embed == "sinusoidal")
            match act:
                case "silu":
                    return SinusoidalEmbed(
                        width, fd, mp, sc, extra_features=extra, frequency_shift=shift
                    )
                case "geglu":
                    return GatedSinusoidalEmbed(
                        width, fd, mp, sc, extra_features=extra, frequency_shift=shift
                    )
                case other:
                    assert_never(other)
        case S.FourierNoise(std=std):
            return FourierNoiseEmbed(width, std)
        case S.FNONoise(points=pts, modes=modes, width=w, depth=depth):
            return FNOEmbed(width, pts, modes, w, depth)
        case other:
            assert_never(other)


def build_conditioning(spec: S.ModelSpec) -> Conditioning:
    """``spec.conditioning`` as a module. Modules are made in a fixed order (noise, class
    tokens, class embedding, auxiliary embeddings, mapping): construction draws from the RNG,
    and a spec must build the same weights from the same seed."""
    cond, cw = spec.conditioning, spec.cond_width
    noise = build_noise(cond, cw)
    classes = cond.classes
    inject = classes.inject if classes is not None else None
    class_tokens = (
        ClassTokens(classes, spec.levels[0].d_model, spec.init.embedding_std)
        if inject == "prefix" and classes is not None
        else NoClassTokens()
    )
    match inject:
        case "vector":
            assert classes is not None  # inject comes from it
            class_embed: ClassVector | NoClasses = ClassVector(classes.rows, cw)
        case "memory":
            assert classes is not None
            class_embed = ClassMemory(classes.rows, cw)
        case "prefix" | None:
            class_embed = NoClasses()
        case other:
            assert_never(other)
    aux = nn.ModuleDict(
        {a.name: FourierEmbed(a.dims, cw, a.std) for a in cond.aux if a.embed == "fourier"}
    )
    mapping = None
    if cond.mapping is not None:
        mapping = MappingNetwork(
            cw, cond.mapping.depth, int(round(cond.mapping.ratio * cw)), cond.mapping.dropout
        )
    return Conditioning(
        cw,
        noise,
        classes,
        class_embed,
        class_tokens,
        aux,
        aux_sinusoidal={
            a.name: (a.features, a.freq_min, a.freq_max)
            for a in cond.aux
            if a.embed == "sinusoidal"
        },
        aux_dims={a.name: a.dims for a in cond.aux},
        aux_dropout={a.name: a.dropout for a in cond.aux},
        mapping=mapping,
        embedding_std=spec.init.embedding_std,
    )
