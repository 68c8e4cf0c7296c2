"""The resolution-extrapolation runner: sample, measure and report per (policy, resolution).

For every policy and target resolution it adapts the spec and weights
(``ditkit.runtime.extrapolate``), measures GMACs (meta device), forward latency and peak memory,
samples a fixed-seed grid when weights are given, and writes ``report.md``, ``report.html``,
``results.json``, the grids and a log-log cost plot (with an isotropic DiT of similar size for
reference and fitted slopes).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from pydantic import TypeAdapter, ValidationError

from ditkit import spec as S
from ditkit.builder import build, describe

from .extrapolate import adapt, adapt_spec, loglog_slope

_POLICY = TypeAdapter(S.Policy)


def parse_policy(text: str) -> S.Policy:
    """``kind[:key=value[,key=value]]``, e.g. ``local_core:kernel_size=15``,
    ``as_is:rope=extrapolate``, ``add_levels:share_weights=true``."""
    import yaml

    kind, _, rest = text.partition(":")
    data: dict = {"kind": kind}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise S.SpecError([("--policies", f"{text!r}: expected key=value after the kind, "
                                f"e.g. local_core:kernel_size=15")])
        data[key.strip()] = yaml.safe_load(value)
    try:
        return _POLICY.validate_python(data)
    except ValidationError as err:
        issues = [(f"--policies {text}: " + ".".join(str(p) for p in e["loc"]),
                   e["msg"]) for e in err.errors(include_url=False)]
        raise S.SpecError(issues, "policy") from None


def policy_label(policy: S.Policy) -> str:
    data = {k: v for k, v in S.to_data(policy).items() if k != "kind"}
    args = ",".join(f"{k}={v}" for k, v in data.items())
    return policy.kind + (f":{args}" if args else "")


def dit_reference(spec: S.ModelSpec) -> S.ModelSpec:
    """An isotropic DiT with the spec's patch size and input, its innermost width, and the depth
    whose parameter count comes closest to the spec's -- the O(n^2) baseline in cost plots."""
    target = describe(spec).params
    inner = spec.levels[-1]
    d_head = spec.stack(len(spec.levels) - 1, "middle")[0].d_head if inner.middle else 64
    best = None
    for depth in range(1, 49):
        cand = S.ModelSpec(
            name=f"dit-like-{spec.name}", input=spec.input, patch=spec.patch,
            position=S.SincosPosition(), conditioning=S.Conditioning(
                classes=spec.conditioning.classes), block=S.Block(d_head=d_head),
            levels=(S.Level(d_model=inner.d_model, middle=depth),), head=S.AdaLNHead())
        n = sum(p.numel() for p in build(cand, device="meta").parameters())
        if best is None or abs(n - target) < abs(best[0] - target):
            best = (n, cand)
        if n > target:
            break
    return best[1]


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send file descriptor 2 to /dev/null while the block runs: the profiler's C++ side prints
    ``USDT ... profiler_start/stop`` lines there on every use, which would break the progress
    bar. Python exceptions are unaffected (they are raised, not printed, inside the block)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded / captured)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn) -> int | None:
    """Peak bytes of CPU tensors alive at once while ``fn()`` runs, above what was alive before:
    the running sum of PyTorch's CPU allocator events (allocations and frees, in time order),
    recorded by ``torch.profiler`` with ``profile_memory``. Unlike the process's resident size
    it sees memory the allocator reuses, and nothing outside tensors (Python objects, the
    profiler itself). Reads the profiler's event tree (``experimental_event_tree``, an API
    PyTorch marks experimental): ``None`` when that is unavailable."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType

        with _native_stderr_silenced(), \
                profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
    except (AttributeError, ImportError, RuntimeError):
        return None
    running = peak = 0
    for _, size in sorted(allocs):
        running += size
        peak = max(peak, running)
    return peak


def measure_forward(model, spec: S.ModelSpec, resolution, device: str = "cpu",
                    repeats: int = 3) -> tuple[float, float | None]:
    """Median forward latency (ms) at batch 1 and peak memory above the baseline (MiB): the
    CUDA allocator's peak, or on a CPU :func:`cpu_peak_bytes` in one more (profiled) forward
    that does not count towards the latency."""
    h, w = resolution
    x = torch.randn(1, spec.input.channels, h, w, device=device)
    sigma = torch.ones(1, device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device) if spec.conditioning.classes else None
    times = []
    with torch.no_grad():
        model(x, sigma, labels)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x, sigma, labels)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000)
        if device.startswith("cuda"):
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak_bytes = cpu_peak_bytes(lambda: model(x, sigma, labels))
            peak = None if peak_bytes is None else peak_bytes / 2**20
    return statistics.median(times), peak


@dataclass
class Row:
    policy: str
    resolution: tuple[int, int]
    gmacs: float
    params: int
    latency_ms: float | None = None
    peak_mib: float | None = None
    grid: str | None = None
    reinitialised: int = 0
    metrics: dict = field(default_factory=dict)
    error: str | None = None


def run(spec: S.ModelSpec, tensors: dict | None, objective, policies: list[S.Policy],
        resolutions: list[tuple[int, int]], out: Path, *, steps: int = 20,
        sampler: str = "heun", seed: int = 0, samples: int = 8, device: str = "cpu",
        measure: bool = True, curve: list[tuple[int, int]] | None = None,
        evaluate=None, eval_count: int = 0, extra: list[tuple[str, S.ModelSpec, dict]] = (),
        eval_resolutions: list[tuple[int, int]] | None = None, progress: bool = True
        ) -> list[Row]:
    """Run every (policy, resolution), write the report into ``out`` and return the rows.

    ``evaluate``: an optional metrics hook ``(images, labels) -> dict`` (e.g.
    ``ditkit.train.evaluate.ResolutionMetrics``; the runtime does not import the training
    layer, so the caller passes it); it scores ``eval_count`` fixed-seed samples per cell (the
    grid shows the first ``samples`` of them). ``extra``: further rows ``(label, spec,
    tensors)`` of models already at their resolution (e.g. a fine-tuned adaptation), sampled
    and measured like the policies' rows. ``eval_resolutions``: score only these (default:
    all; sampling enough images for metrics is the slow part on a CPU)."""
    scored = None if eval_resolutions is None else {tuple(r) for r in eval_resolutions}

    def hook(res):
        return evaluate if scored is None or tuple(res) in scored else None
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(exist_ok=True)
    rows: list[Row] = []
    jobs = [(p, r) for p in policies for r in resolutions]
    for policy, res in tqdm(jobs, desc="extrapolate", unit="run", disable=not progress):
        label = policy_label(policy)
        try:
            new_spec = adapt_spec(spec, policy, res)
        except S.SpecError as err:
            rows.append(Row(label, res, float("nan"), 0, error="; ".join(
                f"{p}: {m}" for p, m in err.issues)))
            continue
        rep = describe(new_spec)
        row = Row(label, res, rep.gmacs, rep.params)
        model = None
        if tensors is not None:
            adapted = adapt(spec, tensors, policy, res, seed=seed)
            row.reinitialised = len(adapted.record["reinitialised"])
            model = build(adapted.spec, device=device)
            model.load_state_dict(adapted.tensors)
            model.eval()
        elif measure:
            torch.manual_seed(seed)
            model = build(new_spec, device=device).eval()
        if model is not None and measure:
            row.latency_ms, row.peak_mib = measure_forward(model, new_spec, res, device)
        if tensors is not None and objective is not None:
            row.grid, row.metrics = _sample_grid(model, objective, new_spec, res, out, label,
                                                 steps, sampler, seed, samples, device,
                                                 hook(res), eval_count)
        rows.append(row)
    for label, x_spec, x_tensors in tqdm(extra, desc="extra rows", unit="run",
                                         disable=not (extra and progress)):
        res = tuple(x_spec.input.resolution)
        rep = describe(x_spec)
        row = Row(label, res, rep.gmacs, rep.params)
        model = build(x_spec, device=device)
        model.load_state_dict(x_tensors)
        model.eval()
        if measure:
            row.latency_ms, row.peak_mib = measure_forward(model, x_spec, res, device)
        if objective is not None:
            row.grid, row.metrics = _sample_grid(model, objective, x_spec, res, out, label,
                                                 steps, sampler, seed, samples, device,
                                                 hook(res), eval_count)
        rows.append(row)

    curves = _cost_curves(spec, policies, curve or resolutions)
    _write_report(spec, rows, curves, out)
    return rows


def _sample_grid(model, objective, spec, res, out, label, steps, sampler, seed, n, device,
                 evaluate=None, eval_count=0):
    """Sample ``max(n, eval_count)`` images with a fixed seed (labels cycling through the
    classes), save the first ``n`` as a grid; score all of them with ``evaluate``."""
    from ditkit.runtime.denoiser import Denoiser
    from ditkit.runtime.samplers import sample

    from .images import save_grid

    classes = spec.conditioning.classes
    total = max(n, eval_count if evaluate is not None else 0)
    labels = torch.arange(total, device=device) % classes.count if classes else None
    x = sample(Denoiser(model, objective), (total, spec.input.channels, *res), steps=steps,
               sampler=sampler, seed=seed, class_labels=labels, device=device)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", label.replace(":", "_").replace("=", "-"))
    name = f"grids/{stem.strip('_')}_{res[0]}x{res[1]}.png"
    save_grid(x[:n], out / name)
    compact_png(out / name)
    metrics = {}
    if evaluate is not None and eval_count and labels is not None:
        metrics = evaluate(x.float().cpu(), labels.cpu())
    return name, metrics


def compact_png(path: Path, colours: int = 256) -> None:
    """Re-save a grid with an adaptive palette of ``colours`` (a third of the bytes for the
    large grids, which a committed report keeps many of; the shapes have few colours)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colours)
    small.save(path, optimize=True)


