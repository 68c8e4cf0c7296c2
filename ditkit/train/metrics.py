"""Improved precision and recall (Kynkäänniemi et al., 2019) of feature sets, as the ADM
evaluator computes them on Inception pool features.

Each set of features is taken as a union of balls: around every point, the ball reaching its
``k``-th nearest neighbour in the same set (``k = 3`` by default; the point itself is not a
neighbour). **Precision** is the fraction of generated points that fall inside some ball of the
real set (are the samples realistic?), **recall** the fraction of real points inside some ball
of the generated set (is the real variety covered?). As in ADM's ``ManifoldEstimator``,
distances are squared Euclidean (``|u|^2 - 2 u.v + |v|^2``, clipped at 0), computed in float64
in blocks of rows so that 50,000 x 50,000 comparisons never form one matrix, and a point on a
ball's boundary counts as inside (``<=``).

Pure numpy: the Inception features come from :mod:`ditkit.train.fid`.
"""

from __future__ import annotations

import numpy as np

from ditkit.errors import UserError

BLOCK = 1024
"""Rows per block of the distance matrix (a block is ``BLOCK x N`` float64)."""


def squared_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``(len(u), len(v))`` squared Euclidean distances, clipped at 0 against round-off."""
    nu = (u * u).sum(1)[:, None]
    nv = (v * v).sum(1)[None, :]
    return np.maximum(nu - 2 * (u @ v.T) + nv, 0.0)


def knn_radii(features: np.ndarray, k: int = 3, block: int = BLOCK) -> np.ndarray:
    """Squared distance from each row to its ``k``-th nearest *other* row: position ``k`` of
    the sorted distances, position 0 being the row itself."""
    f = np.asarray(features, np.float64)
    if len(f) <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} images per set, "
                        f"got {len(f)}")
    out = np.empty(len(f))
    for s in range(0, len(f), block):
        d = squared_distances(f[s:s + block], f)
        out[s:s + block] = np.partition(d, k, axis=1)[:, k]
    return out


def inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray,
           block: int = BLOCK) -> np.ndarray:
    """For each row of ``points``: does it lie in some ball ``|p - centre|^2 <= radius``?"""
    p = np.asarray(points, np.float64)
    c = np.asarray(centres, np.float64)
    hit = np.zeros(len(p), bool)
    for s in range(0, len(p), block):
        hit[s:s + block] = (squared_distances(p[s:s + block], c) <= radii[None, :]).any(1)
    return hit


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     block: int = BLOCK) -> tuple[float, float]:
    """``(precision, recall)`` of the ``fake`` features against the ``real`` ones."""
    r_real, r_fake = knn_radii(real, k, block), knn_radii(fake, k, block)
    precision = float(inside(fake, real, r_real, block).mean())
    recall = float(inside(real, fake, r_fake, block).mean())
    return precision, recall


__all__ = ["precision_recall", "knn_radii", "inside", "squared_distances", "BLOCK"]
