"""Improved precision and recall (Kynkäänniemi et al., 2019) of feature sets, as the ADM
evaluator computes them on Inception pool features.

Each set of features is taken as a union of balls: around every point, the ball reaching its
``k``-th nearest neighbour in the same set (``k = 3`` by default; the point itself is not a
neighbour). **Precision** is the fraction of generated points that fall inside some ball of the
real set (are the samples realistic?), **recall** the fraction of real points inside some ball
of the generated set (is the real variety covered?). As in ADM's ``ManifoldEstimator``,
distances are squared Euclidean (``|u|^2 - 2 u.v + |v|^2``, clipped at 0), computed in blocks of
rows so that 50,000 x 50,000 comparisons never form one matrix, and a point on a ball's boundary
counts as inside (``<=``). ADM computes the distances in float16 (float32 where that
overflows); here they are float64, so a point within round-off of a boundary may be counted
differently -- precision and recall can differ from ADM's in the last digits.

Features come in as numpy arrays (:mod:`ditkit.evaluate.fid` computes them); the distances run in
torch on the given device.
"""

from __future__ import annotations

import numpy as np
import torch

from ditkit.errors import UserError

BLOCK = 1024
"""Rows per block of the distance matrix (a block is ``BLOCK x N`` float64)."""


def _tensor(x, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, np.float64), device=device)


def squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(len(u), len(v))`` squared Euclidean distances, clipped at 0 against round-off."""
    nu = (u * u).sum(1)[:, None]
    nv = (v * v).sum(1)[None, :]
    return (nu - 2 * (u @ v.T) + nv).clamp_min_(0.0)


def knn_radii(features, k: int = 3, block: int = BLOCK, device: str = "cpu") -> np.ndarray:
    """Squared distance from each row to its ``k``-th nearest *other* row: the ``k + 1``-th
    smallest of its distances, the smallest being the row itself."""
    f = _tensor(features, device)
    if len(f) <= k:
        raise UserError(
            f"precision/recall with k={k} needs more than {k} images per set, got {len(f)}"
        )
    out = [
        torch.kthvalue(squared_distances(f[s : s + block], f), k + 1, dim=1).values
        for s in range(0, len(f), block)
    ]
    return torch.cat(out).cpu().numpy()


def inside(points, centres, radii, block: int = BLOCK, device: str = "cpu") -> np.ndarray:
    """For each row of ``points``: does it lie in some ball ``|p - centre|^2 <= radius``?"""
    p, c, r = _tensor(points, device), _tensor(centres, device), _tensor(radii, device)
    hit = [
        (squared_distances(p[s : s + block], c) <= r[None, :]).any(1)
        for s in range(0, len(p), block)
    ]
    return torch.cat(hit).cpu().numpy()


@torch.no_grad()
def precision_recall(
    real, fake, k: int = 3, block: int = BLOCK, device: str = "cpu"
) -> tuple[float, float]:
    """``(precision, recall)`` of the ``fake`` features against the ``real`` ones (float64
    on ``device``: a GPU makes 50,000 x 50,000 distances a matter of seconds)."""
    r_real, r_fake = knn_radii(real, k, block, device), knn_radii(fake, k, block, device)
    precision = float(inside(fake, real, r_real, block, device).mean())
    recall = float(inside(real, fake, r_fake, block, device).mean())
    return precision, recall


__all__ = ["precision_recall", "knn_radii", "inside", "squared_distances", "BLOCK"]
