"""The extrapolation report's **compare** part: pure functions over the measured rows.

95% intervals for each scored row (Wilson for accuracy, a bootstrap percentile interval for the
Fréchet distance), paired tests of every row of a resolution against its best (McNemar for
accuracy, a paired bootstrap for the Fréchet difference) in several scopes (all rows; the
zero-shot policies alone where fine-tuned rows take part; the single-pass rows alone and the
multi-stage rows alone where multi-stage rows take part), and the log-log slopes of cost and
latency against pixels. Nothing here measures or writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ditkit.evaluate.report_measure import Measured, PerSample, Resolution, Row
from ditkit.evaluate.stats import (
    bootstrap_frechet,
    mcnemar_p,
    paired_frechet_difference,
    wilson_interval,
)
from ditkit.runtime.extrapolate import loglog_slope


def with_intervals(
    rows: list[Row], scores: dict[int, PerSample], rounds: int = 300, seed: int = 0
) -> list[Row]:
    """The rows, each one with per-sample scores given ``accuracy_ci`` (Wilson) and
    ``frechet_ci`` (``rounds`` bootstrap rounds) in its metrics."""

    out = []
    for i, row in enumerate(rows):
        per = scores.get(i)
        if per is not None:
            correct = per.correct
            row = replace(
                row,
                metrics={
                    **row.metrics,
                    "accuracy_ci": list(wilson_interval(int(correct.sum()), len(correct))),
                    "frechet_ci": list(
                        bootstrap_frechet(per.features, per.frechet, rounds=rounds, seed=seed)
                    ),
                },
            )
        out.append(row)
    return out


def compare(
    rows: list[Row],
    paired: dict[int, PerSample],
    rounds: int = 300,
    seed: int = 0,
    scope: str = "all",
    min_rows: int = 2,
) -> list[dict[str, Any]]:
    """Per resolution, the best row by accuracy and by Fréchet distance and paired tests of
    every other row against it on the same samples (same seed, same labels): McNemar's exact
    test for accuracy, a paired bootstrap of the Fréchet difference. Rows that reuse another
    row's samples (bit-identical models) are left out. ``scope`` labels the entries (``all``
    rows, or ``zero-shot`` when the caller passes only the policies' rows, ``single-pass`` /
    ``multi-stage`` for one kind of row). A resolution with fewer than ``min_rows`` rows has
    no entry (``min_rows=1``: a lone row is named the best, with no tests)."""

    out = []
    by_res: dict[Resolution, list[int]] = {}
    for i in paired:
        if rows[i].same_as is None:
            by_res.setdefault(rows[i].resolution, []).append(i)
    for res, idx in by_res.items():
        counts = {len(paired[i].correct) for i in idx}
        if len(idx) < min_rows or len(counts) != 1:
            continue
        best_acc = max(
            idx, key=lambda i: (rows[i].metrics["accuracy"], -rows[i].metrics["frechet"])
        )
        best_fd = min(idx, key=lambda i: (rows[i].metrics["frechet"], -rows[i].metrics["accuracy"]))
        acc_tests, fd_tests = [], []
        for i in idx:
            if i != best_acc:
                acc_tests.append(
                    {
                        "policy": rows[i].policy,
                        "difference": rows[best_acc].metrics["accuracy"]
                        - rows[i].metrics["accuracy"],
                        "p": mcnemar_p(paired[best_acc].correct, paired[i].correct),
                    }
                )
            if i != best_fd:
                t = paired_frechet_difference(
                    paired[i].features,
                    paired[best_fd].features,
                    paired[best_fd].frechet,
                    rounds,
                    seed,
                )
                fd_tests.append(
                    {
                        "policy": rows[i].policy,
                        "difference": t["difference"],
                        "interval": list(t["interval"]),
                        "p": t["p"],
                    }
                )
        acc_tests.sort(key=lambda t: t["difference"])
        fd_tests.sort(key=lambda t: t["difference"])
        out.append(
            {
                "resolution": list(res),
                "scope": scope,
                "count": counts.pop(),
                "best_accuracy": rows[best_acc].policy,
                "accuracy_tests": acc_tests,
                "best_frechet": rows[best_fd].policy,
                "frechet_tests": fd_tests,
            }
        )
    return out


def compare_scopes(
    rows: list[Row],
    scores: dict[int, PerSample],
    n_policy_rows: int,
    rounds: int = 300,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """:func:`compare` over all rows; at the resolutions where fine-tuned (extra) rows, the
    single-pass rows from index ``n_policy_rows`` on, take part, over the zero-shot policies
    alone ("which policy to use without training" is a question of its own); and at the
    resolutions where multi-stage rows take part, over the single-pass rows alone and over the
    multi-stage rows alone (each kind's best is named even when it is the only row of its kind
    there). Sorted by pixels, the ``all`` scope first."""
    comparisons = compare(rows, scores, rounds, seed)
    tuned_res = {
        rows[i].resolution for i in scores if i >= n_policy_rows and rows[i].kind == "single-pass"
    }
    zero_shot = {
        i: p for i, p in scores.items() if i < n_policy_rows and rows[i].resolution in tuned_res
    }
    comparisons += compare(rows, zero_shot, rounds, seed, scope="zero-shot")
    staged_res = {rows[i].resolution for i in scores if rows[i].kind == "multi-stage"}
    for kind in ("single-pass", "multi-stage"):
        of_kind = {
            i: p
            for i, p in scores.items()
            if rows[i].kind == kind and rows[i].resolution in staged_res
        }
        comparisons += compare(rows, of_kind, rounds, seed, scope=kind, min_rows=1)
    comparisons.sort(key=lambda c: (c["resolution"][0] * c["resolution"][1], c["scope"] != "all"))
    return comparisons


def compared(
    measured: Measured, rounds: int = 300, seed: int = 0
) -> tuple[list[Row], list[dict[str, Any]]]:
    """The measured rows with their intervals, and :func:`compare_scopes`'s entries."""
    rows = with_intervals(measured.rows, measured.scores, rounds, seed)
    return rows, compare_scopes(rows, measured.scores, measured.n_policy_rows, rounds, seed)


