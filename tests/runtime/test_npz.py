"""``ditkit sample --npz``: the ADM evaluator's file format, chunk seeds (the first chunks equal
``ditkit sample``'s own PNGs), resuming an interrupted run, refusing other settings, latent
decoding, and a 2-process torchrun run equal to a 1-process run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit import spec as S
from ditkit.builder import build
from ditkit.cli import main
from ditkit.runtime.checkpoint import model_hash, save_checkpoint
from ditkit.runtime.denoiser import Denoiser
from ditkit.evaluate.npz import (
    NpzError,
    iter_npz_images,
    npz_settings,
    npz_shape,
    parts_folder,
    read_npz,
    sample_npz,
    write_npz,
)
from tests.conftest import EXAMPLES, ROOT
from tests.training.conftest import tiny_model
from tests.perturb import perturb

STEPS = ["--steps", "2", "--sampler", "euler", "--no-progress"]


def _perturbed(spec, seed=0):
    torch.manual_seed(seed)
    return perturb(build(spec).eval(), 0.1, skip=("position",))


@pytest.fixture(scope="module")
def grey_ckpt(tmp_path_factory):
    """8x8 grey, 10 classes, EDM: a checkpoint whose samples vary with seed and label."""
    spec = S.validate(tiny_model())
    path = tmp_path_factory.mktemp("npz") / "grey.safetensors"
    save_checkpoint(path, _perturbed(spec).state_dict(), spec, objective=S.EDMObjective())
    return path


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_npz_format_and_chunks_equal_the_png_sampler(grey_ckpt, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert (
        main(
            [
                "sample",
                str(grey_ckpt),
                "--count",
                "5",
                "--batch",
                "2",
                "--classes",
                "random",
                "--npz",
                str(out),
                *STEPS,
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    assert not parts_folder(out).exists()  # merged, parts removed
    with zipfile.ZipFile(out) as zf:  # np.savez's layout: uncompressed .npy members
        assert sorted(zf.namelist()) == ["arr_0.npy", "arr_1.npy", "ditkit_settings.npy"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    with np.load(out, allow_pickle=False) as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 3)  # NHWC, grey -> RGB
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()
    assert labels.dtype == np.int64 and labels.shape == (5,)
    assert ((labels >= 0) & (labels < 10)).all()
    assert len({images[i].tobytes() for i in range(5)}) == 5  # every sample differs
    settings = npz_settings(out)  # the file says how it was made
    assert (
        settings["num"],
        settings["batch"],
        settings["steps"],
        settings["sampler"],
        settings["seed"],
    ) == (5, 2, 2, "euler", 0)
    assert settings["source"] == model_hash(grey_ckpt)
    # chunk k is `ditkit sample` with seed k and that chunk's labels: compare with its PNGs
    for k, (start, n) in enumerate([(0, 2), (2, 2), (4, 1)]):
        folder = tmp_path / f"png{k}"
        classes = ",".join(str(int(v)) for v in labels[start : start + n])
        assert (
            main(
                [
                    "sample",
                    str(grey_ckpt),
                    "--count",
                    str(n),
                    "--classes",
                    classes,
                    "--seed",
                    str(k),
                    "--out",
                    str(tmp_path / "g.png"),
                    "--individual",
                    str(folder),
                    *STEPS,
                ]
            )
            == 0
        )
        pngs = np.stack(
            [np.asarray(Image.open(folder / f"{i:06d}.png").convert("RGB")) for i in range(n)]
        )
        np.testing.assert_array_equal(images[start : start + n], pngs)


def test_unconditional_npz_has_no_labels_and_streams(grey_ckpt, tmp_path):
    out = tmp_path / "u.npz"
    assert (
        main(["sample", str(grey_ckpt), "--count", "3", "--batch", "3", "--npz", str(out), *STEPS])
        == 0
    )
    images, labels = read_npz(out)
    assert labels is None and images.shape == (3, 8, 8, 3)
    assert npz_shape(out) == (3, 8, 8, 3)
    chunks = list(iter_npz_images(out, batch=2))
    assert [len(c) for c in chunks] == [2, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), images)


def _den(path):
    from ditkit.runtime.checkpoint import load_model

    model, ckpt = load_model(path)
    return Denoiser(model, ckpt.objective), ckpt.spec


def test_interrupted_run_resumes_to_the_same_file(grey_ckpt, tmp_path):
    den, spec = _den(grey_ckpt)
    labels = torch.arange(7) % 10
    args = dict(
        num=7,
        shape=(1, 8, 8),
        steps=2,
        sampler="euler",
        batch=2,
        class_labels=labels,
        seed=3,
        progress=False,
    )
    sample_npz(den, tmp_path / "whole.npz", **args)
    calls = []

    def crash_on_third(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if stopped during chunk 2
        return x

    out = tmp_path / "resumed.npz"
    with pytest.raises(KeyboardInterrupt):
        sample_npz(den, out, decode=crash_on_third, **args)
    parts = parts_folder(out)
    assert sorted(p.name for p in parts.glob("part-*")) == ["part-000000.npz", "part-000001.npz"]
    assert not out.exists() and not list(parts.glob(".*tmp"))  # nothing half-written
    # other settings are refused, naming what changed
    with pytest.raises(NpzError, match=r"other settings \(seed: 3 -> 4\)"):
        sample_npz(den, out, **{**args, "seed": 4})
    # a part that does not hold its chunk's labels is drawn again, not merged
    part1 = parts / "part-000001.npz"
    images1, _ = read_npz(part1)
    with open(part1, "wb") as f:
        np.savez(f, arr_0=images1, arr_1=np.array([9, 9]))
    result = sample_npz(den, out, **args)
    assert (result.reused, result.drawn) == (2, 5)
    whole, resumed = read_npz(tmp_path / "whole.npz"), read_npz(out)
    np.testing.assert_array_equal(whole[0], resumed[0])
    np.testing.assert_array_equal(resumed[1], labels.numpy())
    with pytest.raises(NpzError, match="already exists"):
        sample_npz(den, out, **args)


def test_every_sampling_flag_reaches_the_npz_and_its_resume_settings(grey_ckpt, tmp_path):
    """Issue 26: `--npz` once ignored --sigma-min/--sigma-max. Both paths now take one
    Sampling, so the sigma flags change the file, chunk 0 equals the grid path's samples with
    the same flags, and a resume with other sigma flags is refused."""
    base = [
        "sample",
        str(grey_ckpt),
        "--count",
        "2",
        "--batch",
        "1",
        "--classes",
        "3",
        "--seed",
        "5",
        *STEPS,
    ]
    sigmas = ["--sigma-min", "0.5", "--sigma-max", "5"]
    plain, narrow = tmp_path / "plain.npz", tmp_path / "narrow.npz"
    assert main(base + ["--npz", str(plain)]) == 0
    assert main(base + sigmas + ["--npz", str(narrow)]) == 0
    a, b = read_npz(plain)[0], read_npz(narrow)[0]
    assert not np.array_equal(a, b)  # the flags changed the samples
    settings = npz_settings(narrow)
    assert (settings["sigma_min"], settings["sigma_max"]) == (0.5, 5.0)
    assert npz_settings(plain)["sigma_min"] is None
    # chunk 0 (seed 5) is the grid path's sample with the same flags
    folder = tmp_path / "png"
    assert (
        main(
            [
                "sample",
                str(grey_ckpt),
                "--count",
                "1",
                "--classes",
                "3",
                "--seed",
                "5",
                *STEPS,
                *sigmas,
                "--out",
                str(tmp_path / "g.png"),
                "--individual",
                str(folder),
            ]
        )
        == 0
    )
    png = np.asarray(Image.open(folder / "000000.png").convert("RGB"))
    np.testing.assert_array_equal(b[0], png)
    # an interrupted run records the sigmas; a resume with others is refused, naming them
    den, _ = _den(grey_ckpt)
    args = dict(
        num=4,
        shape=(1, 8, 8),
        steps=2,
        sampler="euler",
        batch=2,
        progress=False,
        sigma_min=0.5,
        sigma_max=5.0,
    )

    calls = []

    def stop_on_second(x):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return x

    out = tmp_path / "resumed.npz"
    with pytest.raises(KeyboardInterrupt):
        sample_npz(den, out, decode=stop_on_second, **args)
    with pytest.raises(NpzError, match=r"other settings \(sigma_min: 0\.5 -> 0\.2\)"):
        sample_npz(den, out, **{**args, "sigma_min": 0.2})
    with pytest.raises(NpzError, match=r"sigma_max: 5\.0 -> None"):
        sample_npz(den, out, **{**args, "sigma_max": None})
    assert sample_npz(den, out, **args).reused == 2  # the same sigmas continue it


def test_write_npz_streams_and_reader_refuses_non_images(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, (n, 4, 6, 3), dtype=np.uint8) for n in (3, 1, 2)]
    shape = write_npz(tmp_path / "a.npz", iter(chunks), 6, labels=np.arange(6))
    assert shape == (6, 4, 6, 3)
    images, labels = read_npz(tmp_path / "a.npz")
    np.testing.assert_array_equal(images, np.concatenate(chunks))
    np.testing.assert_array_equal(labels, np.arange(6))
    with pytest.raises(NpzError, match="hold 6 images, not 7"):
        write_npz(tmp_path / "b.npz", iter(chunks), 7)
    assert not (tmp_path / "b.npz").exists()
    np.savez(tmp_path / "float.npz", np.zeros((2, 4, 4, 3), np.float32))
    np.savez(tmp_path / "obj.npz", np.array([{"x": 1}, None], dtype=object))
    for name in ("float.npz", "obj.npz"):
        with pytest.raises(NpzError, match="must be uint8 images"):
            next(iter_npz_images(tmp_path / name))
    np.savez(tmp_path / "other.npz", images=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(NpzError, match="no arr_0"):
        npz_shape(tmp_path / "other.npz")


def test_latent_model_is_decoded_through_the_vae(tmp_path, capsys):
    from tests.tiny_vae import save_tiny_vae

    vae = save_tiny_vae(tmp_path / "vae")
    spec = S.load(EXAMPLES / "tiny" / "tiny-dit.yaml")  # 4 latent channels, 8x8
    ckpt = tmp_path / "dit.safetensors"
    save_checkpoint(
        ckpt,
        _perturbed(spec).state_dict(),
        spec,
        objective=S.DDPMObjective(learned_sigma=spec.head.learned_sigma),
    )
    out = tmp_path / "d.npz"
    assert main(["sample", str(ckpt), "--count", "2", "--npz", str(out), *STEPS]) == 2
    assert "one decoder" in capsys.readouterr().err
    assert (
        main(["sample", str(ckpt), "--count", "2", "--npz", str(out), "--vae", str(vae), *STEPS])
        == 0
    )
    images, _ = read_npz(out)
    assert images.shape == (2, 16, 16, 3) and images.std() > 0  # factor-2 autoencoder


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(grey_ckpt, tmp_path):
    common = [
        "sample",
        str(grey_ckpt),
        "--count",
        "7",
        "--batch",
        "2",
        "--classes",
        "random",
        "--seed",
        "5",
        *STEPS,
    ]
    assert main([*common, "--npz", str(tmp_path / "one.npz")]) == 0
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    # `--`: torchrun would read `--num` as an abbreviation of its own `--numa-binding`
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "--",
            "ditkit.cli",
            *common,
            "--npz",
            str(tmp_path / "two.npz"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote") == 1 and "2 process(es)" in proc.stdout  # rank 0 only
    one, two = read_npz(tmp_path / "one.npz"), read_npz(tmp_path / "two.npz")
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    assert not parts_folder(tmp_path / "two.npz").exists()


def test_non_finite_samples_stop_before_their_part_is_written(grey_ckpt, tmp_path):
    den, _ = _den(grey_ckpt)
    calls = []

    def nan_in_second_chunk(x):
        calls.append(1)
        return x * float("nan") if len(calls) == 2 else x

    out = tmp_path / "nan.npz"
    with pytest.raises(NpzError, match=r"chunk 1 \(samples 2\.\.3, seed 1\) holds non-finite"):
        sample_npz(
            den,
            out,
            num=4,
            shape=(1, 8, 8),
            steps=2,
            sampler="euler",
            batch=2,
            decode=nan_in_second_chunk,
            progress=False,
        )
    assert sorted(p.name for p in parts_folder(out).glob("part-*")) == ["part-000000.npz"]
