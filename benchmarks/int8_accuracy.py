"""What the opt-in int8 export (``ditkit export --quantize int8``) costs in accuracy.

    python benchmarks/int8_accuracy.py SOURCE [--resolution 128] [--steps 20] [--batch 4]
        [--threads 1]

SOURCE: a ditkit checkpoint (e.g. the one ``ditkit demo --out DIR`` trains:
``DIR/checkpoints/step-*/ema.safetensors``) or a spec (random weights, its zero-initialised
layers perturbed so that the network changes the output). Exports the model for onnxruntime
in fp32 and with ``quantize="int8"`` and prints, against fp32 eager PyTorch:

- the denoiser output (``x0``) at 5 noise levels of the model's range: relative error
  ``||x0_onnx - x0_eager|| / ||x0_eager||`` and max |diff|;
- a full sampler run (Heun, ``--steps``, fixed seed and labels): max and RMS difference of the
  final samples, and the RMS of the eager samples for scale.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def main() -> None:
    from ditkit import spec as S
    from ditkit.cli.common import load_model_source
    from ditkit.runtime.denoiser import Denoiser, NoiseRange
    from ditkit.runtime.engines import OrtDenoiser
    from ditkit.runtime.export import export_onnx, zero_weights
    from ditkit.runtime.samplers import sample

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("--resolution", type=int, default=None, help="default: the spec's")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, objective, _, _ = load_model_source(args.source)
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
    engines = {}
    tmp = tempfile.TemporaryDirectory(prefix="ditkit-int8-acc-")
    for name, quantize in (("onnxruntime fp32", None), ("onnxruntime int8", "int8")):
        path = Path(tmp.name) / f"{name.split()[-1]}.onnx"
        export_onnx(model, objective, path, check=False, resolution=res, quantize=quantize)
        engines[name] = OrtDenoiser(path, threads=args.threads)
    print(f"{spec.name} at {res[0]}x{res[1]}, batch {args.batch}, {args.threads} thread(s)"
          + (f"; {len(perturbed)} zero-initialised weight matrices perturbed" if perturbed
             else ""))

    g = torch.Generator().manual_seed(args.seed + 1)
    x0 = torch.randn(args.batch, spec.input.channels, *res, generator=g)
    classes = spec.conditioning.classes
    labels = (torch.randint(0, classes.count, (args.batch,), generator=g) if classes else None)
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
        cells = []
        for name, eng in engines.items():
            got = eng(x, s, labels)
            cells.append(f"{name}: {float((got - ref).norm()) / scale:.2e} | "
                         f"{float((got - ref).abs().max()):.2e}")
        print(f"  sigma {sigma:8.3f}:  " + ";  ".join(cells))

    print(f"\nfull sampler run (heun, {args.steps} steps, seed {args.seed}) vs fp32 eager")
    kw = dict(steps=args.steps, sampler="heun", seed=args.seed, class_labels=labels)
    shape = (args.batch, spec.input.channels, *res)
    with torch.no_grad():
        ref = sample(eager, shape, **kw)
    print(f"  eager samples: RMS {float(ref.pow(2).mean().sqrt()):.3f}, max |x| "
          f"{float(ref.abs().max()):.3f}")
    for name, eng in engines.items():
        got = sample(eng, shape, **kw)
        d = got - ref
        print(f"  {name}: max |diff| {float(d.abs().max()):.2e}, RMS diff "
              f"{float(d.pow(2).mean().sqrt()):.2e}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
