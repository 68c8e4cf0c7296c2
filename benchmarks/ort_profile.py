"""Where onnxruntime spends its time: op-type totals of one denoiser evaluation.

    python benchmarks/ort_profile.py [--spec SPEC] [--resolutions 128 256] [--threads 1]
        [--backend gather|tiled] [--repeats 3] [--torch] [--quantize int8]

Exports the spec (random weights, fp32, dynamic batch and resolution) with the chosen exportable
neighborhood backend, runs it in onnxruntime with ``SessionOptions.enable_profiling`` and prints,
per resolution, the share of each op type in the node time (median run of ``--repeats``).
``--torch`` also prints the eager model's top ops from ``torch.profiler`` for comparison.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ditkit import spec as S
from ditkit.builder import build, kernels
from ditkit.deploy.export import export_onnx

ROOT = Path(__file__).resolve().parents[1]


def op_totals(profile_file: str, runs: int, by: str = "op") -> dict[str, float]:
    """Microseconds per op type (``by="op"``) or per node with its input shapes
    (``by="node"``), averaged over the ``runs`` runs of a profile file."""
    events = json.loads(Path(profile_file).read_text())
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            a = e["args"]
            key = a.get("op_name", "?")
            if by == "node":
                shapes = [list(s.values())[0] for s in a.get("input_type_shape", [])]
                key = f"{key} {e['name'][: -len('_kernel_time')][-40:]} {shapes}"
            totals[key] += e["dur"] / runs
    return dict(totals)


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "benchmarks/specs/hdit-bench-4m.yaml"))
    ap.add_argument("--resolutions", nargs="+", type=int, default=[128, 256])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="gather", choices=kernels.EXPORTABLE_BACKENDS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--nodes", type=int, default=0, help="also list the N slowest nodes")
    ap.add_argument("--torch", action="store_true", help="also profile eager torch")
    ap.add_argument(
        "--quantize",
        default=None,
        choices=["int8"],
        help="profile the opt-in int8 export instead of the fp32 one",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    spec = S.load(args.spec)
    model = build(spec).eval()
    tmp = tempfile.TemporaryDirectory(prefix="ditkit-prof-")
    path = Path(tmp.name) / "model.onnx"
    with kernels.use_backend(args.backend):
        export_onnx(
            model,
            S.EDMObjective(),
            path,
            check=False,
            resolution=(args.resolutions[0],) * 2,
            quantize=args.quantize,
        )
    for r in args.resolutions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp.name) / f"prof{r}")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        g = torch.Generator().manual_seed(0)
        feeds = {
            "x": torch.randn(1, spec.input.channels, r, r, generator=g).numpy(),
            "sigma": np.full((1,), 2.0, np.float32),
        }
        names = [i.name for i in sess.get_inputs()]
        if "class_labels" in names:
            feeds["class_labels"] = np.zeros(1, np.int64)
        for i in sess.get_inputs():
            if i.name not in feeds:
                feeds[i.name] = np.zeros((1, i.shape[1]), np.float32)
        sess.run(None, feeds)  # warm-up (counted in the profile, subtracted below)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t0)
        prof = sess.end_profiling()
        totals = op_totals(prof, args.repeats + 1)
        node = sum(totals.values())
        print(
            f"\n{spec.name} {r}x{r}, backend {args.backend}, {args.threads} thread(s): "
            f"run {1e3 * float(np.median(times)):.1f} ms, node time {node / 1e3:.1f} ms/run"
        )
        for op, us in sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {op:24s} {us / 1e3:9.2f} ms  {100 * us / node:5.1f} %")
        if args.nodes:
            for name, us in sorted(
                op_totals(prof, args.repeats + 1, "node").items(), key=lambda kv: -kv[1]
            )[: args.nodes]:
                print(f"    {us / 1e3:8.2f} ms  {name}")
        if args.torch:
            from torch.profiler import ProfilerActivity, profile

            from ditkit.runtime.denoiser import Denoiser

            den = Denoiser(model, S.EDMObjective())
            x = torch.from_numpy(feeds["x"])
            s = torch.full((1,), 2.0)
            y = torch.zeros(1, dtype=torch.long)
            with torch.no_grad(), kernels.use_backend("auto"):
                den(x, s, y)
                with profile(activities=[ProfilerActivity.CPU]) as p:
                    den(x, s, y)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    tmp.cleanup()


if __name__ == "__main__":
    main()
