"""FSDP2 under torchrun with 2 CPU processes (gloo) against DDP: same losses, checkpoints in the
same format (loadable into a plain model), exact resume, and a DDP checkpoint resumed under
FSDP2. One torchrun launch runs all four trainings (``fsdp_worker.py``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ditkit.builder import build
from ditkit.runtime.checkpoint import load_model
from ditkit.training import checkpoints as C
from ditkit.training.logs import read_scalars

from .conftest import tiny_experiment, tiny_experiment_data

WORKER = Path(__file__).with_name("fsdp_worker.py")
ROOT = Path(__file__).resolve().parents[2]

# Tolerance, DDP vs FSDP2: with two ranks both average the same two gradient values (a + b is
# commutative and halving is exact), the all-gathered weights are exact copies, and AdamW is
# elementwise, so only the global gradient norm (summed per shard, then across ranks, under
# FSDP2) can differ in its last bits -- and it enters only through the clip coefficient.
# 1e-6 relative admits that and nothing else: averaging with a wrong factor, a missed
# gradient sync under accumulation or a wrong shard all move the loss by > 1e-3 within a step.
# (Measured: bitwise equal -- see docs/guides/distributed.md.)
RTOL = 1e-6


def _run_worker(folder: Path) -> dict:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", str(WORKER), str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    common = dict(
        training={"batch_size": 16, "accumulate": 2},  # exercises no-sync micro-batches
        optimizer={"grad_clip": 0.2},  # below the tiny model's norms: clipping acts
        checkpoint={"every": 3},
    )
    for name, dist in (("ddp", {}), ("fsdp2", {"strategy": "fsdp2"})):
        data = tiny_experiment_data("edm", steps=6, distributed=dist, **common)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return folder, _run_worker(folder)


@pytest.mark.slow
def test_fsdp2_trains_like_ddp(runs):
    folder, res = runs
    ddp, fsdp = res["ddp"]["losses"], res["fsdp2"]["losses"]
    assert len(ddp) == len(fsdp) == 6
    assert fsdp == pytest.approx(ddp, rel=RTOL)
    assert fsdp[-1] < fsdp[0]  # it trains
    grad_norms = [r["grad_norm"] for r in read_scalars(folder / "fsdp2/scalars.csv")]
    assert min(grad_norms) > 0.2  # the clip was active at every step
    summary = json.loads((folder / "fsdp2/summary.json").read_text())
    assert summary["world"] == 2 and summary["ranks_identical"]
    assert (folder / "fsdp2/previews/step-000006.png").is_file()  # EMA gathered to sample


@pytest.mark.slow
def test_fsdp2_checkpoint_is_a_plain_full_checkpoint(runs):
    folder, _ = runs
    spec = tiny_experiment("edm").model_spec
    plain_keys = set(build(spec).state_dict())
    for weights in ("model", "ema"):
        f = folder / "fsdp2/checkpoints/step-000006" / f"{weights}.safetensors"
        d = folder / "ddp/checkpoints/step-000006" / f"{weights}.safetensors"
        model, _ = load_model(f)  # strict load into a plain (unsharded) model
        sd = model.state_dict()
        assert set(sd) == plain_keys
        ref = C.read_tensors(d)
        for k, v in sd.items():
            assert v.shape == ref[k].shape, k
            assert torch.allclose(v, ref[k], rtol=1e-5, atol=1e-6), k  # measured <= 1.2e-7
    ema, model = (
        C.read_tensors(folder / "fsdp2/checkpoints/step-000006" / f)
        for f in ("ema.safetensors", "model.safetensors")
    )
    assert any(not torch.equal(ema[k], model[k]) for k in model)  # EMA is its own average
    s_f = C.read_state(folder / "fsdp2/checkpoints/step-000006")
    s_d = C.read_state(folder / "ddp/checkpoints/step-000006")
    assert s_f["world"] == s_d["world"] == 2
    trainable = {n for n, p in build(spec).named_parameters()}
    assert set(s_f["optimizer"]["state"]) == set(s_d["optimizer"]["state"]) == trainable
    for name, st in s_d["optimizer"]["state"].items():  # full, unsharded optimizer moments
        for key in ("exp_avg", "exp_avg_sq"):
            got = s_f["optimizer"]["state"][name][key]
            assert got.shape == st[key].shape
            assert torch.allclose(got, st[key], rtol=1e-5, atol=1e-9), (name, key)
    assert [g["params"] for g in s_f["optimizer"]["param_groups"]] == [
        g["params"] for g in s_d["optimizer"]["param_groups"]
    ]


@pytest.mark.slow
def test_fsdp2_resume_is_exact_and_accepts_a_ddp_checkpoint(runs):
    folder, res = runs
    full = res["fsdp2"]["losses"]
    assert res["fsdp2_resumed"]["losses"] == full[3:]  # same strategy: bitwise
    assert res["fsdp2_resumed"]["fingerprints"] == res["fsdp2"]["fingerprints"]
    rows = read_scalars(folder / "fsdp2_resumed/scalars.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert res["ddp_then_fsdp2"]["losses"] == pytest.approx(res["ddp"]["losses"][3:], rel=RTOL)


def test_fsdp2_options_need_strategy_fsdp2():
    from ditkit.spec import SpecError

    exp = tiny_experiment(
        distributed={"strategy": "fsdp2", "param_dtype": "bf16", "reshard_after_forward": False}
    )
    assert exp.distributed.param_dtype == "bf16" and not exp.distributed.reshard_after_forward
    with pytest.raises(
        SpecError,
        match=r"distributed.param_dtype: is an option of strategy "
        r"fsdp2; remove it or set distributed.strategy: fsdp2",
    ):
        tiny_experiment(distributed={"param_dtype": "bf16"})
    with pytest.raises(
        SpecError,
        match=r"distributed.strategy: Input should be 'ddp' or "
        r"'fsdp2'",
    ):
        tiny_experiment(distributed={"strategy": "zero3"})


def test_fsdp2_mixed_precision_policy_follows_the_run_dtype():
    from ditkit.training.distributed import Placement

    def policy(device, **dist):
        exp = tiny_experiment(distributed={"strategy": "fsdp2", **dist})
        return Placement(exp, 2, 0, torch.device(device)).fsdp_options()["mp_policy"]

    assert policy("cpu").param_dtype == torch.float32  # auto on CPU: fp32 like the run
    cuda = policy("cuda")
    assert (cuda.param_dtype, cuda.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert policy("cpu", param_dtype="bf16").param_dtype == torch.bfloat16


@pytest.mark.slow
def test_cli_fsdp2_bf16_params_on_cpu_and_resume(tmp_path):
    """``ditkit train`` under torchrun with FSDP2 and bf16 compute (param_dtype) on CPU/gloo:
    master weights stay fp32 in the checkpoint, and ``--resume`` from the middle checkpoint
    repeats the uninterrupted losses exactly (two launches, ~1 min)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    data = tiny_experiment_data(
        "edm",
        steps=6,
        checkpoint={"every": 3},
        distributed={"strategy": "fsdp2", "param_dtype": "bf16", "reshard_after_forward": False},
    )
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }

    def launch(*extra):
        proc = subprocess.run(
            [
                torchrun,
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "ditkit.cli",
                "train",
                "exp.yaml",
                "--no-progress",
                *extra,
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]

    launch("--out", "run")
    rows = read_scalars(tmp_path / "run/scalars.csv")
    losses = [r["loss"] for r in rows]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    weights = C.read_tensors(tmp_path / "run/checkpoints/step-000006/model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float32}
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed/checkpoints/step-000006")
    csv = tmp_path / "resumed/scalars.csv"  # as if stopped after step 3: rows 4-6 must return
    csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:4]))
    (tmp_path / "resumed/summary.json").unlink()
    launch("--out", "resumed", "--resume")
    assert (tmp_path / "resumed/checkpoints/step-000006/ema.safetensors").is_file()
    resumed = [r["loss"] for r in read_scalars(tmp_path / "resumed/scalars.csv")]
    assert resumed == losses
    summary = json.loads((tmp_path / "resumed/summary.json").read_text())
    assert summary["ranks_identical"] and summary["world"] == 2


