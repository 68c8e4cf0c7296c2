"""Intervals and paired tests of ``ditkit.evaluate.stats`` against values worked out by hand."""

import math

import numpy as np
import pytest

from ditkit.evaluate.stats import (
    FrechetToReference,
    bootstrap_frechet,
    frechet_from_stats,
    mcnemar_p,
    paired_frechet_difference,
    wilson_interval,
)


def test_wilson_interval_matches_the_closed_form():
    # 5 of 10, z = 1.96: centre 0.5, half-width 1.96 * sqrt(0.025 + 0.0096) / 1.384
    lo, hi = wilson_interval(5, 10)
    half = (
        1.959963984540054
        * math.sqrt(0.25 / 10 + 1.959963984540054**2 / 400)
        / (1 + 1.959963984540054**2 / 10)
    )
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)  # never below 0, and not degenerate at 0 successes
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(450, 500)
    assert lo < 0.9 < hi and hi - lo < 0.06


def test_mcnemar_exact_p_counts_only_the_discordant_pairs():
    # 10 samples only A gets right, 2 only B: p = 2 P(X <= 2), X ~ Bin(12, 1/2)
    a = np.array([1] * 10 + [0] * 2 + [1] * 30 + [0] * 7, bool)
    b = np.array([0] * 10 + [1] * 2 + [1] * 30 + [0] * 7, bool)
    assert mcnemar_p(a, b) == pytest.approx(2 * (1 + 12 + 66) / 4096, rel=1e-12)
    assert mcnemar_p(b, a) == mcnemar_p(a, b)
    assert mcnemar_p(a, a) == 1.0  # no discordant pair
    assert mcnemar_p(np.ones(3000, bool), np.zeros(3000, bool)) < 1e-300 + 1e-12
    with pytest.raises(ValueError, match="paired"):
        mcnemar_p(a, b[:-1])


def test_frechet_to_reference_equals_the_two_sided_formula():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(400, 6))
    x = rng.normal(0.3, 1.2, size=(200, 6))
    f = FrechetToReference(ref.mean(0), np.cov(ref, rowvar=False))
    assert f(x) == pytest.approx(
        frechet_from_stats(
            ref.mean(0), np.cov(ref, rowvar=False), x.mean(0), np.cov(x, rowvar=False)
        ),
        rel=1e-10,
    )


def test_bootstrap_interval_covers_the_estimate_and_shrinks_with_more_samples():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(2000, 4))
    f = FrechetToReference(ref.mean(0), np.cov(ref, rowvar=False))
    small = rng.normal(0.5, 1.0, size=(100, 4))
    big = rng.normal(0.5, 1.0, size=(1600, 4))
    lo_s, hi_s = bootstrap_frechet(small, f, rounds=200)
    lo_b, hi_b = bootstrap_frechet(big, f, rounds=200)
    assert lo_s <= f(small) <= hi_s and lo_b <= f(big) <= hi_b
    assert hi_b - lo_b < (hi_s - lo_s) / 2  # 16x the samples: about a quarter of the width
    assert lo_b < 4 * 0.25 < hi_b  # the true distance: |mu|^2 = 4 * 0.5^2


def test_paired_difference_separates_a_shifted_model_and_not_a_copy():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(2000, 4))
    f = FrechetToReference(ref.mean(0), np.cov(ref, rowvar=False))
    noise = rng.normal(size=(500, 4))
    good, bad = noise + 0.05, noise + 0.4  # the same samples, one model shifted further
    t = paired_frechet_difference(bad, good, f, rounds=200)
    assert t["difference"] > 0 and t["interval"][0] > 0 and t["p"] < 0.05
    same = paired_frechet_difference(good, good.copy(), f, rounds=50)
    assert same["difference"] == 0 and same["p"] == 1.0


def test_bootstrap_interval_is_centred_on_the_estimate_despite_the_resampling_bias():
    # 64 features, 300 samples: a resample's repeated rows add ~tr(S)/n = 0.2 to the distance,
    # more than the spread; the raw percentiles would lie entirely above the estimate
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(5000, 64))
    f = FrechetToReference(ref.mean(0), np.cov(ref, rowvar=False))
    x = rng.normal(0.05, 1.0, size=(300, 64))
    lo, hi = bootstrap_frechet(x, f, rounds=200)
    est = f(x)
    assert lo < est < hi
    assert abs((lo + hi) / 2 - est) < (hi - lo) / 2