def slope(points: Sequence[tuple[Resolution, float]]) -> float | None:
    """The log-log slope of a cost curve ``[(resolution, gmacs), ...]`` against pixels."""
    if len(points) < 2:
        return None
    return loglog_slope([r[0] * r[1] for r, _ in points], [g for _, g in points])


OVERHEAD_FACTOR = 1.5
"""A latency point smaller than the policy's most efficient one is overhead-bound when its
milliseconds per GMAC exceed that best (lowest) ms/GMAC by more than this factor: fixed
per-call overhead, not compute, dominates it (:func:`latency_slope`)."""


def latency_slope(points: Sequence[tuple[Resolution, float, float]]) -> dict[str, Any]:
    """The log-log slope of measured latency vs pixels over the *compute-bound* points only.

    ``points``: ``(resolution, latency_ms, gmacs)``. A tiny model's batch-1 forward at a small
    resolution is dominated by per-call overhead (Python, kernel launches), so its time barely
    grows with the work and a slope through it says nothing about scaling. A point counts as
    overhead-bound when it does *less* work than the policy's most efficient point (lowest ms
    per GMAC) and its ms per GMAC is more than :data:`OVERHEAD_FACTOR` times that best. A point
    doing *more* work that runs slower per GMAC is not overhead: it is what the larger size
    really costs (memory traffic, attention the GMAC count under-weights), so it stays in the
    fit. The slope is fitted when at least two compute-bound points span a 4x range of pixels,
    else it is ``None``."""
    pts = [(r, ms, g) for r, ms, g in points if ms and g and g > 0]
    if len(pts) < 2:  # one point: nothing to fit, and nothing to compare its ms/GMAC with
        return {"slope": None, "compute_bound": [], "overhead_bound": []}
    best_ms, best_g = min(((ms / g, g) for _, ms, g in pts))

    def overhead(ms: float, g: float) -> bool:
        return g < best_g and ms / g > OVERHEAD_FACTOR * best_ms

    bound = [(r, ms) for r, ms, g in pts if not overhead(ms, g)]
    over = [list(r) for r, ms, g in pts if overhead(ms, g)]
    pixels: list[float] = [r[0] * r[1] for r, _ in bound]
    fitted = None
    if len(bound) >= 2 and max(pixels) >= 4 * min(pixels):
        fitted = loglog_slope(pixels, [ms for _, ms in bound])
    return {"slope": fitted, "compute_bound": [list(r) for r, _ in bound], "overhead_bound": over}


def latency_fits(rows: list[Row]) -> dict[str, dict[str, Any]]:
    """:func:`latency_slope` per policy label over the rows with a latency."""
    latency: dict[str, list[tuple[Resolution, float, float]]] = {}
    for r in rows:
        if r.latency_ms is not None:
            latency.setdefault(r.policy, []).append((r.resolution, r.latency_ms, r.gmacs))
    return {k: latency_slope(v) for k, v in latency.items()}
