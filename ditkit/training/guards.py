"""Checks a training run makes before it allocates or continues anything.

* :func:`compare_for_resume`: ``--resume`` continues *the same* experiment. The experiment given
  now is compared with the one the checkpoint was trained with; fields that only change what is
  written or how long the run goes (:data:`MAY_CHANGE`) are allowed and recorded, anything else
  is refused naming the fields, unless the caller says the change is intended
  (``--allow-changes``), and then it is recorded too (``run/resume-changes.json``).
* :func:`memory_issues`: a lower bound of the memory one process needs for the weights, the
  optimizer and one micro-batch's activations, estimated from the spec (no building), against
  what the device has. A run that cannot fit is refused naming ``training.batch_size`` or the
  model, before anything is allocated. ``DITKIT_NO_SIZE_LIMITS=1`` turns it off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ditkit import spec as S
from ditkit.errors import UserError
from ditkit.spec.experiment import Experiment
from ditkit.spec.io import read_text
from ditkit.spec.limits import (
    OVERRIDE_HINT,
    activation_bytes_per_sample,
    estimated_params,
    limits_enabled,
)

from .checkpoints import write_json

MAY_CHANGE = (
    "training.steps",
    "logging.",
    "checkpoint.",
    "preview.",
    "evaluation.",
    "distributed.",
    "precision.compile",
    "precision.activation_checkpointing",
    "precision.attention_backend",
)
"""Field paths (exact, or a section prefix ending in ``.``) a resumed run may change: total
steps; what is logged, checkpointed, previewed or evaluated; and how the same training is
placed and computed (DDP <-> FSDP2, compile, activation checkpointing, the attention kernel:
runtime switches that give the same numbers within tolerance). Never what is trained: model,
objective, data, batch, optimizer, schedule, EMA, seed, precision dtype."""


class ResumeMismatch(UserError):
    """``--resume`` with an experiment that differs from the run's in what is trained."""


def _flat(data, prefix: str = "") -> dict[str, object]:
    if isinstance(data, dict):
        out: dict[str, object] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def differences(old: Experiment, new: Experiment) -> dict[str, tuple[object, object]]:
    """``{field path: (old value, new value)}`` over every field (defaults included)."""
    a = _flat(S.to_data(old, full=True))
    b = _flat(S.to_data(new, full=True))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def may_change(path: str) -> bool:
    return any(path == p or (p.endswith(".") and path.startswith(p)) for p in MAY_CHANGE)


def compare_for_resume(
    checkpoint: Path, exp: Experiment, run: Path, step: int, allow_changes: bool = False
) -> dict[str, tuple[object, object]]:
    """The differences between the experiment stored in ``checkpoint`` and ``exp``; raises
    :class:`ResumeMismatch` for a change to what is trained unless ``allow_changes``."""
    stored = checkpoint / "experiment.yaml"
    try:
        old = S.loads(read_text(stored, "experiment"), Experiment, str(stored))
    except S.SpecError as err:
        why = err.issues[0][1] if err.issues else str(err)
        raise ResumeMismatch(
            f"{stored}: the run's own experiment cannot be read, so the "
            f"resumed experiment cannot be compared with it ({why})"
        ) from None
    diff = differences(old, exp)
    refused = sorted(k for k in diff if not may_change(k))
    if refused and not allow_changes:
        shown = "; ".join(f"{k}: {diff[k][0]!r} -> {diff[k][1]!r}" for k in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ResumeMismatch(
            f"--resume: this experiment differs from the one {run} was trained with in "
            f"{len(refused)} field(s) that change what is trained ({shown}{more}); resume with "
            "the run's own experiment (`ditkit train RUN --resume`), start a new --out folder, "
            "or pass --allow-changes if the change is intended (it is recorded)"
        )
    return diff


def record_changes(run: Path, step: int, diff: dict[str, tuple[object, object]]) -> None:
    """Append the resumed run's changes to ``run/resume-changes.json``."""

    if not diff:
        return
    path = run / "resume-changes.json"
    history = []
    if path.is_file():
        try:
            history = json.loads(path.read_text()).get("resumes", [])
        except (ValueError, AttributeError):
            history = []
    history.append(
        {
            "step": step,
            "changes": {
                k: {"old": o, "new": n, "allowed": may_change(k)} for k, (o, n) in diff.items()
            },
        }
    )
    write_json(path, {"resumes": history})


# ------------------------------------------------------------------------------ memory


def available_bytes(device) -> int | None:
    """Memory the device has: a CUDA device's total memory, or the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_issues(exp: Experiment, world: int, device) -> list[tuple[str, str]]:
    """``[(field, message)]`` when one process cannot hold the run (empty when it may fit or
    the limits are off). The estimate is a lower bound: fp32 weights, gradients, two AdamW
    moments and the EMA (20 bytes a parameter, split across ranks under FSDP2; 60% of the
    spec estimate, which runs above the measured count), plus every block's input and output
    for one micro-batch per process, at the largest of ``training.resolutions`` when set
    (block activations grow with the token count)."""

    if not limits_enabled():
        return []
    have = available_bytes(device)
    if not have:
        return []
    spec, tr = exp.model_spec, exp.training
    shards = world if exp.distributed.strategy == "fsdp2" else 1
    weights = 0.6 * estimated_params(spec) * 20 / shards
    micro = max(1, tr.batch_size // tr.accumulate // max(1, world))
    activations = micro * activation_bytes_per_sample(spec)
    h0, w0 = spec.input.resolution
    if tr.resolutions:  # the largest bucket's batches hold the most activations
        activations *= max(1.0, max(h * w for h, w in tr.resolutions) / (h0 * w0))
    need = weights + activations
    gib = 2**30
    where = "cuda" if device.type == "cuda" else "host RAM"
    h, w = spec.input.resolution
    per_sample = spec.input.channels * h * w * 4  # fp32 samples kept until the grid is made
    for field, count in (
        ("preview.count", exp.preview.count if exp.preview.every else 0),
        ("evaluation.count", exp.evaluation.count if exp.evaluation.enabled else 0),
    ):
        if count * per_sample > have:
            return [
                (
                    field,
                    f"{count:,} samples of {spec.input.channels}x{h}x{w} need at least "
                    f"{count * per_sample / gib:,.1f} GiB, more than the {have / gib:,.1f} GiB "
                    f"of host RAM; lower {field}; {OVERRIDE_HINT}",
                )
            ]
    if need <= have:
        return []
    if activations >= weights:
        return [
            (
                "training.batch_size",
                f"{tr.batch_size:,} samples per step need at least "
                f"{need / gib:,.1f} GiB per process ({micro:,} per micro-batch), more than the "
                f"{have / gib:,.1f} GiB of {where}; lower training.batch_size or raise "
                f"training.accumulate; {OVERRIDE_HINT}",
            )
        ]
    return [
        (
            "model",
            f"the model's weights and optimizer state need at least "
            f"{weights / gib:,.1f} GiB, more than the {have / gib:,.1f} GiB of {where}; use a "
            f"smaller model or distributed.strategy: fsdp2 across more processes; "
            f"{OVERRIDE_HINT}",
        )
    ]


__all__ = [
    "compare_for_resume",
    "record_changes",
    "differences",
    "memory_issues",
    "ResumeMismatch",
    "MAY_CHANGE",
]
