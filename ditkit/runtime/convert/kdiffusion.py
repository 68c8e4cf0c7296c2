"""crowsonkb/k-diffusion ``image_transformer_v2`` (HDiT) checkpoints <-> ditkit.

Sources: the inference safetensors of ``convert_for_inference.py`` (the inner model's state
dict, the merged JSON config in the metadata under ``config``) or a training checkpoint
(``{"model", "model_ema", "config", ...}``; EMA weights preferred).

The spec comes from the config, with k-diffusion's ``load_config`` defaults for absent keys
(mapping width 256 / depth 2 / d_ff 3x, d_ffs 3x widths, neighborhood-7 levels under a global
one, d_head 64, no dropout, ``sigma_data`` 1); the result is :func:`ditkit.spec.hdit` plus
per-level overrides where the config differs per level.

Tensor mapping (copies, except the two AdaRMSNorm projections of a layer, which ditkit holds as
one ``modulation`` Linear = ``cat([self_attn.norm.linear, ff.norm.linear])``): ``patch_in`` ->
``embed``, ``time_emb``/``time_in_proj`` -> ``conditioning.noise``, ``aug_emb``/``aug_in_proj``
-> ``conditioning.aux.aug_cond``, ``class_emb`` -> ``conditioning.class_embed``, ``mapping`` ->
``conditioning.mapping``, ``down_levels.i.j`` / ``up_levels.i.j`` / ``mid_level.j`` ->
``levels.i.encoder.j`` / ``levels.i.decoder.j`` / ``levels.{last}.middle.j``, ``merges.i`` ->
``levels.i.down``, ``splits.i`` -> ``levels.i.up`` (+ ``skip.fac``), ``out_norm``/``patch_out``
-> ``head``. TokenMerge's (row, col, c) channel order is ditkit's too, so no permutation.
``self_attn.pos_emb.freqs`` are derived: they must equal ditkit's RoPE frequencies (head h gets
every n_heads-th log-spaced value) and are regenerated on export.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Literal

import torch

from ditkit import spec as S
from ditkit.builder.position import rope_frequencies
from ditkit.runtime.denoiser import NoiseRange

from . import remap
from .remap import Concat, ConversionInputError, Derived, Move, expected_shapes

SOURCE = "k-diffusion"
PREFERRED_KEYS = ("model_ema", "model")

_ATTN_KIND: dict[str, Literal["neighborhood", "shifted_window", "global"]] = {
    "global": "global",
    "neighborhood": "neighborhood",
    "shifted-window": "shifted_window",
}


# --------------------------------------------------------------------------------------------
# config <-> spec


def model_config(metadata: dict) -> tuple[dict, int]:
    """``(config["model"] with load_config's defaults filled in, num_classes)`` from the
    ``config`` metadata entry (JSON)."""
    if "config" not in metadata:
        raise ConversionInputError(
            "no k-diffusion config: the inference safetensors keeps it in its "
            "metadata under `config`, a training checkpoint under the `config` "
            "entry; neither is present"
        )
    try:
        config = json.loads(metadata["config"])
    except json.JSONDecodeError as err:
        raise ConversionInputError(
            f"the k-diffusion `config` metadata is not JSON: {err}"
        ) from None
    model = dict(config.get("model", {}))
    if model.get("type") != "image_transformer_v2":
        raise ConversionInputError(
            f"config.model.type is {model.get('type')!r}; only "
            "'image_transformer_v2' (HDiT) is supported"
        )
    for key in ("widths", "depths", "input_channels", "input_size", "patch_size"):
        if key not in model:
            raise ConversionInputError(f"config.model.{key} is missing")
    n = len(model["widths"])
    model.setdefault("mapping_width", 256)
    model.setdefault("mapping_depth", 2)
    model["mapping_d_ff"] = model.get("mapping_d_ff") or model["mapping_width"] * 3
    model.setdefault("mapping_cond_dim", 0)
    model.setdefault("mapping_dropout_rate", 0.0)
    model["d_ffs"] = model.get("d_ffs") or [w * 3 for w in model["widths"]]
    if not model.get("self_attns"):
        model["self_attns"] = [{"type": "neighborhood", "d_head": 64, "kernel_size": 7}] * (
            n - 1
        ) + [{"type": "global", "d_head": 64}]
    rate = model.get("dropout_rate")
    model["dropout_rate"] = (
        [0.0] * n if rate is None else [float(rate)] * n if isinstance(rate, (int, float)) else rate
    )
    model.setdefault("sigma_data", 1.0)
    for key in ("depths", "d_ffs", "self_attns", "dropout_rate"):
        if len(model[key]) != n:
            raise ConversionInputError(
                f"config.model.{key} has {len(model[key])} entries; widths has {n}"
            )
    classes = int(config.get("dataset", {}).get("num_classes", 0) or 0)
    return model, classes


def spec_from_config(model: dict, classes: int, name: str = "hdit") -> S.ModelSpec:
    if model["mapping_cond_dim"]:
        raise ConversionInputError(
            f"config.model.mapping_cond_dim = {model['mapping_cond_dim']}: an extra "
            "linear mapping input is not supported by ditkit's spec (yet)"
        )
    if model.get("has_variance"):
        raise ConversionInputError("config.model.has_variance = true is not supported")
    kinds: list[Literal["neighborhood", "shifted_window", "global"]] = []
    heads, kernels, windows = [], [], []
    for i, sa in enumerate(model["self_attns"]):
        if sa.get("type") not in _ATTN_KIND:
            raise ConversionInputError(
                f"config.model.self_attns[{i}].type = {sa.get('type')!r} is not "
                f"supported; use one of {', '.join(_ATTN_KIND)}"
            )
        kinds.append(_ATTN_KIND[sa["type"]])
        heads.append(int(sa.get("d_head", 64)))
        if sa["type"] == "neighborhood":
            kernels.append(int(sa.get("kernel_size", 7)))
        if sa["type"] == "shifted-window":
            if "window_size" not in sa:
                raise ConversionInputError(f"config.model.self_attns[{i}].window_size is missing")
            windows.append(int(sa["window_size"]))
    ph, pw = (
        model["patch_size"]
        if isinstance(model["patch_size"], (list, tuple))
        else (model["patch_size"],) * 2
    )
    h, w = (
        model["input_size"]
        if isinstance(model["input_size"], (list, tuple))
        else (model["input_size"],) * 2
    )
    widths, depths = [int(x) for x in model["widths"]], [int(x) for x in model["depths"]]
    base = S.hdit(
        widths,
        depths,
        local=kinds,
        d_head=heads[0],
        kernel_size=kernels[0] if kernels else 7,
        window_size=windows[0] if windows else 8,
        patch=int(ph),
        channels=int(model["input_channels"]),
        resolution=int(h),
        classes=classes or None,
        mapping_width=int(model["mapping_width"]),
        mapping_depth=int(model["mapping_depth"]),
        ffn_ratio=3.0,
        dropout=[float(d) for d in model["dropout_rate"]],
        name=name,
        description="converted from a k-diffusion image_transformer_v2 checkpoint",
    )
    data = S.to_data(base, full=True)
    data["input"]["resolution"] = [int(h), int(w)]
    data["patch"]["size"] = [int(ph), int(pw)] if ph != pw else int(ph)
    mapping_ratio = model["mapping_d_ff"] / model["mapping_width"]
    data["conditioning"]["mapping"]["ratio"] = mapping_ratio
    data["conditioning"]["mapping"]["dropout"] = float(model["mapping_dropout_rate"])
    for i, lvl in enumerate(data["levels"]):
        if heads[i] != heads[0]:
            lvl["d_head"] = heads[i]
        sa = model["self_attns"][i]  # hdit() above takes one kernel / window for all levels
        if sa["type"] == "neighborhood" and int(sa.get("kernel_size", 7)) != kernels[0]:
            lvl["attention"] = {"kind": "neighborhood", "kernel_size": int(sa["kernel_size"])}
        if sa["type"] == "shifted-window" and int(sa["window_size"]) != windows[0]:
            lvl["attention"] = {"kind": "shifted_window", "window_size": int(sa["window_size"])}
        d_ff = int(model["d_ffs"][i])
        if d_ff != 3 * widths[i]:
            lvl["ffn"] = {"kind": "geglu", "d_ff": d_ff, "bias": False}
    return S.validate(data, S.ModelSpec, "k-diffusion config")


def config_from_spec(spec: S.ModelSpec, sigma_data: float = 1.0, objective=None) -> dict:
    """The complete k-diffusion config (``model``, ``dataset``, ``optimizer``, ``lr_sched``,
    ``ema_sched``: every key ``load_config``, ``make_model``, ``make_denoiser_wrapper``,
    ``make_sample_density`` and ``sample.py`` read) of an HDiT-layout spec. The training part
    comes from ``objective`` (an EDM objective; ``None``: EDM's defaults at ``sigma_data``);
    raises ``ValueError`` naming what k-diffusion cannot express."""
    _check_aug(spec)
    if objective is not None and not isinstance(objective, S.EDMObjective):
        raise ConversionInputError(
            f"k-diffusion trains with EDM preconditioning; this checkpoint's "
            f"objective is {objective.kind!r}"
        )
    self_attns, d_ffs, dropout = [], [], []
    for i, lvl in enumerate(spec.levels):
        blocks = spec.stack(i, "middle" if i == len(spec.levels) - 1 else "encoder")
        blk = blocks[0]
        att = blk.attention
        match att:
            case S.GlobalAttention():
                sa = {"type": "global", "d_head": blk.d_head}
            case S.NeighborhoodAttention(kernel_size=k):
                sa = {"type": "neighborhood", "d_head": blk.d_head, "kernel_size": S.pair(k)[0]}
            case S.ShiftedWindowAttention(window_size=ws):
                sa = {"type": "shifted-window", "d_head": blk.d_head, "window_size": ws}
            case _:
                raise ConversionInputError(
                    f"levels[{i}].attention {att.kind!r} has no k-diffusion equivalent"
                )
        self_attns.append(sa)
        d_ffs.append(blk.ffn.hidden(lvl.d_model))
        dropout.append(blk.dropout)
    cond = spec.conditioning
    if cond.mapping is None:
        raise ConversionInputError("conditioning.mapping is required by k-diffusion's HDiT")
    ph, pw = S.pair(spec.patch.size)
    model = {
        "type": "image_transformer_v2",
        "input_channels": spec.input.channels,
        "input_size": list(spec.input.resolution),
        "patch_size": [ph, pw],
        "depths": [
            len(spec.stack(i, "middle" if i == len(spec.levels) - 1 else "encoder"))
            for i in range(len(spec.levels))
        ],
        "widths": [lvl.d_model for lvl in spec.levels],
        "d_ffs": d_ffs,
        "self_attns": self_attns,
        "dropout_rate": dropout,
        "mapping_width": spec.cond_width,
        "mapping_depth": cond.mapping.depth,
        "mapping_d_ff": int(round(cond.mapping.ratio * spec.cond_width)),
        "mapping_cond_dim": 0,
        "mapping_dropout_rate": cond.mapping.dropout,
        "augment_wrapper": False,
        "skip_stages": 0,
        "has_variance": False,
        "augment_prob": 0.0,
    }
    model.update(_training_config(spec, objective, sigma_data))
    config = {
        "model": model,
        "dataset": {
            "type": "imagefolder",
            "num_classes": cond.classes.count if cond.classes else 0,
            "cond_dropout_rate": 0.1,
        },
        # load_config's image_transformer_v2 / global defaults, written out
        "optimizer": {
            "type": "adamw",
            "lr": 5e-4,
            "betas": [0.9, 0.99],
            "eps": 1e-8,
            "weight_decay": 1e-4,
        },
        "lr_sched": {"type": "constant", "warmup": 0.0},
        "ema_sched": {"type": "inverse", "power": 0.6667, "max_value": 0.9999},
    }
    m, classes = model_config({"config": json.dumps(config)})
    back = spec_from_config(m, classes, spec.name)
    differs = _differences(spec, back)
    if differs:
        raise ConversionInputError(
            f"spec {spec.name!r} cannot be written as a k-diffusion "
            f"image_transformer_v2: it differs from that layout in "
            f"{', '.join(differs)}"
        )
    return config


def _training_config(spec: S.ModelSpec, objective, sigma_data: float) -> dict:
    """``sigma_data``, ``sigma_min`` / ``sigma_max``, the loss and the sigma density of an EDM
    objective in k-diffusion's keys (the inverse of :func:`objective`)."""
    obj = objective if objective is not None else S.EDMObjective(sigma_data=sigma_data)
    sd = obj.sigma_data
    if obj.weighting == "min_snr":
        raise ConversionInputError(
            "k-diffusion has no min-snr weighting (only karras, snr, "
            "soft-min-snr); this checkpoint's objective uses min_snr"
        )
    if obj.weighting == "soft_min_snr" and not math.isclose(obj.gamma, 1 / sd**2, rel_tol=1e-9):
        raise ConversionInputError(
            f"k-diffusion's soft-min-snr is gamma = 1 / sigma_data^2 = {1 / sd**2:g}; "
            f"this checkpoint's objective has gamma {obj.gamma:g}"
        )

    rng = NoiseRange.of(obj)
    out: dict = {
        "sigma_data": sd,
        "sigma_min": rng.sigma_min,
        "sigma_max": rng.sigma_max,
        "loss_config": "karras",
        "loss_weighting": {"karras": "karras", "snr": "snr", "soft_min_snr": "soft-min-snr"}[
            obj.weighting
        ],
        "loss_scales": 1,
    }
    match obj.sigma_sampling:
        case S.LogNormalSigma(mean=mean, std=std):
            out["sigma_sample_density"] = {"type": "lognormal", "mean": mean, "std": std}
        case S.CosineInterpolatedSigma() as c:
            size = max(spec.input.resolution)
            out["sigma_sample_density"] = {
                "type": "cosine-interpolated",
                "min_value": c.sigma_min,
                "max_value": c.sigma_max,
                "noise_d_low": c.low_resolution,
                "noise_d_high": c.high_resolution or size,
            }
    return out


def _differences(a: S.ModelSpec, b: S.ModelSpec) -> list[str]:
    da, db = S.to_data(a, full=True), S.to_data(b, full=True)
    out = []
    for key in da:
        if key in ("name", "description", "init"):
            continue
        if key == "levels":
            for i, (la, lb) in enumerate(zip(a.levels, b.levels)):
                for which in ("encoder", "middle", "decoder"):
                    if a.stack(i, which) != b.stack(i, which):
                        out.append(f"levels[{i}].{which}")
                for f in ("down", "skip"):
                    if getattr(la, f) != getattr(lb, f):
                        out.append(f"levels[{i}].{f}")
            if len(a.levels) != len(b.levels):
                out.append("levels")
        elif key != "block" and da[key] != db[key]:
            out.append(key)
    return out


def infer_spec(
    state: dict[str, torch.Tensor],
    metadata: dict,
    *,
    preset: S.ModelSpec | None = None,
    name: str | None = None,
    **_hints,
) -> S.ModelSpec:
    if preset is not None:
        return preset
    model, classes = model_config(metadata)
    return spec_from_config(model, classes, name or metadata.get("ditkit.name") or "hdit-converted")


_WEIGHTINGS = {"karras": "karras", "snr": "snr", "soft-min-snr": "soft_min_snr"}


def objective(metadata: dict, spec: S.ModelSpec | None):  # spec: the interface's; unused
    """The config's training objective, as k-diffusion's ``make_denoiser_wrapper`` and
    ``make_sample_density`` define it: EDM preconditioning with ``sigma_data``; the loss
    weighting (``soft-min-snr`` is ``gamma = 1 / sigma_data^2``); the sigma density
    (``lognormal`` or ``cosine-interpolated`` with its ``min(sigma_min, 1e-3)`` /
    ``max(sigma_max, 1e3)`` clip range, ``noise_d_low`` 32, ``noise_d_high`` = the image
    size); and ``sigma_min`` / ``sigma_max``, the range ``sample.py`` samples over."""
    try:
        model, _ = model_config(metadata)
    except ValueError:
        return None
    sd = float(model["sigma_data"])
    name = model.get("loss_weighting", "karras")
    if name not in _WEIGHTINGS:
        raise ConversionInputError(
            f"config.model.loss_weighting {name!r} is not one of k-diffusion's "
            f"{', '.join(_WEIGHTINGS)}"
        )
    if model.get("loss_config", "karras") != "karras":
        warnings.warn(
            f"config.model.loss_config {model['loss_config']!r}: ditkit records the "
            "'karras' loss (the same denoiser for sampling; fine-tuning trains a "
            "different loss)",
            stacklevel=2,
        )
    if model.get("loss_scales", 1) != 1:
        warnings.warn(
            f"config.model.loss_scales {model['loss_scales']}: ditkit has no DCT "
            "frequency weighting; fine-tuning uses loss_scales 1",
            stacklevel=2,
        )
    args: dict = {"sigma_data": sd, "weighting": _WEIGHTINGS[name]}
    if name == "soft-min-snr":
        args["gamma"] = 1 / sd**2
    if "sigma_min" in model and "sigma_max" in model:
        args["sigma_min"], args["sigma_max"] = float(model["sigma_min"]), float(model["sigma_max"])
    density = model.get("sigma_sample_density", {})
    kind = density.get("type")
    if kind == "lognormal":
        args["sigma_sampling"] = S.LogNormalSigma(
            mean=density.get("mean", density.get("loc")),
            std=density.get("std", density.get("scale")),
        )
    elif kind == "cosine-interpolated":
        sizes = model["input_size"]
        size = max(sizes) if isinstance(sizes, (list, tuple)) else sizes
        if density.get("image_d", size) != size:
            raise ConversionInputError(
                f"config.model.sigma_sample_density.image_d "
                f"{density['image_d']} differs from the input size {size}; ditkit's "
                "cosine_interpolated density uses the input size"
            )
        high = density.get("noise_d_high", size)
        args["sigma_sampling"] = S.CosineInterpolatedSigma(
            sigma_min=density.get("min_value", min(model.get("sigma_min", 1e-3), 1e-3)),
            sigma_max=density.get("max_value", max(model.get("sigma_max", 1e3), 1e3)),
            low_resolution=density.get("noise_d_low", 32),
            high_resolution=None if high == size else high,
        )
    elif kind is not None:
        warnings.warn(
            f"config.model.sigma_sample_density.type {kind!r} has no ditkit "
            "equivalent (lognormal, cosine-interpolated); recorded EDM's log-normal "
            "density",
            stacklevel=2,
        )
    return S.EDMObjective(**args)


def metadata(spec: S.ModelSpec) -> dict[str, str]:
    return {}


def source_metadata(spec: S.ModelSpec, objective=None) -> dict[str, str]:
    """The ``config`` metadata of k-diffusion's inference safetensors, plus the spec's name
    under ``ditkit.name`` (k-diffusion ignores it; converting back restores the name)."""
    sigma_data = getattr(objective, "sigma_data", 1.0) if objective is not None else 1.0
    config = config_from_spec(spec, sigma_data, objective)
    return {"config": json.dumps(config, indent=4), "ditkit.name": spec.name}


# --------------------------------------------------------------------------------------------
# tensors


def _layers(spec: S.ModelSpec) -> list[tuple[str, str, int, int, S.Block]]:
    """(k-diffusion layer prefix, ditkit block prefix, d_model, level, block) for every layer."""
    last = len(spec.levels) - 1
    out = []
    for i, which, j, blk in spec.blocks():
        src = {
            "encoder": f"down_levels.{i}.{j}",
            "decoder": f"up_levels.{i}.{j}",
            "middle": f"mid_level.{j}",
        }[which]
        out.append((src, f"levels.{i}.{which}.{j}", spec.levels[i].d_model, i, blk))
    assert all(i == last for _, d, _, i, _ in out if ".middle." in d)
    return out


def _freqs(blk: S.Block, d_model: int) -> torch.Tensor | None:
    if not isinstance(blk.rope, S.AxialRope) or isinstance(blk.attention, S.NoAttention):
        return None
    r = blk.rope
    return rope_frequencies(
        d_model // blk.d_head,
        int(round(r.fraction * blk.d_head)),
        r.frequencies,
        r.freq_min,
        r.freq_max,
        r.base,
    )


def _moves(spec: S.ModelSpec) -> list[Move | Concat | Derived]:
    """Every tensor's move, declared once: ``to_ditkit`` runs them forward, ``from_ditkit``
    backward. Copies first, then per layer the two AdaRMSNorm projections (one ditkit
    ``modulation`` Linear) and the RoPE frequencies (derived from the spec)."""
    pairs = [
        ("patch_in.proj.weight", "embed.proj.weight"),
        ("time_emb.weight", "conditioning.noise.weight"),
        ("time_in_proj.weight", "conditioning.noise.proj.weight"),
        ("aug_emb.weight", "conditioning.aux.aug_cond.weight"),
        ("aug_in_proj.weight", "conditioning.aux.aug_cond.proj.weight"),
        ("mapping.in_norm.scale", "conditioning.mapping.in_norm.scale"),
        ("mapping.out_norm.scale", "conditioning.mapping.out_norm.scale"),
        ("out_norm.scale", "head.norm.scale"),
        ("patch_out.proj.weight", "head.proj.weight"),
    ]
    if spec.conditioning.classes is not None:
        pairs.append(("class_emb.weight", "conditioning.class_embed.weight"))
    for j in range(spec.conditioning.mapping.depth if spec.conditioning.mapping else 0):
        for a, b in (
            ("norm.scale", "norm.scale"),
            ("up_proj.weight", "up.weight"),
            ("down_proj.weight", "down.weight"),
        ):
            pairs.append((f"mapping.blocks.{j}.{a}", f"conditioning.mapping.blocks.{j}.{b}"))
    for i in range(len(spec.levels) - 1):
        pairs += [
            (f"merges.{i}.proj.weight", f"levels.{i}.down.proj.weight"),
            (f"splits.{i}.proj.weight", f"levels.{i}.up.proj.weight"),
            (f"splits.{i}.fac", f"levels.{i}.skip.fac"),
        ]
    for src, dst, _, _, _ in _layers(spec):
        for a, b in (
            ("self_attn.qkv_proj.weight", "attn.qkv.weight"),
            ("self_attn.out_proj.weight", "attn.out.weight"),
            ("self_attn.scale", "attn.scale"),
            ("ff.up_proj.weight", "ffn.up.weight"),
            ("ff.down_proj.weight", "ffn.down.weight"),
        ):
            pairs.append((f"{src}.{a}", f"{dst}.{b}"))
    moves: list[Move | Concat | Derived] = [Move(a, b) for a, b in pairs]
    for src, dst, d_model, _, blk in _layers(spec):
        moves.append(
            Concat(
                (f"{src}.self_attn.norm.linear.weight", f"{src}.ff.norm.linear.weight"),
                f"{dst}.modulation.weight",
            )
        )
        freqs = _freqs(blk, d_model)
        if freqs is not None:
            moves.append(
                Derived(
                    f"{src}.self_attn.pos_emb.freqs",
                    freqs,
                    dtype_of=f"{dst}.attn.qkv.weight",
                    wrong_shape="the spec's RoPE needs {shape} (heads, d_head * fraction / 4)",
                    wrong_value="{source} differs from the RoPE frequencies ditkit derives for "
                    + dst
                    + " (max abs diff {diff:.3g}); this checkpoint's RoPE layout "
                    "is not k-diffusion's log-spaced one",
                )
            )
    return moves


def _check_aug(spec: S.ModelSpec) -> None:
    aux = {a.name: a for a in spec.conditioning.aux}
    aug = aux.get("aug_cond")
    if aug is None or aug.dims != 9 or aug.embed != "fourier":
        have = "none" if aug is None else f"a {aug.dims}-dimensional {aug.embed} one"
        raise ConversionInputError(
            "k-diffusion's image_transformer_v2 requires a 9-dimensional aug_cond "
            f"input; this model has {have}"
        )
    others = sorted(set(aux) - {"aug_cond"})
    if others:
        raise ConversionInputError(
            "k-diffusion's image_transformer_v2 has one auxiliary input "
            f"(aug_cond); this model also has {', '.join(others)}"
        )


def _check_family(spec: S.ModelSpec) -> None:
    if not isinstance(spec.conditioning.noise, S.FourierNoise):
        raise ConversionInputError(
            f"spec {spec.name!r} is not an HDiT-layout spec (its noise embedding is "
            f"{spec.conditioning.noise.kind!r}, k-diffusion's is 'fourier')"
        )
    if any(not isinstance(b.modulation, S.AdaScale) for _, _, _, b in spec.blocks()):
        raise ConversionInputError(
            f"spec {spec.name!r} is not an HDiT-layout spec (k-diffusion's blocks "
            "use ada_scale modulation)"
        )
    _check_aug(spec)


def to_ditkit(state: dict[str, torch.Tensor], spec: S.ModelSpec) -> dict[str, torch.Tensor]:
    _check_family(spec)
    return remap.to_ditkit(_moves(spec), state, SOURCE, expected_shapes(spec))


def from_ditkit(tensors: dict[str, torch.Tensor], spec: S.ModelSpec) -> dict[str, torch.Tensor]:
    _check_family(spec)
    return remap.from_ditkit(_moves(spec), tensors, SOURCE)
