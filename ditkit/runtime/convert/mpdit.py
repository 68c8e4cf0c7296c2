"""quandao10/MPDiT checkpoints <-> ditkit (``MPDiT``, two stages, and ``MPDiTv2``, three).

Source layout (``models/mpdit.py``): ``x_embedder`` (coarse patch, Conv2d), a fine
``x_embedder_skip`` + ``linear_skip`` (v2: ``x_embedder_lvl{1,2}`` + ``linear_skip_lvl{1,2}``),
``pos_embed_downsampled`` / ``pos_embed`` fixed sin-cos tables (v2: ``pos_embed``,
``pos_embed_lvl{1,2}``), ``t_embedder`` (FNO: ``fc0``, ``conv{i}.weights_{real,imag}``,
``w{i}``, ``fc1``; or DiT's ``mlp.{0,2}``), ``y_embedder.embedding_table`` ``(classes + 1,
tokens * D)``, the shared ``time_modulation.1``, timm blocks ``downsample_blocks.i`` /
``upsample_blocks.i`` (v2: ``upsample_blocks_lvl{1,2}.i``), ``upsampler`` (v2:
``upsampler_lvl{1,2}``) with ``proj`` and ``refine``, ``final_layer.linear``.

As ditkit levels (outer = finest): the fine embedding is ``embed``, each coarser embedding is a
``repatch`` down (only the coarsest carries a position table), the upsamplers are ``upsample``
ups carrying the finer grid's table, ``linear_skip`` is the ``linear`` skip, the coarse blocks are
the innermost ``middle`` and the fine blocks each level's ``decoder``.

Two layout changes, both exact permutations: a Conv2d patch weight ``(D, C, p, p)`` becomes a
Linear over ``(row, col, c)``; the upsampler's ``proj`` produces channels ordered ``(c, row,
col)`` (it views them as ``(D, f, f)``), ditkit's pixel shuffle reads ``(row, col, c)``, so its
rows are permuted. MPDiT's ``forward_with_cfg`` guides every channel (unlike DiT's)."""

from __future__ import annotations

import json
import math
import re
from typing import Literal

import torch

from ditkit import spec as S
from ditkit.spec.families import mpdit

from ..checkpoint import CFG_CHANNELS_KEY
from . import remap
from .remap import ConversionInputError, Move, Transform, check_heads, expected_shapes

SOURCE = "mpdit"
PREFERRED_KEYS = ("ema", "model")

_WIDTH_HEADS = {768: 12, 1152: 16}  # MPDiT-B, MPDiT-XL


