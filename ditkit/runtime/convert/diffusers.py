"""ditkit DiT checkpoints <-> diffusers' ``DiTTransformer2DModel`` folders (what ``DiTPipeline``
runs).

A diffusers model folder is ``config.json`` (the constructor's arguments, ``_class_name``) and
``diffusion_pytorch_model.safetensors`` (or safetensors shards with an ``.index.json``). Only
safetensors are read: a ``.bin`` weights file is a pickle and is refused, never loaded.

What diffusers' DiT fixes, and what the spec must therefore say (anything else is refused,
naming the spec field):

- one level of adaLN-Zero blocks (``levels[0].middle``), sin-cos positions, an ``ada_ln`` head,
  a sinusoidal timestep embedding with 256 features and ``downscale_freq_shift=1``
  (``conditioning.noise.frequency_shift: 1``; DiT's reference code uses 0, a different
  embedding that ``from_pretrained`` cannot select), class labels with a null row
  (``LabelEmbedding`` has ``num_classes + 1`` rows, the last one unconditional);
- LayerNorms without affine parameters: the attention norm's eps is fixed at 1e-6 (as is the
  head's), the FFN norm's is ``norm_eps``; ditkit has one block eps, so it must be 1e-6 and
  ``config.json`` gets ``norm_eps: 1e-6``;
- biases on q/k/v/out and both FFN Linears, a 4x tanh-GELU FFN (``gelu-approximate``) or a
  4x exact GELU (``gelu``);
- a square input (``sample_size``), learned sigma as ``out_channels = 2 * in_channels``.

Tensor mapping: ``pos_embed.proj`` (Conv2d) <-> ``embed.proj`` (a Linear over (row, col, c)
patches: ``permute(0, 2, 3, 1)``); ditkit's fused ``attn.qkv`` <-> ``to_q``/``to_k``/``to_v``
(rows q | k | v, heads contiguous in each, the same in both); adaLN chunks keep DiT's order
(shift, scale, gate for attention, then for the FFN; the head's shift, scale). Every diffusers
block holds its own copy of the timestep and label embedders (``norm1.emb``); they are
written as copies of ditkit's one embedder and must be equal when read back (the head uses
block 0's). The sin-cos table is a non-persistent buffer in diffusers: it is regenerated.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ditkit import spec as S
from ditkit.builder.position import sincos_table
from ditkit.errors import UserError
from ditkit.files import current_umask, environment_fault, honour_umask
from ditkit.runtime.checkpoint import load_checkpoint, save_checkpoint
from ditkit.runtime.convert.remap import Remap, expected_shapes
from ditkit.spec.diff import MISSING, diff

SOURCE = "diffusers"
CLASS_NAME = "DiTTransformer2DModel"
LEGACY_CLASS_NAMES = ("Transformer2DModel",)  # facebook/DiT-XL-2-256's config says this
CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
FREQUENCY_DIM = 256  # CombinedTimestepLabelEmbeddings: Timesteps(num_channels=256, ...)
FIXED_EPS = 1e-6  # AdaLayerNormZero's norm and norm_out
_ACTIVATIONS: dict[str, Literal["tanh", "none"]] = {"gelu-approximate": "tanh", "gelu": "none"}
# config keys and the one value ditkit can express (the class's defaults where they are)
_FIXED = {
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "attention_bias": True,
    "dropout": 0.0,
}
_IGNORED = {
    "norm_num_groups",
    "upcast_attention",
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "_use_default_values",
    # Transformer2DModel-era keys a DiT config may carry with their inert values
    "cross_attention_dim",
    "num_vector_embeds",
    "only_cross_attention",
    "use_linear_projection",
}


class DiffusersError(UserError):
    """A model diffusers' ``DiTTransformer2DModel`` cannot express, or a folder that is not one."""


# --------------------------------------------------------------------------------------------
# spec <-> config.json


