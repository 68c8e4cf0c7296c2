"""Multi-stage sampling and the extrapolation tooling on any run: the demo's digits model (8x8)
trained for two steps, sampled at 16x16 and 32x32 by ``ditkit sample`` (``--policy``,
``--stages``)."""

import json

import pytest
from PIL import Image

from ditkit.cli import main
from tests.conftest import ROOT

DIGITS_SPEC = str(ROOT / "examples" / "tiny" / "tiny-hdit-digits.yaml")  # random weights


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    import ditkit

    run = tmp_path_factory.mktemp("digits") / "run"
    ditkit.train(
        ditkit.DEMO,
        out=run,
        steps=2,
        progress=False,
        device="cpu",
        overrides=[
            "evaluation.enabled=false",
            "preview.every=0",
            "training.batch_size=8",
            "checkpoint.every=2",
            "preview.count=1",
            "preview.sampling.steps=1",
        ],
    )
    return run


def sample_json(capsys, *args):
    assert main(["sample", *args, "--steps", "2", "--no-progress", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow  # trains the demo model for 2 steps (imports and data: ~10-20 s)
def test_sample_with_stages_and_policy(digits_run, tmp_path, capsys):
    out = tmp_path / "staged.png"
    got = sample_json(
        capsys,
        str(digits_run),
        "--stages",
        "8,16:2.0,32:1.0:1",
        "--policy",
        "as_is",
        "--count",
        "4",
        "--cols",
        "4",
        "--out",
        str(out),
    )
    assert got["resolution"] == [32, 32]  # the last stage's
    assert [s["resolution"] for s in got["sampling"]["stages"]] == [[8, 8], [16, 16], [32, 32]]
    assert got["sampling"]["stages"][2] == {
        "resolution": [32, 32],
        "sigma": 1.0,
        "steps": 1,
        "upsample": "bicubic",
    }
    w, h = Image.open(out).size
    assert h > 32 and w > 4 * 32  # one row of four 32x32 samples (and padding)
    plain = sample_json(
        capsys,
        str(digits_run),
        "--policy",
        "as_is:rope=extrapolate",
        "--resolution",
        "16",
        "--count",
        "2",
        "--out",
        str(tmp_path / "p.png"),
    )
    assert plain["resolution"] == [16, 16] and "stages" not in plain["sampling"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--stages", "8:1.0"], "stages[0].sigma"),
        (["--stages", "8,16"], "stages[1].sigma"),
        (["--stages", "16,8:1"], "stages[1].resolution"),
        (["--stages", "8,sixteen:1"], "RES[:SIGMA[:STEPS]]"),
        (["--stages", "8,16:2", "--resolution", "32"], "the last of --stages samples 16x16"),
        (["--stages", "8,16:1e6"], "highest noise level"),
    ],
)
def test_bad_stages_exit_2(tmp_path, capsys, args, message):
    code = main(
        [
            "sample",
            DIGITS_SPEC,
            "--steps",
            "1",
            "--count",
            "1",
            "--no-progress",
            "--objective",
            "edm",
            "--out",
            str(tmp_path / "x.png"),
            *args,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_stages_on_random_weights(tmp_path, capsys):
    """The same flags on a spec file (random weights): fast, in the default suite."""
    got = sample_json(
        capsys,
        DIGITS_SPEC,
        "--objective",
        "edm",
        "--stages",
        "8,16:2.0:1:nearest",
        "--count",
        "2",
        "--out",
        str(tmp_path / "g.png"),
    )
    assert got["resolution"] == [16, 16]
    assert got["sampling"]["stages"][1]["upsample"] == "nearest"
