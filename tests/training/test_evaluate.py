"""The digits evaluation: real digits score like real digits, noise does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditkit.data.datasets import digits_tensor
from ditkit.evaluate.classifier import DigitsClassifier, evaluate_samples, frechet_distance


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


def test_shapes_classifier_scores_real_shapes_like_real_and_noise_badly():
    from ditkit.data.datasets import shape_image
    from ditkit.evaluate.classifier import ResolutionMetrics, ShapesClassifier

    metrics = ResolutionMetrics("shapes", count=2000)
    res = (16, 16)
    # real shapes from another seed than the classifier's
    real = torch.from_numpy(np.stack([shape_image(i, i % 10, res, 77) for i in range(100)]))
    good = metrics(real, torch.arange(100) % 10)
    clf = metrics._classifiers[res]
    assert isinstance(clf, ShapesClassifier) and clf.resolution == res
    assert clf.x_fit.shape == (1000, 16 * 16)  # grey, half of the real images
    assert good["real_accuracy"] > 0.6 and good["accuracy"] > 0.5 and good["count"] == 100
    assert good["frechet"] < 2 * good["frechet_real"] + 1
    noise = metrics(torch.rand(100, 3, *res) * 2 - 1, torch.arange(100) % 10)
    assert noise["accuracy"] < 0.25
    assert noise["frechet"] > 5 * good["frechet"]
    assert list(metrics._classifiers) == [res]  # one classifier per resolution, reused
