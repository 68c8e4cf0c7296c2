"""Issue 27: one writer per run folder (the lock) and training that survives preemption
(SIGTERM/SIGUSR1 -> checkpoint at the step boundary, exit 75; ``--resume auto``), also under
``torchrun --max-restarts``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ditkit.cli import main
from ditkit.runtime.checkpoint import load_checkpoint
from ditkit.training import checkpoints as C
from ditkit.training import runlock
from ditkit.training.logs import read_scalars
from ditkit.training.loop import EXIT_PREEMPTED, train

from .conftest import tiny_experiment, tiny_experiment_data

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _cli(*args, cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ditkit.cli", *map(str, args)],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _same_weights(a: Path, b: Path) -> bool:
    for name in ("model.safetensors", "ema.safetensors"):
        x, y = load_checkpoint(a / name).tensors, load_checkpoint(b / name).tensors
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def _wait_for_rows(run: Path, rows: int, proc: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    csv = run / "scalars.csv"
    while time.monotonic() < deadline and proc.poll() is None:
        if csv.exists() and len(csv.read_text().splitlines()) > rows:  # + the header
            return
        time.sleep(0.01)
    out, err = proc.communicate() if proc.poll() is not None else ("", "")
    pytest.fail(f"the run never reached step {rows} (exit {proc.poll()}): {err[-2000:]}")


# ------------------------------------------------------------------ one writer per run folder


def test_a_second_writer_exits_2_at_once_naming_the_holder(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(tiny_experiment_data("edm", 2)))
    run = tmp_path / "run"
    with runlock.acquire(run):  # this process holds the lock, as a running train would
        t0 = time.monotonic()
        code = main(["train", str(exp), "--out", str(run), "--no-progress"])
        err = capsys.readouterr().err
        assert time.monotonic() - t0 < 20  # at once, not after training
        assert code == 2 and f"PID {os.getpid()} on host {socket.gethostname()}" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (run / "checkpoints").exists() and not (run / "scalars.csv").exists()
        # --resume auto waits for nobody either
        assert (
            main(["train", str(exp), "--out", str(run), "--resume", "auto", "--no-progress"]) == 2
        )
    assert run.is_dir()  # the loser did not remove the holder's folder
    assert main(["train", str(exp), "--out", str(run), "--no-progress"]) == 0  # free again


def test_a_killed_holder_leaves_no_lock_and_resume_takes_over(tmp_path):
    run = tmp_path / "run"
    train(tiny_experiment("edm", 4, checkpoint={"every": 2}), run, progress=False, stop_after=2)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ditkit.training.runlock import acquire; "
            f"acquire({str(run)!r}); print('held', flush=True); time.sleep(600)",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunLockedError, match=f"PID {holder.pid} "):
            runlock.acquire(run)
        # a killed run also leaves a half-written checkpoint folder behind
        (run / "checkpoints" / ".step-000004.abc123.tmp").mkdir()
    finally:
        holder.kill()
        holder.wait()
    assert str(holder.pid) in (run / runlock.LOCK_NAME).read_text()  # the stale label stays
    result = train(
        tiny_experiment("edm", 4, checkpoint={"every": 2}), run, progress=False, resume=True
    )
    assert result.step == 4
    assert not list((run / "checkpoints").glob(".*"))  # stale temporary removed


def test_a_symlink_planted_as_the_lock_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (run / runlock.LOCK_NAME).symlink_to(victim)
    with pytest.raises(runlock.UserError, match="symbolic link"):
        runlock.acquire(run)
    assert victim.read_text() == "precious\n"


def test_checkpoint_temporaries_are_unique_per_write(tmp_path, monkeypatch):
    """Two writers of one step never share a temporary folder (the race of issue 27)."""
    seen = []
    real = C._write_state

    def spy(folder, state):
        seen.append(folder.name)
        return real(folder, state)

    monkeypatch.setattr(C, "_write_state", spy)
    exp = tiny_experiment("edm", 2)
    state = {"step": 1}
    model = {"w": torch.zeros(2)}
    import ditkit.runtime.checkpoint as RC

    monkeypatch.setattr(RC, "save_checkpoint", lambda path, *a, **k: Path(path).write_bytes(b""))
    for _ in range(2):
        C.write_checkpoint(tmp_path, 1, exp, model, model, state, keep_last=2)
    assert len(set(seen)) == 2 and all(n.startswith(".step-000001.") for n in seen)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]


# ------------------------------------------------------------------ preemption


def test_resume_auto_starts_a_new_run_and_continues_an_old_one(tmp_path):
    exp = tiny_experiment("edm", 4, checkpoint={"every": 2})
    first = train(exp, tmp_path / "run", progress=False, resume="auto", stop_after=3)
    assert first.step == 3
    again = train(exp, tmp_path / "run", progress=False, resume="auto")
    assert again.step == 4
    ref = train(exp, tmp_path / "ref", progress=False)
    assert _same_weights(ref.checkpoint, again.checkpoint)


STEPS = 12
SECTIONS = dict(checkpoint={"every": 1000, "keep_last": 2})  # no periodic checkpoint


def _check_stopped_then_resume(tmp_path, capsys) -> None:
    """After a stop signal: a checkpoint at the step reached, scalars up to it; then
    ``--resume auto`` (the CLI, in this process) ends bit-identical to an uninterrupted run."""
    stopped = C.latest_checkpoint(tmp_path / "run" / "checkpoints")[0]
    assert 3 <= stopped < STEPS  # the steps done so far are kept, not thrown away
    assert read_scalars(tmp_path / "run" / "scalars.csv")[-1]["step"] == stopped
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                str(tmp_path / "exp.yaml"),
                "--out",
                str(tmp_path / "run"),
                "--resume",
                "auto",
                "--no-progress",
            ]
        )
        == 0
    )
    ref = train(tiny_experiment("edm", STEPS, **SECTIONS), tmp_path / "ref", progress=False)
    done = C.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert done[0] == STEPS and _same_weights(ref.checkpoint, done[1])
    assert [r["loss"] for r in read_scalars(tmp_path / "run/scalars.csv")] == [
        r["loss"] for r in read_scalars(tmp_path / "ref/scalars.csv")
    ]


def test_sigterm_checkpoints_exits_75_and_resume_auto_is_bit_identical(tmp_path, capsys):
    (tmp_path / "exp.yaml").write_text(
        yaml.safe_dump(tiny_experiment_data("edm", STEPS, **SECTIONS))
    )
    proc = _cli("train", "exp.yaml", "--out", "run", "--no-progress", cwd=tmp_path)
    _wait_for_rows(tmp_path / "run", 3, proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == EXIT_PREEMPTED == 75, err
    assert "SIGTERM: stopped at step" in err and "--resume auto" in err
    assert "Traceback" not in err
    _check_stopped_then_resume(tmp_path, capsys)


def test_sigusr1_in_process_stops_the_same_way(tmp_path, capsys):
    """SIGUSR1 (SLURM's usual advance notice) delivered to this very process while the CLI
    trains in it; the previous handler is back afterwards."""
    import threading

    (tmp_path / "exp.yaml").write_text(
        yaml.safe_dump(tiny_experiment_data("edm", STEPS, **SECTIONS))
    )
    csv = tmp_path / "run" / "scalars.csv"

    def notice():
        while not (csv.exists() and len(csv.read_text().splitlines()) > 3):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGUSR1)

    before = signal.getsignal(signal.SIGUSR1)
    threading.Thread(target=notice, daemon=True).start()
    code = main(
        ["train", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 75 and "SIGUSR1: stopped at step" in err, err
    assert signal.getsignal(signal.SIGUSR1) is before
    _check_stopped_then_resume(tmp_path, capsys)


def test_resume_flag_still_takes_the_run_folder_after_it(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_experiment("edm", 3, checkpoint={"every": 1}), run, progress=False, stop_after=2)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert C.latest_checkpoint(run / "checkpoints")[0] == 3
    code = main(["train", str(run), "--resume", str(run)])
    assert code == 2 and "--resume takes no value but `auto`" in capsys.readouterr().err


TORCHRUN_WORKER = r"""
import os, signal, sys, time
from ditkit.cli import main
# rank 1 of the first attempt stops itself mid-run, as a preempted or killed process would
if os.environ["RANK"] == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    import threading
    from pathlib import Path
    def killer():
        csv = Path(sys.argv[-1]) / "scalars.csv"
        while not (csv.exists() and len(csv.read_text().splitlines()) > int(sys.argv[-2])):
            time.sleep(0.01)
        (Path(sys.argv[-1]).parent / "killed").write_text(os.environ["KILL_WITH"])
        os.kill(os.getpid(), getattr(signal, os.environ["KILL_WITH"]))
    threading.Thread(target=killer, daemon=True).start()
sys.exit(main(sys.argv[1:-2]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kill_with", ["SIGTERM", "SIGKILL"])
def test_torchrun_max_restarts_finishes_a_preempted_ddp_run_bit_identically(tmp_path, kill_with):
    """``torchrun --nproc-per-node 2 --max-restarts 2`` (gloo, CPU): one rank is stopped
    mid-run (SIGTERM: every rank checkpoints and exits 75; SIGKILL: the others fail), torchrun
    restarts the workers, ``--resume auto`` continues, and the final weights equal an
    uninterrupted two-process run's."""
    steps = 24
    data = tiny_experiment_data(
        "edm",
        steps,
        checkpoint={"every": 6, "keep_last": 2},
        distributed={"strategy": "ddp", "backend": "gloo"},
    )
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "worker.py").write_text(TORCHRUN_WORKER)

    def launch(out: str, rows: int, restarts: int) -> subprocess.CompletedProcess:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "--max-restarts",
                str(restarts),
                "worker.py",
                "train",
                "exp.yaml",
                "--out",
                out,
                "--resume",
                "auto",
                "--no-progress",
                "--threads",
                "1",
                str(rows),
                str(tmp_path / out),
            ],
            cwd=tmp_path,
            env=_env(KILL_WITH=kill_with),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out_, err = proc.communicate(timeout=500)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers, no orphans
            out_, err = proc.communicate()
            pytest.fail(f"torchrun did not finish: {err[-3000:]}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out_, err)

    ref = launch("ref", 10**9, 0)  # never reaches the kill: uninterrupted
    assert ref.returncode == 0, ref.stderr[-3000:]
    job = launch("run", 9, 2)
    assert job.returncode == 0, job.stderr[-3000:]
    assert (tmp_path / "killed").read_text() == kill_with  # rank 1 was stopped mid-run
    a = C.latest_checkpoint(tmp_path / "ref" / "checkpoints")
    b = C.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert a[0] == b[0] == steps and _same_weights(a[1], b[1])
    if kill_with == "SIGTERM":  # the graceful path wrote a checkpoint beyond the periodic ones
        assert "stopped at step" in job.stderr
    shutil.rmtree(tmp_path / "ref")
