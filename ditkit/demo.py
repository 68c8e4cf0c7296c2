"""``ditkit demo``: the embedded default job -- a tiny pixel-space HDiT, described, built and
run forward and backward on the CPU."""

from __future__ import annotations

import time

from ditkit import spec as S

DEMO_SPEC = """
spec_version: 1
name: demo-tiny-hdit
description: tiny two-level HDiT on 32x32 RGB (neighborhood outside, global inside)
input: {channels: 3, space: pixel, resolution: [32, 32]}
patch: {size: 2, bias: false}
conditioning:
  width: 64
  noise: {kind: fourier}
  classes: {count: 10}
  mapping: {depth: 1}
block:
  d_head: 16
  logits: {kind: cosine}
  rope: {kind: axial, fraction: 0.5}
  attention_bias: false
  norm: {kind: rms}
  modulation: {kind: ada_scale}
  ffn: {kind: geglu, ratio: 3.0, bias: false}
  zero_init_out: true
levels:
  - d_model: 64
    encoder: 2
    decoder: 2
    attention: {kind: neighborhood, kernel_size: 7}
    down: {kind: merge, factor: 2}
    skip: {kind: lerp}
  - d_model: 128
    middle: 4
    attention: {kind: global}
head: {kind: linear, norm: {kind: rms, affine: true}, bias: false}
init: {linear: torch_default, embedding_std: 1.0}
"""


def run_demo(args) -> int:
    import torch

    from ditkit.builder import build, describe
    from ditkit.cli import format_report, load_spec

    spec = load_spec(args.spec) if args.spec else S.loads(DEMO_SPEC, source="embedded demo spec")
    print(format_report(describe(spec), spec))
    torch.manual_seed(0)
    model = build(spec)
    h, w = spec.input.resolution
    x = torch.randn(4, spec.input.channels, h, w)
    sigma = torch.rand(4).mul(5).add(0.05)
    labels = (torch.arange(4) % spec.conditioning.classes.count
              if spec.conditioning.classes else None)
    t0 = time.perf_counter()
    out = model(x, sigma, labels)
    loss = out.pow(2).mean()
    loss.backward()
    dt = time.perf_counter() - t0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = torch.isfinite(out).all().item() and all(torch.isfinite(g).all().item() for g in grads)
    print(f"\nforward+backward on CPU, batch 4 at {h}x{w}: {dt * 1000:.0f} ms; output "
          f"{tuple(out.shape)}; {len(grads)} parameter gradients; all finite: {finite}")
    return 0 if finite else 1
