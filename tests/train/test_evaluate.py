"""The digits evaluation: real digits score like real digits, noise does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditkit.train.data import digits_tensor
from ditkit.train.evaluate import DigitsClassifier, evaluate_samples, frechet_distance


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2 + np.array([1.0, 0, 0])
    # |mu|^2 + tr(I + 4I - 2 * 2I) = 1 + 3
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_real_digits_pass_and_noise_fails():
    clf = DigitsClassifier((16, 16))
    assert clf.real_accuracy > 0.93
    x, y = digits_tensor((16, 16))
    held = torch.from_numpy(clf.x_held).float().view(-1, 1, 16, 16)
    real = evaluate_samples(clf, held, torch.from_numpy(clf.y_held))
    assert real.accuracy == pytest.approx(clf.real_accuracy)
    assert real.frechet == pytest.approx(real.frechet_real, rel=1e-6)
    noise = torch.rand(500, 1, 16, 16) * 2 - 1
    bad = evaluate_samples(clf, noise, torch.arange(500) % 10)
    assert bad.accuracy < 0.3 and bad.frechet > 5 * real.frechet_real