def spec_from_config(config: dict, *, name: str | None = None) -> S.ModelSpec:
    """The ditkit spec of a ``DiTTransformer2DModel`` config (a ``config.json`` dict). Keys
    ditkit cannot express are refused by name; absent keys take the class's defaults."""
    cls = config.get("_class_name", CLASS_NAME)
    if cls not in (CLASS_NAME, *LEGACY_CLASS_NAMES):
        raise DiffusersError(
            f"config.json: _class_name is {cls!r}; ditkit reads "
            f"{CLASS_NAME} folders (DiTPipeline's transformer)"
        )
    known = {
        "num_attention_heads",
        "attention_head_dim",
        "in_channels",
        "out_channels",
        "num_layers",
        "sample_size",
        "patch_size",
        "activation_fn",
        "num_embeds_ada_norm",
        "norm_eps",
        *_FIXED,
        *_IGNORED,
    }
    unknown = sorted(set(config) - known)
    if unknown:
        raise DiffusersError(
            f"config.json: unknown keys {', '.join(unknown)} (not "
            f"{CLASS_NAME} arguments ditkit knows)"
        )
    for key, want in _FIXED.items():
        if key in config and config[key] != want:
            raise DiffusersError(
                f"config.json: {key} = {config[key]!r} has no ditkit "
                f"equivalent (ditkit's DiT has {want!r})"
            )
    for key, want in (
        ("only_cross_attention", False),
        ("cross_attention_dim", None),
        ("num_vector_embeds", None),
    ):
        if config.get(key, want) != want:
            raise DiffusersError(
                f"config.json: {key} = {config[key]!r}: not a DiT "
                "(ditkit reads class-conditional DiT transformers only)"
            )
    if config.get("upcast_attention"):
        warnings.warn(
            "config.json: upcast_attention is true; it only changes half-precision "
            "rounding, ditkit's attention computes in the input dtype",
            stacklevel=2,
        )
    eps = float(config.get("norm_eps", 1e-5))
    if eps != FIXED_EPS:
        raise DiffusersError(
            f"config.json: norm_eps = {eps:g}, but diffusers fixes the attention norm's eps at "
            f'1e-6 and ditkit\'s blocks use one eps for both norms; set "norm_eps": 1e-6 in '
            f"config.json to accept the difference (DiT's reference code uses 1e-6 for both)"
        )
    activation = config.get("activation_fn", "gelu-approximate")
    if activation not in _ACTIVATIONS:
        raise DiffusersError(
            f"config.json: activation_fn = {activation!r}; ditkit's DiT FFN "
            f"is one of {', '.join(_ACTIVATIONS)}"
        )
    heads = int(config.get("num_attention_heads", 16))
    d_head = int(config.get("attention_head_dim", 72))
    channels = int(config.get("in_channels", 4))
    out = config.get("out_channels")
    out = channels if out is None else int(out)
    if out not in (channels, 2 * channels):
        raise DiffusersError(
            f"config.json: out_channels = {out}; ditkit's DiT head gives "
            f"in_channels ({channels}) or twice that (learned sigma)"
        )
    size, patch = int(config.get("sample_size", 32)), int(config.get("patch_size", 2))
    classes = config.get("num_embeds_ada_norm", 1000)
    if classes is None:
        raise DiffusersError(
            "config.json: num_embeds_ada_norm is null; DiTTransformer2DModel "
            "needs the number of classes"
        )
    layers = int(config.get("num_layers", 28))
    label = f"dit-d{layers}-w{heads * d_head}-p{patch}"
    return S.ModelSpec(
        name=name or label,
        description=f"converted from a diffusers {CLASS_NAME} ({label})",
        input=S.Input(
            channels=channels, space="latent" if channels == 4 else "pixel", resolution=(size, size)
        ),
        patch=S.Patch(size=patch, bias=True),
        position=S.SincosPosition(),
        conditioning=S.Conditioning(
            noise=S.SinusoidalNoise(frequency_dim=FREQUENCY_DIM, frequency_shift=1),
            classes=S.Classes(count=int(classes), null_class=True),
        ),
        block=S.Block(
            d_head=d_head,
            norm=S.Norm(kind="layer", eps=FIXED_EPS),
            ffn=S.GeluMLP(approximate=_ACTIVATIONS[activation]),
        ),
        levels=(S.Level(d_model=heads * d_head, middle=layers),),
        head=S.AdaLNHead(learned_sigma=out == 2 * channels),
        init=S.Init(linear="xavier_uniform", embedding_std=0.02),
    )


