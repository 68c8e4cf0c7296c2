"""The experiment's ``evaluation:`` block run by ``train``: every N steps and at the end, logged
as ``eval/...`` scalars and ``eval.json``, equal to ``ditkit evaluate`` of the final EMA
checkpoint, kept across a resume, without changing the training; FID / precision / recall
against a reference ``.npz`` with a random Inception network; the spec's checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ditkit.cli import main
from ditkit.errors import UserError
from ditkit.evaluate.npz import to_uint8, write_npz
from ditkit.spec import SpecError
from ditkit.spec.experiment import absolute_evaluation_paths, experiment_from_data
from ditkit.data.datasets import digits_tensor
from ditkit.training.logs import read_scalars
from ditkit.training.loop import train

from .conftest import tiny_experiment
from .test_fid import _random_weights
from .test_latents import images, latents, vae_dir  # noqa: F401  (fixtures)

DIGITS_EVAL = {"enabled": True, "every": 2, "count": 10, "steps": 2}


def _cli_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_digits_evaluation_every_n_steps_resumes_and_leaves_training_alone(tmp_path, capsys):
    ckpt = {"every": 2, "keep_last": 3}
    plain = train(tiny_experiment(steps=4, checkpoint=ckpt), tmp_path / "plain", progress=False)
    exp = tiny_experiment(steps=4, checkpoint=ckpt, evaluation=DIGITS_EVAL)
    run = tmp_path / "run"
    first = train(exp, run, progress=False, stop_after=2)
    assert first.evaluation["step"] == 2
    assert [h["step"] for h in json.loads((run / "eval.json").read_text())["history"]] == [2]
    result = train(exp, run, progress=False, resume=True)
    # evaluating draws from its own generators: the losses are those of the run without it
    assert first.losses + result.losses == plain.losses
    report = json.loads((run / "eval.json").read_text())
    assert [h["step"] for h in report["history"]] == [2, 4]  # step 2 kept across the resume
    assert report["step"] == 4 and report["settings"]["count"] == 10
    final = report["metrics"]
    assert final == result.evaluation and 0 <= final["accuracy"] <= 1
    rows = read_scalars(run / "scalars.csv")
    evals = {int(r["step"]): r for r in rows if "eval/accuracy" in r}
    assert sorted(evals) == [2, 4] and all("loss" not in r for r in evals.values())
    assert evals[4]["eval/frechet"] == pytest.approx(final["frechet"], rel=1e-6)
    assert (run / "samples.png").is_file() and (run / "loss.png").is_file()
    # the same numbers as `ditkit evaluate` of the final EMA checkpoint
    cli = _cli_json(capsys, "evaluate", str(run), "--count", "10", "--steps", "2")
    assert cli["accuracy"] == final["accuracy"]
    assert cli["frechet"] == pytest.approx(final["frechet"], rel=1e-4)
    assert cli["per_class_accuracy"] == final["per_class_accuracy"]


def test_reference_fid_precision_recall_equal_ditkit_evaluate(tmp_path, capsys):
    weights = _random_weights(tmp_path / "inception.pth")
    digits, _ = digits_tensor((8, 8))
    ref = tmp_path / "ref.npz"
    write_npz(ref, iter([to_uint8(digits[:5])]), 5)
    exp = tiny_experiment(
        steps=2,
        evaluation={
            "enabled": True,
            "count": 4,
            "steps": 2,
            "reference": str(ref),
            "inception": str(weights),
            "batch": 3,
        },
    )
    result = train(exp, tmp_path / "run", progress=False)
    m = result.evaluation
    assert m["reference_count"] == 5 and m["k"] == 3 and m["fid"] > 0
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert "accuracy" in m  # digits data: the classifier metrics run too
    row = [r for r in read_scalars(tmp_path / "run" / "scalars.csv") if "eval/fid" in r]
    assert [r["step"] for r in row] == [2] and row[0]["eval/fid"] == pytest.approx(m["fid"])
    cli = _cli_json(
        capsys,
        "evaluate",
        str(tmp_path / "run"),
        "--real",
        str(ref),
        "--count",
        "4",
        "--steps",
        "2",
        "--fid-weights",
        str(weights),
    )
    assert cli["fid"] == pytest.approx(m["fid"], rel=1e-4)
    assert (cli["precision"], cli["recall"]) == (m["precision"], m["recall"])


def test_a_missing_reference_fails_before_training(tmp_path):
    exp = tiny_experiment(
        steps=2, evaluation={"enabled": True, "reference": str(tmp_path / "none.npz")}
    )
    with pytest.raises(UserError, match=r"evaluation: .*none.npz: no such .npz file"):
        train(exp, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluation_spec_checks():
    # the shapes have a built-in classifier now, as the digits do ...
    tiny_experiment(
        data={"kind": "shapes", "classes": 10}, evaluation={"enabled": True}, model=_rgb_model()
    )
    # ... for a class-conditional model only
    with pytest.raises(SpecError, match=r"evaluation.reference.*class-conditional"):
        tiny_experiment(
            data={"kind": "shapes", "classes": 10},
            evaluation={"enabled": True},
            model={**_rgb_model(), "conditioning": {"width": 32}},
        )
    with pytest.raises(SpecError, match=r"evaluation.every.*enabled: true"):
        tiny_experiment(evaluation={"every": 5})
    ev = tiny_experiment(
        evaluation={"enabled": True, "reference": "ref", "inception": "/w.pth"}
    ).evaluation
    fixed = absolute_evaluation_paths(ev, Path("/data/exp"))
    assert (fixed.reference, fixed.inception, fixed.vae) == ("/data/exp/ref", "/w.pth", None)


def _rgb_model() -> dict:
    from .conftest import tiny_model

    return {**tiny_model(), "input": {"channels": 3, "resolution": [8, 8]}}


def test_latent_model_evaluated_through_its_vae(tmp_path, vae_dir, latents):  # noqa: F811 (fixtures)
    from PIL import Image

    from .test_latents import _latent_exp_data

    weights = _random_weights(tmp_path / "inception.pth")
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    data = _latent_exp_data(latents, steps=2)
    data["evaluation"] = {
        "enabled": True,
        "count": 2,
        "steps": 2,
        "k": 0,
        "reference": str(ref),
        "inception": str(weights),
    }
    with pytest.raises(SpecError, match="evaluation.vae"):  # latents need their decoder
        experiment_from_data(data)
    data["evaluation"]["vae"] = str(vae_dir)
    result = train(experiment_from_data(data), tmp_path / "run", progress=False)
    m = result.evaluation  # 4-channel latents would be refused by the Inception input
    assert np.isfinite(m["fid"]) and m["reference_count"] == 2 and m["precision"] is None
    grid = Image.open(tmp_path / "run" / "samples.png")
    assert grid.size == (2 * (16 * 4 + 1) + 1, 16 * 4 + 2)  # decoded 16x16, shown 4x


@pytest.mark.slow
def test_a_shapes_run_is_scored_by_the_shapes_classifier_in_train_and_evaluate(tmp_path, capsys):
    """`ditkit evaluate` of a shapes run used to score it with the *digits* classifier (about
    10%, chance); now the run's data picks the classifier, in training and on the command
    line, and a run on data with no built-in classifier is refused in one line."""
    from ditkit.cli.evaluate import LABELLED
    from ditkit.spec.experiment import LABELLED_DATA
    from ditkit.evaluate.classifier import DigitsClassifier, ShapesClassifier

    assert LABELLED == LABELLED_DATA
    exp = tiny_experiment(
        steps=2,
        model=_rgb_model(),
        data={"kind": "shapes", "count": 40, "classes": 4},
        evaluation={"enabled": True, "count": 8, "steps": 2},
    )
    run = tmp_path / "run"
    final = train(exp, run, progress=False).evaluation
    shapes_real = ShapesClassifier((8, 8), 4).real_accuracy
    assert final["real_accuracy"] == shapes_real
    assert shapes_real != DigitsClassifier((8, 8)).real_accuracy
    cli = _cli_json(capsys, "evaluate", str(run), "--count", "8", "--steps", "2")
    assert cli["data"] == "shapes" and cli["settings"]["data"] == "shapes"
    assert cli["real_accuracy"] == shapes_real and len(cli["per_class_accuracy"]) == 4
    assert cli["accuracy"] == final["accuracy"]  # same seed, labels cycling over the 4 classes
    forced = _cli_json(
        capsys,
        "evaluate",
        str(run),
        "--count",
        "10",
        "--steps",
        "2",
        "--data",
        "digits",
        "--cfg-scale",
        "1",
    )
    assert forced["data"] == "digits" and len(forced["per_class_accuracy"]) == 10
    # a run on other data: no classifier to score it with -> exit 2, one line naming the field
    for exp_file in run.rglob("experiment.yaml"):  # the run's, and each checkpoint's copy
        exp_file.write_text(exp_file.read_text().replace("kind: shapes", "kind: webdataset"))
    capsys.readouterr()
    assert main(["evaluate", str(run), "--count", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.kind is 'webdataset'" in err and "--data" in err and len(err.splitlines()) == 1
