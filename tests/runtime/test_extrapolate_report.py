"""The extrapolation runner: report files, table rows, policies parsed from the command line."""

import json
import subprocess
import sys

import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build
from ditkit.runtime.extrapolate_report import dit_reference, parse_policy, run
from tests.conftest import ROOT

TINY = ROOT / "examples/tiny/tiny-hdit-neighborhood.yaml"


def test_parse_policy():
    assert parse_policy("as_is") == S.AsIs()
    assert parse_policy("local_core:kernel_size=5") == S.LocalCore(kernel_size=5)
    assert parse_policy("add_levels:share_weights=true") == S.AddLevels(share_weights=True)
    assert parse_policy("core_patch:factor=4,level=0") == S.CorePatch(factor=4, level=0)
    with pytest.raises(S.SpecError, match="kernel_size"):
        parse_policy("local_core:kernel_size=big")
    with pytest.raises(S.SpecError):
        parse_policy("zoom")


def test_dit_reference_is_isotropic_and_similar_in_size():
    spec = S.load(ROOT / "examples/hdit/hdit-imagenet-128.yaml")
    ref = dit_reference(spec)
    assert len(ref.levels) == 1 and ref.patch == spec.patch
    ours = sum(p.numel() for p in build(spec, device="meta").parameters())
    theirs = sum(p.numel() for p in build(ref, device="meta").parameters())
    assert 0.8 < theirs / ours < 1.25


def test_runner_writes_report_for_random_weights(tmp_path):
    spec = S.load(TINY)
    rows = run(spec, None, None, [S.AsIs(), S.AddLevels(), S.CorePatch(factor=4)],
               [(16, 16), (32, 32), (48, 32)], tmp_path)
    by = {(r.policy, r.resolution): r for r in rows}
    assert by[("add_levels", (48, 32))].error and "power of two" in by[("add_levels", (48, 32))].error
    ok = [r for r in rows if not r.error]
    assert all(r.latency_ms > 0 and r.gmacs > 0 for r in ok)
    assert by[("add_levels", (32, 32))].gmacs > by[("as_is", (16, 16))].gmacs
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["slopes"]) >= {"as_is", "add_levels"}
    for name in ("report.md", "report.html", "cost.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| `core_patch:factor=4` | 32x32 |" in (tmp_path / "report.md").read_text()


def test_cli_bad_policy_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ditkit.cli", "extrapolate", str(TINY),
                           "--resolutions", "32", "--policies", "local_core:kernel_size=big",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "kernel_size" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_runner_samples_grids_from_a_checkpoint(tmp_path):
    from ditkit.runtime.checkpoint import load_checkpoint, save_checkpoint

    spec = S.load(TINY)
    torch.manual_seed(0)
    model = build(spec)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model.state_dict(), spec, objective=S.EDMObjective())
    ckpt = load_checkpoint(path)
    rows = run(ckpt.spec, ckpt.tensors, ckpt.objective, [S.AsIs(), S.AddLevels()],
               [(16, 16), (32, 32)], tmp_path / "report", steps=2, samples=4, measure=False)
    assert all(r.grid for r in rows)
    for r in rows:
        assert (tmp_path / "report" / r.grid).stat().st_size > 0
    add32 = next(r for r in rows if r.policy == "add_levels" and r.resolution == (32, 32))
    assert add32.reinitialised > 0  # the new outer level is fresh, and the report says so
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Samples (fixed seed)" in report and "grids/add_levels_32x32.png" in report


def test_cpu_peak_bytes_follows_the_allocator():
    from ditkit.runtime.extrapolate_report import cpu_peak_bytes

    def work():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = torch.ones(2048, 1024)  # 8 MiB: 12 alive
        del a
        c = torch.ones(1024, 1024)  # 4 MiB reused: still 12 alive at most
        return float(b[0, 0] + c[0, 0])

    keep = torch.ones(4096, 1024)  # alive before: not counted
    assert cpu_peak_bytes(work) == pytest.approx(12 * 2**20, rel=1e-3)
    assert keep.numel()


def test_runner_scores_cells_with_a_metrics_hook_and_adds_extra_rows(tmp_path):
    from ditkit.runtime.extrapolate import adapt

    spec = S.load(TINY)
    torch.manual_seed(0)
    tensors = build(spec).state_dict()
    calls = []

    def hook(images, labels):
        calls.append((tuple(images.shape), labels.tolist()))
        return {"accuracy": 0.5, "frechet": 3.25, "frechet_real": 1.5, "real_accuracy": 0.9,
                "count": len(labels)}

    tuned = adapt(spec, tensors, S.CorePatch(factor=4), (32, 32))
    rows = run(spec, tensors, S.EDMObjective(), [S.AsIs()], [(16, 16), (32, 32)],
               tmp_path, steps=1, samples=4, measure=False, evaluate=hook, eval_count=6,
               eval_resolutions=[(32, 32)], extra=[("tuned core", tuned.spec, tuned.tensors)])
    assert [(r.policy, r.resolution) for r in rows] == [
        ("as_is", (16, 16)), ("as_is", (32, 32)), ("tuned core", (32, 32))]
    assert rows[0].metrics == {} and rows[1].metrics["frechet"] == 3.25
    classes = spec.conditioning.classes.count
    assert calls == [((6, spec.input.channels, 32, 32), [i % classes for i in range(6)])] * 2
    report = (tmp_path / "report.md").read_text()
    assert "| accuracy | Fréchet |" in report
    assert "| 50.0% (90%) | 3.25 (1.50) |" in report and "| - | - |" in report
    assert rows[2].grid == "grids/tuned_core_32x32.png" and (tmp_path / rows[2].grid).is_file()
    from PIL import Image

    with Image.open(tmp_path / rows[2].grid) as im:  # palette PNG: a small committed report
        assert im.mode == "P" and im.size[0] >= 64


def test_cpu_peak_measure_keeps_stderr_clean():
    """The profiler's native side prints USDT lines on fd 2; they must not reach the user (they
    break the progress bar), while Python's own stderr still works afterwards."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from ditkit.runtime.extrapolate_report import cpu_peak_bytes\n"
            "print(cpu_peak_bytes(lambda: torch.ones(1024, 1024) * 2))\n"
            "print('after', file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    # ones (4 MiB) and the product (4 MiB) are alive together, plus the scalar operand
    assert 8 << 20 <= int(out.stdout.strip()) < (8 << 20) + 1024
    assert out.stderr.strip() == "after"
