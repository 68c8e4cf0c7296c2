"""Model accounting: parameters and multiply-adds per level, measured from the built modules.

GMACs are forward multiply-adds for batch 1 -- the DiT paper's "GFLOPs" convention (one
multiply-add = one FLOP). Linear layers and convolutions are counted by PyTorch's
``FlopCounterMode`` on meta tensors (which reports 2 FLOPs per multiply-add, halved here);
attention's QK^T and AV are counted by the attention kernels from the shapes they receive
(``kernels.count_attention``), because fused SDPA kernels are invisible to the counter on CPU
and a neighborhood backend's materialisation says nothing about the algorithm's cost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import cast

import torch
from torch.utils.flop_counter import FlopCounterMode

from ditkit import spec as S

from . import kernels
from .model import DiffusionTransformer, build
from .presentation import attention_text


@dataclass
class LevelReport:
    index: int
    grid: tuple[int, int]
    d_model: int
    heads: str
    blocks: str
    attention: str
    params: int
    gmacs: float


@dataclass
class Report:
    name: str
    resolution: tuple[int, int]
    params: int
    trainable: int
    gmacs: float
    attention_gmacs: float
    levels: list[LevelReport] = field(default_factory=list)
    other: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = asdict(self)
        out["resolution"] = list(self.resolution)
        for lvl in out["levels"]:
            lvl["grid"] = list(lvl["grid"])
        return out


def describe(spec: S.ModelSpec, resolution: tuple[int, int] | None = None) -> Report:
    """Parameters and GMACs of ``spec`` at ``resolution`` (default: its training resolution)."""
    resolution = cast(tuple[int, int], tuple(resolution or spec.input.resolution))
    issues = spec.check_resolution(resolution, "--resolution")
    if issues:
        raise S.SpecError(issues, f"{spec.name} at {resolution[0]}x{resolution[1]}")
    model = build(spec, device="meta")
    macs, attn = count_macs(model, resolution)
    grids = spec.token_grids(resolution)
    total_attn = sum(attn.values())
    levels = []
    for i, lvl in enumerate(spec.levels):
        prefix = f"levels.{i}."
        params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
        blocks = {w: len(spec.stack(i, w)) for w in ("encoder", "middle", "decoder")}
        kinds, heads = [], []
        for which in ("encoder", "middle", "decoder"):
            for blk in spec.stack(i, which):
                kinds.append(attention_text(blk.attention).column)
                heads.append(
                    "-" if blk.attention.kind == "none" else str(lvl.d_model // blk.d_head)
                )
        levels.append(
            LevelReport(
                index=i,
                grid=grids[i],
                d_model=lvl.d_model,
                heads="/".join(dict.fromkeys(heads)),
                blocks=(
                    f"{blocks['middle']}"
                    if i == len(spec.levels) - 1
                    else f"{blocks['encoder']}+{blocks['decoder']}"
                ),
                attention=", ".join(dict.fromkeys(kinds)),
                params=params,
                gmacs=(macs.get(f"levels.{i}", 0) + attn.get(f"levels.{i}", 0)) / 1e9,
            )
        )
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    level_params = sum(lv.params for lv in levels)
    level_macs = sum(lv.gmacs for lv in levels)
    total = (macs["total"] + total_attn) / 1e9
    other = {
        "embed, conditioning, head": {"params": params - level_params, "gmacs": total - level_macs}
    }
    return Report(spec.name, resolution, params, trainable, total, total_attn / 1e9, levels, other)


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:,.2f}M"


def format_report(report: Report, spec: S.ModelSpec) -> str:
    """The per-level table that ``ditkit describe`` prints."""
    h, w = report.resolution
    space = (
        f"latent {spec.input.channels}ch, image {h * spec.input.latent_factor}x"
        f"{w * spec.input.latent_factor}"
        if spec.input.space == "latent"
        else f"pixel {spec.input.channels}ch"
    )
    rows = [("level", "tokens", "d_model", "heads", "blocks", "attention", "params", "GMACs")]
    for lv in report.levels:
        rows.append(
            (
                str(lv.index),
                f"{lv.grid[0]}x{lv.grid[1]}",
                str(lv.d_model),
                lv.heads,
                lv.blocks,
                lv.attention,
                _fmt_params(lv.params),
                f"{lv.gmacs:.2f}",
            )
        )
    for name, vals in report.other.items():
        rows.append(
            ("-", "", "", "", "", name, _fmt_params(vals["params"]), f"{vals['gmacs']:.2f}")
        )
    rows.append(("total", "", "", "", "", "", _fmt_params(report.params), f"{report.gmacs:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{report.name} at {h}x{w} ({space})"]
    for k, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(widths[i]) if i < 6 else c.rjust(widths[i]) for i, c in enumerate(r)
            ).rstrip()
        )
        if k == 0 or k == len(rows) - 2:
            lines.append("  ".join("-" * wd for wd in widths))
    lines.append(
        f"params {report.params:,} ({report.trainable:,} trainable); "
        f"attention QK^T+AV {report.attention_gmacs:.2f} GMACs"
    )
    lines.append("GMACs: forward multiply-adds at batch 1, the DiT paper's 'GFLOPs' convention")
    return "\n".join(lines)


def count_macs(
    model: DiffusionTransformer, resolution: tuple[int, int]
) -> tuple[dict[str, float], dict[str, float]]:
    """Forward multiply-adds at batch 1 on meta tensors.

    Returns ``(linear_macs, attention_macs)``: the first keyed by ``total`` and ``levels.i``
    (from FlopCounterMode's module hierarchy), the second by ``levels.i``."""
    spec = model.spec
    dev = torch.device("meta")
    x = torch.zeros(1, spec.input.channels, *resolution, device=dev)
    sigma = torch.ones(1, device=dev)
    labels = torch.zeros(1, dtype=torch.long, device=dev) if spec.conditioning.classes else None
    counter = FlopCounterMode(display=False)
    hooks = _scope_hooks(model)
    try:
        with counter, kernels.count_attention() as attn, torch.no_grad():
            model(x, sigma, labels)
    finally:
        for hook in hooks:
            hook.remove()
    out = {"total": counter.get_total_flops() / 2}
    for key, per_op in counter.get_flop_counts().items():
        parts = key.split(".")[1:]  # drop the root class name
        if len(parts) == 3 and parts[0] == "levels":  # levels.i.<encoder|down|up|...>
            name = f"levels.{parts[1]}"
            out[name] = out.get(name, 0) + sum(per_op.values()) / 2
    return out, dict(attn)


def _scope_hooks(model: DiffusionTransformer) -> list:
    """Forward pre-hooks that name the accounting scope (``levels.i``) as each part of level
    ``i`` starts and clear it at the head, so the model's ``forward`` carries no accounting."""

    def enter(name: str):
        return lambda module, args: kernels.set_attention_scope(name)

    hooks = [model.head.register_forward_pre_hook(enter(""))]
    for i, level in enumerate(model.levels):
        for part in level.children():
            hooks.append(part.register_forward_pre_hook(enter(f"levels.{i}")))
    return hooks
