"""webdataset tar shards: writing, reading, shard-wise rank split, exact resume, errors."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ditkit.cli import main
from ditkit.spec import experiment as E
from ditkit.data.datasets import (
    DataError,
    ShardStream,
    WebDataset,
    digits_arrays,
    expand_braces,
    make_stream,
    write_shards,
)
from ditkit.training.logs import read_scalars
from ditkit.training.loop import train

from .conftest import tiny_experiment, tiny_experiment_data


def _digit(i: int):
    from PIL import Image

    images, labels = digits_arrays()
    return Image.fromarray((images[i] * 255).round().astype(np.uint8), "L"), int(labels[i])


def _digit_shards(folder: Path, n: int, shard_size: int, labelled: bool = True) -> list[Path]:
    samples = (
        (f"d{i:04d}", *(lambda im, y: (im, y if labelled else None))(*_digit(i))) for i in range(n)
    )
    return write_shards(samples, folder, shard_size)


def _ids_shards(folder: Path, sizes: list[int]) -> list[Path]:
    """Shards whose labels are the global sample ids 0..N-1 (4x4 grey images of value id
    with a white left column, so a flip shows)."""
    from PIL import Image

    out, k = [], 0
    for s, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            arr = np.full((4, 4), k, np.uint8)
            arr[:, 0] = 255
            samples.append((f"s{k:04d}", Image.fromarray(arr, "L"), k))
            k += 1
        out += write_shards(samples, folder, size, prefix=f"part{s}")
    return out


def test_expand_braces():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}/{8..10}") == ["x/8", "x/9", "x/10", "y/8", "y/9", "y/10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_write_and_read_shards_with_patterns_labels_and_flips(tmp_path):
    paths = _digit_shards(tmp_path / "wds", 10, 4)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(paths[0]) as tar:  # the webdataset layout
        assert tar.getnames()[:4] == ["d0000.png", "d0000.cls", "d0001.png", "d0001.cls"]
        assert tar.extractfile("d0001.cls").read() == str(_digit(1)[1]).encode()
    for shards in (
        "wds/shard-{000000..000002}.tar",
        "wds/*.tar",
        ["wds/shard-000000.tar", "wds/shard-000001.tar", "wds/shard-000002.tar"],
    ):
        ds = WebDataset(E.WebDatasetData(shards=shards), (8, 8), 1, tmp_path, classes=10)
        assert ds.shards == paths and len(ds) == 10
    images, labels = digits_arrays()
    for shard, j, i in ((0, 0, 0), (1, 2, 6), (2, 1, 9)):
        img, label = ds.read(shard, j)
        expect = np.round(images[i] * 255) / 127.5 - 1  # 8x8 stays 8x8: no resampling
        assert img.shape == (1, 8, 8) and label == labels[i]
        np.testing.assert_allclose(img[0].numpy(), expect, atol=1e-6)
        assert torch.equal(ds.read(shard, j, flip=True)[0], img.flip(-1))
    # 3 channels (grey repeated by PIL's RGB conversion), resized to 16x16
    rgb = WebDataset(E.WebDatasetData(shards="wds/*.tar"), (16, 16), 3, tmp_path)
    img, label = rgb.read(0, 0)
    assert img.shape == (3, 16, 16) and torch.equal(img[0], img[2]) and label == 0


def test_shards_split_across_ranks_and_each_epoch_visits_every_sample(tmp_path):
    ds = WebDataset(
        E.WebDatasetData(shards=[str(p) for p in _ids_shards(tmp_path, [5] * 4)], flip=False),
        (4, 4),
        1,
        classes=20,
    )
    shard_of = {k: k // 5 for k in range(20)}
    r0, r1 = (make_stream(ds, 2, seed=3, rank=r, world=2) for r in (0, 1))
    assert isinstance(r0, ShardStream)
    a = [int(r0.next(2)[1]) for _ in range(10)]
    b = [int(r1.next(2)[1]) for _ in range(10)]
    # each rank reads whole shards, one after the other, and never one the other rank reads
    assert len({shard_of[k] for k in a[:5]}) == 1 and len({shard_of[k] for k in a[5:]}) == 1
    assert not {shard_of[k] for k in a} & {shard_of[k] for k in b}
    assert sorted(a + b) == list(range(20))  # epoch 0 = every sample once
    assert a[:5] != sorted(a[:5]) or b[:5] != sorted(b[:5])  # shuffled inside a shard
    with pytest.raises(DataError, match="4 shard.* cannot be split across 5 processes"):
        make_stream(ds, 5, seed=3, rank=0, world=5)


def test_shard_stream_resumes_exactly_across_shards_and_epochs(tmp_path):
    ds = WebDataset(
        E.WebDatasetData(shards=[str(p) for p in _ids_shards(tmp_path, [3, 7, 2])], flip=True),
        (4, 4),
        1,
        classes=12,
    )
    straight = make_stream(ds, 3, seed=1)
    seq = [straight.next(3) for _ in range(12)]  # 36 samples: 3 epochs of 12
    labels = torch.cat([y for _, y in seq]).tolist()
    assert [sorted(labels[e * 12 : (e + 1) * 12]) for e in range(3)] == [list(range(12))] * 3
    assert labels[:12] != labels[12:24]  # reshuffled every epoch
    part = make_stream(ds, 3, seed=1)
    for _ in range(5):
        part.next(3)
    resumed = make_stream(ds, 3, seed=1)
    resumed.restore(part.state())
    for (x, y), (x2, y2) in zip(seq[5:], (resumed.next(3) for _ in range(7))):
        assert torch.equal(y, y2) and torch.equal(x, x2)  # same samples, same flips
    flipped = [bool(x[i, 0, :, -1].min() == 1) for x, _ in seq for i in range(3)]
    assert 8 < sum(flipped) < 28  # about half of the 36 draws are flipped


def test_training_on_webdataset_resumes_exactly(tmp_path):
    _digit_shards(tmp_path / "wds", 40, 10)
    data = {"kind": "webdataset", "shards": str(tmp_path / "wds/shard-{000000..000003}.tar")}
    exp = tiny_experiment(
        "edm", steps=6, data=data, checkpoint={"every": 3}, training={"batch_size": 8}
    )
    full = train(exp, tmp_path / "full", progress=False)
    train(exp, tmp_path / "part", progress=False, stop_after=4)  # checkpoint at 3
    resumed = train(exp, tmp_path / "part", progress=False, resume=True)
    assert resumed.step == 6
    loss = [r["loss"] for r in read_scalars(tmp_path / "part/scalars.csv")]
    assert loss == [r["loss"] for r in read_scalars(tmp_path / "full/scalars.csv")]
    assert resumed.losses == full.losses[3:] and len(set(loss)) == 6


def _write_exp(folder: Path, **sections) -> Path:
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_experiment_data("edm", 2, **sections)))
    return path


def test_cli_shards_then_train_with_a_relative_pattern(tmp_path, capsys):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (12, 8), 40 if cls == "a" else 200).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    assert (
        main(
            [
                "shards",
                str(tmp_path / "imgs"),
                "--out",
                str(tmp_path / "wds"),
                "--shard-size",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "wds").iterdir()) == [
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    ds = WebDataset(E.WebDatasetData(shards=str(tmp_path / "wds/*.tar")), (8, 8), 1, classes=2)
    assert [int(ds.read(1, j)[1]) for j in range(2)] == [1, 1]
    assert ds.read(1, 0)[0].mean() > 0.5  # class b is the light one
    exp = _write_exp(
        tmp_path, data={"kind": "webdataset", "shards": "wds/*.tar"}, training={"batch_size": 4}
    )
    assert main(["train", str(exp), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    saved = yaml.safe_load((tmp_path / "run/experiment.yaml").read_text())
    assert saved["data"]["shards"] == str(tmp_path / "wds/*.tar")  # absolute in the run
    assert main(["shards", str(tmp_path / "imgs"), "--out", str(tmp_path / "wds")]) == 2
    assert "already holds .tar shards" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", r"data.shards: no such shard: .*nope-00000\d.tar"),
        ("no_match", "data.shards: no shards match .*zzz"),
        (
            "no_labels",
            r"data.shards: sample 'd\d+' in .* has no .cls label but the model is "
            "class-conditional",
        ),
        ("bad_member", "data.shards: cannot read image d0001.png in .*remove or replace"),
        ("not_tar", "data.shards: .* is not a readable tar file"),
    ],
)
def test_bad_shards_exit_2_with_the_field(tmp_path, capsys, case, message):
    wds = tmp_path / "wds"
    shards = str(wds / "shard-{000000..000001}.tar")
    if case == "missing":
        _digit_shards(wds, 4, 4)
        shards = str(wds / "nope-{000000..000001}.tar")
    elif case == "no_match":
        shards = str(tmp_path / "zzz*.tar")
    elif case == "no_labels":
        _digit_shards(wds, 8, 4, labelled=False)
    elif case == "bad_member":
        write_shards(
            [("d0000", _digit(0)[0], 0), ("d0001", b"not a png", 1)], wds, 1, check_images=False
        )
        shards = str(wds / "*.tar")
    else:
        _digit_shards(wds, 4, 4)
        (wds / "shard-000001.tar").write_bytes(b"\0garbage" * 10)
    exp = _write_exp(
        tmp_path,
        data={"kind": "webdataset", "shards": shards, "flip": False},
        training={"batch_size": 2},
    )
    assert main(["train", str(exp), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_label_outside_the_model_classes_is_named(tmp_path):
    from PIL import Image

    write_shards([("k", Image.new("L", (8, 8)), 12)], tmp_path, 1)
    ds = WebDataset(E.WebDatasetData(shards=str(tmp_path / "*.tar")), (8, 8), 1, classes=10)
    with pytest.raises(
        DataError,
        match=r"label 12, outside \[0, 10\) of "
        "model.conditioning.classes.count",
    ):
        ds.read(0, 0)
    # an unconditional model ignores the labels
    assert (
        WebDataset(E.WebDatasetData(shards=str(tmp_path / "*.tar")), (8, 8), 1).read(0, 0)[1] == 0
    )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:  # a sample without an image
        info = tarfile.TarInfo("x.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    (tmp_path / "noimg.tar").write_bytes(buf.getvalue())
    ds = WebDataset(E.WebDatasetData(shards=str(tmp_path / "noimg.tar")), (8, 8), 1)
    with pytest.raises(DataError, match="sample 'x' in .* has no image member"):
        ds.samples(0)


@pytest.mark.slow  # 3 torchrun launches, ~50 s on 2 busy cores
def test_torchrun_two_processes_on_shards_resume_exactly(tmp_path):
    """Each of 2 gloo ranks reads its own shards; a 2-then-2-step run equals a 4-step run."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    _digit_shards(tmp_path / "wds", 32, 8)
    data = tiny_experiment_data(
        "edm",
        steps=4,
        training={"batch_size": 8},
        data={"kind": "webdataset", "shards": "wds/*.tar"},
        preview={"every": 0, "count": 10, "steps": 1},
    )
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out: str, *extra: str) -> None:
        proc = subprocess.run(
            [
                torchrun,
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "ditkit.cli",
                "train",
                "exp.yaml",
                "--out",
                out,
                "--no-progress",
                *extra,
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    run("full")
    run("part", "--steps", "2")
    run("part", "--steps", "4", "--resume")
    summary = json.loads((tmp_path / "part/summary.json").read_text())
    assert summary["world"] == 2 and summary["ranks_identical"]
    full = [r["loss"] for r in read_scalars(tmp_path / "full/scalars.csv")]
    assert [r["loss"] for r in read_scalars(tmp_path / "part/scalars.csv")] == full
    assert len(full) == 4
