"""Convert checkpoints trained elsewhere to ditkit checkpoints, and back.

Each source format is one module in this package that exposes:

``SOURCE: str``
    its name on the command line (``ditkit convert --from SOURCE``).
``infer_spec(state, metadata, **hints) -> ModelSpec``
    the ditkit spec matching a source state dict. ``metadata`` is the source file's string
    metadata (safetensors metadata, or ``config``/``args`` of a training dict, JSON-encoded);
    ``hints`` are optional user choices (``preset``: a ModelSpec to use as is, ``n_heads``, ...);
    a module ignores hints it does not know (pass ``**hints``).
``to_ditkit(state, spec) -> dict[str, Tensor]``
    source tensors -> the ditkit model's ``state_dict()`` (persistent entries only). Must
    consume every source key and produce every ditkit key with the right shape; use
    :class:`Remap`, which collects every missing / left-over / mis-shaped tensor and raises one
    :class:`ConversionError` listing them all.
``from_ditkit(tensors, spec) -> dict[str, Tensor]``
    the inverse, back to the source key layout; ``from_ditkit(to_ditkit(s, spec), spec)`` must
    equal ``s`` bit for bit (derived buffers the source stores are regenerated).

A format module declares each tensor's move once -- a list of :class:`~.remap.Move` (a copy,
or a layout change with its inverse, :class:`~.remap.Transform`), :class:`~.remap.Concat`
and :class:`~.remap.Derived` -- and gets both functions from :func:`~.remap.to_ditkit` and
:func:`~.remap.from_ditkit`, which run the list forward and backward through a
:class:`Remap`.

Optional: ``PREFERRED_KEYS`` (entries of a training dict to take the weights from, in order;
default ``("ema", "model_ema", "model")``), ``metadata(spec) -> dict[str, str]`` (what
:func:`convert` records in the ditkit checkpoint, e.g. ``ditkit.cfg_channels``),
``source_metadata(spec, objective) -> dict[str, str]`` (written into an exported
safetensors file), and
``objective(metadata, spec)`` (the training objective, when the source format implies one).

A folder format (diffusers) exposes ``convert_folder(path, out, **hints)`` and
``export_folder(path, out)`` instead, and :func:`convert` / :func:`export` hand over to them.

Dispatch is the explicit dict :data:`SOURCES`; there is no registry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ditkit import spec as S
from ditkit.files import atomic_path
from ditkit.runtime.checkpoint import _atomic_save, load_checkpoint, model_hash, save_checkpoint
from ditkit.runtime.convert import diffusers, dit, kdiffusion, mpdit
from ditkit.runtime.convert.remap import (  # noqa: F401
    ConversionError,
    ConversionInputError,
    Remap,
    check_heads,
    compact,
    expected_shapes,
)
from ditkit.spec.limits import check_run_bytes, gib

DEFAULT_PREFERRED_KEYS = ("ema", "model_ema", "model")


# --------------------------------------------------------------------------------------------
# reading source files safely


def conversion_hash(tensors: Mapping[str, torch.Tensor], spec: S.ModelSpec, objective=None) -> str:
    """sha256 over the tensors (:func:`ditkit.runtime.checkpoint.model_hash`), the spec and the
    objective (canonical JSON): two conversions of the same weights with different ``--heads``
    get different hashes."""

    h = hashlib.sha256(model_hash(tensors).encode())
    h.update(json.dumps(S.to_data(spec, full=True), sort_keys=True).encode())
    if objective is not None:
        h.update(json.dumps(objective.model_dump(mode="json"), sort_keys=True).encode())
    return h.hexdigest()


def _check_unpacked_size(path: Path) -> None:
    """A ``.pt`` is a zip archive; its entries' sizes, read from the directory before anything
    is unpacked, estimate the memory ``torch.load`` needs. ``torch.save`` stores entries
    uncompressed, so an archive that unpacks to far more than its size on disk (a compressed
    storage) is checked against the run-time memory limit, as any other size."""

    if not zipfile.is_zipfile(path):
        return  # the legacy (non-zip) format: torch.load refuses or reads it by itself
    try:
        with zipfile.ZipFile(path) as zf:
            unpacked = sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ConversionInputError(f"{path}: not a readable PyTorch archive ({err})") from None
    on_disk = path.stat().st_size
    limit = max(4 * on_disk, 2**26) if unpacked > 4 * on_disk + 2**20 else None
    check_run_bytes(
        unpacked,
        str(path),
        f"unpacking {gib(on_disk)} on disk (compressed entries, which torch.save never writes)"
        if limit
        else "reading it",
        **({"limit": limit} if limit else {}),
    )


def read_source(
    path: str | os.PathLike,
    preferred: tuple[str, ...] = DEFAULT_PREFERRED_KEYS,
    key: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state dict, string metadata)`` of a ``.safetensors`` file or a ``.pt``/``.pth``/
    ``.ckpt`` file read with ``torch.load(weights_only=True)`` (never arbitrary unpickling).

    A training dict is unwrapped: ``key`` if given, else the first of ``preferred`` present
    (EMA weights first). Other non-tensor entries named ``config``/``args`` become JSON metadata.
    A ``_orig_mod.`` (torch.compile) or ``module.`` (DDP) prefix on every key is stripped."""
    path = Path(path)
    if not path.is_file():
        raise ConversionInputError(f"{path}: no such file")
    meta: dict[str, str] = {}
    obj: Any  # a state dict, or a dict of them (checked below)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            obj = load_file(str(path))
        except Exception as err:
            raise ConversionInputError(f"{path}: not a readable safetensors file ({err})") from None
    else:
        _check_unpacked_size(path)
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConversionInputError(
                f"{path}: cannot be read safely with torch.load(weights_only=True) "
                f"({type(err).__name__}: {str(err).splitlines()[0][:300]}); re-save "
                "it as a plain state dict or as .safetensors"
            ) from None
    if not isinstance(obj, Mapping):
        raise ConversionInputError(
            f"{path}: expected a state dict or a dict of them, got {type(obj).__name__}"
        )
    if key is not None and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionInputError(
            f"--key {key}: {path} is a plain state dict (tensors only, no "
            "entry holding one); drop --key"
        )
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for name in ("config", "args"):
            value = obj.get(name)
            if isinstance(value, argparse.Namespace):
                value = vars(value)
            if value is not None:
                meta[name] = value if isinstance(value, str) else json.dumps(value, default=str)
        candidates = [key] if key else list(preferred)
        chosen = next((k for k in candidates if isinstance(obj.get(k), Mapping)), None)
        if chosen is None:
            entries = ", ".join(f"{k!r}" for k in obj)
            want = f"entry {key!r}" if key else "one of " + ", ".join(preferred)
            raise ConversionInputError(
                f"{path}: a dict with entries {entries} but no {want} holding "
                "a state dict; pick one with --key"
            )
        obj = obj[chosen]
        meta["ditkit.source_key"] = chosen
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    dropped = [k for k in obj if k not in state]
    if dropped:
        raise ConversionInputError(
            f"{path}: entries that are not tensors: {', '.join(map(str, dropped))}"
        )
    for prefix in ("_orig_mod.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state, meta


# --------------------------------------------------------------------------------------------
# dispatch


def _sources() -> dict[str, ModuleType]:

    return {
        dit.SOURCE: dit,
        kdiffusion.SOURCE: kdiffusion,
        mpdit.SOURCE: mpdit,
        diffusers.SOURCE: diffusers,
    }


def source_module(name: str) -> ModuleType:
    sources = _sources()
    if name not in sources:
        raise ConversionInputError(f"unknown source format {name!r}; known: {', '.join(sources)}")
    return sources[name]


def source_names() -> list[str]:
    return list(_sources())


def convert_state(
    source: str, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], **hints
) -> tuple[dict[str, torch.Tensor], S.ModelSpec]:
    """``(ditkit tensors, spec)`` from a source state dict."""
    mod = source_module(source)
    spec = mod.infer_spec(dict(state), dict(metadata), **hints)
    return mod.to_ditkit(dict(state), spec), spec


