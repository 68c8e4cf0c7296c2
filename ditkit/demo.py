"""``ditkit demo``: the demo job -- train the tiny HDiT of ``examples/tiny/tiny-hdit-digits.yaml``
on scikit-learn's handwritten digits on the CPU (``examples/experiments/demo-digits.yaml``),
with a progress bar and preview grids, then sample the final EMA model and evaluate the samples
(label accuracy and Frechet distance, see ``ditkit.train.evaluate``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEMO_EXPERIMENT = EXAMPLES / "experiments" / "demo-digits.yaml"


def add_arguments(p) -> None:
    p.add_argument("--spec", default=None,
                   help="model spec to train instead of examples/tiny/tiny-hdit-digits.yaml "
                   "(1 or 3 channels, 10 classes)")
    p.add_argument("--out", default=None, help="run folder (default: runs/demo-<time>)")
    p.add_argument("--steps", type=int, default=None, help="override the training steps")
    p.add_argument("--samples", type=int, default=None,
                   help="override the number of evaluation samples (evaluation.count)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: a model this small gains little from "
                   "more, and threads spin-waiting on a shared machine are several times slower)")


def run_demo(args) -> int:
    import torch

    from ditkit.builder import describe
    from ditkit.cli import UsageError, format_report, load_spec
    from ditkit.spec.experiment import load_experiment, resolve_experiment
    from ditkit.train.evaluate import DigitsReport
    from ditkit.train.loop import TrainingError, train

    t_start = time.perf_counter()
    if not DEMO_EXPERIMENT.is_file():
        raise UsageError(f"the demo experiment {DEMO_EXPERIMENT} is missing (the demo runs from "
                         "a source checkout of ditkit)")
    exp = load_experiment(DEMO_EXPERIMENT)
    if args.spec:
        exp = resolve_experiment(exp.model_copy(update={"model": load_spec(args.spec)}),
                                 source=f"demo experiment with {args.spec}")
    if args.steps is not None:
        if args.steps <= 0:
            raise UsageError(f"--steps {args.steps}: must be positive")
        exp = exp.model_copy(update={"training": exp.training.model_copy(
            update={"steps": args.steps})})
    if args.samples is not None:
        if args.samples < 10:
            raise UsageError(f"--samples {args.samples}: use at least 10 (one per digit)")
        exp = exp.model_copy(update={"evaluation": exp.evaluation.model_copy(
            update={"count": args.samples})})
    if args.threads is not None:
        if args.threads <= 0:
            raise UsageError(f"--threads {args.threads}: must be positive")
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    spec = exp.model_spec
    print(format_report(describe(spec), spec))
    tr = exp.training
    print(f"\ntraining {spec.name} on digits ({tr.steps} steps, batch {tr.batch_size}, "
          f"{exp.objective.kind} objective) with {torch.get_num_threads()} CPU thread(s) "
          f"-> {out}")
    try:
        result = train(exp, out, progress=True, device="cpu")
    except TrainingError as err:
        print(f"error: {err}")
        return 1
    t_train = time.perf_counter() - t_start

    ev = exp.evaluation
    if result.evaluation is None:  # the demo experiment enables its evaluation
        raise UsageError(f"{DEMO_EXPERIMENT}: evaluation.enabled must be true for the demo")
    m = result.evaluation
    report = DigitsReport(count=ev.count, accuracy=m["accuracy"], frechet=m["frechet"],
                          frechet_real=m["frechet_real"], real_accuracy=m["real_accuracy"],
                          per_class_accuracy=m["per_class_accuracy"])
    print(f"\nevaluated {ev.count} digits sampled from the final EMA model ({ev.sampler}, "
          f"{ev.steps} steps, cfg {ev.cfg_scale}) in {m['seconds']:.0f} s")
    wall = time.perf_counter() - t_start
    print(f"\n{report.format()}")
    print(f"per class: {', '.join(f'{k}: {a:.0%}' for k, a in enumerate(report.per_class_accuracy))}")
    print(f"wall time {wall:.0f} s (training and evaluation {t_train:.0f} s)")
    print(f"outputs: {out}/samples.png (one column per digit), {out}/previews/, {out}/loss.png, "
          f"{out}/eval.json, {result.checkpoint}/ema.safetensors")
    print(json.dumps({"accuracy": round(report.accuracy, 4), "frechet": round(report.frechet, 3),
                      "frechet_real": round(report.frechet_real, 3), "wall_s": round(wall, 1)}))
    return 0