def test_optimizer_state_is_saved_by_name_and_old_numbered_state_still_loads(tmp_path):
    """One process: the checkpoint's optimizer state is keyed by parameter name (the format
    every strategy writes); a state saved the old way (``optimizer.state_dict()``, numbered)
    resumes to the same optimizer."""
    import copy

    from ditkit.training.distributed import Placement
    from ditkit.training.loop import param_groups

    exp = tiny_experiment("edm")
    torch.manual_seed(0)
    model = build(exp.model_spec)
    ema = copy.deepcopy(model).requires_grad_(False)
    place = Placement(exp, 1, 0, torch.device("cpu"))

    def adamw(m):
        return torch.optim.AdamW(param_groups(m, exp.optimizer), lr=1e-3)

    opt = adamw(model)
    x = torch.randn(2, 1, 8, 8)
    model(x, torch.ones(2), torch.zeros(2, dtype=torch.long)).square().mean().backward()
    opt.step()
    m_sd, e_sd, o_sd = place.full_state(model, ema, opt)
    names = {n for n, _ in model.named_parameters()}
    assert set(o_sd["state"]) == names and set(m_sd) == set(model.state_dict())
    for saved in (o_sd, opt.state_dict()):  # by name, and the old numbered format
        fresh = build(exp.model_spec)
        fresh_opt = adamw(fresh)
        place.load(fresh, copy.deepcopy(fresh), fresh_opt, m_sd, e_sd, copy.deepcopy(saved))
        for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
            assert torch.equal(p, q), n
            assert torch.equal(opt.state[p]["exp_avg_sq"], fresh_opt.state[q]["exp_avg_sq"]), n