def _cost_curves(spec, policies, resolutions):
    curves = {}
    for policy in policies:
        pts = []
        for r in resolutions:
            try:
                pts.append((r, describe(adapt_spec(spec, policy, r)).gmacs))
            except S.SpecError:
                continue
        if pts:
            curves[policy_label(policy)] = pts
    ref = dit_reference(spec)
    curves[f"isotropic DiT ({ref.levels[0].d_model}x{ref.levels[0].middle})"] = [
        (r, describe(adapt_spec(ref, S.AsIs(), r)).gmacs) for r in resolutions
        if not ref.check_resolution(r)]
    return curves


def _slope(points) -> float | None:
    if len(points) < 2:
        return None
    return loglog_slope([r[0] * r[1] for r, _ in points], [g for _, g in points])


def _write_report(spec, rows: list[Row], curves: dict, out: Path) -> None:
    latency = {}
    for r in rows:
        if r.latency_ms is not None:
            latency.setdefault(r.policy, []).append((r.resolution, r.latency_ms))
    results = {"spec": spec.name, "rows": [asdict(r) for r in rows],
               "curves": {k: [[list(r), g] for r, g in v] for k, v in curves.items()},
               "slopes": {k: _slope(v) for k, v in curves.items()},
               "latency_slopes": {k: _slope(v) for k, v in latency.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    plot = _plot(curves, out / "cost.png")

    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)

    scored = [r for r in rows if r.metrics]
    md = [f"# Resolution extrapolation: {spec.name}", "",
          f"Trained at {spec.input.resolution[0]}x{spec.input.resolution[1]}.",
          "", "GMACs are forward multiply-adds at batch 1 (the DiT paper's GFLOPs); latency is "
          "the median of 3 forwards at batch 1; peak MiB is the most tensor memory alive at "
          "once during one forward above what was alive before (CUDA: the allocator's peak; "
          "CPU: PyTorch's allocator events under `torch.profiler`)."]
    if scored:
        n = scored[0].metrics.get("count")
        md += ["", f"Metrics on {n} fixed-seed class-conditional samples per cell (labels "
               "cycling through the classes): *accuracy* is the fraction a classifier trained on "
               "real images at that resolution labels as the requested class (its accuracy on "
               "held-out real images in brackets); *Fréchet* is the Fréchet distance between "
               "the classifier's hidden features of the samples and of real images, with the "
               f"same distance for {n} held-out real images in brackets (what a perfect "
               "generator would score at this sample size)."]
    head = "| policy | resolution | GMACs | params | latency ms | peak MiB | re-initialised |"
    rule = "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
    if scored:
        head += " accuracy | Fréchet |"
        rule += " ---: | ---: |"
    md += ["", head + " note |", rule + " --- |"]
    for r in rows:
        line = (f"| `{r.policy}` | {r.resolution[0]}x{r.resolution[1]} | {cell(r.gmacs, '.2f')} "
                f"| {r.params:,} | {cell(r.latency_ms, '.1f')} | {cell(r.peak_mib, '.1f')} "
                f"| {r.reinitialised} |")
        if scored:
            m = r.metrics
            line += (f" {m['accuracy']:.1%} ({m['real_accuracy']:.0%}) | {m['frechet']:.2f} "
                     f"({m['frechet_real']:.2f}) |" if m else " - | - |")
        md.append(line + f" {r.error or ''} |")
    md += ["", "## Cost vs pixels (log-log slopes)", ""]
    md += [f"- {k}: GMACs slope {s:.3f}" for k, s in results["slopes"].items() if s is not None]
    md += [f"- {k}: measured latency slope {s:.3f}"
           for k, s in results["latency_slopes"].items() if s is not None]
    if plot:
        md += ["", "![cost](cost.png)"]
    grids = [r for r in rows if r.grid]
    if grids:
        md += ["", "## Samples (fixed seed)", ""]
        res_list = sorted({r.resolution for r in grids})
        md.append("| policy | " + " | ".join(f"{h}x{w}" for h, w in res_list) + " |")
        md.append("| --- |" + " --- |" * len(res_list))
        for pol in dict.fromkeys(r.policy for r in grids):
            cells = {r.resolution: r.grid for r in grids if r.policy == pol}
            md.append(f"| `{pol}` | " + " | ".join(
                f"![{pol} {h}x{w}]({cells[(h, w)]})" if (h, w) in cells else "-"
                for h, w in res_list) + " |")
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(_html("\n".join(md)))


def _plot(curves: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, pts in curves.items():
        if not pts:
            continue
        xs = [r[0] * r[1] for r, _ in pts]
        ys = [g for _, g in pts]
        s = _slope(pts)
        ax.plot(xs, ys, marker="o", label=f"{name}" + (f" (slope {s:.2f})" if s else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pixels (H x W)")
    ax.set_ylabel("GMACs per forward (batch 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _html(markdown: str) -> str:
    """A minimal Markdown -> HTML for the report's own constructs (headings, lists, tables,
    images), so the report opens in a browser without extra packages."""
    import html
    import re

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2" style="max-width:320px">',
                      text)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)

    out, table = ["<!doctype html><meta charset=utf-8><title>ditkit extrapolation</title>",
                  "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
                  "td,th{border:1px solid #ccc;padding:4px}table{border-collapse:collapse}</style>"], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                table.append(cells)
            continue
        if table:
            head, *body = table
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body]
            out.append("</table>")
            table = []
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line:
            out.append(f"<p>{inline(line)}</p>")
    return "\n".join(out)
