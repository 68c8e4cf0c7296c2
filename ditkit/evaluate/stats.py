"""Statistics for sample metrics (numpy only): the Fréchet distance of two Gaussians,
confidence intervals for an accuracy and a Fréchet distance, and paired tests between two
models scored on the *same* fixed-seed samples (same noise, same labels), as the
extrapolation runner does for its policies.

* accuracy: the Wilson score interval (good at small counts and near 0 or 1, unlike the
  normal approximation); two models on the same samples: McNemar's exact test, which looks only
  at the samples one model gets right and the other wrong;
* Fréchet distance: a bootstrap over the samples, re-centred on the estimate (the reference
  Gaussian is held fixed); two models: a paired bootstrap of the difference, resampling the
  same sample indices for both.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


# ----------------------------------------------------------------- the Fréchet distance


def _clean(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off removed: those within ``n * eps`` of zero
    (relative to the largest) are zeros of a singular matrix, and their square roots
    (~1e-8 each) would otherwise add up to a bias."""
    tol = max(float(np.abs(w).max()), 0.0) * len(w) * np.finfo(w.dtype).eps
    return np.where(w > tol, w, 0.0)


def sqrtm_psd(m: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(_clean(w))) @ v.T


def trace_sqrt_product(s_a: np.ndarray, s_b: np.ndarray) -> float:
    """``tr (S_a S_b)^(1/2)`` for covariances: the sum of the square roots of the eigenvalues
    of the symmetric ``S_a^(1/2) S_b S_a^(1/2)`` (similar to ``S_a S_b``). Unlike
    ``scipy.linalg.sqrtm(S_a @ S_b)`` it stays real and finite when the covariances are
    singular (fewer images than features)."""
    return _trace_sqrt_with_half(sqrtm_psd(s_a), s_b)


def _trace_sqrt_with_half(half_a: np.ndarray, s_b: np.ndarray) -> float:
    inner = half_a @ s_b @ half_a
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(_clean(w)).sum())


def frechet_from_stats(mu_a, s_a, mu_b, s_b) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``."""
    return FrechetToReference(mu_a, s_a).distance(mu_b, s_b)


class FrechetToReference:
    """The Fréchet distance of sets of feature rows to one fixed reference Gaussian, with the
    reference's square root computed once (bootstraps call it hundreds of times)."""

    def __init__(self, mu_ref: np.ndarray, s_ref: np.ndarray):
        self.mu = np.asarray(mu_ref, np.float64)
        self.s = np.atleast_2d(s_ref).astype(np.float64)
        self.half = sqrtm_psd(self.s)
        self.trace = float(np.trace(self.s))

    def distance(self, mu, s) -> float:
        """The distance of the Gaussian ``(mu, s)`` to the reference."""
        mu = np.asarray(mu, np.float64)
        s = np.atleast_2d(s).astype(np.float64)
        d = (
            ((mu - self.mu) ** 2).sum()
            + self.trace
            + np.trace(s)
            - 2 * _trace_sqrt_with_half(self.half, s)
        )
        return max(float(d), 0.0)

    def __call__(self, features: np.ndarray) -> float:
        f = np.asarray(features, np.float64)
        return self.distance(f.mean(0), np.cov(f, rowvar=False))


# ----------------------------------------------------------------- intervals and tests


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_p(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Two-sided exact McNemar test that two models scored on the same samples have the same
    accuracy: under the null, each discordant sample (one right, the other wrong) is a fair
    coin, so the count ``b`` of "only A right" among ``n`` discordant ones is Binomial(n, 1/2).
    Returns the p-value (1.0 when there is no discordant sample)."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in count: {a.shape} vs {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    # P(X <= k) for X ~ Binomial(n, 1/2), doubled; computed in log space (n can be large)
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        for i in range(k + 1)
    ]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2 * tail)


def bootstrap_frechet(
    features: np.ndarray,
    frechet: FrechetToReference,
    rounds: int = 300,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """A bootstrap interval of the Fréchet distance of ``features`` (rows = samples) to the fixed
    reference: resample the rows with replacement ``rounds`` times and take the percentiles,
    re-centred on the estimate. The re-centring matters: a resample repeats rows, which adds
    about ``tr(S) / n`` to the distance (the same finite-sample bias the estimate itself has
    once over), so the raw percentiles sit above the estimate and may not contain it at all;
    subtracting the bootstrap's bias (its mean minus the estimate) keeps the spread and puts it
    around the estimate. The interval is the estimator's variability at this sample size; the
    finite-sample bias itself is what the report's matched real-vs-real distance shows."""
    f = np.asarray(features, np.float64)
    rng = np.random.default_rng(seed)
    n = len(f)
    estimate = frechet(f)
    values = np.array([frechet(f[rng.integers(0, n, n)]) for _ in range(rounds)])
    bias = float(values.mean()) - estimate
    lo, hi = np.quantile(values - bias, [(1 - level) / 2, (1 + level) / 2])
    return max(float(lo), 0.0), float(hi)


def paired_frechet_difference(
    features_a: np.ndarray,
    features_b: np.ndarray,
    frechet: FrechetToReference,
    rounds: int = 300,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Paired bootstrap of ``FD(a) - FD(b)`` for two models scored on the same samples: each
    round draws one set of sample indices and scores both models on it. Returns the observed
    difference, its percentile interval and a two-sided bootstrap p-value (twice the smaller
    fraction of rounds on either side of zero, at least ``1 / rounds``)."""
    fa, fb = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if fa.shape[0] != fb.shape[0]:
        raise ValueError(f"paired samples differ in count: {len(fa)} vs {len(fb)}")
    rng = np.random.default_rng(seed)
    n = len(fa)
    drawn = []
    for _ in range(rounds):
        idx = rng.integers(0, n, n)
        drawn.append(frechet(fa[idx]) - frechet(fb[idx]))
    diffs = np.array(drawn)
    observed = frechet(fa) - frechet(fb)
    diffs = diffs - (diffs.mean() - observed)  # re-centred, as in bootstrap_frechet
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    p = 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())
    return {
        "difference": observed,
        "interval": (float(lo), float(hi)),
        "p": float(min(1.0, max(p, 1.0 / rounds))),
    }
