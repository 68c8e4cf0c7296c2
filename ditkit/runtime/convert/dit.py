"""facebookresearch/DiT checkpoints <-> ditkit.

Source layout (``models.py``, timm blocks): ``x_embedder.proj`` (Conv2d, kernel = stride =
patch), ``pos_embed`` (1, T, D) fixed sin-cos table, ``t_embedder.mlp.{0,2}``,
``y_embedder.embedding_table`` (``num_classes + 1`` rows, the last is the null label),
``blocks.i.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}``,
``final_layer.{adaLN_modulation.1, linear}``; the LayerNorms have no parameters.

The mapping is exact (a copy) except for the patch embedding: a Conv2d weight (D, C, p, p)
becomes the Linear over a patch flattened as (row, col, c), i.e. ``permute(0, 2, 3, 1)``.

DiT's own ``forward_with_cfg`` guides only output channels 0-2 (a quirk of the reference); the
converted checkpoint records ``ditkit.cfg_channels = "3"`` so a sampler can reproduce it.
"""

from __future__ import annotations

import math
import re

import torch

from ditkit import spec as S
from ditkit.spec.families import DIT_SIZES

from ..checkpoint import CFG_CHANNELS_KEY
from . import remap
from .remap import ConversionInputError, Move, Transform, check_heads, expected_shapes

SOURCE = "dit"
PREFERRED_KEYS = ("ema", "model")

_WIDTH_HEADS = {d_model: n_heads for _, d_model, n_heads in DIT_SIZES.values()}


def _block_count(state: dict) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if ids != set(range(len(ids))):
        raise ConversionInputError(f"DiT blocks are not numbered 0..n-1: found {sorted(ids)}")
    return len(ids)


def infer_spec(
    state: dict[str, torch.Tensor],
    metadata: dict,
    *,
    preset: S.ModelSpec | None = None,
    n_heads: int | None = None,
    classes: int | None = None,
    name: str | None = None,
    **_hints,
) -> S.ModelSpec:
    """The DiT spec of a state dict: depth from ``blocks.*``, width/channels/patch from
    ``x_embedder.proj.weight``, grid from ``pos_embed``, classes from ``y_embedder``, learned
    sigma from ``final_layer.linear``. Heads cannot be read from shapes (qkv is (3D, D) for any
    head count): the DiT sizes' widths (384, 768, 1024, 1152) imply theirs, other widths need
    ``n_heads``. ``preset`` skips inference (the mapping still checks every shape)."""
    if preset is not None:
        return preset
    need = [
        "x_embedder.proj.weight",
        "pos_embed",
        "final_layer.linear.weight",
        "blocks.0.mlp.fc1.weight",
    ]
    missing = [k for k in need if k not in state]
    if missing:
        raise ConversionInputError(
            "not a DiT state dict (missing " + ", ".join(missing) + "); pass "
            "--preset NAME to name the spec, or check --from"
        )
    w = state["x_embedder.proj.weight"]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise ConversionInputError(
            f"x_embedder.proj.weight has shape {tuple(w.shape)}; DiT's is (D, C, p, p)"
        )
    d_model, channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    tokens = int(state["pos_embed"].shape[1])
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ConversionInputError(f"pos_embed has {tokens} tokens, not a square grid")
    depth = _block_count(state)
    if n_heads is None:
        if d_model not in _WIDTH_HEADS:
            raise ConversionInputError(
                f"cannot infer the number of heads of a width-{d_model} DiT from its "
                "weights (the qkv shape does not depend on it); pass --heads N (or "
                "--preset NAME)"
            )
        n_heads = _WIDTH_HEADS[d_model]
    check_heads(n_heads, d_model, _WIDTH_HEADS, "DiT")
    ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / d_model
    out = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out not in (channels, 2 * channels):
        raise ConversionInputError(
            f"final_layer.linear produces {out} channels per pixel; DiT's is "
            f"{channels} or {2 * channels} (learned sigma)"
        )
    cond = S.Conditioning()
    table = state.get("y_embedder.embedding_table.weight")
    if table is not None:
        rows = int(table.shape[0])
        count = classes if classes is not None else rows - 1
        if rows not in (count, count + 1):
            raise ConversionInputError(
                f"y_embedder has {rows} rows; with --classes {count} it needs "
                f"{count} or {count + 1} (with the null label)"
            )
        cond = S.Conditioning(classes=S.Classes(count=count, null_class=rows == count + 1))
    size = next(
        (s for s, (d, w_, h) in DIT_SIZES.items() if (d, w_, h) == (depth, d_model, n_heads)), None
    )
    label = f"dit-{size}-{patch}" if size else f"dit-d{depth}-w{d_model}-p{patch}"
    return S.ModelSpec(
        name=name or label,
        description=f"converted from a facebookresearch/DiT checkpoint ({label})",
        input=S.Input(
            channels=channels,
            space="latent" if channels == 4 else "pixel",
            resolution=(grid * patch, grid * patch),
        ),
        patch=S.Patch(size=patch, bias=True),
        position=S.SincosPosition(),
        conditioning=cond,
        block=S.Block(
            d_head=d_model // n_heads, ffn=S.GeluMLP(ratio=ratio) if ratio != 4.0 else S.GeluMLP()
        ),
        levels=(S.Level(d_model=d_model, middle=depth),),
        head=S.AdaLNHead(learned_sigma=out == 2 * channels),
        init=S.Init(linear="xavier_uniform", embedding_std=0.02),
    )