def config_from_spec(spec: S.ModelSpec) -> dict:
    """The ``config.json`` of ``spec`` as a ``DiTTransformer2DModel``; a spec diffusers cannot
    express raises :class:`DiffusersError` naming the spec fields that differ."""
    _check_shape(spec)
    blk = spec.stack(0, "middle")[0]
    channels = spec.input.channels
    ffn = blk.ffn
    activation = (
        "gelu" if isinstance(ffn, S.GeluMLP) and ffn.approximate == "none" else "gelu-approximate"
    )
    classes = spec.conditioning.classes
    assert classes is not None  # _check_shape: DiT is class-conditional
    config = {
        "_class_name": CLASS_NAME,
        "num_attention_heads": spec.levels[0].d_model // blk.d_head,
        "attention_head_dim": blk.d_head,
        "in_channels": channels,
        "out_channels": spec.out_channels,
        "num_layers": len(spec.stack(0, "middle")),
        "dropout": 0.0,
        "norm_num_groups": 32,
        "attention_bias": True,
        "sample_size": spec.input.resolution[0],
        "patch_size": S.pair(spec.patch.size)[0],
        "activation_fn": activation,
        "num_embeds_ada_norm": classes.count,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": FIXED_EPS,
    }
    back = spec_from_config(config, name=spec.name)

    ignore = ("name", "description", "init", "input.space", "input.latent_factor")
    rows = [c for c in diff(spec, back) if not c.path.startswith(ignore)]
    if rows:
        what = "; ".join(f"{c.path} is {_show(c.a)} (diffusers: {_show(c.b)})" for c in rows)
        raise DiffusersError(
            f"spec {spec.name!r} cannot be written as a diffusers {CLASS_NAME}: {what}{_hint(rows)}"
        )
    return config


def _show(value) -> str:

    if value is MISSING:
        return "absent"
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _hint(rows) -> str:
    if any(c.path == "conditioning.noise.frequency_shift" for c in rows):
        return (
            ". diffusers' DiT hard-codes downscale_freq_shift=1 in its timestep embedding "
            "(DiT's reference code, and ditkit's default, use 0: another embedding); train "
            "the model with conditioning.noise.frequency_shift: 1 to take it to diffusers"
        )
    return ""


def _check_shape(spec: S.ModelSpec) -> None:
    """The family-level refusals, each naming the field (before any per-field comparison)."""
    if len(spec.levels) != 1:
        raise DiffusersError(
            f"spec {spec.name!r}: levels has {len(spec.levels)} entries; diffusers' "
            f"{CLASS_NAME} is one level of blocks (DiT), it cannot express a hierarchical "
            "model (HDiT, MDiT, MPDiT)"
        )
    lvl = spec.levels[0]
    if lvl.encoder or lvl.decoder or not lvl.middle:
        raise DiffusersError(
            f"spec {spec.name!r}: levels[0] must hold only middle blocks "
            f"for diffusers' {CLASS_NAME}"
        )
    if not isinstance(spec.head, S.AdaLNHead):
        raise DiffusersError(
            f"spec {spec.name!r}: head.kind is {spec.head.kind!r}; diffusers' "
            f"{CLASS_NAME} has DiT's ada_ln head"
        )
    if not isinstance(spec.conditioning.noise, S.SinusoidalNoise):
        raise DiffusersError(
            f"spec {spec.name!r}: conditioning.noise.kind is "
            f"{spec.conditioning.noise.kind!r}; diffusers' {CLASS_NAME} "
            "embeds a timestep (sinusoidal)"
        )
    if spec.conditioning.classes is None:
        raise DiffusersError(
            f"spec {spec.name!r}: conditioning.classes is absent; diffusers' "
            f"{CLASS_NAME} always conditions on a class label "
            "(unconditional DiTs cannot be expressed)"
        )
    h, w = spec.input.resolution
    if h != w:
        raise DiffusersError(
            f"spec {spec.name!r}: input.resolution is {h}x{w}; diffusers' "
            f"{CLASS_NAME} takes a square sample_size"
        )


# --------------------------------------------------------------------------------------------
# tensors


def _embed_keys(i: int) -> list[tuple[str, str]]:
    e = f"transformer_blocks.{i}.norm1.emb"
    return (
        [
            (f"{e}.timestep_embedder.linear_1.{p}", f"conditioning.noise.fc1.{p}")
            for p in ("weight", "bias")
        ]
        + [
            (f"{e}.timestep_embedder.linear_2.{p}", f"conditioning.noise.fc2.{p}")
            for p in ("weight", "bias")
        ]
        + [(f"{e}.class_embedder.embedding_table.weight", "conditioning.class_embed.weight")]
    )


def _pairs(spec: S.ModelSpec) -> list[tuple[str, str]]:
    """(diffusers key, ditkit key) of every tensor copied unchanged (block 0's embedders)."""
    pairs = [("pos_embed.proj.bias", "embed.proj.bias")] + _embed_keys(0)
    for i in range(len(spec.stack(0, "middle"))):
        b, d = f"transformer_blocks.{i}", f"levels.0.middle.{i}"
        for src, dst in (
            ("norm1.linear", "modulation"),
            ("attn1.to_out.0", "attn.out"),
            ("ff.net.0.proj", "ffn.up"),
            ("ff.net.2", "ffn.down"),
        ):
            pairs += [(f"{b}.{src}.{p}", f"{d}.{dst}.{p}") for p in ("weight", "bias")]
    for src, dst in (("proj_out_1", "head.modulation.1"), ("proj_out_2", "head.proj")):
        pairs += [(f"{src}.{p}", f"{dst}.{p}") for p in ("weight", "bias")]
    return pairs


