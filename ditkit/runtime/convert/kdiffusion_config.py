"""Bring your config: a k-diffusion JSON config (``model.type: image_transformer_v2``, HDiT)
-> a validated ditkit model spec and training experiment, no checkpoint needed.

Every key of the config is accounted for: it is *mapped* to a ditkit field (each
:class:`Row` says which), *has no effect* on this model in k-diffusion itself (keys of the
older ``image_v1`` model that ``make_model`` ignores for ``image_transformer_v2``), or it is
*refused* with a :class:`KDiffusionConfigError` naming the key and the fix. Absent keys take
k-diffusion's ``load_config`` defaults (the same ones :mod:`.kdiffusion` uses for checkpoints).

The model keys go through :func:`.kdiffusion.model_config` / :func:`.kdiffusion.spec_from_config`
(one reading of k-diffusion's model keys for checkpoints and configs); this module adds the
per-level attention settings, the training keys and the per-key account.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from ditkit import spec as S
from ditkit.builder import build
from ditkit.errors import UserError
from ditkit.files import atomic_path
from ditkit.runtime.convert import kdiffusion as KD
from ditkit.spec.experiment import EMA, ConstantLR, Experiment, ImageFolderData, Optimizer, Training

SOURCE = "k-diffusion"


class KDiffusionConfigError(UserError):
    """A k-diffusion config key ditkit cannot map (the message names the key and the fix)."""


@dataclass(frozen=True)
class Row:
    """One config key: its value and where it went (``target``: a ditkit field path or a
    note). ``status``: ``mapped``, ``no effect`` (k-diffusion itself ignores it for this
    model) or ``training`` (a training key, read only when an experiment is converted)."""

    key: str
    value: object
    target: str
    status: str = "mapped"


@dataclass(frozen=True)
class Translation:
    spec: S.ModelSpec
    experiment: Experiment | None  # model: the spec inline (None: not asked for)
    rows: tuple[Row, ...]

    def table(self) -> str:
        """The per-key account as aligned text lines."""
        width = max(len(r.key) for r in self.rows)
        lines = []
        for r in self.rows:
            value = json.dumps(r.value, separators=(",", ":"))
            if len(value) > 48:
                value = value[:45] + "..."
            arrow = {"mapped": "->", "training": ".."}.get(r.status, "--")
            lines.append(f"{r.key:<{width}}  {value:<48}  {arrow} {r.target}")
        return "\n".join(lines)


# k-diffusion's load_config defaults for the sections (model defaults: kdiffusion.model_config)
_OPTIMIZER_DEFAULTS = {
    "type": "adamw",
    "lr": 1e-4,
    "betas": [0.95, 0.999],
    "eps": 1e-6,
    "weight_decay": 1e-3,
}
_LR_DEFAULTS = {"type": "inverse", "inv_gamma": 20000.0, "power": 1.0, "warmup": 0.99}
_EMA_DEFAULTS = {"type": "inverse", "power": 0.6667, "max_value": 0.9999}
_MODEL_DEFAULTS = {
    "sigma_data": 1.0,
    "dropout_rate": 0.0,
    "augment_wrapper": True,
    "augment_prob": 0.0,
    "mapping_cond_dim": 0,
    "unet_cond_dim": 0,
    "cross_cond_dim": 0,
    "cross_attn_depths": None,
    "skip_stages": 0,
    "has_variance": False,
    "loss_config": "karras",
    "loss_weighting": "karras",
    "loss_scales": 1,
}
# keys k-diffusion's make_model reads only for the image_v1 U-Net: no effect on this model
_V1_ONLY = {
    "augment_wrapper": "the image_v1 augmentation wrapper (image_transformer_v2 has "
    "its aug_cond input built in)",
    "unet_cond_dim": "image_v1 only",
    "cross_cond_dim": "image_v1 only",
    "cross_attn_depths": "image_v1 only",
    "skip_stages": "image_v1 only",
}
# HDiT's param_groups: the mapping network trains at a third of the learning rate
MAPPING_LR_SCALE = 1 / 3


def _refuse(key: str, value, why: str) -> KDiffusionConfigError:
    return KDiffusionConfigError(f"k-diffusion config: {key} = {json.dumps(value)}: {why}")


# --------------------------------------------------------------------------------------------
# model


def _check_attention(i: int, sa) -> None:
    """Refuse a ``self_attns`` entry ditkit cannot map, by its key (the mapping itself is
    :func:`.kdiffusion.spec_from_config`'s)."""
    if not isinstance(sa, dict):
        raise _refuse(f"model.self_attns[{i}]", sa, "each entry is an object with a type")
    kind = sa.get("type")
    known = {
        "global": {"type", "d_head"},
        "neighborhood": {"type", "d_head", "kernel_size"},
        "shifted-window": {"type", "d_head", "window_size"},
    }
    if kind not in known:
        raise _refuse(
            f"model.self_attns[{i}].type",
            kind,
            "ditkit maps global, neighborhood and shifted-window ('none', a level "
            "without attention, is not supported)",
        )
    extra = sorted(set(sa) - known[kind])
    if extra:
        raise _refuse(
            f"model.self_attns[{i}]", sa, f"unknown keys {', '.join(extra)} for a {kind} attention"
        )
    if kind == "shifted-window" and "window_size" not in sa:
        raise _refuse(
            f"model.self_attns[{i}]",
            sa,
            "a shifted-window attention needs window_size (k-diffusion has no default for it)",
        )


def model_spec(config: dict, name: str) -> tuple[S.ModelSpec, list[Row]]:
    """The ditkit spec of ``config`` and the rows of its model keys (and
    ``dataset.num_classes``)."""
    raw = dict(config.get("model") or {})
    if raw.get("type") != "image_transformer_v2":
        raise _refuse(
            "model.type",
            raw.get("type"),
            "ditkit reads image_transformer_v2 (HDiT) "
            "configs; image_v1 and image_transformer_v1 have no ditkit family",
        )
    for key in ("mapping_cond_dim", "has_variance"):
        if raw.get(key, _MODEL_DEFAULTS[key]) != _MODEL_DEFAULTS[key]:
            why = (
                "an extra linear input to the mapping network has no ditkit spec field"
                if key == "mapping_cond_dim"
                else "a learned-variance output has no ditkit objective for k-diffusion models"
            )
            raise _refuse(f"model.{key}", raw[key], why)
    for i, sa in enumerate(raw.get("self_attns") or []):
        _check_attention(i, sa)
    try:
        model, classes = KD.model_config({"config": json.dumps(config)})
        spec = KD.spec_from_config(model, classes, name)
    except UserError:
        raise
    except ValueError as err:
        raise KDiffusionConfigError(f"k-diffusion config: {err}") from None
    data = S.to_data(spec, full=False)
    data["description"] = "converted from a k-diffusion image_transformer_v2 config"
    try:
        spec = S.validate(data, S.ModelSpec, "k-diffusion config")
    except S.SpecError as err:
        raise KDiffusionConfigError(
            f"k-diffusion config: it describes a model ditkit refuses: {err}"
        ) from None
    rows = _model_rows(raw, model, classes, spec)
    readable = S.validate(_minimal(spec), S.ModelSpec, "k-diffusion config")
    assert readable == spec
    return readable, rows


def _minimal(obj):
    """Plain data of a spec with every field equal to its default left out, so the written
    YAML reads like a hand-written preset (the spec it loads to is the same)."""

    if isinstance(obj, BaseModel):
        out = {}
        for name, field in type(obj).model_fields.items():
            value = getattr(obj, name)
            if (
                name not in ("kind", "spec_version")
                and not field.is_required()
                and value == field.get_default(call_default_factory=True)
            ):
                continue
            out[name] = _minimal(value)
        return out
    if isinstance(obj, (tuple, list)):
        return [_minimal(x) for x in obj]
    return obj


def _model_rows(raw: dict, model: dict, classes: int, spec: S.ModelSpec) -> list[Row]:
    n = len(spec.levels)
    last = n - 1

    def lv(i: int) -> str:
        return f"levels[{i}]"

    rows = [
        Row("model.type", raw["type"], "an HDiT-layout spec (hourglass of levels)"),
        Row("model.input_channels", model["input_channels"], "input.channels"),
        Row("model.input_size", model["input_size"], "input.resolution"),
        Row("model.patch_size", model["patch_size"], "patch.size"),
        Row("model.widths", model["widths"], "levels[i].d_model"),
        Row(
            "model.depths",
            model["depths"],
            f"levels[0..{last - 1}].encoder = .decoder, levels[{last}].middle"
            if n > 1
            else "levels[0].middle",
        ),
    ]
    d_ffs = model["d_ffs"]
    rows.append(
        Row(
            "model.d_ffs",
            d_ffs,
            "levels[i].ffn (GEGLU; d_ff = 3 x d_model is the default ratio 3)"
            + ("" if "d_ffs" in raw else "  [default: 3 x widths]"),
        )
    )
    for i, sa in enumerate(model["self_attns"]):
        blk = spec.stack(i, "middle" if i == last else "encoder")[0]
        att = blk.attention
        what = att.kind + (
            f", kernel_size {S.pair(att.kernel_size)[0]}"
            if isinstance(att, S.NeighborhoodAttention)
            else f", window_size {att.window_size}"
            if isinstance(att, S.ShiftedWindowAttention)
            else ""
        )
        rows.append(
            Row(
                f"model.self_attns[{i}]",
                sa,
                f"{lv(i)}.attention ({what}), "
                f"{lv(i)}.d_head {blk.d_head} -> {spec.levels[i].d_model // blk.d_head}"
                f" heads" + ("" if "self_attns" in raw else "  [default]"),
            )
        )
    rows.append(
        Row(
            "model.dropout_rate",
            raw.get("dropout_rate", 0.0),
            "levels[i].dropout (per level; a number applies to every level)",
        )
    )
    rows += [
        Row("model.mapping_width", model["mapping_width"], "conditioning.width"),
        Row("model.mapping_depth", model["mapping_depth"], "conditioning.mapping.depth"),
        Row(
            "model.mapping_d_ff",
            model["mapping_d_ff"],
            f"conditioning.mapping.ratio {model['mapping_d_ff'] / model['mapping_width']:g}"
            " (x mapping_width)",
        ),
        Row(
            "model.mapping_dropout_rate",
            model["mapping_dropout_rate"],
            "conditioning.mapping.dropout (dropout inside the mapping network's "
            "blocks; NOT the classifier-free-guidance label dropout, which is "
            "dataset.cond_dropout_rate)",
        ),
        Row(
            "model.mapping_cond_dim",
            model["mapping_cond_dim"],
            "no extra mapping input (0 is the only value ditkit maps)",
        ),
    ]
    rows.append(
        Row(
            "dataset.num_classes",
            classes,
            f"conditioning.classes.count {classes} (+1 null row for guidance)"
            if classes
            else "conditioning.classes absent (unconditional)",
        )
    )
    for key, note in _V1_ONLY.items():
        if key in raw:
            rows.append(Row(f"model.{key}", raw[key], f"no effect: {note}", "no effect"))
    return rows


# --------------------------------------------------------------------------------------------
# training


def _objective(raw: dict, model: dict) -> tuple[S.EDMObjective, list[Row]]:
    rows = []
    cfg = raw.get("loss_config", "karras")
    if cfg != "karras":
        raise _refuse(
            "model.loss_config",
            cfg,
            "ditkit trains k-diffusion models with the 'karras' (EDM) loss only",
        )
    scales = raw.get("loss_scales", 1)
    if scales != 1:
        raise _refuse(
            "model.loss_scales", scales, "ditkit has no DCT frequency-weighted loss; use 1"
        )
    weighting = raw.get("loss_weighting", "karras")
    if weighting not in KD._WEIGHTINGS:
        raise _refuse(
            "model.loss_weighting",
            weighting,
            f"k-diffusion's weightings ditkit maps: {', '.join(KD._WEIGHTINGS)}",
        )
    density = raw.get("sigma_sample_density")
    if density is not None:
        if not isinstance(density, dict) or density.get("type") not in (
            "lognormal",
            "cosine-interpolated",
        ):
            raise _refuse(
                "model.sigma_sample_density.type",
                density.get("type") if isinstance(density, dict) else density,
                "ditkit samples sigma as lognormal or cosine-interpolated",
            )
        known = {
            "lognormal": {"type", "mean", "std", "loc", "scale"},
            "cosine-interpolated": {
                "type",
                "min_value",
                "max_value",
                "noise_d_low",
                "noise_d_high",
                "image_d",
            },
        }[density["type"]]
        extra = sorted(set(density) - known)
        if extra:
            raise _refuse("model.sigma_sample_density", density, f"unknown keys {', '.join(extra)}")
    if ("sigma_min" in raw) != ("sigma_max" in raw):
        raise _refuse(
            "model.sigma_min" if "sigma_min" in raw else "model.sigma_max",
            raw.get("sigma_min", raw.get("sigma_max")),
            "give both sigma_min and sigma_max (the sampling range) or neither",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # anything KD.objective would only warn about
            obj = KD.objective({"config": json.dumps({"model": raw})}, None)
    except (ValueError, UserWarning) as err:
        raise KDiffusionConfigError(f"k-diffusion config: {err}") from None
    rows.append(
        Row(
            "model.sigma_data",
            model["sigma_data"],
            "objective.sigma_data (EDM)" + ("" if "sigma_data" in raw else "  [default]"),
        )
    )
    rows.append(Row("model.loss_config", cfg, "objective: edm (k-diffusion's karras loss)"))
    rows.append(
        Row(
            "model.loss_weighting",
            weighting,
            f"objective.weighting {obj.weighting}"
            + (
                f", gamma 1/sigma_data^2 = {obj.gamma:g}" if obj.weighting == "soft_min_snr" else ""
            ),
        )
    )
    if "loss_scales" in raw:
        rows.append(Row("model.loss_scales", scales, "the plain loss (1 scale)"))
    for key in ("sigma_min", "sigma_max"):
        if key in raw:
            rows.append(Row(f"model.{key}", raw[key], f"objective.{key} (the sampling range)"))
    if density is not None:
        rows.append(
            Row(
                "model.sigma_sample_density",
                density,
                f"objective.sigma_sampling = {_show(obj.sigma_sampling)}",
            )
        )
    return obj, rows


def _show(x) -> str:
    return json.dumps(S.to_data(x, full=True), separators=(",", ":"))


def _training(config: dict, raw: dict, data_path: str | None) -> tuple[dict, list[Row]]:
    """The experiment's ``data``, ``training``, ``optimizer`` and ``ema`` entries."""

    rows: list[Row] = []
    prob = raw.get("augment_prob", 0.0)
    if prob:
        raise _refuse(
            "model.augment_prob",
            prob,
            "ditkit's training has no Karras "
            "(non-leaking) augmentation pipeline; set it to 0 (the model keeps its "
            "aug_cond input, fed zeros = no augmentation)",
        )
    rows.append(
        Row(
            "model.augment_prob",
            prob,
            "no augmentation; conditioning.aux aug_cond (9 inputs) is kept and fed zeros",
        )
    )
    # dataset
    ds = dict(config.get("dataset") or {})
    kind = ds.get("type", "imagefolder")
    label_dropout = float(ds.get("cond_dropout_rate", 0.1))
    if data_path is not None:
        data = ImageFolderData(path=data_path)
        for key in sorted(set(ds) - {"num_classes", "cond_dropout_rate"}):
            rows.append(
                Row(
                    f"dataset.{key}",
                    ds[key],
                    f"replaced: data = image_folder {data_path} (--data)",
                    "no effect",
                )
            )
    else:
        if kind != "imagefolder":
            raise _refuse(
                "dataset.type",
                kind,
                "ditkit's experiments read image folders, "
                "webdataset shards and encoded latents; point the experiment at a "
                "folder of the same images with --data FOLDER (or drop "
                "--experiment and convert the model only)",
            )
        extra = sorted(set(ds) - {"type", "location", "num_classes", "cond_dropout_rate"})
        if extra:
            raise _refuse(
                f"dataset.{extra[0]}",
                ds[extra[0]],
                "an imagefolder key ditkit does not map; remove it or use --data FOLDER",
            )
        if "location" not in ds:
            raise _refuse(
                "dataset.location",
                None,
                "an imagefolder dataset needs its folder; add it or pass --data FOLDER",
            )
        data = ImageFolderData(path=str(ds["location"]))
        rows.append(Row("dataset.type", kind, "data.kind image_folder"))
        rows.append(
            Row(
                "dataset.location",
                ds["location"],
                "data.path (relative paths: to the experiment file, not to where train.py ran)",
            )
        )
    rows.append(
        Row(
            "dataset.cond_dropout_rate",
            label_dropout,
            "training.label_dropout (classifier-free guidance: the null label with "
            "this rate)"
            + ("" if "cond_dropout_rate" in ds else "  [k-diffusion train.py's default 0.1]"),
        )
    )
    # optimizer
    opt = {**_OPTIMIZER_DEFAULTS, **(config.get("optimizer") or {})}
    if opt["type"] != "adamw":
        raise _refuse("optimizer.type", opt["type"], "ditkit trains with AdamW only")
    extra = sorted(set(opt) - set(_OPTIMIZER_DEFAULTS))
    if extra:
        raise _refuse(
            f"optimizer.{extra[0]}", opt[extra[0]], "an optimizer key ditkit does not map"
        )
    # lr schedule (load_config merges the defaults in; a constant schedule reads only warmup)
    given = dict(config.get("lr_sched") or {})
    lr = {**_LR_DEFAULTS, **given}
    if lr["type"] != "constant":
        raise _refuse(
            "lr_sched.type" + ("" if "type" in given else " (absent: load_config's default)"),
            lr["type"],
            "ditkit's schedules are constant and "
            "cosine; k-diffusion's inverse / exponential decays have no equivalent "
            '(use {"type": "constant", "warmup": 0.0}; k-diffusion\'s default '
            "is inverse)",
        )
    if lr["warmup"]:
        raise _refuse(
            "lr_sched.warmup",
            lr["warmup"],
            "k-diffusion's warm-up is exponential "
            "(lr x (1 - warmup^step)); ditkit's is linear (optimizer.schedule."
            "warmup_steps): set 0.0 here and warmup_steps in the experiment",
        )
    optimizer = Optimizer(
        lr=float(opt["lr"]),
        betas=tuple(opt["betas"]),
        eps=float(opt["eps"]),
        weight_decay=float(opt["weight_decay"]),
        mapping_lr_scale=MAPPING_LR_SCALE,
        schedule=ConstantLR(),
        grad_clip=None,
    )
    for key in ("type", "lr", "betas", "eps", "weight_decay"):
        default = "" if key in (config.get("optimizer") or {}) else "  [load_config default]"
        target = "optimizer.kind adamw" if key == "type" else f"optimizer.{key}"
        rows.append(Row(f"optimizer.{key}", opt[key], target + default))
    rows.append(Row("lr_sched.type", "constant", "optimizer.schedule.kind constant"))
    rows.append(Row("lr_sched.warmup", lr["warmup"], "no warm-up"))
    for key in sorted(set(given) - {"type", "warmup"}):
        rows.append(
            Row(
                f"lr_sched.{key}",
                given[key],
                "no effect: a constant schedule reads only warmup",
                "no effect",
            )
        )
    # ema
    ema_cfg = {**_EMA_DEFAULTS, **(config.get("ema_sched") or {})}
    if ema_cfg["type"] != "inverse":
        raise _refuse(
            "ema_sched.type",
            ema_cfg["type"],
            "ditkit's EMA warm-up is k-diffusion's inverse schedule",
        )
    extra = sorted(set(ema_cfg) - set(_EMA_DEFAULTS))
    if extra:
        raise _refuse(
            f"ema_sched.{extra[0]}",
            ema_cfg[extra[0]],
            "ditkit's EMA has decay (max_value) and warmup_power (power) with inv_gamma 1",
        )
    ema = EMA(decay=float(ema_cfg["max_value"]), warmup_power=float(ema_cfg["power"]))
    rows += [
        Row("ema_sched.type", "inverse", "ema: min(decay, 1 - (1 + step)^-warmup_power)"),
        Row("ema_sched.power", ema_cfg["power"], "ema.warmup_power"),
        Row("ema_sched.max_value", ema_cfg["max_value"], "ema.decay"),
    ]
    out = {
        "data": data,
        "training": Training(label_dropout=label_dropout),
        "optimizer": optimizer,
        "ema": ema,
    }
    return out, rows


# --------------------------------------------------------------------------------------------
# the whole config


_SECTIONS = ("model", "dataset", "optimizer", "lr_sched", "ema_sched")
_MODEL_KEYS = {
    "type",
    "input_channels",
    "input_size",
    "patch_size",
    "depths",
    "widths",
    "d_ffs",
    "self_attns",
    "dropout_rate",
    "mapping_width",
    "mapping_depth",
    "mapping_d_ff",
    "mapping_cond_dim",
    "mapping_dropout_rate",
    "augment_prob",
    "sigma_data",
    "sigma_min",
    "sigma_max",
    "sigma_sample_density",
    "loss_config",
    "loss_weighting",
    "loss_scales",
    "has_variance",
    *_V1_ONLY,
}


_TRAINING_MODEL_KEYS = (
    "augment_prob",
    "sigma_data",
    "sigma_min",
    "sigma_max",
    "sigma_sample_density",
    "loss_config",
    "loss_weighting",
    "loss_scales",
)


def translate(
    config: dict, *, name: str = "hdit", data_path: str | None = None, experiment: bool = True
) -> Translation:
    """The spec, experiment and per-key account of a k-diffusion config dict.
    ``experiment=False``: the model only; the training keys are listed as such, not read
    (``Translation.experiment`` is ``None``)."""

    if not isinstance(config, dict):
        raise KDiffusionConfigError("k-diffusion config: expected a JSON object at the top")
    unknown = [k for k in config if k not in _SECTIONS]
    if unknown:
        raise _refuse(
            unknown[0],
            config[unknown[0]],
            f"not a k-diffusion config section ({', '.join(_SECTIONS)})",
        )
    raw = config.get("model")
    if not isinstance(raw, dict):
        raise KDiffusionConfigError("k-diffusion config: no `model` object")
    unknown = sorted(set(raw) - _MODEL_KEYS)
    if unknown:
        raise _refuse(
            f"model.{unknown[0]}",
            raw[unknown[0]],
            "a model key ditkit does not "
            f"know for image_transformer_v2 (unknown: {', '.join(unknown)})",
        )
    spec, rows = model_spec(config, name)
    if not experiment:
        later = [f"model.{k}" for k in _TRAINING_MODEL_KEYS if k in raw]
        later += [
            f"{sec}.{k}"
            for sec in _SECTIONS[1:]
            for k in (config.get(sec) or {})
            if f"{sec}.{k}" != "dataset.num_classes"
        ]
        for key in later:
            sec, k = key.split(".", 1)
            rows.append(Row(key, config[sec][k], "training: read with --experiment", "training"))
        _check_accounted(config, rows)
        return Translation(spec, None, tuple(rows))
    model, _ = KD.model_config({"config": json.dumps(config)})
    objective, obj_rows = _objective(raw, model)
    train, train_rows = _training(config, raw, data_path)
    exp = Experiment(
        name=name,
        description="converted from a k-diffusion config",
        model=spec,
        objective=objective,
        **train,
    )
    _check_accounted(config, rows + obj_rows + train_rows)
    return Translation(spec, exp, tuple(rows + obj_rows + train_rows))


def _check_accounted(config: dict, rows: list[Row]) -> None:
    """Every key present in the config has a row (a missing row is a bug here, not the
    user's: it would be a key silently dropped)."""
    have = {r.key.split("[")[0] for r in rows}
    for section in _SECTIONS:
        for key in config.get(section) or {}:
            name = f"{section}.{key}"
            if name not in have:
                raise AssertionError(f"k-diffusion config key {name} has no row")


def read_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise KDiffusionConfigError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KDiffusionConfigError(f"{path}: not a JSON file ({err})") from None


def convert_config(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    experiment: str | os.PathLike | None = None,
    name: str | None = None,
    data_path: str | None = None,
) -> Translation:
    """Read the k-diffusion config at ``path``; write the spec to ``out`` (YAML, or JSON for a
    ``.json`` name) and, when asked, the experiment (its ``model`` is ``out``, relative to the
    experiment file). Both files are written atomically, and only once everything converted."""

    config = read_config(path)
    name = name or Path(path).stem.removeprefix("config_").replace("_", "-") or "hdit"
    t = translate(config, name=name, data_path=data_path, experiment=experiment is not None)
    out = Path(out)
    if out.suffix not in (".yaml", ".yml", ".json"):
        raise KDiffusionConfigError(f"--out {out}: a spec file is .yaml, .yml or .json")
    texts = [(out, S.dumps(t.spec, "json" if out.suffix == ".json" else "yaml"))]
    if experiment is not None:
        experiment = Path(experiment)
        if experiment.suffix not in (".yaml", ".yml", ".json"):
            raise KDiffusionConfigError(
                f"--experiment {experiment}: an experiment file is .yaml, .yml or .json"
            )
        ref = os.path.relpath(out.resolve(), experiment.resolve().parent)
        assert t.experiment is not None  # translated with experiment=True
        exp = t.experiment.model_copy(update={"model": ref})
        texts.append((experiment, S.dumps(exp, "json" if experiment.suffix == ".json" else "yaml")))
    for target, text in texts:
        with atomic_path(target) as tmp:
            Path(tmp).write_text(text)
    return t


def parameter_count(spec: S.ModelSpec) -> int:
    """Trainable parameters of the model ``spec`` builds (meta device: free at any size)."""

    model = build(spec, device="meta", init=False)
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MAPPING_LR_SCALE",
    "KDiffusionConfigError",
    "Row",
    "Translation",
    "convert_config",
    "parameter_count",
    "read_config",
    "translate",
]
