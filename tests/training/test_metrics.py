"""Improved precision / recall (k-NN radii, as the ADM evaluator) on hand-made points and against
a brute-force reference; ``ditkit evaluate`` on an ``.npz`` against a folder of the same images
with a random Inception network (nothing downloaded)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.distance import cdist

from ditkit.cli import main
from ditkit.errors import UserError
from ditkit.evaluate.npz import write_npz
from ditkit.evaluate.metrics import inside, knn_radii, precision_recall

from .test_fid import _random_weights


def _line(xs):
    """Points on the x axis of R^3 (integer coordinates: every distance is exact)."""
    return np.array([[x, 0.0, 0.0] for x in xs])


def test_precision_recall_by_hand():
    real, fake = _line([0, 2, 4, 6, 8]), _line([1, 2, 20, 21])
    # squared distance to the k-th nearest other point
    np.testing.assert_array_equal(knn_radii(real, 1), [4, 4, 4, 4, 4])
    np.testing.assert_array_equal(knn_radii(real, 2), [16, 4, 4, 4, 16])
    np.testing.assert_array_equal(knn_radii(fake, 1), [1, 1, 1, 1])
    # precision: 1 and 2 lie within a real ball (radius^2 4), 20 and 21 do not -> 2/4;
    # recall: real 0 is on the boundary of fake 1's ball (counts), real 2 is fake 2 -> 2/5
    assert precision_recall(real, fake, k=1) == (0.5, 0.4)
    assert precision_recall(real, real, k=1) == (1.0, 1.0)
    with pytest.raises(UserError, match="needs more than 3 images"):
        knn_radii(real[:3], 3)


def test_precision_recall_equals_brute_force_in_blocks():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 5))
    fake = rng.normal(size=(30, 5)) * 0.6 + 0.8
    d_rr, d_ff, d_fr = (
        cdist(a, b, "sqeuclidean") for a, b in ((real, real), (fake, fake), (fake, real))
    )
    r_real, r_fake = np.sort(d_rr, 1)[:, 3], np.sort(d_ff, 1)[:, 3]
    precision = (d_fr <= r_real[None, :]).any(1).mean()
    recall = (d_fr.T <= r_fake[None, :]).any(1).mean()
    assert 0 < precision < 1 and 0 < recall < 1  # a case that can tell them apart
    for block in (7, 1024):
        np.testing.assert_allclose(knn_radii(real, 3, block), r_real, rtol=1e-10)
        p, r = precision_recall(real, fake, 3, block)
        assert (p, r) == pytest.approx((precision, recall))
    assert inside(fake, real, r_real, 7).mean() == pytest.approx(precision)


def test_evaluate_npz_against_a_folder_of_the_same_images(tmp_path, capsys):
    weights = _random_weights(tmp_path / "inception.pth")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 24, 32, 3), dtype=np.uint8)  # H != W: no transposes
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    write_npz(tmp_path / "s.npz", iter([images[:2], images[2:]]), 5)
    assert (
        main(
            [
                "evaluate",
                "--real",
                str(folder),
                "--fake",
                str(tmp_path / "s.npz"),
                "--fid-weights",
                str(weights),
                "--fid-batch",
                "3",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert (report["real_count"], report["fake_count"], report["k"]) == (5, 5, 3)
    # the same images read from PNGs and from arr_0: the same features
    assert report["fid"] == pytest.approx(0.0, abs=1e-6)
    assert (report["precision"], report["recall"]) == (1.0, 1.0)
    np.savez(tmp_path / "f.npz", np.zeros((2, 4, 4, 3), np.float32))
    assert (
        main(
            [
                "evaluate",
                "--real",
                str(folder),
                "--fake",
                str(tmp_path / "f.npz"),
                "--fid-weights",
                str(weights),
            ]
        )
        == 2
    )
    assert "must be uint8 images" in capsys.readouterr().err
