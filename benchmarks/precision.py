"""fp16 / bf16 ONNX export tolerance vs eager fp32, for docs/guides/deployment.md.

    python benchmarks/precision.py [--specs tiny-dit tiny-hdit-neighborhood] \
        [--precisions fp16 bf16]

Each tiny spec is built with random weights, and its zero-initialised layers are perturbed (as
in the tests) so the output depends on every layer. ``export_onnx`` writes the reduced-precision
graph and runs its parity check (2 resolutions x batch 1 and 3, against eager fp32 at the same
inputs); this prints the check's rows as a Markdown table. fp16 graphs run in onnxruntime CPU;
bf16 graphs run in ``onnx.reference`` (onnxruntime's CPU provider has no bf16 Gemm / MatMul).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ditkit import spec as S
from ditkit.builder import build
from ditkit.deploy.export import export_onnx

ROOT = Path(__file__).resolve().parents[1]


def perturbed(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build(S.load(ROOT / "examples/tiny" / f"{name}.yaml")).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "position" not in n:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=["tiny-dit", "tiny-hdit-neighborhood"])
    ap.add_argument("--precisions", nargs="+", default=["fp16", "bf16"])
    args = ap.parse_args()
    print(
        "| spec | precision | opset | runtime | batch x H x W | max abs diff | output scale "
        "| diff / max(1, scale) |"
    )
    print("| --- | --- | ---: | --- | --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.specs:
            spec = S.load(ROOT / "examples/tiny" / f"{name}.yaml")
            objective = spec.default_objective
            for precision in args.precisions:
                result = export_onnx(
                    perturbed(name), objective, Path(tmp) / "m.onnx", precision=precision
                )
                for p in result.parity:
                    h, w = p["resolution"]
                    print(
                        f"| {name} | {precision} | {result.opset} | "
                        f"{p['runtime'].split(' (')[0]} | {p['batch']}x{h}x{w} | "
                        f"{p['max_abs_diff']:.2e} | {p['scale']:.2f} | "
                        f"{p['max_abs_diff'] / max(1.0, p['scale']):.1e} |"
                    )


if __name__ == "__main__":
    main()
