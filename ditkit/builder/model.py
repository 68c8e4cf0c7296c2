"""The one generic model: embed -> levels down -> middle -> levels up -> head.

``build(spec)`` is the only place that reads a spec; the modules below take plain arguments.
Every family (DiT, HDiT, ...) is this same graph with different arguments.
"""

from __future__ import annotations

from typing import assert_never

import torch
from torch import nn

from ditkit import spec as S

from . import kernels
from .attention import Attention
from .conditioning import Conditioning
from .embed import SkipMerge, TokenMerge, TokenSplit
from .ffn import FeedForward
from .head import Head
from .norm import Norm
from .position import LearnedPosition, SincosPosition


class Block(nn.Module):
    """Pre-norm attention + pre-norm FFN, modulated by the conditioning vector.

    ``ada_ln_zero`` (DiT): ``SiLU(cond) -> Linear -> shift, scale, gate`` x2, zero-init.
    ``ada_scale`` (HDiT AdaRMSNorm): ``Linear(cond) -> 1 + scale`` x2 (no bias), zero-init.
    ``none``: plain pre-norm residual blocks."""

    def __init__(self, d_model: int, cond_width: int, modulation: str, norm: S.Norm,
                 attention: Attention | None, ffn: FeedForward):
        super().__init__()
        self.modulation_kind = modulation
        n_attn = attention is not None
        self.attn_norm = Norm(d_model, norm.kind, norm.eps, norm.affine) if n_attn else None
        self.attn = attention
        self.ffn_norm = Norm(d_model, norm.kind, norm.eps, norm.affine)
        self.ffn = ffn
        chunks = {"ada_ln_zero": 6, "ada_scale": 2, "none": 0}[modulation]
        self.modulation = (nn.Linear(cond_width, chunks * d_model,
                                     bias=modulation == "ada_ln_zero") if chunks else None)

    def init_special(self) -> None:
        if self.modulation is not None:
            nn.init.zeros_(self.modulation.weight)
            if self.modulation.bias is not None:
                nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        kind = self.modulation_kind
        if kind == "ada_ln_zero":
            m = self.modulation(nn.functional.silu(cond))[:, None, None, :]  # (B, 1, 1, 6C)
            a_shift, a_scale, a_gate, f_shift, f_scale, f_gate = m.chunk(6, dim=-1)
            if self.attn is not None:
                x = x + a_gate * self.attn(self.attn_norm(x) * (1 + a_scale) + a_shift)
            return x + f_gate * self.ffn(self.ffn_norm(x) * (1 + f_scale) + f_shift)
        if kind == "ada_scale":
            a_scale, f_scale = self.modulation(cond)[:, None, None, :].chunk(2, dim=-1)
            if self.attn is not None:
                x = x + self.attn(self.attn_norm(x) * (1 + a_scale))
            return x + self.ffn(self.ffn_norm(x) * (1 + f_scale))
        if self.attn is not None:
            x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class Stack(nn.ModuleList):
    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = block(x, cond)
        return x


class Level(nn.Module):
    """One level: ``encoder``, ``down`` (merge), ``up`` (split), ``skip``, ``decoder``; the
    innermost level has only ``middle``."""

    def __init__(self, encoder: Stack | None = None, decoder: Stack | None = None,
                 middle: Stack | None = None, down: nn.Module | None = None,
                 up: nn.Module | None = None, skip: SkipMerge | None = None):
        super().__init__()
        self.encoder, self.down, self.middle = encoder, down, middle
        self.up, self.skip, self.decoder = up, skip, decoder


