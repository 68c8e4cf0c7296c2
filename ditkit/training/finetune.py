"""Fine-tune a resolution-adapted model: train only a named subset of its parameters.

An experiment with a ``finetune`` section (:class:`ditkit.spec.experiment.Finetune`) starts
from a trained checkpoint, applies a resolution policy to its spec and weights
(:func:`ditkit.runtime.extrapolate.adapt`: every trained tensor is carried over exactly; only
what the policy says is re-initialised), freezes everything that ``trainable`` does not name,
and trains the rest through the ordinary loop (``ditkit train``).

Two steps, both called from :func:`ditkit.training.loop.train`:

* :func:`prepare` (before anything is written): the *effective* experiment -- ``model`` becomes
  the adapted spec, ``finetune.source_model`` the checkpoint's spec -- and the resolved
  trainable parameter names. Every problem is a :class:`ditkit.spec.SpecError` naming the field
  (``finetune.trainable.1``, ``finetune.policy``, ``finetune.checkpoint``), so the CLI exits 2.
* :func:`apply` (after the model is built): load the adapted weights (unless resuming, when
  the run's own checkpoint is loaded instead) and set ``requires_grad``. The optimizer is then
  built over the trainable parameters only (``param_groups`` skips frozen ones).

The saved experiment is the effective one, so ``--resume`` does not adapt twice; every
checkpoint carries the adapted spec (``ditkit sample`` / ``ditkit extrapolate`` load it as
usual) and a ``ditkit.finetune`` metadata entry with the policy, the patterns and the names.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ditkit import spec as S
from ditkit.builder import build
from ditkit.runtime.checkpoint import load_checkpoint, read_metadata, spec_from_metadata
from ditkit.runtime.extrapolate import adapt, adapt_spec
from ditkit.spec.experiment import TRAINABLE_PRESETS, Experiment, training_resolution_issues

METADATA_KEY = "ditkit.finetune"


@dataclass
class Plan:
    """What :func:`prepare` worked out: the trainable parameter names and the adapt record."""

    trainable: list[str]
    frozen: list[str]
    record: dict = field(default_factory=dict)

    def to_json(self, exp: Experiment) -> dict:
        ft = exp.finetune
        assert ft is not None  # a fine-tuning run's record
        return {
            "checkpoint": ft.checkpoint,
            "policy": S.to_data(ft.policy),  # as written
            "resolution": list(exp.model_spec.input.resolution),
            "patterns": list(ft.trainable),
            "trainable": self.trainable,
            "frozen_count": len(self.frozen),
            "reinitialised": self.record.get("reinitialised", []),
            "replicated": self.record.get("replicated", []),
        }


def _same_model(a: S.ModelSpec, b: S.ModelSpec) -> bool:
    drop = {"name", "description"}
    da = {k: v for k, v in S.to_data(a, full=True).items() if k not in drop}
    db = {k: v for k, v in S.to_data(b, full=True).items() if k not in drop}
    return da == db


def _checkpoint_spec(path: Path) -> S.ModelSpec:

    if not path.is_file():
        raise S.SpecError(
            [
                (
                    "finetune.checkpoint",
                    f"no such checkpoint file: {path} (relative "
                    "paths start at the experiment file's folder)",
                )
            ],
            "finetune",
        )
    try:
        return spec_from_metadata(read_metadata(path), str(path))[0]
    except S.SpecError:
        raise
    except (ValueError, OSError) as err:
        raise S.SpecError(
            [("finetune.checkpoint", f"{path}: not a ditkit checkpoint ({err})")], "finetune"
        ) from None


def _adapted_spec(source: S.ModelSpec, ft) -> S.ModelSpec:

    res = tuple(ft.resolution or source.input.resolution)
    try:
        return adapt_spec(source, ft.policy, res)
    except S.SpecError as err:
        issues = []
        for path, msg in err.issues:
            if path.startswith("policy") or path == "resolution":
                issues.append((f"finetune.{path}", msg))
            else:
                issues.append(
                    (
                        "finetune.policy",
                        f"{ft.policy.kind} at {res[0]}x{res[1]} gives "
                        f"an invalid spec: {path}: {msg}",
                    )
                )
        raise S.SpecError(issues, "finetune") from None


def _preset(name: str, spec: S.ModelSpec, names: list[str], record: dict) -> set[str]:
    if name == "new":
        return set(record.get("reinitialised", [])) | set(record.get("replicated", []))
    if name == "patch":
        return {
            n
            for n in names
            if n.startswith(("embed.", "head.")) or re.match(r"levels\.\d+\.(down|up)\.", n)
        }
    if name == "aggregate":
        prefixes = tuple(
            f"levels.{i}.{w}.{j}."
            for i in range(len(spec.levels))
            for w in ("encoder", "middle", "decoder")
            for j, blk in enumerate(spec.stack(i, w))
            if blk.attention.kind == "aggregate"
        )
        return {n for n in names if prefixes and n.startswith(prefixes)}
    raise AssertionError(name)


def match(pattern: str, names: list[str], spec: S.ModelSpec, record: dict) -> set[str]:
    """The parameter names one ``trainable`` entry selects."""
    if pattern in TRAINABLE_PRESETS:
        return _preset(pattern, spec, names, record) & set(names)
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return {n for n in names if rx.search(n)}
    return {n for n in names if fnmatch.fnmatchcase(n, pattern)}


def prepare(exp: Experiment) -> tuple[Experiment, Plan | None]:
    """The effective experiment (``model`` = the adapted spec) and the trainable names."""

    ft = exp.finetune
    if ft is None:
        return exp, None
    if ft.source_model is None:  # a new run: check the checkpoint, adapt the spec
        source = exp.model_spec
        ckpt_spec = _checkpoint_spec(Path(ft.checkpoint))
        if not _same_model(ckpt_spec, source):
            raise S.SpecError(
                [
                    (
                        "model",
                        f"is not the spec {ft.checkpoint} was trained with; "
                        "set `model` to that spec (`ditkit describe "
                        f"{ft.checkpoint}` shows it)",
                    )
                ],
                "finetune",
            )
        target = _adapted_spec(source, ft)
        ft = ft.model_copy(
            update={"source_model": source, "resolution": tuple(target.input.resolution)}
        )
        exp = exp.model_copy(update={"model": target, "finetune": ft})
    else:  # a saved run: the model is already adapted; make sure it still is what we'd make
        source, target = ft.source_model, exp.model_spec
        if not _same_model(_adapted_spec(source, ft), target):
            raise S.SpecError(
                [
                    (
                        "finetune.source_model",
                        "the saved model is not the policy "
                        "applied to source_model; the experiment file was edited",
                    )
                ],
                "finetune",
            )
    # training.resolutions run through the model that is trained: the adapted one
    issues = training_resolution_issues(exp.training, exp.data.kind, target)
    if issues:
        raise S.SpecError(issues, "finetune")
    meta_source = build(source, device="meta").state_dict()
    record = adapt(source, meta_source, ft.policy, target.input.resolution, device="meta").record
    names = [n for n, _ in build(target, device="meta").named_parameters()]
    chosen: set[str] = set()
    issues = []
    for i, pat in enumerate(ft.trainable):
        hit = match(pat, names, target, record)
        if not hit:
            close = difflib.get_close_matches(pat.removeprefix("re:"), names, n=5, cutoff=0.4)
            hint = (
                f"close names: {', '.join(close)}"
                if close
                else f"names look like {', '.join(names[:3])}, ..."
            )
            what = "preset" if pat in TRAINABLE_PRESETS else "pattern"
            issues.append(
                (
                    f"finetune.trainable.{i}",
                    f"{what} {pat!r} matches no parameter of "
                    f"the adapted model; {hint} (globs use fnmatch, `re:` prefixes a "
                    f"regular expression, presets: {', '.join(TRAINABLE_PRESETS)})",
                )
            )
        chosen |= hit
    if issues:
        raise S.SpecError(issues, "finetune")
    trainable = [n for n in names if n in chosen]
    return exp, Plan(trainable, [n for n in names if n not in chosen], record)


def apply(
    model: nn.Module, exp: Experiment, plan: Plan, *, load_weights: bool, seed: int = 0
) -> dict:
    """Load the adapted checkpoint weights into ``model`` (when ``load_weights``) and freeze
    every parameter ``plan`` does not name. Returns the record saved with the run."""

    ft = exp.finetune
    # resolved by prepare(): a finetune section that names its source model
    assert ft is not None and ft.source_model is not None
    if load_weights:
        ckpt = load_checkpoint(ft.checkpoint)
        adapted = adapt(
            ft.source_model, ckpt.tensors, ft.policy, exp.model_spec.input.resolution, seed=seed
        )
        model.load_state_dict(adapted.tensors)
    keep = set(plan.trainable)
    n_train = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        n_train += p.numel() if name in keep else 0
    out = plan.to_json(exp)
    out["trainable_params"] = n_train
    out["total_params"] = sum(p.numel() for p in model.parameters())
    return out


def metadata(record: dict) -> dict[str, str]:
    """The checkpoint metadata entry (safetensors metadata is ``{str: str}``)."""
    return {METADATA_KEY: json.dumps(record, sort_keys=True)}
