"""The resolution-extrapolation runner: sample, measure and report per (policy, resolution).

:func:`run` is three parts in a row, each in its own module and each callable alone:

* **measure** (:mod:`ditkit.evaluate.report_measure`): adapt the spec and weights for every
  policy at every resolution (``ditkit.runtime.extrapolate``), count GMACs (meta device), time
  the forward, measure peak memory, sample a fixed-seed grid when weights are given and score
  the samples with a :class:`Scorer` (:class:`ClassifierScorer`: the digits/shapes classifier
  of :mod:`ditkit.evaluate.classifier`); each stage chain adds a multi-stage row per policy;
* **compare** (:mod:`ditkit.evaluate.report_compare`): intervals, paired tests, the best
  policy per resolution (all rows, the zero-shot policies alone, and the single-pass and the
  multi-stage rows apart), log-log slopes -- pure functions over the rows;
* **write** (:mod:`ditkit.evaluate.report_write`): ``results.json``, ``report.md``,
  ``report.html``, the log-log cost plot (with an isotropic DiT of similar size for reference).

This module keeps the policy and chain syntax (:func:`parse_policy`, :func:`policy_label`,
:func:`parse_chains`) and re-exports the parts' public names, so
``from ditkit.evaluate.report import run, parse_policy, ...`` works.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ditkit import spec as S
from ditkit.errors import UserError
from ditkit.evaluate import report_measure
from ditkit.evaluate.report_compare import (
    OVERHEAD_FACTOR,
    compare,
    compare_scopes,
    compared,
    latency_slope,
    with_intervals,
)
from ditkit.evaluate.report_measure import (
    Chain,
    ClassifierScorer,
    ExtraRow,
    Measured,
    PerSample,
    Plan,
    Row,
    Scorer,
    Scores,
    Tensors,
    chain_text,
    compact_png,
    cost_curves,
    cpu_peak_bytes,
    dit_reference,
    measure,
    measure_chain,
    measure_forward,
    noop_check,
)
from ditkit.evaluate.report_write import _html, comparison_lines, write_report
from ditkit.runtime.multistage import check_stages
from ditkit.runtime.objectives import objective_of
from ditkit.spec.io import load_yaml
from ditkit.spec.sampling import Sampling, Stage, parse_stages

__all__ = [
    "OVERHEAD_FACTOR",
    "REPORT_SAMPLING",
    "Chain",
    "ClassifierScorer",
    "Measured",
    "PerSample",
    "Plan",
    "Row",
    "Scorer",
    "Scores",
    "chain_text",
    "compact_png",
    "compare",
    "compare_scopes",
    "compared",
    "comparison_lines",
    "cost_curves",
    "cpu_peak_bytes",
    "dit_reference",
    "latency_slope",
    "measure",
    "measure_chain",
    "measure_forward",
    "noop_check",
    "parse_chain_policies",
    "parse_chains",
    "parse_policy",
    "policy_label",
    "run",
    "with_intervals",
    "write_report",
    "_html",
]

_POLICY = TypeAdapter(S.Policy)


REPORT_SAMPLING = Sampling(steps=20, seed=0)
"""What the extrapolation report samples with unless told otherwise."""


def parse_policy(text: str, flag: str = "--policies") -> S.Policy:
    """``kind[:key=value[,key=value]]``, e.g. ``local_core:kernel_size=15``,
    ``as_is:rope=extrapolate``, ``add_levels:share_weights=true``,
    ``core_patch:rope_scaling=ntk,attention_scaling=entropy``, ``as_is:rope_scaling=yarn(beta=16)``
    (a nested option's fields in parentheses, as :func:`policy_label` writes them); errors name
    ``flag``."""

    def items(rest: str) -> dict:
        out: dict = {}
        for item in filter(None, re.split(r",(?![^()]*\))", rest)):  # commas outside (...)
            key, eq, value = item.partition("=")
            if not eq:
                raise S.SpecError(
                    [
                        (
                            flag,
                            f"{text!r}: expected key=value after the kind, "
                            f"e.g. local_core:kernel_size=15",
                        )
                    ]
                )
            nested = re.fullmatch(r"\s*(\w+)\((.*)\)\s*", value)  # yarn(beta=16)
            out[key.strip()] = (
                {"kind": nested[1], **items(nested[2])}
                if nested
                else load_yaml(value, "policy", f"{flag} {key.strip()}")
            )
        return out

    kind, _, rest = text.partition(":")
    data: dict = {"kind": kind, **items(rest)}
    try:
        return _POLICY.validate_python(data)
    except ValidationError as err:
        issues = [
            (f"{flag} {text}: " + ".".join(str(p) for p in e["loc"]), e["msg"])
            for e in err.errors(include_url=False)
        ]
        raise S.SpecError(issues, "policy") from None


def policy_label(policy: S.Policy) -> str:
    """``kind:key=value,...`` with the non-default fields; a nested option (``rope_scaling``)
    shows as its kind, with its own non-default fields in parentheses: ``rope_scaling=ntk``,
    ``rope_scaling=yarn(beta=16)``."""

    def show(v):
        if isinstance(v, dict):
            inner = ",".join(f"{k}={x}" for k, x in v.items() if k != "kind")
            return v.get("kind", "") + (f"({inner})" if inner else "")
        return v

    data = {k: v for k, v in S.to_data(policy).items() if k != "kind"}
    options = ("rope_scaling", "attention_scaling")  # shared by every kind: after its own
    order = sorted(data, key=lambda k: (k in options, options.index(k) if k in options else 0))
    args = ",".join(f"{k}={show(data[k])}" for k in order)
    return policy.kind + (f":{args}" if args else "")


ChainInput = str | Sequence[Stage | Mapping[str, Any]]
"""A stage chain as :func:`run` takes it: the command line's ``"8,16:2.0"``, or
:class:`~ditkit.spec.sampling.Stage` objects or mappings of their fields."""


def parse_chain_policies(
    given: Sequence[S.Policy | str] | None,
    policies: Sequence[S.Policy],
    chains: Sequence[Any],
    flag: str = "chain_policies",
    policies_name: str = "the report's policies",
    chains_name: str = "stage chains",
) -> list[str] | None:
    """The labels of the policies that run the stage chains (``None``: every policy), checked:
    each must be one of ``policies`` and there must be ``chains``. Every error is a
    :class:`~ditkit.errors.UserError` that starts with ``flag`` and names the others as
    ``policies_name`` / ``chains_name`` (the command line's ``--policies`` / ``--stages``)."""
    if given is None:
        return None
    labels = [policy_label(p) for p in policies]
    chained = [policy_label(parse_policy(p, flag) if isinstance(p, str) else p) for p in given]
    missing = [c for c in chained if c not in labels]
    if missing:
        raise UserError(
            f"{flag}: {', '.join(missing)} is not one of {policies_name} ({', '.join(labels)}); "
            "add it there or drop it"
        )
    if not chains:
        raise UserError(f"{flag}: no {chains_name} to run; give the chains too")
    return chained


def parse_chains(
    chains: Sequence[ChainInput],
    resolutions: Sequence[tuple[int, int]],
    sampling: Sampling | None = None,
    objective: S.Objective | None = None,
    *,
    samples: bool = True,
    flag: str = "chains",
) -> list[Chain]:
    """The stage chains of a report's multi-stage rows, checked; every error is a
    :class:`~ditkit.errors.UserError` that starts with ``flag`` and the chain.

    A chain ends at one of the report's ``resolutions`` (its last stage is the target: the
    rows it adds sit beside the single-pass rows of that resolution and are compared with
    them), its stages validate as :attr:`Sampling.stages` (the first from pure noise, every
    later one with a sigma, small to large) and, given the ``objective``, re-noise inside its
    noise range. ``samples``: whether the report draws samples at all (a multi-stage row is a
    way of sampling: without trained weights and an objective it would only repeat the
    single-pass row's costs). The same chain twice is refused."""

    if chains and not samples:
        raise UserError(
            f"{flag}: multi-stage rows compare samples, and this report draws none (it needs "
            "trained weights and an objective: give a checkpoint or a run folder)"
        )
    base = Sampling.of(sampling or REPORT_SAMPLING, stages=())
    targets = [(r[0], r[1]) for r in resolutions]
    out: list[Chain] = []
    for i, given in enumerate(chains):
        stages: tuple[Any, ...] | None
        if isinstance(given, str):
            stages, where = parse_stages(given, flag), f"{flag} {given}"
        else:  # Python: the chain's place in the list
            stages, where = tuple(given), f"{flag}[{i}]"
        if not stages:
            raise UserError(f"{where}: an empty chain; give at least one stage, e.g. 8,16:2.0")
        try:
            staged = Sampling.of(base, stages=stages)
        except S.SpecError as err:
            path, message = err.issues[0]
            raise UserError(f"{where}: {path}: {message.split(' (got ')[0]}") from None
        chain = staged.stages
        end = (chain[-1].resolution[0], chain[-1].resolution[1])
        if end not in targets:
            listed = ", ".join(f"{h}x{w}" for h, w in targets)
            raise UserError(
                f"{where}: ends at {end[0]}x{end[1]}, which is not one of the report's "
                f"resolutions ({listed}); the last stage is the row's target resolution: end "
                "the chain at one of them or add it to the resolutions"
            )
        if objective is not None:
            try:
                check_stages(objective_of(objective), staged)
            except UserError as err:
                raise UserError(f"{where}: {str(err).removeprefix('stages: ')}") from None
        if chain in out:
            raise UserError(f"{where}: given twice (each chain is one row per policy)")
        out.append(chain)
    return out


def run(
    spec: S.ModelSpec,
    tensors: Tensors | None,
    objective: S.Objective | None,
    policies: list[S.Policy],
    resolutions: list[tuple[int, int]],
    out: Path,
    sampling: Sampling | None = None,
    *,
    samples: int = 8,
    device: str = "cpu",
    measure: bool = True,
    curve: list[tuple[int, int]] | None = None,
    scorer: Scorer | None = None,
    eval_count: int = 0,
    extra: Sequence[ExtraRow] = (),
    eval_resolutions: list[tuple[int, int]] | None = None,
    progress: bool = True,
    count_at: dict[tuple[int, int], int] | None = None,
    bootstrap: int = 300,
    latency_batch: int = 1,
    chains: Sequence[ChainInput] = (),
    chain_policies: Sequence[S.Policy | str] | None = None,
    **settings: Any,
) -> list[Row]:
    """Run every (policy, resolution), write the report into ``out`` and return the rows.

    ``sampling``: how the grids and scored images are drawn (default :data:`REPORT_SAMPLING`:
    20 steps of the default sampler, seed 0); ``settings`` are :class:`Sampling` fields given
    one by one (``steps=2``). Its seed also seeds the random weights of new tensors, the
    no-op check and the bootstrap.

    ``scorer``: what scores ``eval_count`` fixed-seed samples per cell (the grid shows the
    first ``samples`` of them), e.g. ``ClassifierScorer("digits")``; ``None``: no scores.
    ``extra``: further rows ``(label, spec, tensors)`` of models already at their resolution
    (e.g. a fine-tuned adaptation), sampled and measured like the policies' rows.
    ``eval_resolutions``: score only these (default: all; sampling enough images for metrics
    is the slow part on a CPU). ``count_at``: a different count for some resolutions (e.g.
    fewer at 4x, where each sample costs 16x).

    Every policy is also run at the training resolution against the trained model
    (:func:`noop_check`); a row there whose outputs are bit-identical to the trained model's
    reuses the samples and scores of the first such row instead of drawing them again. Scored
    rows get 95% intervals (Wilson for accuracy, a ``bootstrap`` percentile interval for the
    Fréchet distance), and the rows of each resolution are compared on the same samples
    (:func:`compare`).

    ``chains``: multi-stage sampling (:mod:`ditkit.runtime.multistage`), each chain e.g.
    ``"8,16:2.0"`` (:func:`parse_chains`: it ends at one of ``resolutions``). Every policy
    samples every chain with its model for the chain's last resolution: one ``multi-stage`` row
    each (``POLICY + stages CHAIN``), scored on the same seed and labels as the single-pass
    rows, and the report names the best single-pass and the best multi-stage row at each such
    resolution apart. ``chain_policies``: only these of ``policies`` (policies or their
    command-line text, e.g. ``"core_patch"``) run the chains (default: every policy)."""
    sampling = Sampling.of(sampling or REPORT_SAMPLING, **settings)
    if sampling.stages:
        raise UserError(
            "sampling.stages: the report's single-pass rows sample in one pass; give stage "
            "chains as chains=[...] (one multi-stage row per policy and chain)"
        )
    staged = parse_chains(
        chains,
        resolutions,
        sampling,
        objective,
        samples=tensors is not None and objective is not None,
    )
    plan = Plan(
        sampling,
        grid_count=samples,
        device=device,
        time=measure,
        latency_batch=latency_batch,
        scorer=scorer,
        count=eval_count,
        count_at={(k[0], k[1]): v for k, v in (count_at or {}).items()},
        scored=None
        if eval_resolutions is None
        else frozenset((r[0], r[1]) for r in eval_resolutions),
        progress=progress,
    )
    labelled = [(policy_label(p), p) for p in policies]
    chained = parse_chain_policies(chain_policies, policies, staged)
    # ``measure`` (the flag) shadows the function here: reach the part through its module
    measured = report_measure.measure(
        spec,
        tensors,
        objective,
        labelled,
        resolutions,
        out,
        plan,
        extra=extra,
        curve=curve,
        chains=staged,
        chain_policies=chained,
    )
    rows, comparisons = compared(measured, bootstrap, sampling.seed)
    write_report(
        spec,
        rows,
        measured.curves,
        out,
        noop=measured.noop,
        comparisons=comparisons,
        sampling=sampling,
        latency_batch=latency_batch,
    )
    return rows