class DiffusionTransformer(nn.Module):
    """A spec compiled to a module. ``model(x, noise_level, class_labels=None, **cond)`` with
    ``x`` as ``(B, C, H, W)``; ``noise_level`` is what the spec's noise embedding expects (a
    DiT timestep, an HDiT sigma), a number or a ``(B,)`` tensor."""

    def __init__(self, spec: S.ModelSpec, embed: TokenMerge, position: nn.Module | None,
                 conditioning: Conditioning, levels: list[Level], head: Head):
        super().__init__()
        self.spec = spec
        self.embed, self.position, self.conditioning = embed, position, conditioning
        self.levels = nn.ModuleList(levels)
        self.head = head

    def forward(self, x: torch.Tensor, noise_level, class_labels: torch.Tensor | None = None,
                **cond: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self._check_input(x)
        b = x.shape[0]
        noise_level = torch.as_tensor(noise_level, device=x.device)
        if noise_level.ndim == 0:
            noise_level = noise_level.expand(b)
        c = self.conditioning(noise_level, class_labels, **cond)  # (B, cond_width)

        h = self.embed(x.permute(0, 2, 3, 1))  # (B, h, w, D0)
        if self.position is not None:
            h = self.position(h)
        skips = []
        for i, level in enumerate(self.levels[:-1]):
            with kernels.attention_scope(f"levels.{i}"):
                h = level.encoder(h, c)
                skips.append(h)
                h = level.down(h)  # (B, h/f, w/f, D_{i+1})
        with kernels.attention_scope(f"levels.{len(self.levels) - 1}"):
            h = self.levels[-1].middle(h, c)
        for i in reversed(range(len(self.levels) - 1)):
            level = self.levels[i]
            with kernels.attention_scope(f"levels.{i}"):
                h = level.up(h)  # (B, h*f, w*f, D_i)
                h = level.skip(h, skips[i])
                h = level.decoder(h, c)
        return self.head(h, c)  # (B, C_out, H, W)

    def _check_input(self, x: torch.Tensor) -> None:
        spec = self.spec
        if x.ndim != 4 or x.shape[1] != spec.input.channels:
            raise ValueError(f"expected x of shape (B, {spec.input.channels}, H, W) "
                             f"(input.channels), got {tuple(x.shape)}")
        issues = spec.check_resolution((x.shape[2], x.shape[3]))
        if issues:
            raise ValueError("; ".join(f"{p}: {m}" for p, m in issues))


# --------------------------------------------------------------------------------------------
# spec -> module


def build(spec: S.ModelSpec, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None, init: bool = True) -> DiffusionTransformer:
    """Compile a spec into a :class:`DiffusionTransformer`.

    ``device="meta"`` builds without memory (for ``describe`` of billion-parameter specs)."""
    with torch.device(device) if device is not None else _nullcontext():
        model = _build(spec)
        if init:
            initialize(model, spec.init)
    if dtype is not None:
        model = model.to(dtype)
    return model


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _build(spec: S.ModelSpec) -> DiffusionTransformer:
    cw = spec.cond_width
    ph, pw = S.pair(spec.patch.size)
    d0 = spec.levels[0].d_model
    embed = TokenMerge(spec.input.channels, d0, (ph, pw), bias=spec.patch.bias)
    grid0 = spec.token_grids()[0]
    match spec.position:
        case S.NoPosition():
            position = None
        case S.SincosPosition(max_period=mp):
            position = SincosPosition(grid0, d0, mp)
        case S.LearnedPosition(init_std=std):
            position = LearnedPosition(grid0, d0, std)
        case other:
            assert_never(other)

    cond = spec.conditioning
    match cond.noise:
        case S.SinusoidalNoise(frequency_dim=fd, max_period=mp, scale=sc):
            noise_kind, noise_args = "sinusoidal", {"frequency_dim": fd, "max_period": mp,
                                                     "scale": sc}
        case S.FourierNoise(std=std):
            noise_kind, noise_args = "fourier", {"std": std}
        case other:
            assert_never(other)
    mapping = None
    if cond.mapping is not None:
        mapping = (cond.mapping.depth, int(round(cond.mapping.ratio * cw)), cond.mapping.dropout)
    conditioning = Conditioning(
        cw, noise_kind, noise_args,
        classes=cond.classes.count if cond.classes else None,
        null_class=bool(cond.classes and cond.classes.null_class),
        aux=[(a.name, a.dims, a.std) for a in cond.aux], mapping=mapping,
        embedding_std=spec.init.embedding_std)

    levels = []
    last = len(spec.levels) - 1
    for i, lvl in enumerate(spec.levels):
        index = 0  # block index within the level: drives shifted-window alternation

        def make_stack(which: str) -> Stack:
            nonlocal index
            blocks = []
            for blk in spec.stack(i, which):
                blocks.append(_block(blk, lvl.d_model, cw, index))
                index += 1
            return Stack(blocks)

        if i == last:
            levels.append(Level(middle=make_stack("middle")))
            continue
        encoder = make_stack("encoder")
        decoder = make_stack("decoder")
        nxt = spec.levels[i + 1].d_model
        match lvl.down:
            case S.Merge(factor=f, bias=bias):
                down = TokenMerge(lvl.d_model, nxt, (f, f), bias=bias)
                up = TokenSplit(nxt, lvl.d_model, (f, f), bias=bias)
            case other:
                assert_never(other)
        match lvl.skip:
            case S.LerpSkip(init=fac):
                skip = SkipMerge("lerp", lvl.d_model, init=fac)
            case S.AddSkip():
                skip = SkipMerge("add", lvl.d_model)
            case S.ConcatSkip(bias=bias):
                skip = SkipMerge("concat", lvl.d_model, bias=bias)
            case S.NoSkip():
                skip = SkipMerge("none", lvl.d_model)
            case other:
                assert_never(other)
        levels.append(Level(encoder=encoder, decoder=decoder, down=down, up=up, skip=skip))

    match spec.head:
        case S.LinearHead() | S.AdaLNHead() as h:
            head = Head(h.kind, d0, cw, spec.out_channels, (ph, pw), h.norm.kind, h.norm.eps,
                        h.norm.affine, h.bias)
        case other:
            assert_never(other)
    return DiffusionTransformer(spec, embed, position, conditioning, levels, head)


def _block(blk: S.Block, d_model: int, cond_width: int, index: int) -> Block:
    att_args: dict = {}
    match blk.attention:
        case S.NoAttention():
            pattern = None
        case S.GlobalAttention():
            pattern = "global"
        case S.NeighborhoodAttention(kernel_size=k, dilation=d):
            pattern = "neighborhood"
            att_args = {"kernel_size": S.pair(k), "dilation": S.pair(d)}
        case S.ShiftedWindowAttention(window_size=w, shift=shift):
            pattern = "shifted_window"
            att_args = {"window_size": w,
                        "window_shift": w // 2 if shift == "alternate" and index % 2 else 0}
        case other:
            assert_never(other)
    attention = None
    if pattern is not None:
        match blk.logits:
            case S.DotLogits():
                att_args.update(logits="dot")
            case S.CosineLogits(scale_init=si, eps=eps):
                att_args.update(logits="cosine", scale_init=si, cosine_eps=eps)
            case other:
                assert_never(other)
        match blk.rope:
            case S.NoRope():
                pass
            case S.AxialRope() as r:
                att_args.update(rope_fraction=r.fraction, rope_positions=r.positions,
                                rope_frequencies_layout=r.frequencies, rope_freq_min=r.freq_min,
                                rope_freq_max=r.freq_max, rope_base=r.base,
                                rope_position_scale=r.position_scale)
            case other:
                assert_never(other)
        attention = Attention(
            d_model, blk.d_head, pattern=pattern, qk_norm=blk.qk_norm.kind,
            qk_norm_affine=blk.qk_norm.affine, qk_norm_eps=blk.qk_norm.eps,
            bias=blk.attention_bias, dropout=blk.dropout, zero_init_out=blk.zero_init_out,
            **att_args)
    f = blk.ffn
    ffn = FeedForward(d_model, f.hidden(d_model), f.kind, bias=f.bias,
                      approximate=getattr(f, "approximate", "none"), dropout=blk.dropout,
                      zero_init_out=blk.zero_init_out)
    return Block(d_model, cond_width, blk.modulation.kind, blk.norm, attention, ffn)


def initialize(model: nn.Module, init: S.Init) -> None:
    """Initialise weights as the reference code does.

    1. ``xavier_uniform``: every Linear gets Xavier-uniform weights and zero biases (DiT's
       ``initialize_weights``); ``torch_default`` keeps PyTorch's init (k-diffusion).
    2. Every module's own ``init_special`` then applies its fixed choices: zero-init adaLN,
       output projections and heads, cosine scales, lerp factors, embeddings."""
    with torch.no_grad():
        if init.linear == "xavier_uniform":
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        for m in model.modules():
            if hasattr(m, "init_special"):
                m.init_special()