def _qkv(i: int) -> tuple[list[str], str]:
    b = f"transformer_blocks.{i}.attn1"
    return [f"{b}.to_{x}" for x in "qkv"], f"levels.0.middle.{i}.attn.qkv"


def from_diffusers(state: dict[str, torch.Tensor], spec: S.ModelSpec) -> dict[str, torch.Tensor]:
    """diffusers ``DiTTransformer2DModel`` tensors -> the ditkit model's ``state_dict()``."""

    config_from_spec(spec)
    r = Remap(state, SOURCE, expected_shapes(spec))
    r.move(
        "pos_embed.proj.weight",
        "embed.proj.weight",
        lambda w: w.permute(0, 2, 3, 1).reshape(w.shape[0], -1),
    )  # (D, p*p*C): (row, col, c)
    for src, dst in _pairs(spec):
        r.move(src, dst)
    depth = len(spec.stack(0, "middle"))
    for i in range(depth):
        names, dst = _qkv(i)
        for p in ("weight", "bias"):
            r.concat([f"{n}.{p}" for n in names], f"{dst}.{p}")
        if i == 0:
            continue
        for (src, _), (first, _) in zip(_embed_keys(i), _embed_keys(0)):  # block 0's copies
            t, t0 = r.take(src), state.get(first)
            if t is not None and t0 is not None and not torch.equal(t, t0):
                r.problem(
                    f"{src} differs from {first}: ditkit has one timestep / label "
                    "embedder (diffusers' head uses block 0's); a model trained with "
                    "per-block embedders cannot be expressed"
                )
    grid = spec.token_grids()[0]
    d_model = spec.levels[0].d_model
    like = state.get("proj_out_2.weight")
    assert isinstance(spec.position, S.SincosPosition)  # a DiT-layout spec (checked)
    table = sincos_table(*grid, d_model, spec.position.max_period)
    r.put(
        "position.table",
        table.to(like.dtype if like is not None else table.dtype),
        "(regenerated: diffusers keeps it as a non-persistent buffer)",
    )
    return r.finish()


def to_diffusers(tensors: dict[str, torch.Tensor], spec: S.ModelSpec) -> dict[str, torch.Tensor]:
    """ditkit tensors -> a ``DiTTransformer2DModel`` state dict (every block gets a copy of the
    embedders). The sin-cos table must be the one ditkit derives (diffusers regenerates it)."""

    config_from_spec(spec)
    r = Remap(tensors, f"ditkit -> {SOURCE}")
    ph, pw = S.pair(spec.patch.size)
    c = spec.input.channels
    r.move(
        "embed.proj.weight",
        "pos_embed.proj.weight",
        lambda w: w.reshape(w.shape[0], ph, pw, c).permute(0, 3, 1, 2).contiguous(),
    )
    for src, dst in _pairs(spec):
        r.move(dst, src)
    depth = len(spec.stack(0, "middle"))
    for i in range(depth):
        names, dst = _qkv(i)
        for p in ("weight", "bias"):
            t = r.take(f"{dst}.{p}")
            if t is not None:
                for n, part in zip(names, t.chunk(3, dim=0)):
                    r.put(f"{n}.{p}", part.contiguous())
        if i:
            for src, dst in _embed_keys(i):
                if dst in tensors:
                    r.put(src, tensors[dst].clone())
    table = r.take("position.table")
    if table is not None:
        assert isinstance(spec.position, S.SincosPosition)  # a DiT-layout spec (checked)
        want = sincos_table(
            *spec.token_grids()[0], spec.levels[0].d_model, spec.position.max_period
        ).to(table.dtype)
        if table.shape != want.shape or not torch.equal(table, want):
            r.problem(
                "position.table is not the sin-cos table ditkit derives for this spec; "
                "diffusers regenerates it and would compute something else"
            )
    return r.finish()


# --------------------------------------------------------------------------------------------
# folders


