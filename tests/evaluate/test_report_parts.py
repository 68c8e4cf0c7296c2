"""The extrapolation report's parts on their own: the classifier scorer (measure), the pure
comparisons over hand-made rows (compare) and the writer fed those rows (write)."""

from dataclasses import asdict

import numpy as np
import pytest
import torch

from ditkit.evaluate.report import (
    ClassifierScorer,
    Measured,
    PerSample,
    Row,
    Scores,
    compared,
    write_report,
)
from ditkit.evaluate.stats import FrechetToReference


def test_classifier_scorer_scores_real_digits_well_and_noise_badly():
    from ditkit.data.datasets import digits_tensor

    x, y = digits_tensor((8, 8), 1)
    images, labels = x[:300], y[:300].long()
    scorer = ClassifierScorer("digits")
    good = scorer.score(images, labels)
    assert isinstance(good, Scores) and good.count == 300
    assert good.accuracy > 0.8 and good.real_accuracy > 0.8
    per = good.per_sample
    assert per.correct.dtype == bool and per.correct.shape == (300,)
    assert per.correct.mean() == pytest.approx(good.accuracy)
    assert per.features.shape[0] == 300 and per.frechet(per.features) == pytest.approx(
        good.frechet, rel=0.2
    )
    noise = scorer.score(torch.rand(300, 1, 8, 8) * 2 - 1, labels)
    assert noise.accuracy < 0.3 and noise.frechet > 5 * good.frechet
    assert set(good.summary()) == {"accuracy", "frechet", "frechet_real", "real_accuracy", "count"}


def _cell(policy, res, n_correct, n=100, same_as=None, shift=0.0):
    rng = np.random.default_rng(len(policy) + n_correct)
    correct = np.arange(n) < n_correct
    features = rng.normal(size=(n, 2)) + shift
    row = Row(
        policy,
        res,
        1.0,
        10,
        metrics={
            "accuracy": n_correct / n,
            "frechet": shift**2,
            "frechet_real": 0.0,
            "real_accuracy": 1.0,
            "count": n,
        },
        same_as=same_as,
    )
    return row, correct, features


def test_compare_ranks_rows_in_both_scopes_without_touching_its_input():
    ref = np.random.default_rng(9).normal(size=(500, 2))
    fd = FrechetToReference(ref.mean(0), np.cov(ref, rowvar=False))
    cells = [
        _cell("as_is", (32, 32), 50, shift=2.0),
        _cell("local_core", (32, 32), 90),
        _cell("local_core", (16, 16), 80),
        _cell("as_is", (16, 16), 80, same_as="x"),
        _cell("as_is + fine-tune", (32, 32), 97, shift=0.1),
    ]
    rows = [c[0] for c in cells]
    scores = {i: PerSample(c[1], c[2], fd) for i, c in enumerate(cells)}
    before = [asdict(r) for r in rows]
    out, comparisons = compared(Measured(rows, scores, {}, {}, n_policy_rows=4), 50, 0)
    assert [asdict(r) for r in rows] == before  # pure: the input rows are not changed
    lo, hi = out[1].metrics["accuracy_ci"]
    assert lo < 0.9 < hi and out[1].metrics["frechet_ci"][0] <= out[1].metrics["frechet_ci"][1]
    # 16x16 has one row of its own (the other reuses samples): nothing to compare there
    assert [(c["resolution"], c["scope"]) for c in comparisons] == [
        ([32, 32], "all"),
        ([32, 32], "zero-shot"),
    ]
    every, zero = comparisons
    assert every["best_accuracy"] == "as_is + fine-tune" and every["count"] == 100
    assert zero["best_accuracy"] == "local_core"
    assert [t["policy"] for t in zero["accuracy_tests"]] == ["as_is"]
    # 40 discordant pairs, all one way: McNemar's exact p = 2 * 0.5**40
    assert zero["accuracy_tests"][0]["p"] == pytest.approx(2 * 0.5**40)
    assert zero["best_frechet"] == "local_core" and zero["frechet_tests"][0]["difference"] > 2


def test_write_report_from_rows_alone(tmp_path):
    rows = [
        Row("as_is", (16, 16), 0.5, 1000, latency_ms=2.0),
        Row("as_is", (32, 32), 2.0, 1000, latency_ms=8.0),
        Row("local_core", (64, 64), float("nan"), 0, error="kernel too large"),
    ]

    class Spec:  # what the writer reads of a spec
        name = "hand-made"

        class input:  # noqa: N801
            resolution = (16, 16)

    write_report(Spec, rows, {"as_is": [((16, 16), 0.5), ((32, 32), 2.0)]}, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Resolution extrapolation: hand-made\n\nTrained at 16x16.")
    assert "| `as_is` | 32x32 | 2.00 | 1,000 | 8.0 | - | 0 |  |" in md
    assert "| `local_core` | 64x64 | nan | 0 | - | - | 0 | kernel too large |" in md
    assert "- as_is: GMACs slope 1.000" in md  # 4x the GMACs for 4x the pixels
    # 4x the time for 4x the work, both points equally efficient: slope 1 over both
    assert (
        "- as_is: measured latency slope 1.000 over the compute-bound points (16x16 to 32x32)" in md
    )
    import json

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["latency_slopes"]["as_is"] == pytest.approx(1.0)
    assert results["rows"][2]["error"] == "kernel too large"
    assert (tmp_path / "report.html").is_file()
