"""The extrapolation runner: report files, table rows, policies parsed from the command line."""

import json
import subprocess
import sys

import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build
from ditkit.runtime.extrapolate import adapt
from ditkit.evaluate.report import PerSample, Scores, dit_reference, parse_policy, run
from tests.conftest import ROOT
from tests.evaluate.test_report_html import check_report_html
from tests.perturb import perturb

TINY = ROOT / "examples/tiny/tiny-hdit-neighborhood.yaml"


def test_parse_policy():
    assert parse_policy("as_is") == S.AsIs()
    assert parse_policy("local_core:kernel_size=5") == S.LocalCore(kernel_size=5)
    assert parse_policy("add_levels:share_weights=true") == S.AddLevels(share_weights=True)
    assert parse_policy("core_patch:factor=4,level=0") == S.CorePatch(factor=4, level=0)
    assert (
        parse_policy("core_patch")
        == parse_policy("core_patch:factor=auto")
        == S.CorePatch(factor="auto")
    )
    assert S.loads(S.dumps(S.CorePatch()), S.CorePatch) == S.CorePatch()
    for bad in ("big", "0"):  # one message naming the field, not one per union branch
        with pytest.raises(S.SpecError) as err:
            parse_policy(f"core_patch:factor={bad}")
        assert len(err.value.issues) == 1
        assert "core_patch.factor" in err.value.issues[0][0]
        assert "a whole number >= 1 or auto" in err.value.issues[0][1]
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
    rows = run(
        spec,
        None,
        None,
        [S.AsIs(), S.AddLevels(), S.CorePatch(factor=4)],
        [(16, 16), (32, 32), (48, 32)],
        tmp_path,
    )
    by = {(r.policy, r.resolution): r for r in rows}
    refused = by[("add_levels", (48, 32))].error
    assert refused and "power of two" in refused
    ok = [r for r in rows if not r.error]
    assert all(r.latency_ms > 0 and r.gmacs > 0 for r in ok)
    assert by[("add_levels", (32, 32))].gmacs > by[("as_is", (16, 16))].gmacs
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["slopes"]) >= {"as_is", "add_levels"}
    for name in ("report.md", "report.html", "cost.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| `core_patch:factor=4` | 32x32 |" in (tmp_path / "report.md").read_text()
    check_report_html(tmp_path)


def test_cli_bad_policy_exits_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ditkit.cli",
            "extrapolate",
            str(TINY),
            "--resolutions",
            "32",
            "--policies",
            "local_core:kernel_size=big",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
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
    rows = run(
        ckpt.spec,
        ckpt.tensors,
        ckpt.objective,
        [S.AsIs(), S.AddLevels()],
        [(16, 16), (32, 32)],
        tmp_path / "report",
        steps=2,
        samples=4,
        measure=False,
    )
    assert all(r.grid for r in rows)
    for r in rows:
        assert (tmp_path / "report" / r.grid).stat().st_size > 0
    add32 = next(r for r in rows if r.policy == "add_levels" and r.resolution == (32, 32))
    assert add32.reinitialised > 0  # the new outer level is fresh, and the report says so
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Samples (fixed seed)" in report and "grids/add_levels_32x32.png" in report


def test_cpu_peak_bytes_follows_the_allocator():
    from ditkit.evaluate.report import cpu_peak_bytes

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

    class Fixed:  # a Scorer with fixed scores and no per-sample data
        def score(self, images, labels):
            calls.append((tuple(images.shape), labels.tolist()))
            return Scores(
                accuracy=0.5, frechet=3.25, frechet_real=1.5, real_accuracy=0.9, count=len(labels)
            )

    tuned = adapt(spec, tensors, S.CorePatch(factor=4), (32, 32))
    rows = run(
        spec,
        tensors,
        S.EDMObjective(),
        [S.AsIs()],
        [(16, 16), (32, 32)],
        tmp_path,
        steps=1,
        samples=4,
        measure=False,
        scorer=Fixed(),
        eval_count=6,
        eval_resolutions=[(32, 32)],
        extra=[("tuned core", tuned.spec, tuned.tensors)],
    )
    assert [(r.policy, r.resolution) for r in rows] == [
        ("as_is", (16, 16)),
        ("as_is", (32, 32)),
        ("tuned core", (32, 32)),
    ]
    assert rows[0].metrics == {} and rows[1].metrics["frechet"] == 3.25
    classes = spec.conditioning.classes.count
    assert calls == [((6, spec.input.channels, 32, 32), [i % classes for i in range(6)])] * 2
    report = (tmp_path / "report.md").read_text()
    assert "| accuracy % [95% CI] (real) | Fréchet [95% CI] (real) |" in report
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

    code = (
        "import sys, torch\n"
        "from ditkit.evaluate.report import cpu_peak_bytes\n"
        "print(cpu_peak_bytes(lambda: torch.ones(1024, 1024) * 2))\n"
        "print('after', file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # ones (4 MiB) and the product (4 MiB) are alive together, plus the scalar operand
    assert 8 << 20 <= int(out.stdout.strip()) < (8 << 20) + 1024
    assert out.stderr.strip() == "after"


def test_noop_check_tells_exact_no_ops_from_policies_that_change_the_model():
    from ditkit.evaluate.report import noop_check

    spec = S.load(TINY)
    torch.manual_seed(0)
    tensors = build(spec).state_dict()
    # perturbed: the zero-initialised output layers would make every model output zero
    tensors = {
        k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in tensors.items()
    }
    assert noop_check(spec, tensors, S.AsIs())["status"] == "identical"
    assert noop_check(spec, tensors, S.AddLevels())["status"] == "identical"
    auto = noop_check(spec, tensors, S.CorePatch())  # factor auto: the trained factor here
    assert auto["status"] == "identical"
    fixed = noop_check(spec, tensors, S.CorePatch(factor=4))  # a 4x4 merge at 16x16
    assert fixed["status"] == "changes the model" and fixed["max_abs_diff"] > 1e-3
    bad = noop_check(spec, tensors, S.CorePatch(level=5))
    assert bad["status"] == "invalid" and "transition 5" in bad["detail"]


def test_core_patch_auto_keeps_the_core_grid_at_every_multiple():
    from ditkit.runtime.extrapolate import adapt_spec

    spec = S.load(TINY)  # trained at 16x16, merge 2
    f0 = spec.levels[0].down.factor
    assert adapt_spec(spec, S.CorePatch(), (32, 32)).levels[0].down.factor == 2 * f0
    assert adapt_spec(spec, S.CorePatch(), (64, 64)).levels[0].down.factor == 4 * f0
    with pytest.raises(S.SpecError, match="whole multiple"):
        adapt_spec(spec, S.CorePatch(), (24, 24))


def test_latency_slope_is_fitted_over_compute_bound_points_only():
    from ditkit.evaluate.report import latency_slope

    # 16^2 costs 10 ms for 0.01 GMACs (1000 ms/GMAC: overhead); the rest ~ 100 ms/GMAC
    pts = [
        ((16, 16), 10.0, 0.01),
        ((32, 32), 4.0, 0.04),
        ((64, 64), 16.0, 0.16),
        ((128, 128), 64.0, 0.64),
    ]
    fit = latency_slope(pts)
    assert fit["overhead_bound"] == [[16, 16]]
    assert fit["compute_bound"] == [[32, 32], [64, 64], [128, 128]]
    assert fit["slope"] == pytest.approx(1.0)
    flat = latency_slope([((16, 16), 5.0, 0.01), ((32, 32), 5.5, 0.04), ((64, 64), 6.0, 0.16)])
    assert flat["slope"] is None and flat["compute_bound"] == [[64, 64]]
    # the biggest size runs slower per GMAC than the mid one (memory-bound attention): that is
    # real scaling cost, fitted, not called overhead
    steep = latency_slope([((16, 16), 10.0, 0.04), ((32, 32), 20.0, 0.08), ((64, 64), 240.0, 0.2)])
    assert steep["overhead_bound"] == [] and len(steep["compute_bound"]) == 3
    assert steep["slope"] > 1.0
    one = latency_slope([((32, 32), 5.0, 0.04)])  # a fine-tuned row: one resolution
    assert one == {"slope": None, "compute_bound": [], "overhead_bound": []}


def test_runner_gives_intervals_reuses_identical_cells_and_names_the_best(tmp_path):
    import numpy as np

    from ditkit.evaluate.stats import FrechetToReference

    spec = S.load(TINY)
    torch.manual_seed(0)
    tensors = {
        k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in build(spec).state_dict().items()
    }
    ref = np.random.default_rng(0).normal(size=(300, 3))
    fd = FrechetToReference(ref.mean(0), np.cov(ref, rowvar=False))
    calls = []

    class SignScorer:  # "correct" when the sample's mean is positive: differs by model
        def score(self, images, labels):
            calls.append(tuple(images.shape))
            correct = images.flatten(1).mean(1).numpy() > 0
            feats = images.flatten(1)[:, :3].double().numpy()
            return Scores(
                accuracy=float(correct.mean()),
                frechet=fd(feats),
                frechet_real=0.1,
                real_accuracy=0.9,
                count=len(labels),
                per_sample=PerSample(correct=correct, features=feats, frechet=fd),
            )

    policies = [S.AsIs(), S.CorePatch(), S.CorePatch(factor=4)]
    # a "fine-tuned" row at 32x32: core_patch's adapted model, its weights nudged
    tuned = adapt(spec, tensors, S.CorePatch(), (32, 32))
    tuned_tensors = {
        k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in tuned.tensors.items()
    }
    rows = run(
        spec,
        tensors,
        S.EDMObjective(),
        policies,
        [(16, 16), (32, 32)],
        tmp_path,
        steps=1,
        samples=2,
        measure=False,
        scorer=SignScorer(),
        eval_count=40,
        count_at={(32, 32): 30},
        bootstrap=50,
        extra=[("core_patch + fine-tune", tuned.spec, tuned_tensors)],
    )
    by = {(r.policy, r.resolution): r for r in rows}
    # core_patch (auto) is bit-identical at 16x16: its cell reuses as_is's samples
    assert by[("core_patch", (16, 16))].same_as == "as_is"
    assert by[("core_patch", (16, 16))].metrics == by[("as_is", (16, 16))].metrics
    assert calls.count((40, 3, 16, 16)) == 2 and calls.count((30, 3, 32, 32)) == 4
    m = by[("as_is", (32, 32))].metrics
    lo, hi = m["accuracy_ci"]
    assert lo <= m["accuracy"] <= hi and m["count"] == 30
    assert m["frechet_ci"][0] <= m["frechet_ci"][1]
    results = json.loads((tmp_path / "results.json").read_text())
    assert (
        results["noop_at_training_resolution"]["core_patch:factor=4"]["status"]
        == "changes the model"
    )
    comp = {tuple(c["resolution"]): c for c in results["comparisons"] if c["scope"] == "all"}
    assert comp[(32, 32)]["count"] == 30 and len(comp[(32, 32)]["accuracy_tests"]) == 3
    key = lambda r: (r.metrics["accuracy"], -r.metrics["frechet"])  # noqa: E731
    best = max((r for r in rows if r.resolution == (32, 32)), key=key)
    assert comp[(32, 32)]["best_accuracy"] == best.policy
    # the zero-shot policies ranked among themselves, only where a fine-tuned row takes part
    zero = [c for c in results["comparisons"] if c["scope"] == "zero-shot"]
    assert [c["resolution"] for c in zero] == [[32, 32]]
    best_zero = max((r for r in rows[: len(policies) * 2] if r.resolution == (32, 32)), key=key)
    assert zero[0]["best_accuracy"] == best_zero.policy
    assert len(zero[0]["accuracy_tests"]) == 2
    assert "core_patch + fine-tune" not in {t["policy"] for t in zero[0]["accuracy_tests"]}
    # at 16x16 the identical core_patch row is not compared with itself
    c16 = comp[(16, 16)]
    assert {t["policy"] for t in c16["accuracy_tests"]} | {c16["best_accuracy"]} == {
        "as_is",
        "core_patch:factor=4",
    } and len(c16["accuracy_tests"]) == 1
    report = (tmp_path / "report.md").read_text()
    assert "**NOT a no-op: changes the model**" in report
    assert "identical (exact no-op)" in report and "## Which policy is best" in report
    assert "multi-stage" not in report and "single-pass only" not in report  # no chains given
    assert {r.kind for r in rows} == {"single-pass"}
    base = by[("as_is", (16, 16))].metrics
    assert (
        f"**The trained model at its training resolution** (16x16, `as_is`): "
        f"{100 * base['accuracy']:.1f}% label accuracy, "
        f"{base['accuracy'] / 0.9:.0%} of the real-image classifier's 90.0%"
    ) in report
    assert f"- **32x32, accuracy:** best `{best.policy}`" in report
    assert f"- **32x32, zero-shot policies only, accuracy:** best `{best_zero.policy}`" in report
    check_report_html(tmp_path)  # the strong claims above read as a page


def test_cli_count_at_is_checked():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ditkit.cli",
            "extrapolate",
            str(TINY),
            "--resolutions",
            "32",
            "--count-at",
            "32:5",
            "--no-measure",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--count-at '32:5': expected RES=N" in r.stderr
    assert "Traceback" not in r.stderr


def test_sample_policy_adapts_the_checkpoint_before_sampling(tmp_path):
    """`ditkit sample CKPT --resolution R --policy P` samples the model adapted as the report
    does: an exact no-op policy at the trained size gives the very same samples, core_patch at
    2x differs from as_is there, and a bad policy or an .onnx source is one usage error."""
    from ditkit.cli import main
    from ditkit.runtime.checkpoint import save_checkpoint

    spec = S.load(TINY)
    torch.manual_seed(0)
    model = build(spec)
    perturb(model, 0.02)  # zero-initialised output layers would make every sample alike
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, model.state_dict(), spec)
    h, w = spec.input.resolution

    def grid(name: str, *args) -> bytes:
        out = tmp_path / f"{name}.png"
        assert (
            main(
                [
                    "sample",
                    str(ckpt),
                    "--objective",
                    "edm",
                    "--steps",
                    "2",
                    "--count",
                    "2",
                    "--out",
                    str(out),
                    "--threads",
                    "1",
                    "--no-progress",
                    *args,
                ]
            )
            == 0
        )
        return out.read_bytes()

    assert grid("plain") == grid("noop", "--policy", "core_patch")  # bit-identical at 1x
    big = f"{2 * h}x{2 * w}"
    assert grid("as_is2", "--resolution", big) != grid(
        "cp2", "--resolution", big, "--policy", "core_patch"
    )
    assert main(["sample", str(ckpt), "--policy", "zoom", "--count", "1"]) == 2
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not read: the flag is refused first")
    assert main(["sample", str(onnx), "--policy", "core_patch", "--count", "1"]) == 2
    assert (
        main(
            [
                "sample",
                str(ckpt),
                "--policy",
                "core_patch",
                "--resolution",
                f"{h + 8}x{w}",
                "--count",
                "1",
            ]
        )
        == 2
    )  # factor auto: not a whole multiple


@pytest.mark.slow  # ~18 s on a loaded 2-core machine: the cost curves and the classifier
def test_cli_scores_with_the_classifier_of_the_runs_data(tmp_path):
    """`ditkit extrapolate CKPT` beside an experiment.yaml of digits scores every cell with the
    digits classifier (the command hands the runner a ClassifierScorer built from the data
    kind)."""
    from ditkit.cli import main
    from ditkit.runtime.checkpoint import save_checkpoint

    spec = S.load(TINY)
    torch.manual_seed(0)
    model = build(spec)
    perturb(model, 0.02)
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, model.state_dict(), spec, objective=S.EDMObjective())
    (tmp_path / "experiment.yaml").write_text("data: {kind: digits, classes: 10}\n")
    args = [
        "extrapolate",
        str(ckpt),
        "--resolutions",
        "16",
        "--steps",
        "1",
        "--count",
        "12",
        "--grid-count",
        "2",
        "--no-measure",
        "--bootstrap",
        "20",
        "--no-progress",
    ]
    assert main(args + ["--out", str(tmp_path / "scored")]) == 0
    (row,) = json.loads((tmp_path / "scored/results.json").read_text())["rows"]
    assert row["grid"]
    m = row["metrics"]
    assert m["count"] == 12 and 0 <= m["accuracy"] <= 1 and m["real_accuracy"] > 0.8
    assert m["accuracy_ci"][0] <= m["accuracy"] <= m["accuracy_ci"][1]
