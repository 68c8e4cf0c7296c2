"""``ditkit encode`` with a tiny local AutoencoderKL, the ``latents`` data kind, training a
latent-space spec on it and ``ditkit sample --vae``."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ditkit.cli import main
from ditkit.spec import experiment as E
from ditkit.data.datasets import DataError, LatentShards, write_shards

from ..tiny_vae import save_tiny_vae
from .conftest import tiny_experiment_data, tiny_model

ROOT = Path(__file__).resolve().parents[2]
SCALE = 0.5  # the tiny VAE's scaling_factor (not diffusers' default, so reading it is tested)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "vae", scaling_factor=SCALE)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A class-folder of six 16x16 RGB images and the same images as (6, 3, 16, 16) in [-1, 1],
    in the folder's order (class a, then b; sorted names)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs") / "imgs"
    rng = np.random.default_rng(0)
    arrays = []
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
            arrays.append(arr)
    x = torch.from_numpy(np.stack(arrays).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    return root, x.contiguous()


def _diffusers_vae(path: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(path), local_files_only=True).eval()


def _encode(*args) -> int:
    return main(["encode", *map(str, args), "--no-progress"])


def _read_safetensors(folder: Path):
    from safetensors import safe_open

    z, y, meta = [], [], None
    for path in sorted(folder.glob("latents-*.safetensors")):
        with safe_open(str(path), "pt") as f:
            z.append(f.get_tensor("latents"))
            y.append(f.get_tensor("labels"))
            meta = f.metadata()
    return torch.cat(z), torch.cat(y), meta


def test_encode_writes_the_scaled_posterior_mean(tmp_path, vae_dir, images):
    root, x = images
    out = tmp_path / "lat"
    assert (
        _encode(
            root,
            "--vae",
            vae_dir,
            "--out",
            out,
            "--resolution",
            "16",
            "--batch",
            "4",
            "--shard-size",
            "4",
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "encode.json",
        "latents-000000.safetensors",
        "latents-000001.safetensors",
    ]
    z, y, meta = _read_safetensors(out)
    with torch.no_grad():
        expect = _diffusers_vae(vae_dir).encode(x).latent_dist.mean * SCALE
    assert z.shape == (6, 4, 8, 8) and z.dtype == torch.float32
    torch.testing.assert_close(z, expect, rtol=0, atol=1e-5)
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert float(meta["ditkit.scale_factor"]) == SCALE and json.loads(meta["ditkit.classes"]) == [
        "a",
        "b",
    ]
    summary = json.loads((out / "encode.json").read_text())
    assert summary["count"] == 6 and summary["latent_shape"] == [4, 8, 8]
    # a second encode into the same folder is refused (shards are never mixed)
    assert _encode(root, "--vae", vae_dir, "--out", out, "--resolution", "16") == 2


def test_encode_sample_mode_npz_and_webdataset_source(tmp_path, vae_dir, images):
    root, x = images
    out = tmp_path / "lat"
    assert (
        _encode(
            root,
            "--vae",
            vae_dir,
            "--out",
            out,
            "--resolution",
            "16",
            "--batch",
            "6",
            "--mode",
            "sample",
            "--seed",
            "7",
            "--format",
            "npz",
        )
        == 0
    )
    with np.load(out / "latents-000000.npz") as f:
        z, y = torch.from_numpy(f["latents"]), f["labels"].tolist()
    with torch.no_grad():
        dist = _diffusers_vae(vae_dir).encode(x).latent_dist
        expect = dist.sample(generator=torch.Generator().manual_seed(7)) * SCALE
    torch.testing.assert_close(z, expect, rtol=0, atol=1e-5)
    assert not torch.allclose(z, dist.mean * SCALE, atol=1e-3) and y == [0, 0, 0, 1, 1, 1]
    # the latents data kind reads npz (times its own scale) like safetensors
    ds = LatentShards(
        E.LatentsData(path=str(out), scale=2.0),
        E.experiment_from_data(_latent_exp_data(out)).model_spec,
    )
    assert len(ds) == 6 and torch.allclose(ds[4][0], 2 * z[4]) and ds[4][1] == 1
    # webdataset shards of the same images encode to the same latents as the folder
    files = sorted(root.rglob("*.png"))
    write_shards([(f"k{i}", p, i // 3) for i, p in enumerate(files)], tmp_path / "wds", 4)
    out2 = tmp_path / "lat2"
    assert (
        _encode(
            tmp_path / "wds/shard-{000000..000001}.tar",
            "--vae",
            vae_dir,
            "--out",
            out2,
            "--resolution",
            "16",
        )
        == 0
    )
    z2, y2, _ = _read_safetensors(out2)
    torch.testing.assert_close(z2, dist.mean * SCALE, rtol=0, atol=1e-5)
    assert y2.tolist() == [0, 0, 0, 1, 1, 1]


def test_digits_source_gives_labelled_rgb_images():
    from ditkit.data.encode import image_source

    items, count, classes = image_source("digits", (16, 16), 3)
    img, label = next(items)
    assert count == 1797 and classes == [str(i) for i in range(10)]
    assert img.shape == (3, 16, 16) and label == 0 and torch.equal(img[0], img[2])


def _latent_exp_data(path: Path, steps: int = 3, **model_input) -> dict:
    model = tiny_model()
    model["input"] = {
        "channels": 4,
        "space": "latent",
        "resolution": [8, 8],
        "latent_factor": 2,
        **model_input,
    }
    model["conditioning"]["classes"] = {"count": 2}
    data = tiny_experiment_data(
        "edm",
        steps,
        data={"kind": "latents", "path": str(path)},
        training={"batch_size": 4},
        preview={"every": 0, "count": 2, "steps": 2},
    )
    return {**data, "model": model}


@pytest.fixture(scope="module")
def latents(tmp_path_factory, vae_dir, images) -> Path:
    out = tmp_path_factory.mktemp("latents") / "lat"
    assert (
        _encode(
            images[0], "--vae", vae_dir, "--out", out, "--resolution", "16", "--shard-size", "4"
        )
        == 0
    )
    return out


def test_train_latent_spec_then_sample_with_vae(tmp_path, vae_dir, latents, capsys):
    from PIL import Image

    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(_latent_exp_data(latents)))
    run = tmp_path / "run"
    assert main(["train", str(exp), "--out", str(run), "--no-progress"]) == 0
    ckpt = run / "checkpoints/step-000003/ema.safetensors"
    assert ckpt.is_file()
    scalars = (run / "scalars.csv").read_text().splitlines()
    assert len(scalars) == 4  # header + 3 steps
    args = ["sample", str(ckpt), "--steps", "2", "--classes", "0,1", "--seed", "3", "--no-progress"]
    # without a decoder: the latents; with --vae: images decoded from those same latents
    assert main(args + ["--out", str(tmp_path / "raw.png")]) == 0
    raw = torch.load(tmp_path / "raw.latents.pt")
    assert raw.shape == (2, 4, 8, 8)
    assert (
        main(
            args
            + [
                "--vae",
                str(vae_dir),
                "--out",
                str(tmp_path / "grid.png"),
                "--individual",
                str(tmp_path / "each"),
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "grid.png").size == (2 * 65 + 1, 66)  # 16x16 upscaled 4x
    with torch.no_grad():
        decoded = _diffusers_vae(vae_dir).decode(raw / SCALE).sample.clamp(-1, 1)
    for i in range(2):
        png = np.asarray(Image.open(tmp_path / "each" / f"{i:06d}.png")).astype(np.float32)
        expect = (decoded[i].permute(1, 2, 0).numpy() + 1) * 127.5
        assert png.shape == (16, 16, 3) and np.abs(png - expect).max() <= 1.0
    capsys.readouterr()


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"model_input": {"channels": 3}},
            r"model.input.channels is 3 but the latents in .* have "
            r"4 channels; set input.channels: 4",
        ),
        (
            {"model_input": {"resolution": [16, 16]}},
            r"model.input.resolution is \[16, 16\] but the "
            r"latents in .* are 8x8",
        ),
        (
            {"model_input": {"space": "pixel"}},
            r"model.input.space: latents data trains a "
            r"latent-space model",
        ),
        (
            {"classes": 1},
            r"data.path: labels in .* span \[0, 1\] but "
            r"model.conditioning.classes.count is 1",
        ),
        ({"path": "nope/*.safetensors"}, r"data.path: no latent shards match .*nope"),
        ({"path": "empty"}, r"data.path: no latent shards \(.safetensors, .npz\) in .*empty"),
    ],
)
def test_latent_data_errors_exit_2_naming_the_field(tmp_path, latents, capsys, change, message):
    path = latents
    if "path" in change:
        (tmp_path / "empty").mkdir()
        path = tmp_path / change["path"]
    data = _latent_exp_data(path, **change.get("model_input", {}))
    if "classes" in change:
        data["model"]["conditioning"]["classes"] = {"count": change["classes"]}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    assert (
        main(["train", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "run"), "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_unlabelled_latents_for_a_class_conditional_model(tmp_path, vae_dir, images):
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(flat / f"{i}.png")
    out = tmp_path / "lat"
    assert _encode(flat, "--vae", vae_dir, "--out", out, "--resolution", "16") == 0
    spec = E.experiment_from_data(_latent_exp_data(out)).model_spec
    with pytest.raises(DataError, match="has no `labels` but the model is class-conditional"):
        LatentShards(E.LatentsData(path=str(out)), spec)
    spec = spec.model_copy(
        update={"conditioning": spec.conditioning.model_copy(update={"classes": None})}
    )
    assert len(LatentShards(E.LatentsData(path=str(out)), spec)) == 2  # unconditional: fine


def test_encode_and_sample_errors_exit_2(tmp_path, vae_dir, images, capsys, monkeypatch):
    root, _ = images
    (tmp_path / "empty").mkdir()
    cases = [
        (["--vae", tmp_path / "empty"], "--vae .*empty: no config.json"),
        (["--vae", tmp_path / "missing"], "--vae .*missing: no such folder"),
        (
            ["--vae", vae_dir, "--resolution", "15"],
            "--resolution 15x15: must be a multiple of the autoencoder's downsampling factor 2",
        ),
    ]
    for extra, message in cases:
        args = [root, "--out", tmp_path / "o", "--resolution", "16", *extra]
        assert _encode(*args) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
    assert (
        _encode(tmp_path / "nope", "--vae", vae_dir, "--out", tmp_path / "o", "--resolution", "16")
        == 2
    )
    assert "no such folder or shard file" in capsys.readouterr().err
    (vae_dir.parent / "noweights").mkdir(exist_ok=True)
    (vae_dir.parent / "noweights/config.json").write_text((vae_dir / "config.json").read_text())
    assert (
        _encode(
            root,
            "--vae",
            vae_dir.parent / "noweights",
            "--out",
            tmp_path / "o",
            "--resolution",
            "16",
        )
        == 2
    )
    assert "cannot load the AutoencoderKL" in capsys.readouterr().err
    # a pixel-space model has nothing to decode
    assert (
        main(
            [
                "sample",
                str(ROOT / "examples/tiny/tiny-hdit-pixel.yaml"),
                "--steps",
                "1",
                "--count",
                "1",
                "--vae",
                str(vae_dir),
                "--out",
                str(tmp_path / "g.png"),
                "--no-progress",
                "--objective",
                "edm",
            ]
        )
        == 2
    )
    assert "pixel-space model" in capsys.readouterr().err
    # diffusers missing: the message says how to install it
    monkeypatch.setitem(sys.modules, "diffusers", None)
    assert _encode(root, "--vae", vae_dir, "--out", tmp_path / "o", "--resolution", "16") == 2
    assert "pip install 'ditkit[vae]'" in capsys.readouterr().err
