"""The resolution-extrapolation showcase's parts that run without training anything: the second
base differs from the first only in its training-time options, the script wires every report the
summary reads, and the summary picks the best rows and judges the targets as the issue states
them (on hand-made reports)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ditkit.spec.experiment import load_experiment

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "examples/experiments"


def load_summary():
    spec = importlib.util.spec_from_file_location("showcase_summary", EXP / "showcase_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_second_base_differs_only_in_its_training_time_options():
    a = load_experiment(EXP / "shapes-extrapolate.yaml")
    b = load_experiment(EXP / "shapes-trainopts.yaml")
    ma = a.model_spec.model_dump()
    mb = b.model_spec.model_dump()
    assert mb["block"]["rope"].pop("train_positions") == {
        "kind": "random",
        "max_scale": 4.0,
        "probability": 0.5,
    }
    assert ma["block"]["rope"].pop("train_positions") == {"kind": "grid"}
    ma.pop("name"), mb.pop("name")
    assert ma == mb
    # the same budget: steps, batch, seed, optimizer, objective, data
    ta, tb = a.training.model_dump(), b.training.model_dump()
    assert tb.pop("resolutions") == ((12, 12), (16, 16), (20, 20))
    assert ta.pop("resolutions") is None
    tb.pop("resolution_weights"), ta.pop("resolution_weights")
    assert ta == tb
    for field in ("optimizer", "objective", "data", "ema"):
        assert getattr(a, field) == getattr(b, field), field
    # uniform buckets: about the pixels of a 16x16 run (1.04x)
    mean = sum(h * w for h, w in b.training.resolutions) / len(b.training.resolutions)
    assert 1.0 < mean / 256 < 1.1


def run_showcase(tmp_path, ditkit, timeout):
    """The showcase script in smoke mode (SMOKE=1), its runs and reports under tmp_path."""
    env = {
        **os.environ,
        "SMOKE": "1",
        "RUNS": str(tmp_path / "runs"),
        "OUT": str(tmp_path / "out"),
        "DITKIT": str(ditkit),
    }
    return subprocess.run(
        ["bash", str(EXP / "shapes-showcase.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_script_writes_every_report_the_summary_reads():
    script = (EXP / "shapes-showcase.sh").read_text()
    summary = load_summary()
    for name in summary.REPORTS:
        assert f'--out "$OUT/{name}"' in script, name
    assert "shapes-trainopts.yaml" in script and "showcase_summary.py" in script
    subprocess.run(["bash", "-n", str(EXP / "shapes-showcase.sh")], check=True)


def row(policy, res, acc, fd, real_fd=5.0, kind="single-pass", count=500):
    return {
        "policy": policy,
        "resolution": [res, res],
        "kind": kind,
        "stages": policy.split(" + stages ")[1] if kind == "multi-stage" else None,
        "error": None,
        "metrics": {
            "accuracy": acc,
            "accuracy_ci": [acc - 0.04, acc + 0.04],
            "frechet": fd,
            "frechet_real": real_fd,
            "real_accuracy": 0.8,
            "count": count,
        },
    }


def test_summary_names_the_best_per_category_and_judges_the_targets(tmp_path):
    zero = {
        "trained_resolution": [16, 16],
        "noop_at_training_resolution": {"as_is": {"status": "identical"}},
        "rows": [
            row("as_is", 16, 0.70, 3.0, 2.5),
            row("as_is", 32, 0.30, 90.0),
            row("core_patch", 32, 0.60, 12.0),  # 86% of 1x: short of 90%
            row("as_is", 64, 0.10, 300.0, 20.0, count=200),
            # 93% of 1x, Fréchet 1.98x real
            row("core_patch + stages 16,32:0.5", 32, 0.65, 9.9, kind="multi-stage"),
            row("as_is + stages 16,32:0.5", 32, 0.66, 10.1, kind="multi-stage"),  # 94%, FD 2.02x
            row("core_patch + stages 16,64:0.5", 64, 0.53, 39.0, 20.0, "multi-stage", 200),
        ],
    }
    tuned = {
        "trained_resolution": [16, 16],
        "noop_at_training_resolution": {"as_is": {"status": "identical"}},
        "rows": [
            row("as_is", 16, 0.70, 3.0, 2.5),
            row("core_patch + fine-tune new (200 steps)", 32, 0.67, 8.0),  # 95.7% of 1x
            row("as_is + fine-tune * (200 steps)", 32, 0.49, 6.0),
            row("as_is + fine-tune * (200 steps)", 64, 0.42, 30.0, 20.0, count=200),
        ],
    }
    for name, data in (("shapes-zero-shot", zero), ("shapes-finetuned", tuned)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(data))
    summary = load_summary()
    assert summary.main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    lines = text.splitlines()

    def line(start):
        return next(x for x in lines if x.startswith(start))

    assert "16×16: 70.0% label accuracy" in text
    single2 = line("| 2× (32²) | zero-shot single-pass |")
    assert "`core_patch`" in single2 and "**86%**" in single2
    assert "not met by any row (≥ 90% of 1× and Fréchet ≤ 2× real)" in single2
    # the most accurate multi-stage row misses the Fréchet bound by a hair; the next one meets
    # both bounds and is named
    multi2 = line("| 2× (32²) | multi-stage |")
    assert (
        "| `as_is + stages 16,32:0.5` |" in multi2 and "**94%**" in multi2 and "2.0× real" in multi2
    )
    assert (
        "**met** by `core_patch + stages 16,32:0.5`: 65.0% (**93%**), Fréchet 9.9 (2.0× real)"
        in multi2
    )
    assert multi2.endswith("`core_patch + stages 16,32:0.5` 9.9 |")  # the best Fréchet apart
    multi4 = line("| 4× (64²) | multi-stage |")
    assert "**76%**" in multi4 and "| **met** (≥ 75% of 1× and" in multi4  # 53/70, 39 <= 2 x 20
    assert "not met by any row" in line("| 4× (64²) | zero-shot single-pass |")
    tuned2 = line("| 2× (32²) | fine-tuned |")
    assert "**96%**" in tuned2 and "**met** (≥ 95% of 1×)" in tuned2
    assert "(no `" in text and "shapes-trainopts" in text  # a report not run is said, not hidden
    # every method in one table: zero-shot (zero-shot report), fine-tuned (fine-tuned report),
    # its best chain; the share of 1x (70%), Fréchet as a multiple of real, the column's best bold
    assert "| method | 2× zero-shot | 2× fine-tuned | 2× multi-stage | 4× zero-shot |" in text
    assert line("| `core_patch` |") == (
        "| `core_patch` | **86%** · 2.4× | **96%** · 1.6× | 93% · 2.0× (16,32:0.5) | – | – | "
        "**76%** · 1.9× (16,64:0.5) |"  # 39 / 20
    )
    assert line("| `as_is` |") == (
        "| `as_is` | 43% · 18.0× | 70% · 1.2× | **94%** · 2.0× (16,32:0.5) | **14%** · 15.0× | "
        "**60%** · 1.5× | – |"
    )
    assert text.index("## Every method") < text.index("## [shapes-zero-shot]")


@pytest.mark.slow  # about 4 minutes on 2 cores; .ci/run runs it in its slow line
def test_the_showcase_script_runs_end_to_end_in_smoke_mode(tmp_path):
    """examples/experiments/shapes-showcase.sh with SMOKE=1 (a few steps and samples): both
    bases, the sixteen fine-tunes and the three reports, every row it names, and the summary."""
    done = run_showcase(tmp_path, Path(sys.executable).parent / "ditkit", timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== total" in done.stderr
    rows = {
        name: json.loads((tmp_path / "out" / name / "results.json").read_text())["rows"]
        for name in ("shapes-zero-shot", "shapes-finetuned", "shapes-trainopts")
    }
    # 8 policies at 3 resolutions, then each through both chains (16 -> 32, 16 -> 64)
    assert len(rows["shapes-zero-shot"]) == 24 + 16
    assert sum(r["kind"] == "multi-stage" for r in rows["shapes-zero-shot"]) == 16
    tuned = [r for r in rows["shapes-finetuned"] if " + fine-tune " in r["policy"]]
    assert sorted(r["resolution"][0] for r in tuned) == [32] * 8 + [64] * 8  # every method
    assert len(rows["shapes-finetuned"]) == 1 + 16  # the 16x16 reference, then the fine-tunes
    assert len(rows["shapes-trainopts"]) == 6 + 2
    assert all(r["metrics"] and not r["error"] for rs in rows.values() for r in rs)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.count("| 2× (32²) | multi-stage |") == 2
    assert "| 4× (64²) | fine-tuned |" in summary
    table = summary.split("## Every method")[1].split("\n## ")[0]
    methods = [ln for ln in table.splitlines() if ln.startswith("| `")]
    assert len(methods) == 8  # the every-method table names each method...
    assert all(" – " not in ln for ln in methods)  # ...with all six cells filled


def test_summary_refuses_a_missing_folder_and_a_broken_report(tmp_path, capsys):
    summary = load_summary()
    assert summary.main([str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().out
    (tmp_path / "shapes-zero-shot").mkdir()
    (tmp_path / "shapes-zero-shot" / "results.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert summary.main([str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and "is not an extrapolation report's" in out
    assert not (tmp_path / "summary.md").exists()


def test_a_failed_lane_one_finetune_stops_the_showcase_with_one_message(tmp_path):
    """Lane 2 waits for lane 1's three fine-tunes before its report; when lane 1 stops without
    them, lane 2 must not wait forever: the script exits non-zero, saying which lane stopped."""
    fake = tmp_path / "ditkit"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {tmp_path / "calls"}\n'
        'if [[ "$*" == *shapes-finetune-add-levels.yaml* && "$*" == *ft2-* ]]; then\n'
        '    echo "error: add-levels broke" >&2; exit 2\n'
        "fi\n"
    )
    fake.chmod(0o755)
    done = run_showcase(tmp_path, fake, timeout=120)
    assert done.returncode != 0
    assert "lane 1 stopped before its fine-tunes were done" in done.stderr
    assert "a lane failed" in done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert not any(c.startswith("extrapolate") for c in calls)  # neither lane reached a report
    # lane 2 ran its own 13 fine-tunes: the as_is five at 2x, all eight at 4x
    assert sum("--out" in c and "/ft4-" in c for c in calls) == 8
    assert sum("/ft2-as-is" in c for c in calls) == 5
