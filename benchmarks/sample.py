"""CPU benchmark for docs/measurements.md: onnxruntime vs eager per-step latency, tiny HDiT.

    python benchmarks/sample.py [--resolutions 32 64] [--threads 1] [--repeats 20]

One "step" is one denoiser evaluation (the model plus EDM preconditioning) at batch 1, the unit
every sampler is made of. Random weights (latency does not depend on their values); the
onnxruntime side is the file `ditkit export` writes (fp32, dynamic batch and resolution),
timed through the same ``denoise`` call the samplers use. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ditkit import spec as S
from ditkit.builder import build
from ditkit.deploy.bench import bench_sample

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "examples/tiny/tiny-hdit-neighborhood.yaml"))
    ap.add_argument("--resolutions", nargs="+", type=int, default=[32, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = S.load(args.spec)
    rows = bench_sample(
        build(spec).eval(),
        S.EDMObjective(),
        [(r, r) for r in args.resolutions],
        engines=("eager", "onnxruntime"),
        batch=args.batch,
        repeats=args.repeats,
        threads=args.threads,
    )
    print(
        f"{spec.name}, batch {args.batch}, {args.threads} CPU thread(s), median of "
        f"{args.repeats}, torch {torch.__version__}"
    )
    print()
    print(
        "| resolution | eager ms/step | onnxruntime ms/step | ORT / eager | ORT / eager, CPU time |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for res in dict.fromkeys(r["resolution"] for r in rows):
        e = next(r for r in rows if r["resolution"] == res and r["engine"] == "eager")
        o = next(r for r in rows if r["resolution"] == res and r["engine"] == "onnxruntime")
        print(
            f"| {res} | {e['ms_per_step']:.2f} | {o['ms_per_step']:.2f} | "
            f"{o['ms_per_step'] / e['ms_per_step']:.2f} | "
            f"{o['cpu_ms_per_step'] / e['cpu_ms_per_step']:.2f} |"
        )


if __name__ == "__main__":
    main()
