"""Datasets and the deterministic, resumable, per-rank batch stream."""

from __future__ import annotations

import pytest
import torch

from ditkit.spec import experiment as E
from ditkit.data.datasets import (
    BatchStream,
    DataError,
    ImageFolder,
    Position,
    ShapesDataset,
    TensorImages,
    digits_tensor,
)


def test_digits_resized_to_the_model_resolution():
    x, y = digits_tensor((16, 16))
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1
    assert sorted(set(y.tolist())) == list(range(10))
    x3, _ = digits_tensor((8, 8), channels=3)
    assert x3.shape == (1797, 3, 8, 8) and torch.equal(x3[:, 0], x3[:, 2])


def test_shapes_are_deterministic_class_conditional_at_any_resolution():
    ds = ShapesDataset(E.ShapesData(count=20, classes=10, seed=3), (24, 40))
    a, la = ds[7]
    b, lb = ds[7]
    assert a.shape == (3, 24, 40) and torch.equal(a, b) and la == lb == 7
    assert not torch.equal(ds[7][0], ds[17][0])  # same class, different draw
    assert not torch.equal(ShapesDataset(E.ShapesData(count=20, seed=4), (24, 40))[7][0], a)
    # classes differ in their foreground pattern: masks of class 0 (disc) vs 1 (square) differ
    big = ShapesDataset(E.ShapesData(count=20), (64, 64))
    masks = [(big[i][0].mean(0) > big[i][0].mean()).float().mean().item() for i in range(10)]
    assert len(set(round(m, 3) for m in masks)) > 5


def test_image_folder_reads_classes_resizes_and_reports_bad_files(tmp_path):
    from PIL import Image

    for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 20), colour).save(tmp_path / cls / f"{i}.png")
    ds = ImageFolder(E.ImageFolderData(path=str(tmp_path), flip=True), (16, 16), 3)
    assert len(ds) == 4 and ds.num_classes == 2 and ds.classes == ["cat", "dog"]
    img, label = ds[3]
    assert img.shape == (3, 16, 16) and label == 1
    assert img[2].mean() > 0.9 and img[0].mean() < -0.9  # blue dog, scaled to [-1, 1]
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    ds = ImageFolder(E.ImageFolderData(path=str(tmp_path)), (16, 16), 3)
    bad = [i for i, (p, _) in enumerate(ds.files) if p.name == "broken.png"][0]
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        ds[bad]
    with pytest.raises(DataError, match="no such folder"):
        ImageFolder(E.ImageFolderData(path=str(tmp_path / "nope")), (16, 16), 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolder(E.ImageFolderData(path=str(tmp_path / "empty")), (16, 16), 3)


def test_batch_stream_resumes_and_shards_ranks():
    ds = TensorImages(torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10), 10)
    full = BatchStream(ds, 4, seed=1)
    seq = [full.next_indices(4) for _ in range(6)]
    flat = [i for b in seq for i in b]
    assert sorted(flat[:10]) == list(range(10))  # an epoch visits every sample once
    assert flat[:10] != list(range(10)) and flat[10:20] != flat[:10]
    part = BatchStream(ds, 4, seed=1)
    for _ in range(3):
        part.next_indices(4)
    resumed = BatchStream(ds, 4, seed=1, position=Position(**vars(part.position)))
    assert [resumed.next_indices(4) for _ in range(3)] == seq[3:]
    r0, r1 = BatchStream(ds, 4, 1, rank=0, world=2), BatchStream(ds, 4, 1, rank=1, world=2)
    x0, _ = r0.next(4)
    x1, _ = r1.next(4)
    assert sorted(x0.flatten().tolist() + x1.flatten().tolist()) == sorted(float(i) for i in seq[0])
    with pytest.raises(ValueError, match="not divisible"):
        BatchStream(ds, 5, 1, rank=0, world=2)
