"""FID: the Inception network's parameter names and shapes (those of pytorch-fid's
``pt_inception-2015-12-05`` file), the matrix square root against scipy, FID properties with a
randomly initialised network saved locally, and the CLI (exit 2 without weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from ditkit.cli import main
from ditkit.evaluate.fid import (
    ENV_VAR,
    FIDError,
    fid_folders,
    folder_features,
    frechet_from_features,
    frechet_from_stats,
    gaussian,
    load_inception,
    sqrtm_psd,
    trace_sqrt_product,
)
from ditkit.evaluate.inception import FIDInception

# (name, shape) from torchvision's Inception3 (which pytorch-fid patches and loads the file
# into strictly): BasicConv2d = conv (no bias) + bn; num_classes 1008, aux_logits=False
KNOWN_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch_pool.conv.weight": (64, 288, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_4.conv.weight": (192, 192, 7, 1),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
    "Mixed_7c.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def test_state_dict_names_and_shapes_match_the_fid_weights_file():
    sd = FIDInception().state_dict()
    for name, shape in KNOWN_SHAPES.items():
        assert tuple(sd[name].shape) == shape, name
    assert not any(k.startswith("AuxLogits") for k in sd)  # pytorch-fid: aux_logits=False
    assert not any(k.endswith("conv.bias") for k in sd)  # convolutions have no bias
    bns = [m for m in FIDInception().modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 94 and all(m.eps == 1e-3 for m in bns)
    # torchvision documents 27,161,264 parameters for Inception3 (1000 classes, aux head);
    # minus the aux head (conv0 768*128 + bn 256, conv1 128*768*25 + bn 1536, fc 768*1000 +
    # 1000) plus 8 more classes (8 * 2048 + 8) gives the FID network's count
    expected = 27_161_264 - (98_304 + 256 + 2_457_600 + 1_536 + 769_000) + 16_392
    assert sum(p.numel() for p in FIDInception().parameters()) == expected == 23_850_960


def test_sqrtm_and_trace_match_scipy():
    rng = np.random.default_rng(0)
    for n in (3, 7):
        a, b = rng.normal(size=(n, n)), rng.normal(size=(n, 2 * n))
        s_a, s_b = a @ a.T + 0.1 * np.eye(n), b @ b.T / n
        np.testing.assert_allclose(sqrtm_psd(s_a), scipy.linalg.sqrtm(s_a).real, atol=1e-10)
        assert trace_sqrt_product(s_a, s_b) == pytest.approx(
            np.trace(scipy.linalg.sqrtm(s_a @ s_b)).real, rel=1e-9
        )
        assert trace_sqrt_product(s_a, s_b) == pytest.approx(trace_sqrt_product(s_b, s_a), rel=1e-9)
    # by hand: S_a = diag(1, 4, 9), S_b = diag(4, 1, 1) -> (S_a S_b)^(1/2) = diag(2, 2, 3);
    # FID = |(1, 2, 2)|^2 + (14 + 6) - 2 * 7 = 9 + 20 - 14 = 15
    s_a, s_b = np.diag([1.0, 4, 9]), np.diag([4.0, 1, 1])
    assert trace_sqrt_product(s_a, s_b) == pytest.approx(7.0, rel=1e-12)
    assert frechet_from_stats([0, 0, 0], s_a, [1, 2, 2], s_b) == pytest.approx(15.0, rel=1e-12)
    # singular covariances (fewer samples than dimensions): still real and finite, and 0 for
    # identical Gaussians
    f = rng.normal(size=(4, 10))
    mu, s = gaussian(f)
    assert np.linalg.matrix_rank(s) == 3
    assert frechet_from_stats(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9 * np.trace(s))
    # the fast path for fewer images than features (an SVD of A B^T) equals the covariance one
    g = rng.normal(size=(5, 10)) * 2 + 1
    via_stats = frechet_from_stats(*gaussian(f), *gaussian(g))
    assert frechet_from_features(f, g) == pytest.approx(via_stats, rel=1e-9)
    assert frechet_from_features(g, f) == pytest.approx(via_stats, rel=1e-9)
    s_g = np.cov(g, rowvar=False)
    by_scipy = (
        ((f.mean(0) - g.mean(0)) ** 2).sum()
        + np.trace(s)
        + np.trace(s_g)
        - 2 * np.trace(scipy.linalg.sqrtm(s @ s_g)).real
    )
    assert via_stats == pytest.approx(by_scipy, rel=1e-6)


def _random_weights(path, seed=0):
    """A randomly initialised network saved like the real file (a plain state dict). He-normal
    convolutions keep the activations' scale through the 47 ReLU layers (PyTorch's default
    init would shrink them to ~1e-8), so the features differ between images."""
    torch.manual_seed(seed)
    net = FIDInception()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def _images(folder, seed, smooth):
    """Three 40x40 RGB images: noise, or (``smooth``) blurred brighter noise."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(3):
        x = rng.uniform(size=(40, 40, 3))
        if smooth:
            x = x + np.roll(x, 1, 0) + np.roll(x, 1, 1) + np.roll(x, (1, 1), (0, 1))
            x = 0.3 + 0.7 * x / 4
        Image.fromarray((x * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def fid_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    weights = _random_weights(root / "random_inception.pth")
    a, b = _images(root / "a", 0, False), _images(root / "b", 1, True)
    net = load_inception(weights)
    feats = {
        "a": folder_features(net, a, batch=3, progress=False),
        "b": folder_features(net, b, batch=3, progress=False),
    }
    return root, weights, a, b, feats


def test_random_network_fid_properties(fid_setup):
    _, _, _, _, feats = fid_setup
    fa, fb = feats["a"], feats["b"]
    assert fa.shape == (3, 2048) and np.isfinite(fa).all()
    assert fa.std(0).mean() > 1e-3  # the features do vary between images
    scale = fa.var(0).sum() + fb.var(0).sum()
    assert frechet_from_features(fa, fa) == pytest.approx(0.0, abs=1e-9 * scale)
    d_ab, d_ba = frechet_from_features(fa, fb), frechet_from_features(fb, fa)
    assert d_ab > 0.05 * scale  # different image distributions: far apart
    assert d_ab == pytest.approx(d_ba, rel=1e-12)


def test_weights_load_strictly_and_a_wrong_file_is_named(tmp_path, fid_setup):
    _, weights, *_ = fid_setup
    state = torch.load(weights, weights_only=True)
    no_counters = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(no_counters, tmp_path / "old.pth")  # accepted: eval never reads the counters
    net = load_inception(tmp_path / "old.pth")
    assert torch.equal(
        net.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"]
    )
    broken = dict(state)
    broken.pop("fc.weight")
    broken["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(10, 2048, 1, 1)
    torch.save(broken, tmp_path / "bad.pth")
    with pytest.raises(
        FIDError,
        match=r"not the FID Inception weights .*missing: fc.weight; "
        r"wrong shape: Mixed_7c.branch_pool.conv.weight",
    ):
        load_inception(tmp_path / "bad.pth")


def test_cli_fid_between_folders(fid_setup, capsys):
    _, weights, a, b, feats = fid_setup
    assert (
        main(
            [
                "evaluate",
                "--real",
                str(a),
                "--fake",
                str(b),
                "--fid-weights",
                str(weights),
                "--fid-batch",
                "2",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    expected = frechet_from_features(feats["a"], feats["b"])
    assert report["fid"] == pytest.approx(expected, rel=1e-6)  # batch 2 vs 3: same features
    assert (report["real_count"], report["fake_count"]) == (3, 3)


def test_cli_fid_without_weights_exits_2_and_says_where_to_put_them(
    tmp_path, fid_setup, capsys, monkeypatch
):
    _, _, a, b, _ = fid_setup
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere.pth"))
    assert main(["evaluate", "--real", str(a), "--fake", str(b)]) == 2
    err = capsys.readouterr().err
    assert "pt_inception-2015-12-05-6726825d.pth" in err and "nowhere.pth" in err
    assert "--fid-weights PATH" in err and ENV_VAR in err and "Traceback" not in err
    assert main(["evaluate", "--real", str(a), "--fake", str(tmp_path)]) == 2  # no images
    assert "no images" in capsys.readouterr().err
    assert main(["evaluate", "--real", str(a)]) == 2
    assert "FID needs --fake DIR (generated images) or a checkpoint" in capsys.readouterr().err
    with pytest.raises(FIDError, match="nowhere.pth"):
        fid_folders(a, b)


def test_inception_input_from_samples():
    from ditkit.evaluate.fid import to_inception_input

    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    y = to_inception_input(x)
    assert y.shape == (1, 3, 299, 299)
    assert torch.equal(y[:, 0], y[:, 2])  # grey repeated into RGB
    corners = y[0, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert torch.allclose(corners, torch.tensor([0.0, 128 / 255, 1.0, 1.0]))  # 8-bit, clamped
    with pytest.raises(FIDError, match="grey or RGB"):
        to_inception_input(torch.zeros(1, 4, 2, 2))


def test_cli_fid_of_checkpoint_samples_against_a_folder(tmp_path, fid_setup, capsys):
    from ditkit.training.loop import train

    from .conftest import tiny_experiment

    _, weights, a, _, _ = fid_setup
    train(tiny_experiment(steps=2), tmp_path / "run", progress=False)
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "run"),
                "--real",
                str(a),
                "--count",
                "4",
                "--steps",
                "2",
                "--fid-weights",
                str(weights),
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert (report["real_count"], report["fake_count"]) == (3, 4)
    assert report["fake"].startswith("4 samples of") and report["fake"].endswith("ema.safetensors")
    assert np.isfinite(report["fid"]) and report["fid"] > 0
    assert main(["evaluate", str(tmp_path / "run"), "--real", str(a), "--fake", str(a)]) == 2
    assert "not both" in capsys.readouterr().err
