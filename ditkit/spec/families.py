"""Python specs: plain functions that return spec objects.

They are ordinary code (loops, arithmetic) so YAML can stay declarative; the YAML presets in
``examples/`` are equal to what these return (a test checks it).
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from .components import (
    DEFAULT_KERNEL_SIZE,
    GEGLU,
    AdaLNHead,
    AdaScale,
    AggregateAttention,
    Attention,
    AuxInput,
    AxialRope,
    Classes,
    Conditioning,
    CosineLogits,
    FNONoise,
    FourierNoise,
    GeluMLP,
    GlobalAttention,
    Init,
    Input,
    LerpSkip,
    LinearHead,
    LinearSkip,
    Mapping,
    MemoryCrossAttention,
    Merge,
    NeighborhoodAttention,
    NoModulation,
    NoPosition,
    Norm,
    NoSkip,
    Patch,
    QKNorm,
    Repatch,
    SharedAdaLNZero,
    ShiftedWindowAttention,
    SincosPosition,
    SinusoidalNoise,
    Upsample,
)
from .model import Block, BlockOverride, Level, ModelSpec

# name: (depth, d_model, n_heads) -- DiT paper, Table 1
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "s": (12, 384, 6),
    "b": (12, 768, 12),
    "l": (24, 1024, 16),
    "xl": (28, 1152, 16),
}


def dit(
    size: str = "xl",  # one of DIT_SIZES (any case)
    patch: int = 2,
    *,
    channels: int = 4,
    resolution: int = 32,
    space: Literal["pixel", "latent"] = "latent",
    classes: int | None = 1000,
    learned_sigma: bool = True,
    name: str | None = None,
) -> ModelSpec:
    """DiT (Peebles & Xie): one level of adaLN-Zero blocks over a sin-cos positioned grid.

    Defaults are the paper's ImageNet 256^2 models (32x32x4 latents, 1000 classes)."""
    depth, d_model, n_heads = DIT_SIZES[size.lower()]
    return ModelSpec(
        name=name or f"dit-{size.lower()}-{patch}",
        description=f"DiT-{size.upper()}/{patch} (Peebles & Xie 2023)",
        input=Input(channels=channels, space=space, resolution=(resolution, resolution)),
        patch=Patch(size=patch, bias=True),
        position=SincosPosition(),
        conditioning=Conditioning(classes=Classes(count=classes) if classes else None),
        block=Block(d_head=d_model // n_heads),
        levels=(Level(d_model=d_model, middle=depth),),
        head=AdaLNHead(learned_sigma=learned_sigma),
        init=Init(linear="xavier_uniform", embedding_std=0.02),
    )


LocalKind = Literal["neighborhood", "shifted_window", "global"]


def hdit(
    widths: Sequence[int],
    depths: Sequence[int],
    *,
    local: Sequence[LocalKind] | None = None,
    n_global: int = 1,
    d_head: int = 64,
    kernel_size: int = DEFAULT_KERNEL_SIZE,
    window_size: int = 8,
    patch: int = 4,
    channels: int = 3,
    resolution: int = 128,
    classes: int | None = 1000,
    mapping_width: int = 768,
    mapping_depth: int = 1,
    ffn_ratio: float = 3.0,
    augmentation: bool = True,
    dropout: Sequence[float] | None = None,
    name: str = "hdit",
    description: str = "",
) -> ModelSpec:
    """HDiT (Crowson et al. 2024), k-diffusion's ``image_transformer_v2``.

    ``widths``/``depths`` are per level, outer -> inner; a level of depth d has d encoder and d
    decoder blocks, the innermost has d middle blocks. The innermost ``n_global`` levels use
    global attention, the others ``local`` (default neighborhood)."""
    n = len(widths)
    if len(depths) != n:
        raise ValueError(f"widths ({n}) and depths ({len(depths)}) must have the same length")
    kinds = list(local) if local is not None else ["neighborhood"] * (n - n_global)
    kinds += ["global"] * (n - len(kinds))
    dropout = list(dropout) if dropout is not None else [0.0] * n
    levels = []
    for i, (w, d, kind) in enumerate(zip(widths, depths, kinds)):
        attentions: dict[str, Attention] = {
            "neighborhood": NeighborhoodAttention(kernel_size=kernel_size),
            "shifted_window": ShiftedWindowAttention(window_size=window_size),
            "global": GlobalAttention(),
        }
        attention = attentions[kind]
        extra: dict[str, Any] = {"dropout": dropout[i]} if dropout[i] else {}
        if i < n - 1:
            levels.append(
                Level(
                    d_model=w,
                    encoder=d,
                    decoder=d,
                    attention=attention,
                    down=Merge(factor=2),
                    skip=LerpSkip(),
                    **extra,
                )
            )
        else:
            levels.append(Level(d_model=w, middle=d, attention=attention, **extra))
    return ModelSpec(
        name=name,
        description=description,
        input=Input(channels=channels, space="pixel", resolution=(resolution, resolution)),
        patch=Patch(size=patch, bias=False),
        conditioning=Conditioning(
            width=mapping_width,
            noise=FourierNoise(),
            classes=Classes(count=classes) if classes else None,
            aux=(AuxInput(name="aug_cond", dims=9),) if augmentation else (),
            mapping=Mapping(depth=mapping_depth, ratio=3.0),
        ),
        block=Block(
            d_head=d_head,
            logits=CosineLogits(),
            rope=AxialRope(fraction=0.5),
            attention_bias=False,
            norm=Norm(kind="rms"),
            modulation=AdaScale(),
            ffn=GEGLU(ratio=ffn_ratio, bias=False),
            zero_init_out=True,
        ),
        levels=tuple(levels),
        head=LinearHead(norm=Norm(kind="rms", affine=True), bias=False),
        init=Init(linear="torch_default", embedding_std=1.0),
    )


def hdit_imagenet_128() -> ModelSpec:
    """HDiT ablation step E (Table 1 / Table 6): 117M params, 31 GFLOPs at 128^2."""
    return hdit(
        [384, 768],
        [2, 11],
        resolution=128,
        mapping_width=768,
        mapping_depth=1,
        name="hdit-imagenet-128",
        description="HDiT ImageNet-128^2, ablation step E (Crowson et al. 2024, Table 6)",
    )


def hdit_ffhq_1024() -> ModelSpec:
    """HDiT FFHQ-1024^2 (Table 6): 85M params, 206 GFLOPs; unconditional, augmentation input."""
    return hdit(
        [128, 256, 384, 768, 1024],
        [2, 2, 2, 2, 2],
        n_global=2,
        resolution=1024,
        classes=None,
        mapping_width=256,
        mapping_depth=2,
        dropout=[0.0, 0.0, 0.0, 0.0, 0.1],
        name="hdit-ffhq-1024",
        description="HDiT FFHQ-1024^2 (Crowson et al. 2024, Table 6)",
    )


def hdit_imagenet_256() -> ModelSpec:
    """HDiT ImageNet-256^2 large-scale model (Table 6): 557M params, 198 GFLOPs."""
    return hdit(
        [384, 768, 1536],
        [2, 2, 16],
        resolution=256,
        mapping_width=256,
        mapping_depth=2,
        name="hdit-imagenet-256",
        description="HDiT ImageNet-256^2 (Crowson et al. 2024, Table 6)",
    )


# --------------------------------------------------------------------------------------------
# MPDiT (coarse-first multi-patch) and MDiT (multiscale, aggregate blocks)


def mpdit(
    d_model: int = 768,
    n_heads: int = 12,
    depths: Sequence[int] = (6, 6),
    patches: Sequence[int] = (4, 2),
    *,
    channels: int = 4,
    resolution: int = 32,
    classes: int | None = 1000,
    class_tokens: int = 16,
    mlp_ratio: float = 4.0,
    noise: Literal["fno", "sinusoidal"] = "fno",
    skip: bool = True,
    name: str = "mpdit",
    description: str = "",
) -> ModelSpec:
    """MPDiT (multi-patch, global-to-local): ``depths[i]`` DiT blocks run on the tokens of a
    ``patches[i]`` patch embedding, coarse first (``patches`` decreasing, e.g. (4, 2) or
    (8, 4, 2)). Each coarser stage is a ``repatch`` of the input; the way back is an
    ``upsample`` block, a ``linear`` skip from the finer patch embedding and that grid's sin-cos
    table. Classes are ``class_tokens`` prefix tokens, the blocks share one adaLN network,
    time is embedded by an FNO (``noise: fno``) or DiT's sinusoidal MLP.

    As levels (outer = finest): level i has patch ``patches[-1 - i]``, ``depths[-1 - i]``
    decoder blocks and no encoder blocks; the innermost (coarsest) has the first depth as
    ``middle``."""
    n = len(depths)
    if len(patches) != n or n < 2:
        raise ValueError(
            f"depths ({len(depths)}) and patches ({len(patches)}) need the same "
            "length, at least 2 (coarse then fine)"
        )
    fine = list(reversed(patches))  # outer -> inner
    depth = list(reversed(depths))
    sincos = SincosPosition()
    levels = []
    for i in range(n):
        if i == n - 1:
            levels.append(Level(d_model=d_model, middle=depth[i]))
            continue
        innermost_next = i + 1 == n - 1
        levels.append(
            Level(
                d_model=d_model,
                encoder=0,
                decoder=depth[i],
                down=Repatch(
                    patch_size=fine[i + 1], position=sincos if innermost_next else NoPosition()
                ),
                up=Upsample(position=sincos),
                skip=LinearSkip() if skip else NoSkip(),
            )
        )
    noise_spec = FNONoise() if noise == "fno" else SinusoidalNoise()
    return ModelSpec(
        name=name,
        description=description,
        input=Input(channels=channels, space="latent", resolution=(resolution, resolution)),
        patch=Patch(size=fine[0], bias=True),
        conditioning=Conditioning(
            noise=noise_spec,
            classes=(
                Classes(count=classes, inject="prefix", tokens=class_tokens) if classes else None
            ),
        ),
        block=Block(
            d_head=d_model // n_heads, modulation=SharedAdaLNZero(), ffn=GeluMLP(ratio=mlp_ratio)
        ),
        levels=tuple(levels),
        head=AdaLNHead(shared=True),
        init=Init(linear="xavier_uniform", embedding_std=0.02),
    )


def mpdit_b() -> ModelSpec:
    """MPDiT-B (Table 1 of the MPDiT paper): 12 blocks, the last k=6 at the fine grid."""
    return mpdit(
        768,
        12,
        (6, 6),
        (4, 2),
        name="mpdit-b",
        description="MPDiT-B, ImageNet-256^2 latents, 12 blocks, k=6 (MPDiT paper)",
    )


def mpdit_xl() -> ModelSpec:
    """MPDiT-XL: 28 blocks, the last k=6 at the fine grid."""
    return mpdit(
        1152,
        16,
        (22, 6),
        (4, 2),
        name="mpdit-xl",
        description="MPDiT-XL, ImageNet-256^2 latents, 28 blocks, k=6 (MPDiT paper)",
    )


def mpdit_xl_3level() -> ModelSpec:
    """MPDiT-XL three-level variant at 512^2 (64x64x4 latents): {18, 6, 4} blocks at patches
    8 -> 4 -> 2."""
    return mpdit(
        1152,
        16,
        (18, 6, 4),
        (8, 4, 2),
        resolution=64,
        name="mpdit-xl-3level",
        description="MPDiT-XL 3-level, ImageNet-512^2 latents, {18, 6, 4} blocks "
        "at patches 8/4/2 (MPDiT paper)",
    )


MDIT_SIZES = {  # name: (M, N, K, L, outer d_model, core d_model, aggregate heads)
    "b": (2, 4, 4, 5, 384, 768, 18),
    "l": (4, 8, 8, 10, 512, 1024, 24),
    "xl": (4, 9, 8, 12, 576, 1152, 27),
}


def mdit(
    m: int = 2,
    n: int = 4,
    k: int = 4,
    l: int = 5,  # noqa: E741  (the paper's name)
    *,
    outer: int = 384,
    core: int = 768,
    d_head: int = 64,
    aggregate_heads: int | None = None,
    kernel_size: int = DEFAULT_KERNEL_SIZE,
    channels: int = 4,
    resolution: int = 32,
    classes: int | None = 1000,
    ffn_ratio: float = 8 / 3,
    aux: bool = True,
    name: str = "mdit",
    description: str = "",
) -> ModelSpec:
    """MDiT {M, N, K, L}: an outer level at the latent grid (1x1 patch, neighborhood attention,
    M encoder and N decoder blocks) around a core at 2x (K blocks alternating standard /
    aggregate, then L standard). Core standard blocks cross-attend to {null, class, GELU(time)}
    tokens and are unmodulated; the other blocks use RMSNorm modulated by ``1 + GELU(t) W``.
    ``{0, 0, 0, L}`` is the isotropic model: one level with a 2x2 patch. The GEGLU width is
    LLaMA's 8/3 d_model (the paper says "LLaMA blocks (with GeGLU)"). ``aux``: the ImageNet
    models' image ``scale`` and ``aspect`` ratio inputs (256 sinusoidal features each,
    concatenated to 384 timestep features: 896 into a 2-layer GEGLU mapping MLP, dropped with
    probability 0.1 in training)."""
    if k % 2:
        raise ValueError(f"K={k} must be even (standard / aggregate pairs)")
    agg_heads = aggregate_heads or (3 * core // d_head) // 2
    std = BlockOverride(cross_attention=MemoryCrossAttention(), modulation=NoModulation())
    core_stack = []
    if k:
        core_stack.append(
            BlockOverride(cross_attention=std.cross_attention, modulation=std.modulation)
        )
        core_stack.append(BlockOverride(attention=AggregateAttention(factor=2, n_heads=agg_heads)))
        core_stack = core_stack * (k // 2)
    if l:
        core_stack.append(
            BlockOverride(repeat=l, cross_attention=std.cross_attention, modulation=std.modulation)
        )
    levels: tuple[Level, ...]
    if m == 0 and n == 0:
        levels = (Level(d_model=core, middle=tuple(core_stack), attention=GlobalAttention()),)
        patch = 2
    else:
        levels = (
            Level(
                d_model=outer,
                encoder=m,
                decoder=n,
                attention=NeighborhoodAttention(kernel_size=kernel_size),
                down=Merge(factor=2),
                skip=LerpSkip(),
            ),
            Level(d_model=core, middle=tuple(core_stack), attention=GlobalAttention()),
        )
        patch = 1
    return ModelSpec(
        name=name,
        description=description,
        input=Input(channels=channels, space="latent", resolution=(resolution, resolution)),
        patch=Patch(size=patch, bias=False),
        conditioning=Conditioning(
            width=core,
            noise=SinusoidalNoise(frequency_dim=384, activation="geglu"),
            classes=(Classes(count=classes, inject="memory") if classes else None),
            aux=(
                (
                    AuxInput(
                        name="scale",
                        dims=1,
                        embed="sinusoidal",
                        features=256,
                        freq_min=1.0,
                        freq_max=1000.0,
                        dropout=0.1,
                    ),
                    AuxInput(
                        name="aspect",
                        dims=1,
                        embed="sinusoidal",
                        features=256,
                        freq_min=500.0,
                        freq_max=2000.0,
                        dropout=0.1,
                    ),
                )
                if aux
                else ()
            ),
        ),
        block=Block(
            d_head=d_head,
            qk_norm=QKNorm(kind="layer", affine=False),
            rope=AxialRope(fraction=0.25, positions="integer", frequencies="geometric"),
            attention_bias=False,
            norm=Norm(kind="rms"),
            modulation=AdaScale(activation="gelu"),
            ffn=GEGLU(ratio=ffn_ratio, bias=False),
            zero_init_out=True,
        ),
        levels=levels,
        head=LinearHead(norm=Norm(kind="rms", affine=True), bias=False),
        init=Init(linear="xavier_uniform", embedding_std=0.02),
    )


def _mdit_preset(size: str) -> ModelSpec:
    m, n, k, l, outer, core, agg = MDIT_SIZES[size]  # noqa: E741
    return mdit(
        m,
        n,
        k,
        l,
        outer=outer,
        core=core,
        aggregate_heads=agg,
        name=f"mdit-{size}",
        description=f"MDiT-{size.upper()} {{{m},{n},{k},{l}}}, ImageNet-256^2 latents (MDiT paper)",
    )


def mdit_b() -> ModelSpec:
    return _mdit_preset("b")


def mdit_l() -> ModelSpec:
    return _mdit_preset("l")


def mdit_xl() -> ModelSpec:
    return _mdit_preset("xl")
