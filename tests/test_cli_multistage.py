"""Multi-stage sampling and the extrapolation tooling on any run: the demo's digits model (8x8)
trained for two steps, sampled at 16x16 and 32x32 by ``ditkit sample`` (``--policy``,
``--stages``) and ``ditkit extrapolate`` (``--stages``: multi-stage rows)."""

import json

import pytest
import torch
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


def test_demo_model_at_16_and_32_through_sample_and_extrapolate(
    digits_run, tmp_path, capsys, monkeypatch
):
    """Issue 29 item 5 in the default suite: the demo's digits model (8x8 native), trained for
    two steps, through ``ditkit sample RUN --policy`` and ``ditkit extrapolate RUN --stages`` at
    16x16 and 32x32 (few samples, one or two steps; the classifier replaced by a recording
    scorer, so the test does not train one per resolution)."""
    from tests.evaluate.test_report_stages import Recorder

    for res, policy in (("16", "as_is"), ("32", "as_is:rope=extrapolate")):
        got = sample_json(
            capsys, str(digits_run), "--policy", policy, "--resolution", res, "--count", "2",
            "--out", str(tmp_path / f"{res}.png"),
        )  # fmt: skip
        assert got["resolution"] == [int(res)] * 2 and "stages" not in got["sampling"]
    recorders = []
    monkeypatch.setattr(  # the run's data kind (digits) picks the scorer
        "ditkit.evaluate.report.ClassifierScorer",
        lambda kind, classes: recorders.append(Recorder()) or recorders[-1],
    )
    out = tmp_path / "report"
    code = main(
        ["extrapolate", str(digits_run), "--resolutions", "16,32", "--policies", "as_is",
         "--stages", "8,16:2.0", "8,32:2.0:1", "16", "--steps", "1", "--grid-count", "2",
         "--count", "4", "--no-measure", "--bootstrap", "10", "--curve", "16", "--out", str(out),
         "--json", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["policy"], tuple(r["resolution"]), r["kind"]) for r in rows] == [
        ("as_is", (16, 16), "single-pass"),
        ("as_is", (32, 32), "single-pass"),
        ("as_is + stages 8,16:2", (16, 16), "multi-stage"),
        ("as_is + stages 8,32:2:1", (32, 32), "multi-stage"),
        ("as_is + stages 16", (16, 16), "multi-stage"),
    ]
    for r in rows:
        assert r["error"] is None and (out / r["grid"]).is_file() and r["metrics"]["count"] == 4
    images = recorders[0].images  # scored in row order
    assert torch.equal(images[4], images[0])  # one stage: the single-pass row, bit for bit
    report = (out / "report.md").read_text()
    for res in ("16x16", "32x32"):
        for kind in ("single-pass", "multi-stage"):
            assert f"- **{res}, {kind} only, accuracy:** best `" in report
    # the only multi-stage row at 32x32 is named, with nothing to test it against
    assert (
        "- **32x32, multi-stage only, accuracy:** best `as_is + stages 8,32:2:1` (the only one "
        "scored here)." in report
    )


@pytest.mark.parametrize(
    "stages,message",
    [
        (["8,32:2"], "--stages 8,32:2: ends at 32x32, which is not one of the report's "
         "resolutions (16x16)"),
        (["8:1"], "--stages 8:1: stages[0].sigma: the first stage starts from pure noise"),
        (["8,x"], "--stages: write comma-separated RES[:SIGMA[:STEPS]] items"),
        (["8,16:1e6"], "--stages 8,16:1e6: sigma 1e+06 is above the model's highest noise"),
        (["8,16:2", "8,16:2.0"], "--stages 8,16:2.0: given twice"),
    ],
)  # fmt: skip
def test_extrapolate_bad_stages_exit_2_with_one_line(digits_run, tmp_path, capsys, stages, message):
    code = main(
        ["extrapolate", str(digits_run), "--resolutions", "16", "--stages", *stages,
         "--metrics", "none", "--out", str(tmp_path / "r"), "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # refused before anything is measured


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--stages", "8,16:2", "--stage-policies", "core_patch"],
         "--stage-policies: core_patch is not one of --policies (as_is); add it there or drop it"),
        (["--stage-policies", "as_is"], "--stage-policies: no --stages to run"),
        (["--stages", "8,16:2", "--stage-policies", "core_patch:factor=x"],
         "--stage-policies core_patch:factor=x: core_patch.factor"),
    ],
)  # fmt: skip
def test_extrapolate_bad_stage_policies_exit_2_with_one_line(
    digits_run, tmp_path, capsys, extra, message
):
    code = main(
        ["extrapolate", str(digits_run), "--resolutions", "16", *extra,
         "--metrics", "none", "--out", str(tmp_path / "r"), "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 2  # a policy's problems: a header and one line each
    assert not (tmp_path / "r").exists()


def test_extrapolate_stages_need_a_trained_model(tmp_path, capsys):
    code = main(
        ["extrapolate", DIGITS_SPEC, "--resolutions", "16", "--stages", "8,16:2",
         "--out", str(tmp_path / "r"), "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--stages: multi-stage rows compare samples" in err
