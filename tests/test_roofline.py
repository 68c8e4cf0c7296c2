"""benchmarks/roofline.py runs end to end on a tiny spec and its shares are the ratios of its
own numbers (a correctness check of the arithmetic; the benchmark times, the test does not)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow  # ~15 s: three timed modes with the profiler
def test_roofline_rows_are_consistent(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/roofline.py"),
            str(ROOT / "examples/tiny/tiny-hdit-global.yaml"),
            "--peak-size",
            "128",
            "--repeats",
            "1",
            "--modes",
            "forward",
            "sample",
            "train",
            "--profile",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    peaks = data["peaks_gflops"]
    assert peaks["fp32"] > 0 and peaks["bf16"] > 0
    rows = {r["mode"]: r for r in data["rows"]}
    assert set(rows) == {"forward", "sample", "train"}
    fwd = rows["forward"]["gflop"]
    assert abs(rows["sample"]["gflop"] - 2 * fwd) < 1e-9  # the two CFG halves
    assert abs(rows["train"]["gflop"] - 3 * fwd) < 1e-9  # forward + backward
    for r in rows.values():
        assert abs(r["gflops"] - r["gflop"] / (r["ms"] / 1e3)) <= 1e-6 * r["gflops"]
        assert abs(r["share_of_fp32_peak"] - r["gflops"] / peaks["fp32"]) < 1e-9
        assert 1 <= len(r["top_ops"]) <= 10 and all(op["self_ms"] >= 0 for op in r["top_ops"])
    assert "| resolution | batch | mode |" in proc.stdout


def test_roofline_refuses_a_resolution_the_spec_cannot_take():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/roofline.py"),
            str(ROOT / "examples/tiny/tiny-hdit-global.yaml"),
            "--resolutions",
            "13",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
