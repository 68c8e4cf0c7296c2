"""What the approximate fast engines cost in accuracy: onnxruntime with int8 linear layers
(``ditkit export --quantize int8``), onnxruntime with the OpenVINO execution provider in bf16
(``--ort-provider openvino-bf16``) and, for scale, eager PyTorch under bf16 autocast; the exact
engines (onnxruntime fp32 on its CPU kernels and on OpenVINO in f32) are shown beside them.

    python benchmarks/approx_accuracy.py SOURCE [--resolution 128] [--steps 20] [--batch 4]
        [--threads 1] [--engines ...] [--classify shapes|digits --count 500]

SOURCE: a ditkit checkpoint (e.g. the one ``ditkit demo --out DIR`` trains:
``DIR/checkpoints/step-*/ema.safetensors``) or a spec (random weights, its zero-initialised
layers perturbed so that the network changes the output). Prints, against fp32 eager PyTorch:

- the denoiser output (``x0``) at 5 noise levels of the model's range: relative error
  ``||x0_engine - x0_eager|| / ||x0_eager||`` and max |diff|;
- a full sampler run (Heun, ``--steps``, fixed seed and labels): max and RMS difference of the
  final samples, and the RMS of the eager samples for scale;
- with ``--classify DATA``: ``--count`` samples per engine (same seeds and labels, Heun) scored
  by that data's built-in classifier (``ditkit evaluate``'s): accuracy and Fréchet distance,
  i.e. whether the approximation changes what the model draws.
Engines that cannot run here (e.g. no OpenVINO plugin) are listed with the reason.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

ENGINES = (
    "onnxruntime",
    "onnxruntime-int8",
    "onnxruntime-openvino",
    "onnxruntime-openvino-bf16",
    "eager-bf16",
)


class Autocast:
    """A denoiser whose calls run under ``torch.autocast`` to bf16 (outputs back in fp32)."""

    def __init__(self, denoiser):
        self.inner = denoiser

    def __getattr__(self, name):
        value = getattr(self.inner, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = value(*args, **kwargs)
            return (
                tuple(o.float() if torch.is_tensor(o) else o for o in out)
                if isinstance(out, tuple)
                else out.float()
            )

        return call

    def __call__(self, *args, **kwargs):
        return self.__getattr__("__call__")(*args, **kwargs)


def main() -> None:
    from ditkit import spec as S
    from ditkit.cli.common import load_model_source, parse_list
    from ditkit.errors import UserError
    from ditkit.deploy.bench import ORT_ENGINES
    from ditkit.runtime.denoiser import Denoiser, NoiseRange
    from ditkit.deploy.engines import OrtDenoiser
    from ditkit.deploy.export import export_onnx, zero_weights
    from ditkit.deploy.ort_providers import ProviderError
    from ditkit.runtime.samplers import sample

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("--resolution", type=int, default=None, help="default: the spec's")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--engines", default=",".join(ENGINES), help=f"comma-separated from {', '.join(ENGINES)}"
    )
    ap.add_argument(
        "--classify",
        default=None,
        choices=("digits", "shapes"),
        help="also score --count samples per engine with this data's classifier",
    )
    ap.add_argument("--count", type=int, default=500, help="samples per engine (--classify)")
    args = ap.parse_args()
    names = parse_list(args.engines)
    unknown = set(names) - set(ENGINES)
    if unknown:
        ap.error(f"--engines {','.join(sorted(unknown))}: choose from {', '.join(ENGINES)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        model, objective, _, _ = load_model_source(args.source)
    except UserError as err:  # a missing or unreadable source: one line, exit 2
        ap.error(str(err))
    model = model.eval()
    perturbed = zero_weights(model)
    if perturbed:  # an untrained spec: give the zero-initialised layers small weights
        params = dict(model.named_parameters())
        g = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for n in perturbed:
                params[n].copy_(torch.randn(params[n].shape, generator=g) * 0.02)
    spec: S.ModelSpec = model.spec
    res = (args.resolution,) * 2 if args.resolution else tuple(spec.input.resolution)
    eager = Denoiser(model, objective)
    engines, files = {}, {}
    tmp = tempfile.TemporaryDirectory(prefix="ditkit-approx-acc-")
    for name in names:
        if name == "eager-bf16":
            engines[name] = Autocast(eager)
            continue
        quantize, provider = ORT_ENGINES[name]
        if quantize not in files:
            files[quantize] = Path(tmp.name) / f"{quantize or 'fp32'}.onnx"
            export_onnx(
                model, objective, files[quantize], check=False, resolution=res, quantize=quantize
            )
        try:
            engines[name] = OrtDenoiser(
                files[quantize], threads=args.threads, ort_provider=provider
            )
        except ProviderError as err:
            print(f"{name}: not run ({err})")
    print(
        f"{spec.name} at {res[0]}x{res[1]}, batch {args.batch}, {args.threads} thread(s)"
        + (f"; {len(perturbed)} zero-initialised weight matrices perturbed" if perturbed else "")
    )

    g = torch.Generator().manual_seed(args.seed + 1)
    x0 = torch.randn(args.batch, spec.input.channels, *res, generator=g)
    classes = spec.conditioning.classes
    labels = torch.randint(0, classes.count, (args.batch,), generator=g) if classes else None
    nr = NoiseRange.of(objective)
    lo, hi = max(nr.sigma_min, 2e-3), min(nr.sigma_max, 80.0)
    print("\ndenoiser output x0 vs fp32 eager: relative error | max |diff|")
    for i in range(5):
        sigma = lo * (hi / lo) ** (i / 4)
        x = x0 + sigma * torch.randn(x0.shape, generator=g)
        s = torch.full((args.batch,), sigma)
        with torch.no_grad():
            ref = eager(x, s, labels)
            scale = float(ref.norm())
            print(f"  sigma {sigma:8.3f}:")
            for name, eng in engines.items():
                got = eng(x, s, labels)
                print(
                    f"    {name:27s} {float((got - ref).norm()) / scale:.2e} | "
                    f"{float((got - ref).abs().max()):.2e}"
                )

    print(f"\nfull sampler run (heun, {args.steps} steps, seed {args.seed}) vs fp32 eager")
    kw = dict(steps=args.steps, sampler="heun", seed=args.seed, class_labels=labels)
    shape = (args.batch, spec.input.channels, *res)
    with torch.no_grad():
        ref = sample(eager, shape, **kw)
        print(
            f"  eager samples: RMS {float(ref.pow(2).mean().sqrt()):.3f}, max |x| "
            f"{float(ref.abs().max()):.3f}"
        )
        for name, eng in engines.items():
            d = sample(eng, shape, **kw) - ref
            print(
                f"  {name:27s} max |diff| {float(d.abs().max()):.2e}, RMS diff "
                f"{float(d.pow(2).mean().sqrt()):.2e}"
            )
    if args.classify:
        classify(args, spec, {"eager": eager, **engines}, res)
    tmp.cleanup()


def classify(args, spec, engines: dict, res) -> None:
    """``--count`` samples per engine, the same seeds and labels, scored by the classifier."""
    from ditkit.runtime.samplers import sample
    from ditkit.evaluate.stats import wilson_interval
    from ditkit.evaluate.classifier import classifier_for, evaluate_samples

    clf = classifier_for(args.classify, tuple(res))
    labels = torch.arange(args.count) % clf.n_classes
    print(
        f"\n{args.count} samples per engine (heun, {args.steps} steps), scored by the "
        f"{args.classify} classifier: accuracy [95% Wilson] / Fréchet "
        f"(the classifier on held-out real images: {clf.real_accuracy:.1%})"
    )
    for name, eng in engines.items():
        t0 = time.perf_counter()
        images = []
        with torch.no_grad():
            for k, start in enumerate(range(0, args.count, 250)):
                lab = labels[start : start + 250]
                images.append(
                    sample(
                        eng,
                        (len(lab), spec.input.channels, *res),
                        steps=args.steps,
                        sampler="heun",
                        seed=args.seed + k,
                        class_labels=lab,
                    ).float()
                )
        report = evaluate_samples(clf, torch.cat(images), labels)
        lo, hi = wilson_interval(round(report.accuracy * report.count), report.count)
        print(
            f"  {name:27s} {report.accuracy:.1%} [{lo:.1%}, {hi:.1%}] / "
            f"{report.frechet:.2f}  ({time.perf_counter() - t0:.0f} s)"
        )


if __name__ == "__main__":
    main()
