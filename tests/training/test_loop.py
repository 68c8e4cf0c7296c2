"""The training loop: outputs, exact resume (also after SIGKILL), NaN handling, DDP."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ditkit import spec as S
from ditkit.builder import build
from ditkit.runtime.checkpoint import load_checkpoint, load_model
from ditkit.training import checkpoints as C
from ditkit.training import loop
from ditkit.training.logs import read_scalars
from ditkit.training.loop import TrainingError, lr_factor, param_groups, train

from .conftest import tiny_experiment, tiny_experiment_data

ROOT = Path(__file__).resolve().parents[2]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_scalars(run / "scalars.csv")]


def test_run_writes_checkpoints_previews_scalars_and_plot(tmp_path):
    exp = tiny_experiment(
        "edm",
        steps=6,
        checkpoint={"every": 2, "keep_last": 2},
        preview={"every": 3, "count": 10, "steps": 2},
    )
    result = train(exp, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert result.step == 6 and len(result.losses) == 6
    assert all(math.isfinite(v) for v in result.losses)
    # keep-last-2 of steps 2, 4, 6
    assert [s for s, _ in C.list_checkpoints(run / "checkpoints")] == [4, 6]
    ckpt = run / "checkpoints" / "step-000006"
    model, info = load_model(ckpt / "ema.safetensors")  # self-describing: nothing else needed
    assert info.spec == exp.model_spec and info.objective == exp.objective
    assert info.metadata["ditkit.step"] == "6" and info.metadata["ditkit.weights"] == "ema"
    ema = load_checkpoint(ckpt / "ema.safetensors").tensors
    raw = load_checkpoint(ckpt / "model.safetensors").tensors
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # EMA differs from the weights
    assert S.loads((ckpt / "experiment.yaml").read_text(), S.experiment.Experiment) == exp
    assert sorted(p.name for p in (run / "previews").iterdir()) == [
        "step-000003.png",
        "step-000006.png",
    ]
    assert _losses(run) == pytest.approx(result.losses, rel=1e-6)
    assert (run / "loss.png").stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 6 and summary["ranks_identical"]
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    exp = tiny_experiment("edm", steps=10, checkpoint={"every": 4}, training={"accumulate": 2})
    full = train(exp, tmp_path / "full", progress=False)
    assert full.step == 10
    part = train(exp, tmp_path / "part", progress=False, stop_after=6)  # ckpt at 4, stop at 6
    assert part.step == 6
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(exp, tmp_path / "part", progress=False)
    resumed = train(exp, tmp_path / "part", progress=False, resume=True)
    assert resumed.step == 10
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")  # exact, CSV rows 5-6 redone
    a = load_checkpoint(tmp_path / "full/checkpoints/step-000010/ema.safetensors").tensors
    b = load_checkpoint(tmp_path / "part/checkpoints/step-000010/ema.safetensors").tensors
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        train(tiny_experiment(steps=2), tmp_path / "empty", progress=False, resume=True)


def _cli(*args, cwd=None, env=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "ditkit.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_same_losses(tmp_path):
    sections = dict(
        checkpoint={"every": 10, "keep_last": 3}, preview={"every": 0, "count": 10, "steps": 1}
    )
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(tiny_experiment_data("edm", 120, **sections)))
    # the uninterrupted reference, in this process (one thread here and in the children)
    train(tiny_experiment("edm", 120, **sections), tmp_path / "ref", progress=False)

    proc = _cli("train", "exp.yaml", "--out", "run", "--no-progress", cwd=tmp_path)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        found = C.latest_checkpoint(ckpts)
        if found and found[0] >= 30 or proc.poll() is not None:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = C.latest_checkpoint(ckpts)[0]
    assert 30 <= killed_at < 120
    assert len(_losses(tmp_path / "run")) < 120
    # whatever the kill interrupted, every listed checkpoint is complete and loadable
    for _, path in C.list_checkpoints(ckpts):
        load_model(path / "ema.safetensors")
        C.read_state(path)

    res = _cli("train", "exp.yaml", "--out", "run", "--resume", "--no-progress", cwd=tmp_path)
    out, err = res.communicate(timeout=300)
    assert res.returncode == 0, err
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")
    assert [r["step"] for r in read_scalars(tmp_path / "run/scalars.csv")] == list(range(1, 121))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    exp = tiny_experiment("edm", steps=20, checkpoint={"every": 5})
    real = loop.DiffusionLoss.__call__

    def poisoned(self, model, x0, labels, gen, step=0, **cond):
        loss, extras = real(self, model, x0, labels, gen, step, **cond)
        return (loss * float("nan") if step == 7 else loss), extras

    monkeypatch.setattr(loop.DiffusionLoss, "__call__", poisoned)
    with pytest.raises(TrainingError, match=r"loss is nan at step 8.*step-000005"):
        train(exp, tmp_path / "run", progress=False)
    assert [s for s, _ in C.list_checkpoints(tmp_path / "run/checkpoints")] == [5]
    model, _ = load_model(tmp_path / "run/checkpoints/step-000005/model.safetensors")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["step"] for r in read_scalars(tmp_path / "run/scalars.csv")] == list(range(1, 8))


def test_param_groups_and_lr_schedule():
    exp = tiny_experiment(optimizer={"weight_decay": 0.1, "mapping_lr_scale": 0.5, "lr": 1e-3})
    model = build(exp.model_spec)
    groups = {g["name"]: g for g in param_groups(model, exp.optimizer)}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups.values():
        for p in g["params"]:
            n = names[id(p)]
            no_decay = p.ndim < 2 or "class_embed" in n or n.endswith("scale")
            assert (g["weight_decay"] == 0.0) == no_decay, n
            assert g["lr"] == (5e-4 if n.startswith("conditioning.") else 1e-3), n
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    assert groups["main/decay"]["weight_decay"] == 0.1
    cos = S.experiment.CosineLR(warmup_steps=10, min_factor=0.1)
    assert lr_factor(cos, 0, 110) == pytest.approx(0.1)
    assert lr_factor(cos, 9, 110) == pytest.approx(1.0)
    assert lr_factor(cos, 60, 110) == pytest.approx(0.55)
    assert lr_factor(cos, 110, 110) == pytest.approx(0.1)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_end_with_identical_weights(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    data = tiny_experiment_data(
        "edm", steps=8, training={"batch_size": 16}, checkpoint={"every": 4}
    )
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
            "run",
            "--no-progress",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["world"] == 2
    assert len(summary["rank_fingerprints"]) == 2
    assert summary["rank_fingerprints"][0] == summary["rank_fingerprints"][1]
    state = C.read_state(tmp_path / "run/checkpoints/step-000008")
    assert state["world"] == 2 and len(state["generators"]) == 2
    assert not torch.equal(state["generators"][0], state["generators"][1])  # per-rank noise
    # the two ranks saw different halves of each batch: the run differs from one process
    single = train(
        tiny_experiment("edm", steps=8, training={"batch_size": 16}),
        tmp_path / "single",
        progress=False,
    )
    assert single.fingerprints[0] != summary["rank_fingerprints"][0]


def test_unknown_preview_sampler_fails_before_training(tmp_path):
    # the experiment spec refuses it (preview.sampling is a Sampling), so no run can start
    from ditkit.spec import SpecError

    with pytest.raises(SpecError, match="preview.sampling.sampler: unknown sampler 'magic'"):
        tiny_experiment(steps=2, preview={"sampler": "magic"})


def test_cli_evaluate_a_run(tmp_path, capsys):
    from ditkit.cli import main

    train(tiny_experiment(steps=2), tmp_path / "run", progress=False)
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "run"),
                "--count",
                "20",
                "--steps",
                "2",
                "--cfg-scale",
                "1",
                "--json",
                "--grid",
                str(tmp_path / "g.png"),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"].endswith("step-000002/ema.safetensors")
    assert out["settings"]["cfg_scales"] == [1.0] and out["settings"]["steps"] == 2
    [report] = out["results"]
    assert {k: out[k] for k in report} == report  # the (only) result also at the top level
    assert report["count"] == 20 and 0 <= report["accuracy"] <= 1 and report["cfg_scale"] == 1
    assert report["frechet"] > report["frechet_real"] > 0  # 2 training steps: far from real
    assert (tmp_path / "g.png").is_file()
    # no scale given: the settings are printed, then unguided and guided numbers
    assert main(["evaluate", str(tmp_path / "run"), "--count", "10", "--steps", "1"]) == 0
    text = capsys.readouterr().out
    assert "10 samples" in text and "dpmpp_2m 1 steps" in text and "seed 1" in text
    assert "cfg-scale 1 (unguided): label accuracy" in text
    assert "(guided): label accuracy" in text
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2


def test_loss_plot_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    import builtins

    from ditkit.training.logs import plot_loss

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    plot_loss([{"step": 1.0, "loss": 0.5}, {"step": 2.0, "loss": 0.4}], tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err
