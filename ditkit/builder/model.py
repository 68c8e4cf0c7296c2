"""The one generic model: embed -> levels down -> middle -> levels up -> head.

``build(spec)`` is the only entry that reads a spec: it walks the levels and calls each
component family's exhaustive ``match`` in the family's own file (``build_attention``,
``build_ffn``, ``build_down`` / ``build_up``, ``build_skip``, ``build_head``,
``build_conditioning``, ``build_position``); the modules take plain arguments and never branch
again on a kind. Every family (DiT, HDiT, ...) is this same graph with different arguments.
"""

from __future__ import annotations

import contextlib
from typing import Literal, assert_never, cast

import torch
from torch import nn

from ditkit import spec as S
from ditkit.device import tune_cpu_allocator

from .attention import AttentionConfig, build_attention
from .conditioning import (
    Conditioning,
    FNOEmbed,
    FourierNoiseEmbed,
    SinusoidalEmbed,
    build_conditioning,
)
from .cross_attention import CrossAttention
from .ffn import FeedForward, build_ffn
from .heads import Head, build_head
from .init import zero_linear_
from .norm import make_norm
from .position import build_position
from .skips import build_skip
from .tags import tag_torch_layers
from .transitions import TokenMerge, build_down, build_up


class Context:
    """Per-forward state the blocks share besides the conditioning vector: the shared adaLN
    vector ``(B, 6 D)``, the cross-attention memory (``{name: (B, cond_width)}``) and the class
    prefix tokens ``(B, T, D)`` that travel beside the grid (updated as they pass blocks) and
    the noise fraction ``(B,)`` in [0, 1] (None where the noise input has none), which
    noise-dependent RoPE scaling reads, and ``rope_draw`` ``(B, 5)``: the uniforms of
    randomised training positions (:func:`ditkit.builder.position.random_positions`), drawn
    once per training forward so every block and level places a sample alike (None outside
    training or without ``train_positions: random``)."""

    __slots__ = ("shared", "memory", "prefix", "noise", "rope_draw")

    def __init__(
        self,
        shared: torch.Tensor | None = None,
        memory: dict[str, torch.Tensor] | None = None,
        prefix: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        rope_draw: torch.Tensor | None = None,
    ):
        self.shared, self.memory, self.prefix, self.noise = shared, memory, prefix, noise
        self.rope_draw = rope_draw


class Block(nn.Module):
    """Pre-norm attention + pre-norm FFN; one subclass per modulation variant of the spec.

    ``cross``: an optional cross-attention sub-layer (own pre-norm, unmodulated) between
    attention and FFN, attending to ``ctx.memory``. A subclass sets ``chunks`` (vectors of
    ``d_model`` its own modulation Linear makes from the conditioning vector, 0: none) and
    ``modulation_bias``, and writes ``forward``."""

    chunks = 0
    modulation_bias = False

    def __init__(
        self,
        d_model: int,
        cond_width: int,
        norm: S.Norm,
        attention: nn.Module | None,
        ffn: FeedForward,
        cross: CrossAttention | None = None,
    ):
        super().__init__()
        n_attn = attention is not None
        self.attn_norm = make_norm(norm.kind, d_model, norm.eps, norm.affine) if n_attn else None
        self.attn = attention
        self.cross_norm = make_norm(norm.kind, d_model, norm.eps, norm.affine) if cross else None
        self.cross = cross
        self.ffn_norm = make_norm(norm.kind, d_model, norm.eps, norm.affine)
        self.ffn = ffn
        self.modulation = (
            nn.Linear(cond_width, self.chunks * d_model, bias=self.modulation_bias)
            if self.chunks
            else None
        )

    def init_special(self) -> None:
        if self.modulation is not None:
            zero_linear_(self.modulation)

    def _cross(self, x: torch.Tensor, ctx: Context | None) -> torch.Tensor:
        if self.cross is None:
            return x
        assert ctx is not None and self.cross_norm is not None  # made with the cross-attention
        return x + self.cross(self.cross_norm(x), ctx.memory)


class PlainBlock(Block):
    """``modulation: none``: plain pre-norm residual blocks."""

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, ctx: Context | None = None
    ) -> torch.Tensor:  # (B, H, W, C)
        if self.attn is not None:
            assert self.attn_norm is not None  # made with the attention
            x = x + self.attn(self.attn_norm(x), ctx)
        x = self._cross(x, ctx)
        return x + self.ffn(self.ffn_norm(x))