def _count(state: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    if ids != set(range(len(ids))):
        raise ConversionInputError(f"MPDiT {prefix} are not numbered 0..n-1: found {sorted(ids)}")
    return len(ids)


def _three_level(state: dict) -> bool:
    return "x_embedder_lvl1.proj.weight" in state


def infer_spec(
    state: dict[str, torch.Tensor],
    metadata: dict,
    *,
    preset: S.ModelSpec | None = None,
    n_heads: int | None = None,
    name: str | None = None,
    **_hints,
) -> S.ModelSpec:
    """The ditkit spec of an MPDiT state dict: width / patches from the patch embeddings,
    depths from the block lists, class tokens from the embedding table, FNO or MLP time
    embedding from ``t_embedder``. Heads cannot be read from shapes: widths 768 / 1152 imply
    12 / 16 (MPDiT-B / XL), other widths need ``n_heads``."""
    if preset is not None:
        return preset
    three = _three_level(state)
    fine_key = "x_embedder_lvl2.proj.weight" if three else "x_embedder_skip.proj.weight"
    need = [
        "x_embedder.proj.weight",
        fine_key,
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
    ]
    missing = [k for k in need if k not in state]
    if missing:
        raise ConversionInputError(
            "not an MPDiT state dict with skip embeddings (missing "
            + ", ".join(missing)
            + "); pass --preset NAME or check --from"
        )
    coarse, fine = state["x_embedder.proj.weight"], state[fine_key]
    d_model, channels = int(coarse.shape[0]), int(coarse.shape[1])
    patches = [int(coarse.shape[-1])]
    if three:
        patches.append(int(state["x_embedder_lvl1.proj.weight"].shape[-1]))
    patches.append(int(fine.shape[-1]))
    if n_heads is None:
        if d_model not in _WIDTH_HEADS:
            raise ConversionInputError(
                f"cannot infer the heads of a width-{d_model} MPDiT from its "
                "weights; pass n_heads (--heads N) or --preset NAME"
            )
        n_heads = _WIDTH_HEADS[d_model]
    check_heads(n_heads, d_model, _WIDTH_HEADS, "MPDiT")
    if three:
        depths: tuple[int, ...] = (
            _count(state, "downsample_blocks"),
            _count(state, "upsample_blocks_lvl1"),
            _count(state, "upsample_blocks_lvl2"),
        )
        fine_table = state["pos_embed_lvl2"]
    else:
        depths = (_count(state, "downsample_blocks"), _count(state, "upsample_blocks"))
        fine_table = state["pos_embed"]
    grid = math.isqrt(int(fine_table.shape[1]))
    table = state["y_embedder.embedding_table.weight"]
    tokens = int(table.shape[1]) // d_model
    ratio = state["downsample_blocks.0.mlp.fc1.weight"].shape[0] / d_model
    noise: Literal["fno", "sinusoidal"] = (
        "fno" if "t_embedder.fc0.weight" in state else "sinusoidal"
    )
    label = name or f"mpdit-w{d_model}-d{'-'.join(map(str, depths))}"
    return mpdit(
        d_model,
        n_heads,
        depths,
        patches,
        channels=channels,
        resolution=grid * patches[-1],
        classes=int(table.shape[0]) - 1,
        class_tokens=tokens,
        mlp_ratio=ratio,
        noise=noise,
        name=label,
        description="converted from a quandao10/MPDiT checkpoint",
    )


def _patch(c: int) -> Transform:
    """A Conv2d patch weight ``(D, C, p, p)`` <-> a Linear over ``(row, col, c)``."""

    def to_source(w: torch.Tensor) -> torch.Tensor:
        p = math.isqrt(w.shape[1] // c)
        return w.reshape(w.shape[0], p, p, c).permute(0, 3, 1, 2).contiguous()

    return Transform(lambda w: w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), to_source)


def _shuffle(f: int) -> Transform:
    """Rows ``(d, p, q)`` (MPDiT) <-> ``(p, q, d)`` (ditkit) of the upsampler's proj weight /
    bias."""

    def to_ditkit(t: torch.Tensor) -> torch.Tensor:
        d = t.shape[0] // (f * f)
        return t.reshape(d, f, f, *t.shape[1:]).movedim(0, 2).reshape(t.shape).contiguous()

    def to_source(t: torch.Tensor) -> torch.Tensor:
        d = t.shape[0] // (f * f)
        return t.reshape(f, f, d, *t.shape[1:]).movedim(2, 0).reshape(t.shape).contiguous()

    return Transform(to_ditkit, to_source)


def _table(grid: tuple[int, int]) -> Transform:
    """A position table ``(1, T, D)`` <-> ``(h, w, D)``."""
    return Transform(
        lambda t: t.reshape(*grid, t.shape[-1]), lambda t: t.reshape(1, -1, t.shape[-1])
    )


def _layout(spec: S.ModelSpec) -> dict:
    """Source names per ditkit level: (upsampler, skip linear, fine blocks, repatch embedder,
    up position table, down position table or None)."""
    n = len(spec.levels)
    if n == 2:
        return {
            "fine_embed": "x_embedder_skip",
            "levels": [
                (
                    "upsampler",
                    "linear_skip",
                    "upsample_blocks",
                    "x_embedder",
                    "pos_embed",
                    "pos_embed_downsampled",
                )
            ],
        }
    if n == 3:
        return {
            "fine_embed": "x_embedder_lvl2",
            "levels": [
                (
                    "upsampler_lvl2",
                    "linear_skip_lvl2",
                    "upsample_blocks_lvl2",
                    "x_embedder_lvl1",
                    "pos_embed_lvl2",
                    None,
                ),
                (
                    "upsampler_lvl1",
                    "linear_skip_lvl1",
                    "upsample_blocks_lvl1",
                    "x_embedder",
                    "pos_embed_lvl1",
                    "pos_embed",
                ),
            ],
        }
    raise ConversionInputError(f"MPDiT has 2 or 3 stages; spec {spec.name!r} has {n} levels")


def _check_family(spec: S.ModelSpec) -> None:
    problems = []
    for i, lvl in enumerate(spec.levels[:-1]):
        if not isinstance(lvl.down, S.Repatch) or not isinstance(lvl.up, S.Upsample):
            problems.append(f"levels[{i}] needs repatch down / upsample up")
        if not isinstance(lvl.skip, S.LinearSkip):
            problems.append(f"levels[{i}] needs a linear skip")
    cls = spec.conditioning.classes
    if cls is None or cls.inject != "prefix":
        problems.append("MPDiT's classes are prefix tokens")
    if not (isinstance(spec.head, S.AdaLNHead) and spec.head.shared):
        problems.append("MPDiT's head is a shared ada_ln head")
    if getattr(spec.conditioning.noise, "frequency_shift", 0):
        problems.append(
            "MPDiT's timestep embedding has conditioning.noise.frequency_shift 0 "
            "(this model uses diffusers' shifted one)"
        )
    if problems:
        raise ConversionInputError(
            f"spec {spec.name!r} is not an MPDiT-layout spec: " + "; ".join(problems)
        )


def _moves(spec: S.ModelSpec) -> list[Move]:
    """Every tensor's move, declared once: ``to_ditkit`` runs them forward, ``from_ditkit``
    backward."""
    lay = _layout(spec)
    grids, factors = spec.token_grids(), spec.factors()
    patch = _patch(spec.input.channels)
    wb = ("weight", "bias")
    moves = [Move(f"{lay['fine_embed']}.proj.weight", "embed.proj.weight", patch)]
    for i, (up, _, _, emb, up_pos, down_pos) in enumerate(lay["levels"]):
        moves.append(Move(f"{emb}.proj.weight", f"levels.{i}.down.embed.proj.weight", patch))
        moves += [
            Move(f"{up}.proj.{p}", f"levels.{i}.up.proj.{p}", _shuffle(factors[i])) for p in wb
        ]
        moves.append(Move(up_pos, f"levels.{i}.up.position.table", _table(grids[i])))
        if down_pos is not None:
            moves.append(Move(down_pos, f"levels.{i}.down.position.table", _table(grids[i + 1])))

    moves += [
        Move(f"{lay['fine_embed']}.proj.bias", "embed.proj.bias"),
        Move("y_embedder.embedding_table.weight", "conditioning.class_tokens.table.weight"),
    ]
    moves += [Move(f"time_modulation.1.{p}", f"shared_modulation.proj.{p}") for p in wb]
    moves += [Move(f"final_layer.linear.{p}", f"head.proj.{p}") for p in wb]
    if isinstance(spec.conditioning.noise, S.FNONoise):
        moves += [Move(f"t_embedder.fc0.{p}", f"conditioning.noise.lift.{p}") for p in wb]
        moves += [Move(f"t_embedder.fc1.{p}", f"conditioning.noise.proj.{p}") for p in wb]
        for i in range(spec.conditioning.noise.depth):
            moves += [
                Move(
                    f"t_embedder.conv{i}.weights_{p}",
                    f"conditioning.noise.spectral.{i}.weights_{p}",
                )
                for p in ("real", "imag")
            ]
            moves += [
                Move(f"t_embedder.w{i}.{p}", f"conditioning.noise.pointwise.{i}.{p}") for p in wb
            ]
    else:
        moves += [
            Move(f"t_embedder.mlp.{i}.{p}", f"conditioning.noise.fc{j}.{p}")
            for i, j in ((0, 1), (2, 2))
            for p in wb
        ]

    def blocks(src: str, dst: str, n: int) -> None:
        for i in range(n):
            for a, b in (
                ("attn.qkv", "attn.qkv"),
                ("attn.proj", "attn.out"),
                ("mlp.fc1", "ffn.up"),
                ("mlp.fc2", "ffn.down"),
            ):
                moves.extend(Move(f"{src}.{i}.{a}.{p}", f"{dst}.{i}.{b}.{p}") for p in wb)

    last = len(spec.levels) - 1
    blocks("downsample_blocks", f"levels.{last}.middle", len(spec.stack(last, "middle")))
    for i, (up, skip, fine, emb, _, _) in enumerate(lay["levels"]):
        blocks(fine, f"levels.{i}.decoder", len(spec.stack(i, "decoder")))
        moves += [Move(f"{up}.refine.{p}", f"levels.{i}.up.refine.{p}") for p in wb]
        moves += [Move(f"{skip}.{p}", f"levels.{i}.skip.proj.{p}") for p in wb]
        moves.append(Move(f"{emb}.proj.bias", f"levels.{i}.down.embed.proj.bias"))
    return moves


def to_ditkit(state: dict[str, torch.Tensor], spec: S.ModelSpec) -> dict[str, torch.Tensor]:
    _check_family(spec)
    return remap.to_ditkit(_moves(spec), state, SOURCE, expected_shapes(spec))


def from_ditkit(tensors: dict[str, torch.Tensor], spec: S.ModelSpec) -> dict[str, torch.Tensor]:
    _check_family(spec)
    return remap.from_ditkit(_moves(spec), tensors, SOURCE)


def metadata(spec: S.ModelSpec) -> dict[str, str]:
    """MPDiT's ``forward_with_cfg`` guides every output channel."""
    return {CFG_CHANNELS_KEY: str(spec.out_channels)}


def objective(metadata: dict, spec: S.ModelSpec):
    """MPDiT trains a rectified flow (``OTFlow``): ``x_t = (1 - t) x0 + t eps``, velocity
    ``eps - x0``, the network gets ``t`` in [0, 1] itself (time scale 1). Times are
    logit-normal (``time_sampler: lognormal`` with ``p_mean`` / ``p_std``) or uniform, read
    from a training checkpoint's ``args``; without them, the published recipe
    (``script/train.sh``: lognormal, ``p_mean 0``, ``p_std 1.0``)."""
    args = {}
    if "args" in metadata:
        try:
            args = json.loads(metadata["args"])
        except (json.JSONDecodeError, TypeError):
            args = {}
        args = args if isinstance(args, dict) else {}
    sampling: S.UniformTime | S.LogitNormalTime
    if args.get("time_sampler", "lognormal") == "uniform":
        sampling = S.UniformTime()
    else:
        sampling = S.LogitNormalTime(
            mean=float(args.get("p_mean", 0.0)), std=float(args.get("p_std", 1.0))
        )
    return S.FlowObjective(time_sampling=sampling, time_scale=1.0)
