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

Optional: ``PREFERRED_KEYS`` (entries of a training dict to take the weights from, in order;
default ``("ema", "model_ema", "model")``), ``metadata(spec) -> dict[str, str]`` (what
:func:`convert` records in the ditkit checkpoint, e.g. ``ditkit.cfg_channels``),
``source_metadata(spec, objective) -> dict[str, str]`` (written into an exported
safetensors file), and
``objective(metadata, spec)`` (the training objective, when the source format implies one).

Dispatch is the explicit dict :data:`SOURCES`; there is no registry.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable, Mapping

import torch

from ditkit.errors import UserError
from ditkit import spec as S

DEFAULT_PREFERRED_KEYS = ("ema", "model_ema", "model")


class ConversionError(UserError):
    """The tensors do not fit the spec: every problem is listed in the message."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 mismatched: list[str], other: list[str] | None = None):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        self.other = other or []
        lines = [f"cannot convert {source} weights:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(compact(missing)))
        if unexpected:
            lines.append(f"  left over / unknown ({len(unexpected)}): "
                         + ", ".join(compact(unexpected)))
        if mismatched:
            lines.append(f"  mis-shaped ({len(mismatched)}):")
            lines += [f"    {m}" for m in mismatched]
        lines += [f"  {line}" for line in self.other]
        super().__init__("\n".join(lines))


def compact(names: list[str]) -> list[str]:
    """Key names with runs that differ in one index folded: ``blocks.2.attn.qkv.weight ...
    blocks.11.attn.qkv.weight`` -> ``blocks.{2..11}.attn.qkv.weight``. Nothing is dropped."""
    groups: dict[tuple[str, ...], list[tuple[int, ...]]] = {}
    for name in names:
        parts = re.split(r"(?<=\.)(\d+)(?=\.|$)", name)
        template = tuple(parts[0::2])
        groups.setdefault(template, []).append(tuple(int(p) for p in parts[1::2]))
    out = []
    for template, values in groups.items():
        if len(values) == 1 or not values[0]:
            out += [_fill(template, v) for v in values]
            continue
        varying = [i for i in range(len(values[0])) if len({v[i] for v in values}) > 1]
        if len(varying) != 1:
            out += [_fill(template, v) for v in values]
            continue
        k = varying[0]
        idx = sorted({v[k] for v in values})
        if idx == list(range(idx[0], idx[-1] + 1)):
            text = f"{{{idx[0]}..{idx[-1]}}}"
        else:
            text = "{" + ",".join(map(str, idx)) + "}"
        out.append(_fill(template, tuple(text if i == k else str(x)
                                         for i, x in enumerate(values[0]))))
    return out


def _fill(template: tuple[str, ...], values: tuple) -> str:
    out = template[0]
    for v, t in zip(values, template[1:]):
        out += f"{v}{t}"
    return out


def _shape(t) -> str:
    return "(" + ", ".join(str(d) for d in t) + ")"


class Remap:
    """Moves tensors from one key layout to another and checks the result.

    ``take(key)`` reads a source tensor (recording it as used, or as missing); ``put(name,
    tensor, origin)`` writes a target tensor; ``finish()`` compares the result against
    ``expected`` (target name -> shape), adds every unused source key as left over, and raises
    a :class:`ConversionError` listing all problems, or returns the target dict."""

    def __init__(self, state: Mapping[str, torch.Tensor], source: str,
                 expected: Mapping[str, tuple[int, ...]] | None = None):
        self.state = dict(state)
        self.source = source
        self.expected = dict(expected) if expected is not None else None
        self.out: dict[str, torch.Tensor] = {}
        self.origin: dict[str, str] = {}
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.mismatched: list[str] = []
        self.other: list[str] = []
        self.unfilled: set[str] = set()  # targets whose source is already reported missing

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> torch.Tensor | None:
        if key not in self.state:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.state[key]

    def put(self, name: str, tensor: torch.Tensor | None, origin: str = "") -> None:
        if tensor is not None:
            self.out[name] = tensor
            self.origin[name] = origin

    def move(self, key: str, name: str, fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
             ) -> None:
        """``out[name] = fn(state[key])``; a transform that fails on a wrong shape is reported
        as mis-shaped."""
        t = self.take(key)
        if t is None:
            self.unfilled.add(name)
            return
        if fn is not None:
            try:
                t = fn(t)
            except (RuntimeError, ValueError, IndexError) as err:
                self.mismatched.append(f"{key} {_shape(t.shape)} cannot become {name} ({err})")
                return
        self.put(name, t, key)

    def concat(self, keys: list[str], name: str, dim: int = 0) -> None:
        parts = [self.take(k) for k in keys]
        if any(p is None for p in parts):
            self.unfilled.add(name)
            return
        try:
            self.put(name, torch.cat(parts, dim), " + ".join(keys))
        except RuntimeError:
            shapes = ", ".join(f"{k} {_shape(p.shape)}" for k, p in zip(keys, parts))
            self.mismatched.append(f"cannot concatenate {shapes} into {name}")

    def problem(self, message: str) -> None:
        self.other.append(message)

    def finish(self) -> dict[str, torch.Tensor]:
        unexpected = sorted(set(self.state) - self.used)
        missing = list(self.missing)
        mismatched = list(self.mismatched)
        if self.expected is not None:
            for name, shape in self.expected.items():
                if name not in self.out:
                    if name not in self.unfilled and not any(name in m for m in mismatched):
                        missing.append(f"{name} (ditkit)")
                elif tuple(self.out[name].shape) != tuple(shape):
                    origin = self.origin.get(name)
                    src = f"{origin} -> " if origin else ""
                    mismatched.append(f"{src}{name}: got {_shape(self.out[name].shape)}, the "
                                      f"spec needs {_shape(shape)}")
            unexpected += sorted(f"{n} (produced, not in the spec)" for n in self.out
                                 if n not in self.expected)
        if missing or unexpected or mismatched or self.other:
            raise ConversionError(self.source, missing, unexpected, mismatched, self.other)
        return self.out


def check_heads(n_heads: int, d_model: int, presets: Mapping[int, int], family: str) -> None:
    """A head count the weights cannot confirm (qkv is ``(3 D, D)`` for any count): refuse one
    that does not divide the width, warn about one that differs from the preset of that width
    (a wrong count converts silently into a different model)."""
    if n_heads <= 0 or d_model % n_heads:
        hint = (f" (the width-{d_model} {family} preset has {presets[d_model]})"
                if d_model in presets else "")
        raise ValueError(f"--heads {n_heads} does not divide the width {d_model}; use a "
                         f"divisor{hint}")
    if d_model in presets and presets[d_model] != n_heads:
        warnings.warn(f"--heads {n_heads} differs from the {presets[d_model]} heads of the "
                      f"width-{d_model} {family} preset: the weights load either way, but the "
                      "model computes something else; check the source's configuration",
                      stacklevel=3)


def conversion_hash(tensors: Mapping[str, torch.Tensor], spec: S.ModelSpec,
                    objective=None) -> str:
    """sha256 over the tensors (:func:`ditkit.runtime.checkpoint.model_hash`), the spec and the
    objective (canonical JSON): two conversions of the same weights with different ``--heads``
    get different hashes."""
    import hashlib

    from ..checkpoint import model_hash

    h = hashlib.sha256(model_hash(tensors).encode())
    h.update(json.dumps(S.to_data(spec, full=True), sort_keys=True).encode())
    if objective is not None:
        h.update(json.dumps(objective.model_dump(mode="json"), sort_keys=True).encode())
    return h.hexdigest()


def expected_shapes(spec: S.ModelSpec) -> dict[str, tuple[int, ...]]:
    """The ditkit ``state_dict()`` names and shapes of ``spec`` (built on the meta device: free
    for any size)."""
    from ditkit.builder import build

    model = build(spec, device="meta", init=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# reading source files safely


def read_source(path: str | os.PathLike, preferred: tuple[str, ...] = DEFAULT_PREFERRED_KEYS,
                key: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state dict, string metadata)`` of a ``.safetensors`` file or a ``.pt``/``.pth``/
    ``.ckpt`` file read with ``torch.load(weights_only=True)`` (never arbitrary unpickling).

    A training dict is unwrapped: ``key`` if given, else the first of ``preferred`` present
    (EMA weights first). Other non-tensor entries named ``config``/``args`` become JSON metadata.
    A ``_orig_mod.`` (torch.compile) or ``module.`` (DDP) prefix on every key is stripped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    meta: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            obj = load_file(str(path))
        except Exception as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path}: cannot be read safely with torch.load(weights_only=True) "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:300]}); re-save "
                             "it as a plain state dict or as .safetensors") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict or a dict of them, got "
                         f"{type(obj).__name__}")
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
            raise ValueError(f"{path}: a dict with entries {entries} but no {want} holding "
                             "a state dict; pick one with --key")
        obj = obj[chosen]
        meta["ditkit.source_key"] = chosen
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    dropped = [k for k in obj if k not in state]
    if dropped:
        raise ValueError(f"{path}: entries that are not tensors: {', '.join(map(str, dropped))}")
    for prefix in ("_orig_mod.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state, meta


# --------------------------------------------------------------------------------------------
# dispatch


def _sources() -> dict[str, ModuleType]:
    from . import dit, kdiffusion, mpdit

    return {dit.SOURCE: dit, kdiffusion.SOURCE: kdiffusion, mpdit.SOURCE: mpdit}


def source_module(name: str) -> ModuleType:
    sources = _sources()
    if name not in sources:
        raise ValueError(f"unknown source format {name!r}; known: {', '.join(sources)}")
    return sources[name]


def source_names() -> list[str]:
    return list(_sources())


def convert_state(source: str, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                  **hints) -> tuple[dict[str, torch.Tensor], S.ModelSpec]:
    """``(ditkit tensors, spec)`` from a source state dict."""
    mod = source_module(source)
    spec = mod.infer_spec(dict(state), dict(metadata), **hints)
    return mod.to_ditkit(dict(state), spec), spec


def convert(path: str | os.PathLike, source: str, out: str | os.PathLike, *,
            key: str | None = None, **hints) -> S.ModelSpec:
    """Read a ``source``-format checkpoint at ``path`` and write a ditkit checkpoint at
    ``out``. Returns the spec."""
    from ..checkpoint import save_checkpoint

    mod = source_module(source)
    preferred = getattr(mod, "PREFERRED_KEYS", DEFAULT_PREFERRED_KEYS)
    state, meta = read_source(path, preferred, key)
    if "ditkit.spec" in meta:
        raise ValueError(f"{path} is already a ditkit checkpoint (it carries its spec); use it "
                         f"as it is, or write it in another format with --to {source}")
    tensors, spec = convert_state(source, state, meta, **hints)
    extra = {"ditkit.converted_from": source, "ditkit.source_file": Path(path).name}
    if "ditkit.source_key" in meta:
        extra["ditkit.source_key"] = meta["ditkit.source_key"]
    if hasattr(mod, "metadata"):
        extra.update(mod.metadata(spec))
    objective = mod.objective(meta, spec) if hasattr(mod, "objective") else None
    save_checkpoint(out, tensors, spec, objective=objective, metadata=extra)
    return spec


def export(path: str | os.PathLike, to: str, out: str | os.PathLike) -> None:
    """Write a ditkit checkpoint back in the ``to`` format: ``.safetensors`` (with the
    module's ``source_metadata``) or a ``torch.save``d plain state dict (``.pt``/``.pth``)."""
    from ..checkpoint import _atomic_save, load_checkpoint

    mod = source_module(to)
    ckpt = load_checkpoint(path)
    state = mod.from_ditkit(ckpt.tensors, ckpt.spec)
    out = Path(out)
    if out.suffix == ".safetensors":
        meta = (dict(mod.source_metadata(ckpt.spec, ckpt.objective))
                if hasattr(mod, "source_metadata") else {})
        _atomic_save({k: v.contiguous() for k, v in state.items()}, meta, out)
    elif out.suffix in (".pt", ".pth", ".ckpt"):
        from ditkit.runtime.files import atomic_path

        with atomic_path(out) as tmp:
            torch.save(state, tmp)
    else:
        raise ValueError(f"{out}: use a .safetensors or .pt/.pth file name")


__all__ = ["ConversionError", "Remap", "check_heads", "conversion_hash", "expected_shapes", "read_source", "source_module",
           "source_names", "convert_state", "convert", "export", "DEFAULT_PREFERRED_KEYS"]