def _moves(spec: S.ModelSpec) -> list[Move]:
    """Every tensor's move, declared once: ``to_ditkit`` runs them forward, ``from_ditkit``
    backward."""
    grid = spec.token_grids()[0]
    ph, pw = S.pair(spec.patch.size)
    c = spec.input.channels
    moves = [
        Move(
            "x_embedder.proj.weight",
            "embed.proj.weight",
            Transform(  # Conv2d (D, C, p, p)
                lambda w: w.permute(0, 2, 3, 1).reshape(
                    w.shape[0], -1
                ),  # (D, p*p*C): (row, col, c)
                lambda w: w.reshape(w.shape[0], ph, pw, c).permute(0, 3, 1, 2).contiguous(),
            ),
        ),
        Move(
            "pos_embed",
            "position.table",
            Transform(  # (1, T, D) <-> (h, w, D)
                lambda t: t.reshape(*grid, t.shape[-1]), lambda t: t.reshape(1, -1, t.shape[-1])
            ),
        ),
        Move("x_embedder.proj.bias", "embed.proj.bias"),
    ]
    moves += [
        Move(f"t_embedder.mlp.{i}.{p}", f"conditioning.noise.fc{j}.{p}")
        for i, j in ((0, 1), (2, 2))
        for p in ("weight", "bias")
    ]
    if spec.conditioning.classes is not None:
        moves.append(Move("y_embedder.embedding_table.weight", "conditioning.class_embed.weight"))
    for i in range(len(spec.stack(0, "middle"))):
        for src, dst in (
            ("adaLN_modulation.1", "modulation"),
            ("attn.qkv", "attn.qkv"),
            ("attn.proj", "attn.out"),
            ("mlp.fc1", "ffn.up"),
            ("mlp.fc2", "ffn.down"),
        ):
            for p in ("weight", "bias"):
                moves.append(Move(f"blocks.{i}.{src}.{p}", f"levels.0.middle.{i}.{dst}.{p}"))
    for src, dst in (("adaLN_modulation.1", "modulation.1"), ("linear", "proj")):
        for p in ("weight", "bias"):
            moves.append(Move(f"final_layer.{src}.{p}", f"head.{dst}.{p}"))
    return moves


def _check_family(spec: S.ModelSpec) -> None:
    problems = []
    if len(spec.levels) != 1:
        problems.append("DiT has one level")
    if not isinstance(spec.position, S.SincosPosition):
        problems.append("DiT has a sincos position table")
    if not isinstance(spec.head, S.AdaLNHead):
        problems.append("DiT's head is ada_ln")
    if not isinstance(spec.conditioning.noise, S.SinusoidalNoise):
        problems.append("DiT's noise embedding is sinusoidal")
    if getattr(spec.conditioning.noise, "frequency_shift", 0):
        problems.append(
            "DiT's timestep embedding has conditioning.noise.frequency_shift 0 "
            "(this model uses diffusers' shifted one)"
        )
    if problems:
        raise ConversionInputError(
            f"spec {spec.name!r} is not a DiT-layout spec: " + "; ".join(problems)
        )


def to_ditkit(state: dict[str, torch.Tensor], spec: S.ModelSpec) -> dict[str, torch.Tensor]:
    _check_family(spec)
    return remap.to_ditkit(_moves(spec), state, SOURCE, expected_shapes(spec))


def from_ditkit(tensors: dict[str, torch.Tensor], spec: S.ModelSpec) -> dict[str, torch.Tensor]:
    _check_family(spec)
    return remap.from_ditkit(_moves(spec), tensors, SOURCE)


def metadata(spec: S.ModelSpec) -> dict[str, str]:
    """DiT's ``forward_with_cfg`` guides only the first 3 output channels."""
    return {CFG_CHANNELS_KEY: "3"}


def objective(metadata: dict, spec: S.ModelSpec):
    """DiT trains epsilon prediction on the 1000-step linear schedule (ADM's)."""
    return S.DDPMObjective(learned_sigma=spec.head.learned_sigma)
