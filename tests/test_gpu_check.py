"""``benchmarks/gpu_check.py --dry-run``: every stage at toy sizes on CPU, so the prepared GPU
script keeps running while no GPU is at hand (~21 s of CPU time for the dry run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    # generous caps: a loaded CI machine must not turn a slow stage into a failure here (the
    # caps themselves are checked by test_a_stage_over_its_cap_is_killed_and_the_rest_run)
    caps = [f"--cap={s}=600" for s in ("env", "tests", "train", "attention", "sample", "onnx")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--dry-run", "--budget-s", "3000", *caps],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


@pytest.mark.slow
def test_every_stage_runs_and_says_ok(dry_run):
    out, res, _ = dry_run
    assert res["meta"]["dry_run"] is True
    assert list(res["stages"]) == ["env", "tests", "train", "attention", "sample", "onnx"]
    assert {name: st["status"] for name, st in res["stages"].items()} == dict.fromkeys(
        res["stages"], "ok"
    )
    assert (out / "results.md").read_text().startswith("# ditkit GPU check (dry run")
    assert not (out / "progress.jsonl").exists()  # merged into results.json


@pytest.mark.slow
def test_rows_hold_measurements_and_cuda_only_parts_say_why_not(dry_run):
    _, res, _ = dry_run
    st = res["stages"]
    env = {r["key"]: r["value"] for r in st["env"]["rows"]}
    assert env["torch"] and env["cuda_available"] in (True, False)
    tests = st["tests"]["rows"][0]
    assert "test_cuda.py" in tests["command"] and "--collect-only" in tests["command"]
    assert tests["exit_code"] == 0 and "collected" in tests["summary"]
    train = st["train"]["rows"]
    assert {r["model"] for r in train} == {"tiny-hdit-neighborhood", "tiny-dit"}
    assert all(r["img_per_s"] > 0 and r["gmacs_fwd"] > 0 for r in train)
    assert any(r["compile"] for r in train)
    attention = st["attention"]["rows"]
    measured = {(r["backend"], r["mode"]) for r in attention if r["ms"]}
    assert {
        ("gather", "fwd+bwd"),
        ("tiled", "fwd+bwd"),
        ("masked", "fwd+bwd"),
        ("flex", "fwd"),
    } <= measured
    assert all(
        "no CUDA" in r["note"]
        for r in attention
        if r["backend"] == "flex" and r["mode"] == "fwd+bwd"
    )
    sample = st["sample"]["rows"]
    assert {r["engine"] for r in sample if r["ms_per_step"]} == {"eager", "compile"}
    assert all(r["note"] == "skipped: no CUDA" for r in sample if r["engine"] == "cuda_graph")
    onnx = {r["engine"]: r for r in st["onnx"]["rows"]}
    assert onnx["export"]["note"].startswith("ok")
    assert onnx["onnxruntime-cpu"]["ms_per_step"] > 0
    assert onnx["onnxruntime-cpu"]["max_abs_diff_vs_eager"] < 1e-4
    assert onnx["onnxruntime-cuda"]["note"] == "skipped: no CUDA"
    assert onnx["tensorrt"]["note"].startswith("skipped")


@pytest.mark.slow
def test_a_stage_over_its_cap_is_killed_and_the_rest_run(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "DITKIT_GPU_CHECK_HANG": "tests",
    }  # the tests stage sleeps instead of running pytest
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(tmp_path),
            "--dry-run",
            "--only",
            "env,tests",
            "--cap",
            "tests=1",
            "--cap",
            "env=300",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["stages"]["env"]["status"] == "ok"
    assert res["stages"]["tests"]["status"].startswith("killed at its 1 s cap")
