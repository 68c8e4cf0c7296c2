"""Python specs: plain functions that return spec objects.

They are ordinary code (loops, arithmetic) so YAML can stay declarative; the YAML presets in
``examples/`` are equal to what these return (a test checks it).
"""

from __future__ import annotations

from typing import Literal, Sequence

from .components import (
    GEGLU,
    AdaLNHead,
    AdaScale,
    AuxInput,
    AxialRope,
    Classes,
    Conditioning,
    CosineLogits,
    FourierNoise,
    GlobalAttention,
    Init,
    Input,
    LerpSkip,
    LinearHead,
    Mapping,
    Merge,
    NeighborhoodAttention,
    Norm,
    Patch,
    ShiftedWindowAttention,
    SincosPosition,
)
from .model import Block, Level, ModelSpec

DIT_SIZES = {  # name: (depth, d_model, n_heads) -- DiT paper, Table 1
    "s": (12, 384, 6),
    "b": (12, 768, 12),
    "l": (24, 1024, 16),
    "xl": (28, 1152, 16),
}


def dit(
    size: Literal["s", "b", "l", "xl"] = "xl",
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
    kernel_size: int = 7,
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
        attention = {
            "neighborhood": NeighborhoodAttention(kernel_size=kernel_size),
            "shifted_window": ShiftedWindowAttention(window_size=window_size),
            "global": GlobalAttention(),
        }[kind]
        extra = {"dropout": dropout[i]} if dropout[i] else {}
        if i < n - 1:
            levels.append(Level(d_model=w, encoder=d, decoder=d, attention=attention,
                                down=Merge(factor=2), skip=LerpSkip(), **extra))
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
    return hdit([384, 768], [2, 11], resolution=128, mapping_width=768, mapping_depth=1,
                name="hdit-imagenet-128",
                description="HDiT ImageNet-128^2, ablation step E (Crowson et al. 2024, Table 6)")


def hdit_ffhq_1024() -> ModelSpec:
    """HDiT FFHQ-1024^2 (Table 6): 85M params, 206 GFLOPs; unconditional, augmentation input."""
    return hdit([128, 256, 384, 768, 1024], [2, 2, 2, 2, 2], n_global=2, resolution=1024,
                classes=None, mapping_width=256, mapping_depth=2,
                dropout=[0.0, 0.0, 0.0, 0.0, 0.1], name="hdit-ffhq-1024",
                description="HDiT FFHQ-1024^2 (Crowson et al. 2024, Table 6)")


def hdit_imagenet_256() -> ModelSpec:
    """HDiT ImageNet-256^2 large-scale model (Table 6): 557M params, 198 GFLOPs."""
    return hdit([384, 768, 1536], [2, 2, 16], resolution=256, mapping_width=256,
                mapping_depth=2, name="hdit-imagenet-256",
                description="HDiT ImageNet-256^2 (Crowson et al. 2024, Table 6)")
