"""The demo job (``ditkit demo``): train the tiny HDiT of ``tiny-hdit-digits.yaml`` on
scikit-learn's handwritten digits on the CPU (``demo-digits.yaml``), with a progress bar and
preview grids, then sample the final EMA model and evaluate the samples (label accuracy and
Frechet distance, see ``ditkit.evaluate.classifier``).

Both files ship inside the package (``ditkit/training/assets/``), so an installed wheel runs the
demo; ``examples/experiments/demo-digits.yaml`` and ``examples/tiny/tiny-hdit-digits.yaml`` are
the same experiment in a source checkout (a test keeps them equal)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ditkit import spec as S
from ditkit.builder import describe, format_report, use_backend
from ditkit.errors import UserError
from ditkit.evaluate.classifier import DigitsReport, evaluate_model
from ditkit.runtime.checkpoint import load_model
from ditkit.spec.experiment import load_experiment, resolve_experiment
from ditkit.spec.sampling import Sampling
from ditkit.training.checkpoints import write_json
from ditkit.training.loop import train

if TYPE_CHECKING:
    from ditkit.evaluate.classifier import LabelReport

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_EXPERIMENT = ASSETS / "demo-digits.yaml"


@dataclass
class DemoResult:
    report: LabelReport
    checkpoint: Path
    out: Path
    wall_s: float
    train_s: float
    # the same evaluation without guidance (cfg 1), when it differs
    unguided: LabelReport | None = None


def demo_experiment(
    spec: S.ModelSpec | None = None,
    steps: int | None = None,
    samples: int | None = None,
    source: str = "demo experiment",
    overrides: list[str] | tuple[str, ...] = (),
):
    """The demo experiment, with another model, step count, evaluation count or ``--set``
    overrides (``ditkit.spec.overrides``)."""

    if not DEMO_EXPERIMENT.is_file():
        raise UserError(
            f"the demo experiment {DEMO_EXPERIMENT} is missing from this "
            "installation of ditkit; reinstall it (pip install --force-reinstall "
            "ditkit)"
        )
    exp = load_experiment(DEMO_EXPERIMENT, overrides)
    if spec is not None:
        exp = resolve_experiment(exp.model_copy(update={"model": spec}), source=source)
    if steps is not None:
        if steps <= 0:
            raise UserError(f"--steps {steps}: must be positive")
        exp = exp.model_copy(update={"training": exp.training.model_copy(update={"steps": steps})})
    if samples is not None:
        if samples < 10:
            raise UserError(f"--count {samples}: use at least 10 (one per digit)")
        exp = exp.model_copy(
            update={"evaluation": exp.evaluation.model_copy(update={"count": samples})}
        )
    return exp


def run_demo(exp, out: str | Path, *, log=print, progress: bool = True) -> DemoResult:
    """Train ``exp`` on the CPU into ``out``; training ends with the experiment's evaluation
    (``ditkit.training.evaluation``: ``samples.png``, ``eval.json``). Raises
    ``ditkit.training.loop.TrainingError``."""

    t_start = time.perf_counter()
    out = Path(out)
    spec = exp.model_spec
    log(format_report(describe(spec), spec))
    tr = exp.training
    log(
        f"\ntraining {spec.name} on digits ({tr.steps} steps, batch {tr.batch_size}, "
        f"{exp.objective.kind} objective) with {torch.get_num_threads()} CPU thread(s) "
        f"-> {out}"
    )
    result = train(exp, out, progress=progress, device="cpu")
    t_train = time.perf_counter() - t_start
    assert result.checkpoint is not None  # a finished run ends with a checkpoint

    ev = exp.evaluation
    if result.evaluation is None:  # train() runs the experiment's evaluation block
        raise UserError(f"{DEMO_EXPERIMENT}: evaluation.enabled must be true for the demo")
    m = result.evaluation
    report = DigitsReport(
        count=ev.count,
        accuracy=m["accuracy"],
        frechet=m["frechet"],
        frechet_real=m["frechet_real"],
        real_accuracy=m["real_accuracy"],
        per_class_accuracy=m["per_class_accuracy"],
    )
    log(
        f"\nevaluated {ev.count} digits sampled from the final EMA model "
        f"({ev.sampling.sampler}, {ev.sampling.steps} steps, cfg {ev.sampling.cfg_scale}) in "
        f"{m['seconds']:.0f} s"
    )
    unguided = None
    if ev.sampling.cfg_scale != 1.0:  # guidance hides a weak conditional model: report both
        unguided = _evaluate_unguided(exp, result.checkpoint, progress)
        log(
            f"evaluated {ev.count} digits without guidance (cfg 1.0): "
            f"{unguided.accuracy:.1%}, Frechet {unguided.frechet:.2f}"
        )

        write_json(out / "eval-unguided.json", unguided.to_json())
    wall = time.perf_counter() - t_start
    return DemoResult(report, result.checkpoint, out, wall, t_train, unguided)


def _evaluate_unguided(exp, checkpoint: Path, progress: bool) -> LabelReport:
    """The experiment's evaluation (same count, sampler, steps and seed) at guidance scale 1."""

    ev = exp.evaluation
    model, _ = load_model(checkpoint / "ema.safetensors")
    with use_backend(exp.precision.attention_backend):
        report, _, _ = evaluate_model(
            model,
            exp.model_spec,
            exp.objective,
            count=ev.count,
            sampling=Sampling.of(ev.sampling, cfg_scale=1.0),
            device="cpu",
            progress=progress,
        )
    return report


def summary_json(r: DemoResult) -> dict:
    """The demo's headline numbers (the last line ``ditkit demo`` prints)."""
    report = r.report
    out = {
        "accuracy": round(report.accuracy, 4),
        "frechet": round(report.frechet, 3),
        "frechet_real": round(report.frechet_real, 3),
        "wall_s": round(r.wall_s, 1),
    }
    if r.unguided is not None:
        out["unguided_accuracy"] = round(r.unguided.accuracy, 4)
        out["unguided_frechet"] = round(r.unguided.frechet, 3)
    return out


def summary(r: DemoResult) -> str:
    """What ``ditkit demo`` prints at the end: the scores, times, outputs and one JSON line."""
    report, out = r.report, r.out
    guided = [] if r.unguided is None else [f"without guidance: {r.unguided.format()}"]
    per_class = ", ".join(f"{k}: {a:.0%}" for k, a in enumerate(report.per_class_accuracy))
    return "\n".join(
        [
            f"\n{report.format()}",
            *guided,
            f"per class: {per_class}",
            f"wall time {r.wall_s:.0f} s (training and evaluation {r.train_s:.0f} s)",
            f"outputs: {out}/samples.png (one column per digit), {out}/previews/, {out}/loss.png, "
            f"{out}/eval.json, {r.checkpoint}/ema.safetensors",
            json.dumps(summary_json(r)),
        ]
    )
