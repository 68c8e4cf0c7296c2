"""torch.compile (inductor, one graph) against eager on CPU, for docs/guides/deployment.md.

    OMP_NUM_THREADS=1 python benchmarks/compile.py [--spec tiny-hdit-shapes]
        [--resolutions 64 128] [--batch 2] [--repeats 3] [--threads 1]

A small HDiT (``examples/tiny/<spec>.yaml``: neighborhood attention outside, global inside) with
random weights, at each resolution:

- **sampling step**: ``Denoiser.denoise`` (EDM) under ``torch.no_grad``, eager vs
  ``compile_denoiser`` (``fullgraph=True``, mode ``default``: CUDA graphs do not apply on CPU);
- **training step**: forward, loss, backward and an AdamW step, eager vs ``compile_network``
  (the optimizer step stays eager in both).

Each row: median milliseconds over ``--repeats`` timed calls after 2 warm-up calls, the ratio
eager / compiled (above 1: compiled is faster) and the compile time (the first compiled call,
tracing and code generation included; inductor's cache is disabled so it is a cold compile).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # measure a cold compile

import torch  # noqa: E402

from ditkit import spec as S  # noqa: E402
from ditkit.builder import build  # noqa: E402
from ditkit.runtime.denoiser import Denoiser, compile_denoiser, compile_network  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _first_call_s(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sampling(spec, res, batch, repeats) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = build(spec).eval()
    x = torch.randn(batch, spec.input.channels, *res)
    sigma = torch.full((batch,), 2.0)
    labels = torch.zeros(batch, dtype=torch.long)
    eager = Denoiser(model, S.EDMObjective())
    compiled = compile_denoiser(Denoiser(model, S.EDMObjective()), "default")
    with torch.no_grad():
        compile_s = _first_call_s(lambda: compiled.denoise(x, sigma, labels))
        t_eager = _median_ms(lambda: eager.denoise(x, sigma, labels), repeats)
        t_compiled = _median_ms(lambda: compiled.denoise(x, sigma, labels), repeats)
    return t_eager, t_compiled, compile_s


def training(spec, res, batch, repeats) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = build(spec).train()
    x = torch.randn(batch, spec.input.channels, *res)
    sigma = torch.rand(batch) * 3 + 0.1
    labels = torch.zeros(batch, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    compiled = compile_network(model, mode="default", training=True)

    def step(net):
        def run():
            loss = (net(x, sigma, labels) - x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    compile_s = _first_call_s(step(compiled))
    t_eager = _median_ms(step(model), repeats)
    t_compiled = _median_ms(step(compiled), repeats)
    return t_eager, t_compiled, compile_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="tiny-hdit-shapes")
    ap.add_argument("--resolutions", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = S.load(ROOT / "examples/tiny" / f"{args.spec}.yaml")
    print(
        f"{args.spec}, batch {args.batch}, {args.threads} thread(s), torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("| step | resolution | eager ms | compiled ms | eager / compiled | compile s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for res in args.resolutions:
        for name, fn in (("sampling", sampling), ("training", training)):
            torch._dynamo.reset()
            e, c, cs = fn(spec, (res, res), args.batch, args.repeats)
            print(
                f"| {name} | {res}x{res} | {e:.1f} | {c:.1f} | {e / c:.2f} | {cs:.1f} |", flush=True
            )


if __name__ == "__main__":
    main()
