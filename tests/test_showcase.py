"""The resolution-extrapolation showcase's parts that run without training anything: the second
base differs from the first only in its training-time options, the script wires every report the
summary reads, and the summary picks the best rows and judges the targets as the issue states
them (on hand-made reports)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

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
        "noop_at_training_resolution": {"core_patch": {"status": "identical"}},
        "rows": [
            row("core_patch", 16, 0.70, 3.0, 2.5),
            row("core_patch", 32, 0.60, 12.0),
            row("core_patch + fine-tune new (300 steps)", 32, 0.67, 8.0),  # 95.7% of 1x
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
