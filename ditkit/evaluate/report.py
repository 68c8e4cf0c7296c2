"""The resolution-extrapolation runner: sample, measure and report per (policy, resolution).

:func:`run` is three parts in a row, each in its own module and each callable alone:

* **measure** (:mod:`ditkit.evaluate.report_measure`): adapt the spec and weights for every
  policy at every resolution (``ditkit.runtime.extrapolate``), count GMACs (meta device), time
  the forward, measure peak memory, sample a fixed-seed grid when weights are given and score
  the samples with a :class:`Scorer` (:class:`ClassifierScorer`: the digits/shapes classifier
  of :mod:`ditkit.evaluate.classifier`);
* **compare** (:mod:`ditkit.evaluate.report_compare`): intervals, paired tests, the best
  policy per resolution (all rows, and the zero-shot policies alone), log-log slopes -- pure
  functions over the rows;
* **write** (:mod:`ditkit.evaluate.report_write`): ``results.json``, ``report.md``,
  ``report.html``, the log-log cost plot (with an isotropic DiT of similar size for reference).

This module keeps the policy syntax (:func:`parse_policy`, :func:`policy_label`) and re-exports
the parts' public names, so ``from ditkit.evaluate.report import run, parse_policy, ...`` works.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ditkit import spec as S
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
    ClassifierScorer,
    ExtraRow,
    Measured,
    PerSample,
    Plan,
    Row,
    Scorer,
    Scores,
    Tensors,
    compact_png,
    cost_curves,
    cpu_peak_bytes,
    dit_reference,
    measure,
    measure_forward,
    noop_check,
)
from ditkit.evaluate.report_write import _html, comparison_lines, write_report
from ditkit.spec.io import load_yaml
from ditkit.spec.sampling import Sampling

__all__ = [
    "OVERHEAD_FACTOR",
    "REPORT_SAMPLING",
    "ClassifierScorer",
    "Measured",
    "PerSample",
    "Plan",
    "Row",
    "Scorer",
    "Scores",
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
    "measure_forward",
    "noop_check",
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
    (:func:`compare`)."""
    sampling = Sampling.of(sampling or REPORT_SAMPLING, **settings)
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
    # ``measure`` (the flag) shadows the function here: reach the part through its module
    measured = report_measure.measure(
        spec, tensors, objective, labelled, resolutions, out, plan, extra=extra, curve=curve
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
