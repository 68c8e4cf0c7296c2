"""The ditkit checkpoint: one safetensors file that describes itself.

A checkpoint holds a model's ``state_dict()`` (the builder's parameter names; non-persistent
buffers such as RoPE frequencies are derived, so not stored) and, in the safetensors metadata
(a ``{str: str}`` map), everything needed to use it without any other file:

============================  ===============================================================
``ditkit.spec``               the model spec as JSON (every field written, so a later change
                              of a default cannot change the model)
``ditkit.spec_version``       the spec's ``spec_version``; older versions are migrated on load
``ditkit.objective``          optional: the objective spec as JSON (a ``ditkit.spec.Objective``)
anything else                 free string metadata (provenance, ``ditkit.cfg_channels``, ...)
============================  ===============================================================

``ditkit sample model.safetensors`` / ``ditkit export model.safetensors`` therefore need
nothing else. Writes are atomic (a temporary file in the same folder, then ``os.replace``), so
a failure never leaves a half-written checkpoint or damages an existing one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from pydantic import TypeAdapter, ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ditkit import spec as S
from ditkit.builder import build
from ditkit.errors import UserError
from ditkit.files import atomic_path
from ditkit.spec.io import check_regular

SPEC_KEY = "ditkit.spec"
VERSION_KEY = "ditkit.spec_version"
OBJECTIVE_KEY = "ditkit.objective"
CFG_CHANNELS_KEY = "ditkit.cfg_channels"
RESERVED_KEYS = (SPEC_KEY, VERSION_KEY, OBJECTIVE_KEY, "format")
"""Metadata keys this module writes itself (``format: pt`` is safetensors' own convention)."""

_OBJECTIVE = TypeAdapter(S.Objective)


@dataclass
class Checkpoint:
    """A loaded ditkit checkpoint. ``metadata`` is the free metadata (reserved keys removed)."""

    spec: S.ModelSpec
    tensors: dict[str, torch.Tensor]
    objective: S.Objective | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def cfg_channels(self) -> int | None:
        """How many output channels classifier-free guidance acts on, when the source model's
        own CFG guided only some (DiT: 3 of its 4 latent channels; ``ditkit.cfg_channels``);
        ``None``: all of them, ditkit's default."""
        return cfg_channels_of(self.metadata)


def cfg_channels_of(metadata: Mapping[str, str]) -> int | None:
    """The ``ditkit.cfg_channels`` entry of checkpoint / ONNX metadata, or None (all channels).
    A value that is not a positive integer is a ValueError naming the key."""
    value = metadata.get(CFG_CHANNELS_KEY)
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except ValueError:
        raise CheckpointError(f"metadata {CFG_CHANNELS_KEY}={value!r} is not an integer") from None
    if n <= 0:
        raise CheckpointError(f"metadata {CFG_CHANNELS_KEY}={value!r} must be positive")
    return n


# --------------------------------------------------------------------------------------------
# save


def save_checkpoint(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    spec: S.ModelSpec,
    *,
    objective=None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``tensors`` (a ``state_dict()``) with ``spec`` (and ``objective``) as a ditkit
    checkpoint at ``path``, atomically: an existing file is replaced only once the new one is
    complete."""
    if not isinstance(spec, S.ModelSpec):
        raise TypeError(f"spec must be a ditkit.spec.ModelSpec, got {type(spec).__name__}")
    meta: dict[str, str] = {"format": "pt"}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(
                f"metadata[{key!r}]: safetensors metadata holds strings only, got "
                f"{type(key).__name__} -> {type(value).__name__}; use str(value) "
                "or json.dumps(value)"
            )
        if key in RESERVED_KEYS:
            raise ValueError(
                f"metadata[{key!r}]: this key is written by save_checkpoint itself; "
                "pass the spec/objective as arguments or pick another key"
            )
        meta[key] = value
    meta[SPEC_KEY] = json.dumps(S.to_data(spec, full=True), separators=(",", ":"))
    meta[VERSION_KEY] = str(spec.spec_version)
    if objective is not None:
        obj = _OBJECTIVE.validate_python(objective)  # a wrong type fails here, before writing
        meta[OBJECTIVE_KEY] = json.dumps(S.to_data(obj, full=True), separators=(",", ":"))

    data = _plain_tensors(tensors)
    _atomic_save(data, meta, Path(path))


def _plain_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; storage shared between entries (tied weights) is
    copied, because safetensors refuses shared storage."""
    if not tensors:
        raise ValueError("no tensors to save (an empty state dict)")
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{name!r}] is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def _atomic_save(data: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:

    with atomic_path(path) as tmp:
        save_file(data, tmp, metadata=meta)


# --------------------------------------------------------------------------------------------
# load


class CheckpointError(UserError):
    """A checkpoint file that cannot be used (damaged, non-finite weights)."""


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The raw safetensors metadata of ``path`` (a clear :class:`CheckpointError` if it is not a
    safetensors file)."""

    path = Path(path)
    check_regular(path, "checkpoint")  # a FIFO would block safetensors' open forever
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # SafetensorError / OSError: not a safetensors file
        raise CheckpointError(
            f"{path}: not a safetensors file ({err}); a ditkit checkpoint is a "
            "safetensors file written by ditkit (convert others with "
            "`ditkit convert --from dit|k-diffusion|mpdit`)"
        ) from None


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf."""
    return sorted(
        k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
    )


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", allow_non_finite: bool = False
) -> Checkpoint:
    """Read a ditkit checkpoint. The spec is validated (older ``spec_version``s migrated by
    :func:`ditkit.spec.migrate`); a file that is not a ditkit checkpoint raises ``ValueError``
    (a :class:`ditkit.spec.SpecError` when its spec is invalid). Weights holding NaN or inf are
    refused (:class:`CheckpointError` naming the tensors) unless ``allow_non_finite``: sampling
    them would silently give garbage."""

    path = Path(path)
    meta = read_metadata(path)
    spec, objective = spec_from_metadata(meta, str(path))
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as err:  # noqa: BLE001 - SafetensorError of a truncated/damaged file
        raise CheckpointError(
            f"{path}: the tensors cannot be read ({err}); the file is damaged or truncated"
        ) from None
    bad = [] if allow_non_finite else non_finite_tensors(tensors)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(
            f"{path}: {len(bad)} tensor(s) hold NaN or inf values ({shown}); "
            "the weights are broken (a diverged run?): use an earlier "
            "checkpoint"
        )
    free = {k: v for k, v in meta.items() if k not in RESERVED_KEYS}
    return Checkpoint(spec=spec, tensors=tensors, objective=objective, metadata=free)


def spec_from_metadata(meta: Mapping[str, str], source: str = "checkpoint"):
    """``(spec, objective or None)`` from a checkpoint's metadata (also used for ONNX
    ``metadata_props``, which hold the same keys)."""
    if SPEC_KEY not in meta:
        hint = (
            " It looks like a k-diffusion checkpoint: `ditkit convert --from k-diffusion`."
            if "config" in meta
            else " Convert a DiT/k-diffusion/MPDiT checkpoint with `ditkit convert --from ...`."
        )
        raise CheckpointError(
            f"{source}: not a ditkit checkpoint (no `{SPEC_KEY}` in its metadata).{hint}"
        )
    try:
        data = json.loads(meta[SPEC_KEY])
    except (ValueError, RecursionError) as err:  # bad JSON, a 5000-digit number, deep nesting
        raise S.SpecError(
            [
                (
                    SPEC_KEY,
                    f"metadata is not valid JSON: {str(err).split(';')[0] or 'nested too deeply'}",
                )
            ],
            source,
        ) from None
    if isinstance(data, dict) and VERSION_KEY in meta and "spec_version" not in data:
        try:
            data["spec_version"] = int(meta[VERSION_KEY][:20])
        except ValueError:
            raise S.SpecError(
                [(VERSION_KEY, f"{meta[VERSION_KEY]!r} is not an integer")], source
            ) from None
    spec = S.validate(data, S.ModelSpec, f"{source} [{SPEC_KEY}]")  # migrates old versions
    objective = None
    if OBJECTIVE_KEY in meta:
        objective = _objective_from(meta[OBJECTIVE_KEY], source)
    return spec, objective


def _objective_from(text: str, source: str):
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise S.SpecError(
            [
                (
                    OBJECTIVE_KEY,
                    f"metadata is not valid JSON: {str(err).split(';')[0] or 'nested too deeply'}",
                )
            ],
            source,
        ) from None
    try:
        return _OBJECTIVE.validate_python(data)
    except ValidationError as err:
        issues = [
            (".".join(str(p) for p in e["loc"]) or "<root>", e["msg"])
            for e in err.errors(include_url=False)
        ]
        raise S.SpecError(issues, f"{source} [{OBJECTIVE_KEY}]") from None


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
):
    """``(model, checkpoint)``: the spec built and the tensors loaded with ``strict=True``.
    The model is returned in ``eval()`` mode (call ``.train()`` to fine-tune)."""

    ckpt = load_checkpoint(path, device="cpu")
    model = build(ckpt.spec, init=False)
    try:
        result = model.load_state_dict(ckpt.tensors, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{path}: tensors do not match the stored spec: {err}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing: {', '.join(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected: {', '.join(result.unexpected_keys)}")
    if problems:
        raise CheckpointError(
            f"{path}: tensors do not match the stored spec ({'; '.join(problems)})"
        )
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model, ckpt


# --------------------------------------------------------------------------------------------
# identity


def model_hash(path_or_tensors: str | os.PathLike | Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over the tensors: names in sorted order, each with dtype, shape and raw
    bytes. Metadata does not enter it, so a checkpoint and the state dict it was saved from
    have the same hash; export metadata records it to tie an engine to its weights."""
    if isinstance(path_or_tensors, Mapping):
        tensors = path_or_tensors
    else:
        read_metadata(path_or_tensors)  # clear error for a non-safetensors file
        tensors = load_file(str(path_or_tensors))
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "non_finite_tensors",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "model_hash",
    "read_metadata",
    "spec_from_metadata",
    "SPEC_KEY",
    "VERSION_KEY",
    "OBJECTIVE_KEY",
    "CFG_CHANNELS_KEY",
]