def convert(
    path: str | os.PathLike, source: str, out: str | os.PathLike, *, key: str | None = None, **hints
) -> S.ModelSpec:
    """Read a ``source``-format checkpoint at ``path`` and write a ditkit checkpoint at
    ``out``. Returns the spec."""

    mod = source_module(source)
    if hasattr(mod, "convert_folder"):  # a folder format (diffusers)
        return mod.convert_folder(path, out, **hints)
    preferred = getattr(mod, "PREFERRED_KEYS", DEFAULT_PREFERRED_KEYS)
    state, meta = read_source(path, preferred, key)
    if "ditkit.spec" in meta:
        raise ConversionInputError(
            f"{path} is already a ditkit checkpoint (it carries its spec); use it "
            f"as it is, or write it in another format with --to {source}"
        )
    tensors, spec = convert_state(source, state, meta, **hints)
    extra = {"ditkit.converted_from": source, "ditkit.source_file": Path(path).name}
    if "ditkit.source_key" in meta:
        extra["ditkit.source_key"] = meta["ditkit.source_key"]
    if hasattr(mod, "metadata"):
        extra.update(mod.metadata(spec))
    objective = mod.objective(meta, spec) if hasattr(mod, "objective") else None
    broken = [
        name
        for name, t in tensors.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if broken:
        raise ConversionInputError(
            f"{path}: {len(broken)} tensor(s) hold NaN or infinite values "
            f"(first: {broken[0]}); nothing was written. Convert a "
            "checkpoint saved before the training diverged"
        )
    save_checkpoint(out, tensors, spec, objective=objective, metadata=extra)
    return spec


def export(path: str | os.PathLike, to: str, out: str | os.PathLike) -> None:
    """Write a ditkit checkpoint back in the ``to`` format: ``.safetensors`` (with the
    module's ``source_metadata``) or a ``torch.save``d plain state dict (``.pt``/``.pth``)."""

    mod = source_module(to)
    if hasattr(mod, "export_folder"):  # a folder format (diffusers)
        return mod.export_folder(path, out)
    ckpt = load_checkpoint(path)
    state = mod.from_ditkit(ckpt.tensors, ckpt.spec)
    out = Path(out)
    if out.suffix == ".safetensors":
        meta = (
            dict(mod.source_metadata(ckpt.spec, ckpt.objective))
            if hasattr(mod, "source_metadata")
            else {}
        )
        _atomic_save({k: v.contiguous() for k, v in state.items()}, meta, out)
    elif out.suffix in (".pt", ".pth", ".ckpt"):
        with atomic_path(out) as tmp:
            torch.save(state, tmp)
    else:
        raise ConversionInputError(f"{out}: use a .safetensors or .pt/.pth file name")


__all__ = [
    "ConversionError",
    "ConversionInputError",
    "Remap",
    "check_heads",
    "conversion_hash",
    "expected_shapes",
    "read_source",
    "source_module",
    "source_names",
    "convert_state",
    "convert",
    "export",
    "DEFAULT_PREFERRED_KEYS",
]