class AdaLNZeroBlock(Block):
    """DiT's adaLN-Zero: ``SiLU(cond) -> Linear -> shift, scale, gate`` x2, zero-init."""

    chunks, modulation_bias = 6, True

    def vectors(self, cond: torch.Tensor, ctx: Context | None) -> torch.Tensor:
        assert self.modulation is not None  # chunks = 6
        return self.modulation(nn.functional.silu(cond))  # (B, 6C)

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, ctx: Context | None = None
    ) -> torch.Tensor:  # (B, H, W, C)
        m = self.vectors(cond, ctx)[:, None, None, :]  # (B, 1, 1, 6C)
        a_shift, a_scale, a_gate, f_shift, f_scale, f_gate = m.chunk(6, dim=-1)
        if self.attn is not None:
            assert self.attn_norm is not None  # made with the attention
            x = x + a_gate * self.attn(self.attn_norm(x) * (1 + a_scale) + a_shift, ctx)
        x = self._cross(x, ctx)
        return x + f_gate * self.ffn(self.ffn_norm(x) * (1 + f_scale) + f_shift)


class SharedAdaLNZeroBlock(AdaLNZeroBlock):
    """MPDiT: adaLN-Zero's six vectors from the model's one shared modulation network
    (``ctx.shared``); no Linear of its own."""

    chunks, modulation_bias = 0, False

    def vectors(self, cond: torch.Tensor, ctx: Context | None) -> torch.Tensor:
        assert ctx is not None and ctx.shared is not None  # the model made the shared vector
        return ctx.shared  # (B, 6C)


class AdaScaleBlock(Block):
    """HDiT's AdaRMSNorm: ``Linear(act(cond)) -> 1 + scale`` x2 (no bias), zero-init;
    ``activation`` (``none``, ``gelu``, ``silu``) is applied to the conditioning vector first."""

    chunks = 2
    ACTIVATIONS = {"none": nn.Identity, "gelu": nn.GELU, "silu": nn.SiLU}

    def __init__(self, *args, activation: str = "none", **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = self.ACTIVATIONS[activation]()

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, ctx: Context | None = None
    ) -> torch.Tensor:  # (B, H, W, C)
        assert self.modulation is not None  # chunks = 2
        a_scale, f_scale = self.modulation(self.activation(cond))[:, None, None, :].chunk(2, -1)
        if self.attn is not None:
            assert self.attn_norm is not None  # made with the attention
            x = x + self.attn(self.attn_norm(x) * (1 + a_scale), ctx)
        x = self._cross(x, ctx)
        return x + self.ffn(self.ffn_norm(x) * (1 + f_scale))