def read_folder(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state dict, config)`` of a diffusers model folder (or of a pipeline folder, whose
    ``transformer/`` is used). Safetensors only: pickled ``.bin`` weights are refused."""

    folder = Path(path)
    if not folder.is_dir():
        raise DiffusersError(
            f"{folder}: not a folder; a diffusers model is a folder with {CONFIG} and {WEIGHTS}"
        )
    if not (folder / CONFIG).is_file() and (folder / "transformer" / CONFIG).is_file():
        folder = folder / "transformer"  # a DiTPipeline folder
    if not (folder / CONFIG).is_file():
        raise DiffusersError(
            f"{folder}: no {CONFIG}; point at the model folder (or the "
            "pipeline folder holding transformer/)"
        )
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DiffusersError(f"{folder / CONFIG}: not JSON ({err})") from None
    if (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    elif (folder / INDEX).is_file():
        try:
            index = json.loads((folder / INDEX).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
            raise DiffusersError(f"{folder / INDEX}: not a safetensors index ({err})") from None
        files = [folder / n for n in names]
        if any(Path(n).name != n or not n.endswith(".safetensors") for n in names):
            raise DiffusersError(
                f"{folder / INDEX}: names files that are not .safetensors beside it"
            )
    else:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        if pickled:
            raise DiffusersError(
                f"{folder}: only pickled weights ({', '.join(pickled)}); ditkit never "
                "unpickles a file. Re-save them as safetensors: "
                "DiTTransformer2DModel.from_pretrained(folder).save_pretrained(new_folder, "
                "safe_serialization=True), in a Python you trust with that pickle"
            )
        raise DiffusersError(f"{folder}: no {WEIGHTS}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as err:  # safetensors raises its own error types
            raise DiffusersError(f"{f}: not a readable safetensors file ({err})") from None
    return state, config


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block succeeds, every file in
    it is synced and the folder replaces ``path`` (an existing folder is swapped out and then
    removed); when it fails, the temporary folder is removed and ``path`` is untouched. The
    folder counterpart of :func:`ditkit.files.atomic_path`."""

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DiffusersError(f"--out {path}: a file is there; a diffusers model is a folder")
    kept = (
        f"the previous {path.name} is untouched"
        if path.exists()
        else "nothing written earlier was lost"
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as err:
        raise (environment_fault(err, str(path), kept) or err) from None
    old = None
    try:
        yield tmp
        for f in tmp.iterdir():
            honour_umask(f)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~current_umask())
        if path.exists():  # swapped out under a fresh name, removed once the new one is in
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as err:
        if old is not None and not path.exists():
            with contextlib.suppress(OSError):
                os.replace(old, path)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        fault = environment_fault(err, str(path), kept)
        if fault is not None:
            raise fault from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_folder(
    tensors: dict[str, torch.Tensor], spec: S.ModelSpec, out: str | os.PathLike
) -> dict:
    """Write ``tensors`` of ``spec`` as a ``DiTTransformer2DModel`` folder at ``out``
    (atomically). Returns the config."""

    config = config_from_spec(spec)
    state = to_diffusers(tensors, spec)

    with contextlib.suppress(metadata.PackageNotFoundError):
        config["_diffusers_version"] = metadata.version("diffusers")
    with atomic_folder(out) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(tmp / WEIGHTS),
            metadata={"format": "pt", "ditkit.name": spec.name},
        )
    return config


# --------------------------------------------------------------------------------------------
# the package's entry points (see ditkit.runtime.convert.convert / export)


def convert_folder(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    preset: S.ModelSpec | None = None,
    name: str | None = None,
    **_hints,
) -> S.ModelSpec:
    """Read a diffusers ``DiTTransformer2DModel`` folder, write a ditkit checkpoint."""

    state, config = read_folder(path)
    if name is None:  # a folder ditkit wrote keeps the spec's name in the weights' metadata
        name = _written_name(Path(path))
    spec = preset if preset is not None else spec_from_config(config, name=name)
    tensors = from_diffusers(state, spec)
    learned = spec.head.learned_sigma if isinstance(spec.head, S.AdaLNHead) else False
    save_checkpoint(
        out,
        tensors,
        spec,
        objective=S.DDPMObjective(learned_sigma=learned),
        metadata={"ditkit.converted_from": SOURCE, "ditkit.source_file": Path(path).name},
    )
    return spec


def _written_name(folder: Path) -> str | None:

    for f in (folder / WEIGHTS, folder / "transformer" / WEIGHTS):
        if f.is_file():
            with contextlib.suppress(Exception), safe_open(str(f), framework="pt") as fh:
                return (fh.metadata() or {}).get("ditkit.name")
    return None


def export_folder(path: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write the ditkit checkpoint at ``path`` as a diffusers model folder at ``out``."""

    ckpt = load_checkpoint(path)
    obj = ckpt.objective
    if obj is not None and not isinstance(obj, S.DDPMObjective):
        raise DiffusersError(
            f"{path}: its objective is {type(obj).__name__}; DiTPipeline's "
            "schedulers run DDPM epsilon prediction (a DDPM objective)"
        )
    write_folder(ckpt.tensors, ckpt.spec, out)
