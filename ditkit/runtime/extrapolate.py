"""Resolution adaptation: ``spec, weights -> spec', weights'`` for a target resolution.

Each policy (``ditkit.spec.policy``) is a spec transform plus a key plan for the weights. The
weights are assembled generically: every tensor of the adapted model is either carried over from
the trained weights (possibly moved to a new name, resized or replicated, as the plan says) or
freshly initialised -- and the record lists which, so nothing is re-initialised silently and no
trained tensor is dropped unnoticed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, cast

import torch
import torch.nn.functional as F

from ditkit import spec as S
from ditkit.builder import build, describe
from ditkit.builder.position import yarn_logit_factor
from ditkit.errors import UserError

Plan = dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]]
"""new key -> (old key, optional tensor transform)."""


class AdaptError(UserError):
    """A policy that cannot carry these trained weights to the new spec."""


@dataclass
class Adapted:
    spec: S.ModelSpec
    tensors: dict[str, torch.Tensor]
    record: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# spec helpers


def _revalidate(spec: S.ModelSpec, what: str) -> S.ModelSpec:
    """``model_copy`` skips validation: round-trip through data so every rule runs again."""
    return S.validate(S.to_data(spec, full=True), source=what)


def _with_resolution(spec: S.ModelSpec, resolution: tuple[int, int]) -> S.ModelSpec:
    return spec.model_copy(
        update={"input": spec.input.model_copy(update={"resolution": tuple(resolution)})}
    )


def map_block_field(spec: S.ModelSpec, name: str, fn, levels=None) -> S.ModelSpec:
    """Apply ``fn`` to block field ``name`` wherever the spec sets it (model defaults, the
    chosen levels, their per-block overrides); returns the new spec (not yet revalidated)."""
    chosen = set(range(len(spec.levels)) if levels is None else levels)
    block = spec.block
    if levels is None:
        block = block.model_copy(update={name: fn(getattr(block, name))})
    new_levels = []
    for i, lvl in enumerate(spec.levels):
        update = {}
        if i in chosen:
            if getattr(lvl, name) is not None:
                update[name] = fn(getattr(lvl, name))
            for which in ("encoder", "decoder", "middle"):
                stack = getattr(lvl, which)
                if isinstance(stack, tuple):
                    update[which] = tuple(
                        o.model_copy(update={name: fn(getattr(o, name))})
                        if getattr(o, name) is not None
                        else o
                        for o in stack
                    )
        new_levels.append(lvl.model_copy(update=update) if update else lvl)
    return spec.model_copy(update={"block": block, "levels": tuple(new_levels)})


# --------------------------------------------------------------------------------------------
# policies: (spec, resolution) -> (spec', plan over the old keys, notes)


def _identity_plan(keys) -> Plan:
    return {k: (k, None) for k in keys}


def _as_is(spec, policy: S.AsIs, resolution, keys):
    h0, w0 = spec.input.resolution
    h, w = resolution
    new = _with_resolution(spec, resolution)
    if policy.rope != "keep":

        def rescale(rope):
            if not isinstance(rope, S.AxialRope):
                return rope
            grow = (
                rope.positions == "normalized"
                if policy.rope == "extrapolate"
                else (rope.positions == "integer")
            )
            if not grow:
                return rope
            factor = (h / h0, w / w0) if policy.rope == "extrapolate" else (h0 / h, w0 / w)
            sh, sw = rope.position_scale
            return rope.model_copy(update={"position_scale": (sh * factor[0], sw * factor[1])})

        new = map_block_field(new, "rope", rescale)
    return new, _identity_plan(keys), {}


def _local_core(spec, policy: S.LocalCore, resolution, keys):
    levels = policy.levels
    if levels is None:
        levels = tuple(
            i
            for i in range(len(spec.levels))
            if any(
                b.attention.kind == "global"
                for w in ("encoder", "middle", "decoder")
                for b in spec.stack(i, w)
            )
        )
    bad = [i for i in levels if i >= len(spec.levels)]
    if bad:
        raise S.SpecError(
            [
                (
                    "policy.levels",
                    f"level(s) {bad} do not exist; the spec has {len(spec.levels)} levels",
                )
            ],
            "local_core",
        )
    local = S.NeighborhoodAttention(kernel_size=policy.kernel_size)
    new = _with_resolution(spec, resolution)
    new_levels = list(new.levels)
    for i in levels:
        new_levels[i] = new_levels[i].model_copy(update={"attention": local})
    new = new.model_copy(update={"levels": tuple(new_levels)})
    new = map_block_field(
        new, "attention", lambda a: local if a.kind == "global" else a, levels=levels
    )
    return new, _identity_plan(keys), {"levels": list(levels)}


def _doublings(spec, resolution) -> int:
    h0, w0 = spec.input.resolution
    h, w = resolution
    n = math.log2(h / h0) if h >= h0 else -1
    if n < 0 or n != int(n) or h * w0 != w * h0:
        raise S.SpecError(
            [
                (
                    "resolution",
                    f"add_levels needs the target to be the training "
                    f"resolution {h0}x{w0} times a power of two on both axes (got {h}x{w}); "
                    "use as_is or core_patch for other sizes",
                )
            ],
            "add_levels",
        )
    return int(n)


def _add_levels(spec, policy: S.AddLevels, resolution, keys):
    n = _doublings(spec, resolution)
    outer = spec.levels[0]
    if len(spec.levels) < 2 and n:
        raise S.SpecError(
            [
                (
                    "levels",
                    "add_levels needs a hierarchical spec (>= 2 levels) to copy "
                    "an outer level from; use as_is or local_core",
                )
            ],
            "add_levels",
        )
    depth_enc = policy.depth if policy.depth is not None else outer.encoder
    depth_dec = policy.depth if policy.depth is not None else outer.decoder
    d_model = policy.d_model or outer.d_model
    added = [
        outer.model_copy(update={"d_model": d_model, "encoder": depth_enc, "decoder": depth_dec})
        for _ in range(n)
    ]
    new = _with_resolution(spec, resolution).model_copy(
        update={"levels": tuple(added) + spec.levels}
    )
    plan: Plan = {}
    for k in keys:
        if k.startswith("levels."):
            _, i, rest = k.split(".", 2)
            plan[f"levels.{int(i) + n}.{rest}"] = (k, None)
        elif k.startswith(("embed.", "head.")) and d_model != outer.d_model:
            continue  # shapes change: fresh (recorded as re-initialised)
        else:
            plan[k] = (k, None)
    if policy.share_weights and n:
        if d_model != outer.d_model or (depth_enc, depth_dec) != (outer.encoder, outer.decoder):
            raise S.SpecError(
                [
                    (
                        "policy.share_weights",
                        "sharing needs the added levels to have "
                        "the outer level's d_model and depth",
                    )
                ],
                "add_levels",
            )
        for j in range(n):
            for k in keys:
                if k.startswith(("levels.0.encoder.", "levels.0.decoder.")):
                    plan[f"levels.{j}.{k.split('.', 2)[2]}"] = (k, None)
    return new, plan, {"added_levels": n}


def _core_patch(spec, policy: S.CorePatch, resolution, keys):
    i = policy.level
    if i >= len(spec.levels) - 1:
        raise S.SpecError(
            [
                (
                    "policy.level",
                    f"transition {i} does not exist; the spec has "
                    f"{len(spec.levels) - 1} transition(s) between levels",
                )
            ],
            "core_patch",
        )
    f0 = spec.levels[i].down.factor
    f = policy.factor
    if f == "auto":
        (h0, w0), (h, w) = spec.input.resolution, resolution
        if h * w0 != w * h0 or h % h0:
            raise S.SpecError(
                [
                    (
                        "policy.factor",
                        f"factor auto needs {h}x{w} to be a whole "
                        f"multiple of the trained {h0}x{w0} with the same aspect; give "
                        "an explicit factor",
                    )
                ],
                "core_patch",
            )
        f = f0 * (h // h0)
    if f % f0:
        raise S.SpecError(
            [("policy.factor", f"factor {f} must be a multiple of the trained factor {f0}")],
            "core_patch",
        )
    lvl = spec.levels[i]
    levels = list(spec.levels)
    levels[i] = lvl.model_copy(update={"down": lvl.down.model_copy(update={"factor": f})})
    new = _with_resolution(spec, resolution).model_copy(update={"levels": tuple(levels)})
    r = f // f0
    d_in = lvl.d_model

    def merge_weight(w):  # (D1, f0*f0*D0) -> (D1, f*f*D0), averaged over the replicated cells
        d1 = w.shape[0]
        w = w.view(d1, f0, f0, d_in).repeat_interleave(r, 1).repeat_interleave(r, 2)
        return (w / (r * r)).reshape(d1, f * f * d_in)

    def split_weight(w):  # (f0*f0*D0, ...) -> (f*f*D0, ...), each cell copies its parent
        rest = w.shape[1:]
        w = w.view(f0, f0, d_in, *rest).repeat_interleave(r, 0).repeat_interleave(r, 1)
        return w.reshape(f * f * d_in, *rest)

    plan = _identity_plan(keys)
    plan[f"levels.{i}.down.proj.weight"] = (f"levels.{i}.down.proj.weight", merge_weight)
    plan[f"levels.{i}.up.proj.weight"] = (f"levels.{i}.up.proj.weight", split_weight)
    if f"levels.{i}.up.proj.bias" in keys:
        plan[f"levels.{i}.up.proj.bias"] = (f"levels.{i}.up.proj.bias", split_weight)
    replicated = [k for k in plan if k.startswith((f"levels.{i}.down.", f"levels.{i}.up."))]
    return new, plan, {"replicated": replicated, "fine_tune": replicated}


# --------------------------------------------------------------------------------------------
# options every policy takes: RoPE frequency scaling and attention entropy scaling


def _map_level_blocks(spec: S.ModelSpec, i: int, fn) -> S.ModelSpec:
    """Set the ``rope`` and ``logits`` of level ``i`` (and of each of its block overrides) to
    ``fn(block)`` -> ``{field: value}``, ``block`` the resolved block of that scope; the
    model-wide ``block`` defaults stay as they are."""
    lvl = spec.levels[i]
    base = spec.block.model_copy(update=lvl.overrides())
    update = dict(fn(base))
    for which in ("encoder", "decoder", "middle"):
        stack = getattr(lvl, which)
        if isinstance(stack, tuple):
            update[which] = tuple(
                o.model_copy(update=fn(base.model_copy(update=o.overrides()))) for o in stack
            )
    levels = list(spec.levels)
    levels[i] = lvl.model_copy(update=update)
    return spec.model_copy(update={"levels": tuple(levels)})


def _attended(block: S.Block, grid: tuple[int, int]) -> int:
    """Tokens one query attends to under ``block``'s attention on a ``grid``."""
    match block.attention:
        case S.GlobalAttention():
            return grid[0] * grid[1]
        case S.AggregateAttention(factor=f):
            return (grid[0] // f) * (grid[1] // f)
        case S.NeighborhoodAttention(kernel_size=k):
            kh, kw = S.pair(k)
            return min(kh, grid[0]) * min(kw, grid[1])
        case S.ShiftedWindowAttention(window_size=w):
            return min(w, grid[0]) * min(w, grid[1])
        case _:  # no attention
            return 1


def _scale_rope(
    rope: S.Rope, scaling: S.RopeScaling, old: tuple[int, int], new: tuple[int, int]
) -> S.Rope:
    """The level's RoPE at grid ``new`` (trained at ``old``) under ``scaling``: positions at the
    trained spacing (normalised ones scaled up by the grid ratio), frequencies rescaled."""
    if not isinstance(rope, S.AxialRope) or isinstance(scaling, S.NoRopeScaling):
        return rope
    s = (new[0] / old[0], new[1] / old[1])
    ps = rope.position_scale
    if rope.positions == "normalized":
        length = (2.0 * ps[0], 2.0 * ps[1])
        ps = (ps[0] * s[0], ps[1] * s[1])
    else:
        length = (old[0] * ps[0], old[1] * ps[1])
    derived = {"scale": s}
    if "trained_length" in type(scaling).model_fields:
        derived["trained_length"] = length
    return rope.model_copy(
        update={"position_scale": ps, "scaling": scaling.model_copy(update=derived)}
    )


def apply_options(spec: S.ModelSpec, new: S.ModelSpec, policy: S.Policy) -> S.ModelSpec:
    """``policy.rope_scaling`` and ``policy.attention_scaling`` on ``new`` (the policy's spec at
    its target resolution), level by level, wherever a level's grid differs from the grid of
    the trained level it comes from (``add_levels``: new outer levels come from level 0). At
    the trained grid nothing changes, so the options are no-ops at the training resolution."""

    if policy.rope_scaling.kind == "none" and policy.attention_scaling == "none":
        return new
    if getattr(policy.rope_scaling, "time_exponent", None) is not None and isinstance(
        spec.conditioning.noise, S.SinusoidalNoise
    ):
        raise S.SpecError(
            [
                (
                    "policy.rope_scaling.time_exponent",
                    "noise-dependent scaling needs "
                    "the noise level as sigma (noise: fourier) or flow time (noise: fno); "
                    "this model takes a timestep: drop time_exponent",
                )
            ],
            policy.kind,
        )
    old_grids, new_grids = spec.token_grids(), new.token_grids()
    shift = len(new.levels) - len(spec.levels)
    for i, grid in enumerate(new_grids):
        old = old_grids[max(i - shift, 0)]
        if grid == old:
            continue

        def fn(block: S.Block, old=old, grid=grid) -> dict:
            out: dict[str, object] = {}
            factor = 1.0
            rope = _scale_rope(block.rope, policy.rope_scaling, old, grid)
            if rope is not block.rope:
                assert isinstance(rope, S.AxialRope)  # _scale_rope returns any other as is
                out["rope"] = rope
                if (
                    isinstance(rope.scaling, S.YarnScaling)
                    and rope.scaling.temperature
                    and rope.scaling.time_exponent is None
                ):  # else per sample, in attention
                    assert rope.scaling.scale is not None  # _scale_rope derives it
                    factor *= yarn_logit_factor(rope.scaling.scale)
            if policy.attention_scaling == "entropy":
                n0, n1 = _attended(block, old), _attended(block, grid)
                if n0 > 1 and n1 != n0:
                    factor *= math.log(n1) / math.log(n0)
            if factor != 1.0:
                out["logits"] = block.logits.model_copy(
                    update={"factor": block.logits.factor * factor}
                )
            return out

        new = _map_level_blocks(new, i, fn)
    return new


POLICIES: dict[str, Callable[..., tuple[S.ModelSpec, Plan, dict]]] = {
    "as_is": _as_is,
    "local_core": _local_core,
    "add_levels": _add_levels,
    "core_patch": _core_patch,
}


# --------------------------------------------------------------------------------------------
# public API


def adapt_spec(spec: S.ModelSpec, policy: S.Policy, resolution: tuple[int, int]) -> S.ModelSpec:
    """The spec of ``policy`` at ``resolution`` (validated like any spec)."""
    new, _, _ = POLICIES[policy.kind](spec, policy, tuple(resolution), [])
    new = apply_options(spec, new, policy)
    return _revalidate(new, f"{policy.kind} at {resolution[0]}x{resolution[1]}")


def adapt(
    spec: S.ModelSpec,
    tensors: dict[str, torch.Tensor],
    policy: S.Policy,
    resolution: tuple[int, int],
    seed: int = 0,
    device: str = "cpu",
) -> Adapted:
    """Apply ``policy`` to a spec and its trained weights (a ``state_dict``). With
    ``device="meta"`` (and meta tensors) it only works out the record: which tensors would be
    carried, re-initialised, resized -- free for any model size."""
    resolution = cast("tuple[int, int]", tuple(resolution))
    new, plan, notes = POLICIES[policy.kind](spec, policy, resolution, list(tensors))
    new = apply_options(spec, new, policy)
    new = _revalidate(new, f"{policy.kind} at {resolution[0]}x{resolution[1]}")
    torch.manual_seed(seed)
    fresh = build(new, device=device).state_dict()
    out, carried, reinit, resized, derived = {}, set(), [], [], []
    table_kind = new.position.kind
    for key, value in fresh.items():
        if key == "position.table" and table_kind == "sincos":
            out[key] = value  # derived from the spec at the new grid
            derived.append(key)
            carried.add(key)
            continue
        if key == "position.table" and table_kind == "learned" and key in tensors:
            old = tensors[key].permute(2, 0, 1)[None]
            out[key] = (
                F.interpolate(old, size=value.shape[:2], mode="bicubic", align_corners=False)[0]
                .permute(1, 2, 0)
                .contiguous()
            )
            resized.append(key)
            carried.add(key)
            continue
        source = plan.get(key)
        if source is None or source[0] not in tensors:
            out[key] = value
            reinit.append(key)
            continue
        old_key, fn = source
        tensor = tensors[old_key] if fn is None else fn(tensors[old_key])
        if tensor.shape != value.shape:
            raise AdaptError(
                f"{policy.kind}: {old_key} {tuple(tensors[old_key].shape)} cannot "
                f"fill {key} {tuple(value.shape)}"
            )
        out[key] = tensor.clone()
        carried.add(old_key)
    dropped = sorted(set(tensors) - carried)
    if dropped:
        raise AdaptError(f"{policy.kind} would drop trained tensors {dropped}")
    record = {
        "policy": S.to_data(policy, full=True),
        "from_resolution": list(spec.input.resolution),
        "to_resolution": list(resolution),
        "reinitialised": reinit,
        "resized": resized,
        "derived": derived,
        **notes,
    }
    return Adapted(new, out, record)


def cost_curve(
    spec: S.ModelSpec, policy: S.Policy, resolutions: list[tuple[int, int]]
) -> list[tuple[tuple[int, int], float]]:
    """GMACs of the adapted spec at each resolution (measured on meta tensors); resolutions the
    policy cannot reach (a SpecError) are left out."""

    points: list[tuple[tuple[int, int], float]] = []
    for r in resolutions:
        try:
            points.append(
                (cast("tuple[int, int]", tuple(r)), describe(adapt_spec(spec, policy, r)).gmacs)
            )
        except S.SpecError:
            continue
    return points


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx = torch.tensor(xs, dtype=torch.float64).log()
    ly = torch.tensor(ys, dtype=torch.float64).log()
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def adapt_model(
    model: torch.nn.Module,
    policy: S.Policy,
    resolution: tuple[int, int],
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> torch.nn.Module:
    """A built model (``model.spec`` set) adapted to ``resolution`` under ``policy``, built
    and loaded, in ``eval()`` mode: carried weights exactly, new ones initialised with ``seed``
    (:func:`adapt`)."""
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    spec = cast(S.ModelSpec, model.spec)  # a built model carries its spec
    adapted = adapt(spec, tensors, policy, cast("tuple[int, int]", tuple(resolution)), seed=seed)
    new = build(adapted.spec, device=device)
    new.load_state_dict(adapted.tensors)
    return new.eval()