class SharedModulation(nn.Module):
    """Shared adaLN (MPDiT): one modulation network for the whole model. DiT gives every block
    its own ``SiLU -> Linear(cond, 6 d)``; MPDiT computes the six shift / scale / gate vectors
    once per forward and every block (and the final layer, which takes the FFN's shift and
    scale) reuses them -- 6 d^2 parameters instead of 6 d^2 per block. Zero-initialised."""

    def __init__(self, cond_width: int, d_model: int):
        super().__init__()
        self.proj = nn.Linear(cond_width, 6 * d_model)

    def init_special(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:  # (B, cw) -> (B, 6 D)
        return self.proj(nn.functional.silu(cond))


class Memory(nn.Module):
    """The cross-attention memory (MDiT): the conditioning vector after GELU as the ``time``
    token, plus what the class injection adds (``label`` for ``inject: memory``)."""

    def forward(
        self, cond: torch.Tensor, classes: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {"time": nn.functional.gelu(cond), **classes}  # each (B, cond_width)


class NoMemory(nn.Module):
    """No block has cross-attention: no memory is made."""

    def forward(self, cond: torch.Tensor, classes: dict[str, torch.Tensor]) -> None:
        return None


class Stack(nn.ModuleList):
    """Blocks in order. With class prefix tokens (``ctx.prefix``), the grid is flattened and
    the tokens are prepended, so the blocks see one ``(B, 1, T + H W, C)`` sequence (global
    attention, no RoPE: the spec checks it); the tokens are split off again at the end."""

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, ctx: Context | None = None
    ) -> torch.Tensor:
        if len(self) == 0:
            return x
        prefix = ctx.prefix if ctx is not None else None
        if prefix is not None:
            b, hh, ww, c = x.shape
            t = prefix.shape[1]
            x = torch.cat([prefix, x.reshape(b, hh * ww, c)], dim=1)[:, None]  # (B, 1, T+N, C)
        for block in self:
            x = block(x, cond, ctx)
        if prefix is not None:
            assert ctx is not None  # the prefix came from it
            ctx.prefix = x[:, 0, :t]
            # a copy, then a view: a reshape of the strided slice would specialise on batch 1
            x = x[:, 0, t:].clone(memory_format=torch.contiguous_format).view(b, hh, ww, c)
        return x


class Level(nn.Module):
    """One level: ``encoder``, ``down`` (merge), ``up`` (split), ``skip``, ``decoder``; the
    innermost level has only ``middle``."""

    def __init__(
        self,
        encoder: Stack | None = None,
        decoder: Stack | None = None,
        middle: Stack | None = None,
        down: nn.Module | None = None,
        up: nn.Module | None = None,
        skip: nn.Module | None = None,
    ):
        super().__init__()
        self.encoder, self.down, self.middle = encoder, down, middle
        self.up, self.skip, self.decoder = up, skip, decoder


class DiffusionTransformer(nn.Module):
    """A spec compiled to a module. ``model(x, noise_level, class_labels=None, **cond)`` with
    ``x`` as ``(B, C, H, W)``; ``noise_level`` is what the spec's noise embedding expects (a
    DiT timestep, an HDiT sigma), a number or a ``(B,)`` tensor."""

    def __init__(
        self,
        spec: S.ModelSpec,
        embed: TokenMerge,
        position: nn.Module | None,
        conditioning: Conditioning,
        levels: list[Level],
        head: Head,
        shared_modulation: SharedModulation | None = None,
        memory: nn.Module | None = None,
    ):
        super().__init__()
        self.spec = spec
        self.embed, self.position, self.conditioning = embed, position, conditioning
        self.shared_modulation = shared_modulation
        self.memory = memory if memory is not None else NoMemory()
        self.levels = nn.ModuleList(levels)
        self.head = head
        # randomised RoPE positions in training (a block's rope.train_positions: random)
        self.random_positions = any(
            isinstance(b.rope, S.AxialRope)
            and isinstance(b.rope.train_positions, S.RandomPositions)
            for *_, b in spec.blocks()
        )
        self.position_generator: torch.Generator | None = None
        """Where a training forward draws randomised positions from (a CPU generator; the
        trainer sets one and checkpoints its state). ``None``: torch's default CPU generator."""

    def forward(
        self,
        x: torch.Tensor,
        noise_level,
        class_labels: torch.Tensor | None = None,
        **cond: torch.Tensor,
    ) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self._check_input(x)
        b = x.shape[0]
        noise_level = torch.as_tensor(noise_level, device=x.device)
        if noise_level.ndim == 0:
            noise_level = noise_level.expand(b)
        labels = self.conditioning.labels(class_labels, b, x.device)
        c = self.conditioning(noise_level, labels, **cond)  # (B, cond_width)
        # build_noise makes one of these; nn.Module's __getattr__ is untyped
        noise_embed = cast(
            "SinusoidalEmbed | FourierNoiseEmbed | FNOEmbed", self.conditioning.noise
        )
        ctx = Context(noise=noise_embed.fraction(noise_level))
        if self.training and self.random_positions:
            draw = torch.rand((b, 5), generator=self.position_generator, dtype=torch.float32)
            ctx.rope_draw = draw.to(x.device)  # (B, 5): see position.random_positions
        if self.shared_modulation is not None:
            ctx.shared = self.shared_modulation(c)  # (B, 6 D)
        ctx.prefix = self.conditioning.class_tokens(labels, x.dtype)  # (B, T, D) or None
        # labels are None only without classes, where class_embed is NoClasses
        ctx.memory = self.memory(c, self.conditioning.class_embed.memory(labels))  # type: ignore[arg-type]

        x_in = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        h = self.embed(x_in)  # (B, h, w, D0)
        if self.position is not None:
            h = self.position(h)
        skips = []
        # the ModuleList's items are plain Modules to mypy, their attributes Tensor | Module
        # (nn.Module.__getattr__): hence the ignores on the Level calls below
        for level in self.levels[:-1]:
            h = level.encoder(h, c, ctx)  # type: ignore[operator]
            skips.append(h)
            h = level.down(h, x_in)  # type: ignore[operator]  # (B, h/f, w/f, D_{i+1})
        h = self.levels[-1].middle(h, c, ctx)  # type: ignore[operator]
        for i in reversed(range(len(self.levels) - 1)):
            level = self.levels[i]
            h, ctx.prefix = level.up(h, ctx.prefix)  # type: ignore[operator]  # (B, h*f, w*f, D_i)
            h = level.skip(h, skips[i])  # type: ignore[operator]
            h = level.decoder(h, c, ctx)  # type: ignore[operator]
        return self.head(h, c, ctx.shared)  # (B, C_out, H, W); prefix tokens are dropped

    def _check_input(self, x: torch.Tensor) -> None:
        spec = self.spec
        if x.ndim != 4 or x.shape[1] != spec.input.channels:
            raise ValueError(
                f"expected x of shape (B, {spec.input.channels}, H, W) "
                f"(input.channels), got {tuple(x.shape)}"
            )
        issues = spec.check_resolution((x.shape[2], x.shape[3]))
        if issues:
            raise ValueError("; ".join(f"{p}: {m}" for p, m in issues))


# --------------------------------------------------------------------------------------------
# spec -> module


def build(
    spec: S.ModelSpec,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    init: bool = True,
) -> DiffusionTransformer:
    """Compile a spec into a :class:`DiffusionTransformer`.

    ``device="meta"`` builds without memory (for ``describe`` of billion-parameter specs).
    Building for the CPU also tunes glibc's allocator for tensor-sized buffers, once per process
    (:func:`ditkit.device.tune_cpu_allocator`; ``DITKIT_CPU_ALLOCATOR=default`` opts out)."""
    if device is None or torch.device(device).type == "cpu":
        tune_cpu_allocator()
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = _build(spec)
        if init:
            initialize(model, spec.init)
    if dtype is not None:
        model = model.to(dtype)
    return model


def _build(spec: S.ModelSpec) -> DiffusionTransformer:
    # modules are made in forward order: construction draws from the RNG (PyTorch's default
    # init, Fourier features), so the order is part of what a seed builds
    cw = spec.cond_width
    d0 = spec.levels[0].d_model
    embed = TokenMerge(spec.input.channels, d0, S.pair(spec.patch.size), bias=spec.patch.bias)
    position = build_position(spec.position, spec.token_grids()[0], d0)
    conditioning = build_conditioning(spec)
    classes = spec.conditioning.classes
    memory_sources: tuple[str, ...] = ()
    memory = None
    if any(isinstance(b.cross_attention, S.MemoryCrossAttention) for *_, b in spec.blocks()):
        memory_sources = ("label", "time") if classes and classes.inject == "memory" else ("time",)
        memory = Memory()

    levels = []
    last = len(spec.levels) - 1
    for i, lvl in enumerate(spec.levels):
        index = 0  # block index within the level: drives shifted-window alternation

        def make_stack(
            which: Literal["encoder", "decoder", "middle"], i: int = i, d_model: int = lvl.d_model
        ) -> Stack:
            nonlocal index
            blocks = []
            for blk in spec.stack(i, which):
                blocks.append(_block(blk, d_model, cw, index, memory_sources))
                index += 1
            return Stack(blocks)

        if i == last:
            levels.append(Level(middle=make_stack("middle")))
            continue
        encoder = make_stack("encoder")
        decoder = make_stack("decoder")
        down, up = build_down(spec, i), build_up(spec, i)
        assert lvl.skip is not None  # the spec gives every outer level a skip
        skip = build_skip(lvl.skip, lvl.d_model)
        levels.append(Level(encoder=encoder, decoder=decoder, down=down, up=up, skip=skip))

    head = build_head(spec)
    shared = None
    shared_widths = {
        spec.levels[i].d_model
        for i, _, _, b in spec.blocks()
        if isinstance(b.modulation, S.SharedAdaLNZero)
    }
    if shared_widths:
        shared = SharedModulation(cw, shared_widths.pop())
    model = DiffusionTransformer(spec, embed, position, conditioning, levels, head, shared, memory)
    tag_torch_layers(model)  # biases and embedding tables: no weight decay
    return model


def _block(
    blk: S.Block, d_model: int, cond_width: int, index: int, memory: tuple[str, ...] = ()
) -> Block:
    cfg = AttentionConfig(
        d_model,
        blk.d_head,
        blk.qk_norm,
        blk.logits,
        blk.rope,
        blk.attention_bias,
        blk.dropout,
        blk.zero_init_out,
    )
    attention = build_attention(blk.attention, cfg, index)
    cross = None
    match blk.cross_attention:
        case S.NoCrossAttention():
            pass
        case S.MemoryCrossAttention(null_token=null, time_token=time_token):
            sources = [s for s in memory if s != "time" or time_token]
            cross = CrossAttention(cfg, cond_width, sources, null_token=null)
        case unknown:
            assert_never(unknown)
    ffn = build_ffn(blk, d_model)
    parts = (d_model, cond_width, blk.norm, attention, ffn, cross)
    match blk.modulation:
        case S.AdaScale(activation=act):
            return AdaScaleBlock(*parts, activation=act)
        case S.AdaLNZero():
            return AdaLNZeroBlock(*parts)
        case S.SharedAdaLNZero():
            return SharedAdaLNZeroBlock(*parts)
        case S.NoModulation():
            return PlainBlock(*parts)
        case other:
            assert_never(other)


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
                m.init_special()  # type: ignore[operator]  # Module.__getattr__ is untyped
