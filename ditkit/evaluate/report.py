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
from ditkit.spec.sampling import Sampling

from ditkit.runtime.extrapolate import adapt, adapt_spec, cost_curve, loglog_slope
from ditkit.files import atomic_path, write_text

_POLICY = TypeAdapter(S.Policy)


REPORT_SAMPLING = Sampling(steps=20, seed=0)
"""What the extrapolation report samples with unless told otherwise."""


def parse_policy(text: str, flag: str = "--policies") -> S.Policy:
    """``kind[:key=value[,key=value]]``, e.g. ``local_core:kernel_size=15``,
    ``as_is:rope=extrapolate``, ``add_levels:share_weights=true``; errors name ``flag``."""
    import yaml

    kind, _, rest = text.partition(":")
    data: dict = {"kind": kind}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise S.SpecError([(flag, f"{text!r}: expected key=value after the kind, "
                                f"e.g. local_core:kernel_size=15")])
        data[key.strip()] = yaml.safe_load(value)
    try:
        return _POLICY.validate_python(data)
    except ValidationError as err:
        issues = [(f"{flag} {text}: " + ".".join(str(p) for p in e["loc"]),
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
                    repeats: int = 3, batch: int = 1) -> tuple[float, float | None]:
    """Median forward latency (ms) at ``batch`` and peak memory above the baseline (MiB): the
    CUDA allocator's peak, or on a CPU :func:`cpu_peak_bytes` in one more (profiled) forward
    that does not count towards the latency."""
    h, w = resolution
    x = torch.randn(batch, spec.input.channels, h, w, device=device)
    sigma = torch.ones(batch, device=device)
    labels = (torch.zeros(batch, dtype=torch.long, device=device)
              if spec.conditioning.classes else None)
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
    same_as: str | None = None
    """Set when the row's model is bit-identical to the trained one at the training
    resolution and it reuses that row's samples and scores."""


def run(spec: S.ModelSpec, tensors: dict | None, objective, policies: list[S.Policy],
        resolutions: list[tuple[int, int]], out: Path, sampling: Sampling | None = None, *,
        samples: int = 8, device: str = "cpu",
        measure: bool = True, curve: list[tuple[int, int]] | None = None,
        evaluate=None, eval_count: int = 0, extra: list[tuple[str, S.ModelSpec, dict]] = (),
        eval_resolutions: list[tuple[int, int]] | None = None, progress: bool = True,
        count_at: dict[tuple[int, int], int] | None = None, bootstrap: int = 300,
        latency_batch: int = 1, **settings) -> list[Row]:
    """Run every (policy, resolution), write the report into ``out`` and return the rows.

    ``sampling``: how the grids and scored images are drawn (default :data:`REPORT_SAMPLING`:
    20 steps of the default sampler, seed 0); ``settings`` are :class:`Sampling` fields given
    one by one (``steps=2``). Its seed also seeds the random weights of new tensors, the
    no-op check and the bootstrap.

    ``evaluate``: an optional metrics hook ``(images, labels) -> dict`` (e.g.
    ``ditkit.evaluate.classifier.ResolutionMetrics``; the runtime does not import the training
    layer, so the caller passes it); it scores ``eval_count`` fixed-seed samples per cell (the
    grid shows the first ``samples`` of them). ``extra``: further rows ``(label, spec,
    tensors)`` of models already at their resolution (e.g. a fine-tuned adaptation), sampled
    and measured like the policies' rows. ``eval_resolutions``: score only these (default:
    all; sampling enough images for metrics is the slow part on a CPU). ``count_at``: a
    different count for some resolutions (e.g. fewer at 4x, where each sample costs 16x).

    Every policy is also run at the training resolution against the trained model
    (:func:`noop_check`); a row there whose outputs are bit-identical to the trained model's
    reuses the samples and scores of the first such row instead of drawing them again. Scored
    rows get 95% intervals (Wilson for accuracy, a ``bootstrap`` percentile interval for the
    Fréchet distance), and the rows of each resolution are compared on the same samples
    (:func:`compare`)."""
    sampling = Sampling.of(sampling or REPORT_SAMPLING, **settings)
    seed = sampling.seed
    scored = None if eval_resolutions is None else {tuple(r) for r in eval_resolutions}
    count_at = {tuple(k): v for k, v in (count_at or {}).items()}
    trained_res = tuple(spec.input.resolution)
    base_tensors = tensors
    if base_tensors is None:
        torch.manual_seed(seed)
        base_tensors = build(spec, device="cpu").state_dict()
    noop = {policy_label(p): noop_check(spec, base_tensors, p, seed=seed) for p in policies}
    paired: dict[int, dict] = {}
    identical_cell: dict = {}

    def hook(res):
        return evaluate if scored is None or tuple(res) in scored else None

    def keep_scores(row: Row) -> dict | None:
        """Move the hook's per-sample scores out of the row's metrics into ``paired`` (under
        the index the row will get) and give the row its intervals."""
        per = row.metrics.pop("per_sample", None)
        if per is not None:
            paired[len(rows)] = per
            _intervals(row, per, bootstrap, seed)
        return per

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
            rows.append(Row(label, res, float("nan"), 0, error=_issues_text(err)))
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
            row.latency_ms, row.peak_mib = measure_forward(model, new_spec, res, device,
                                                           batch=latency_batch)
        if tensors is not None and objective is not None:
            same = res == trained_res and noop[label]["status"] == "identical"
            if same and identical_cell:
                row.grid, row.metrics = identical_cell["grid"], dict(identical_cell["metrics"])
                row.same_as = identical_cell["policy"]
                if identical_cell["paired"] is not None:
                    paired[len(rows)] = identical_cell["paired"]
            else:
                row.grid, row.metrics = _sample_grid(model, objective, new_spec, res, out,
                                                     label, sampling, samples, device,
                                                     hook(res),
                                                     count_at.get(res, eval_count))
                per = keep_scores(row)
                if same:
                    identical_cell.update(grid=row.grid, metrics=row.metrics, policy=label,
                                          paired=per)
        rows.append(row)
    n_policy_rows = len(rows)
    for label, x_spec, x_tensors in tqdm(extra, desc="extra rows", unit="run",
                                         disable=not (extra and progress)):
        res = tuple(x_spec.input.resolution)
        rep = describe(x_spec)
        row = Row(label, res, rep.gmacs, rep.params)
        model = build(x_spec, device=device)
        model.load_state_dict(x_tensors)
        model.eval()
        if measure:
            row.latency_ms, row.peak_mib = measure_forward(model, x_spec, res, device,
                                                           batch=latency_batch)
        if objective is not None:
            row.grid, row.metrics = _sample_grid(model, objective, x_spec, res, out, label,
                                                 sampling, samples, device,
                                                 hook(res), count_at.get(res, eval_count))
            keep_scores(row)
        rows.append(row)

    curves = _cost_curves(spec, policies, curve or resolutions)
    comparisons = compare(rows, paired, bootstrap, seed)
    # where fine-tuned rows take part, also rank the zero-shot policies among themselves:
    # "which policy to use without training" is a question of its own
    tuned_res = {rows[i].resolution for i in paired if i >= n_policy_rows}
    zero_shot = {i: p for i, p in paired.items()
                 if i < n_policy_rows and rows[i].resolution in tuned_res}
    comparisons += compare(rows, zero_shot, bootstrap, seed, scope="zero-shot")
    comparisons.sort(key=lambda c: (c["resolution"][0] * c["resolution"][1],
                                    c["scope"] != "all"))
    _write_report(spec, rows, curves, out, noop=noop, comparisons=comparisons,
                  sampling=sampling,
                  latency_batch=latency_batch)
    return rows


def _issues_text(err: S.SpecError) -> str:
    return "; ".join(f"{p}: {m}" for p, m in err.issues)


def noop_check(spec: S.ModelSpec, tensors: dict, policy: S.Policy, seed: int = 0) -> dict:
    """Is ``policy`` a no-op at the training resolution? Adapt the trained weights to the
    training resolution and compare the network's outputs with the trained model's on fixed
    inputs (batch 3, noise levels 0.1, 1 and 10, labels 0-2). ``status``: ``identical`` (every
    output bit equal), ``no-op`` (equal to float rounding: ``max |diff| <= 1e-5 max |out|``, e.g.
    another attention kernel over the same keys), ``changes the model``, or ``invalid`` (the
    policy cannot be applied there)."""
    res = tuple(spec.input.resolution)
    try:
        adapted = adapt(spec, tensors, policy, res, seed=seed)
    except (S.SpecError, ValueError) as err:
        detail = _issues_text(err) if isinstance(err, S.SpecError) else str(err)
        return {"status": "invalid", "max_abs_diff": None, "detail": detail}
    base = build(spec, device="cpu")
    base.load_state_dict(tensors)
    new = build(adapted.spec, device="cpu")
    new.load_state_dict(adapted.tensors)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, spec.input.channels, *res, generator=gen)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    classes = spec.conditioning.classes
    labels = torch.arange(3) % classes.count if classes else None
    with torch.no_grad():
        a = base.eval()(x, sigma, labels)
        b = new.eval()(x, sigma, labels)
    diff = float((a - b).abs().max())
    scale = float(a.abs().max())
    if diff == 0.0:
        status = "identical"
    elif diff <= 1e-5 * max(scale, 1e-12):
        status = "no-op"
    else:
        status = "changes the model"
    return {"status": status, "max_abs_diff": diff, "output_scale": scale,
            "reinitialised": len(adapted.record["reinitialised"])}


def _intervals(row: Row, per: dict, rounds: int, seed: int) -> None:
    from ditkit.evaluate.stats import bootstrap_frechet, wilson_interval

    correct = per["correct"]
    row.metrics["accuracy_ci"] = list(wilson_interval(int(correct.sum()), len(correct)))
    row.metrics["frechet_ci"] = list(bootstrap_frechet(per["features"], per["frechet"],
                                                       rounds=rounds, seed=seed))


def compare(rows: list[Row], paired: dict[int, dict], rounds: int = 300, seed: int = 0,
            scope: str = "all") -> list[dict]:
    """Per resolution, the best row by accuracy and by Fréchet distance and paired tests of
    every other row against it on the same samples (same seed, same labels): McNemar's exact
    test for accuracy, a paired bootstrap of the Fréchet difference. Rows that reuse another
    row's samples (bit-identical models) are left out. ``scope`` labels the entries (``all``
    rows, or ``zero-shot`` when the caller passes only the policies' rows)."""
    from ditkit.evaluate.stats import mcnemar_p, paired_frechet_difference

    out = []
    by_res: dict = {}
    for i in paired:
        if rows[i].same_as is None:
            by_res.setdefault(rows[i].resolution, []).append(i)
    for res, idx in by_res.items():
        counts = {len(paired[i]["correct"]) for i in idx}
        if len(idx) < 2 or len(counts) != 1:
            continue
        best_acc = max(idx, key=lambda i: (rows[i].metrics["accuracy"],
                                           -rows[i].metrics["frechet"]))
        best_fd = min(idx, key=lambda i: (rows[i].metrics["frechet"],
                                          -rows[i].metrics["accuracy"]))
        acc_tests, fd_tests = [], []
        for i in idx:
            if i != best_acc:
                acc_tests.append({"policy": rows[i].policy,
                                  "difference": rows[best_acc].metrics["accuracy"]
                                  - rows[i].metrics["accuracy"],
                                  "p": mcnemar_p(paired[best_acc]["correct"],
                                                 paired[i]["correct"])})
            if i != best_fd:
                t = paired_frechet_difference(paired[i]["features"], paired[best_fd]["features"],
                                              paired[best_fd]["frechet"], rounds, seed)
                fd_tests.append({"policy": rows[i].policy, "difference": t["difference"],
                                 "interval": list(t["interval"]), "p": t["p"]})
        acc_tests.sort(key=lambda t: t["difference"])
        fd_tests.sort(key=lambda t: t["difference"])
        out.append({"resolution": list(res), "scope": scope, "count": counts.pop(),
                    "best_accuracy": rows[best_acc].policy, "accuracy_tests": acc_tests,
                    "best_frechet": rows[best_fd].policy, "frechet_tests": fd_tests})
    return out


def _sample_grid(model, objective, spec, res, out, label, sampling: Sampling, n, device,
                 evaluate=None, eval_count=0):
    """Sample ``max(n, eval_count)`` images with a fixed seed (labels cycling through the
    classes), save the first ``n`` as a grid; score all of them with ``evaluate``."""
    from ditkit.runtime.denoiser import Denoiser
    from ditkit.runtime.samplers import sample

    from ditkit.runtime.images import save_grid

    classes = spec.conditioning.classes
    total = max(n, eval_count if evaluate is not None else 0)
    labels = torch.arange(total, device=device) % classes.count if classes else None
    x = sample(Denoiser(model, objective), (total, spec.input.channels, *res), sampling,
               class_labels=labels, device=device)
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
    with atomic_path(path) as tmp:
        small.save(tmp, format="PNG", optimize=True)


def _cost_curves(spec, policies, resolutions):
    curves = {}
    for policy in policies:
        pts = cost_curve(spec, policy, resolutions)
        if pts:
            curves[policy_label(policy)] = pts
    ref = dit_reference(spec)
    curves[f"isotropic DiT ({ref.levels[0].d_model}x{ref.levels[0].middle})"] = cost_curve(
        ref, S.AsIs(), resolutions)
    return curves


def _slope(points) -> float | None:
    if len(points) < 2:
        return None
    return loglog_slope([r[0] * r[1] for r, _ in points], [g for _, g in points])


OVERHEAD_FACTOR = 1.5
"""A latency point smaller than the policy's most efficient one is overhead-bound when its
milliseconds per GMAC exceed that best (lowest) ms/GMAC by more than this factor: fixed
per-call overhead, not compute, dominates it (:func:`latency_slope`)."""


def latency_slope(points: list[tuple[tuple[int, int], float, float]]) -> dict:
    """The log-log slope of measured latency vs pixels over the *compute-bound* points only.

    ``points``: ``(resolution, latency_ms, gmacs)``. A tiny model's batch-1 forward at a small
    resolution is dominated by per-call overhead (Python, kernel launches), so its time barely
    grows with the work and a slope through it says nothing about scaling. A point counts as
    overhead-bound when it does *less* work than the policy's most efficient point (lowest ms
    per GMAC) and its ms per GMAC is more than :data:`OVERHEAD_FACTOR` times that best. A point
    doing *more* work that runs slower per GMAC is not overhead: it is what the larger size
    really costs (memory traffic, attention the GMAC count under-weights), so it stays in the
    fit. The slope is fitted when at least two compute-bound points span a 4x range of pixels,
    else it is ``None``."""
    pts = [(r, ms, g) for r, ms, g in points if ms and g and g > 0]
    if len(pts) < 2:  # one point: nothing to fit, and nothing to compare its ms/GMAC with
        return {"slope": None, "compute_bound": [], "overhead_bound": []}
    best_ms, best_g = min(((ms / g, g) for _, ms, g in pts))

    def overhead(ms: float, g: float) -> bool:
        return g < best_g and ms / g > OVERHEAD_FACTOR * best_ms

    bound = [(r, ms) for r, ms, g in pts if not overhead(ms, g)]
    over = [list(r) for r, ms, g in pts if overhead(ms, g)]
    pixels = [r[0] * r[1] for r, _ in bound]
    slope = None
    if len(bound) >= 2 and max(pixels) >= 4 * min(pixels):
        slope = loglog_slope(pixels, [ms for _, ms in bound])
    return {"slope": slope, "compute_bound": [list(r) for r, _ in bound],
            "overhead_bound": over}


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _acc_cell(m: dict) -> str:
    ci = m.get("accuracy_ci")
    band = f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else ""
    return f"{_pct(m['accuracy'])}%{band} ({m['real_accuracy']:.0%})"


def _fd_cell(m: dict) -> str:
    ci = m.get("frechet_ci")
    band = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    return f"{m['frechet']:.2f}{band} ({m['frechet_real']:.2f})"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _comparison_line(head: str, best: str, tests: list[dict], runner_up, alpha: float) -> str:
    text = f"- **{head}:** best `{best}`"
    if not tests:
        return text
    t = tests[0]
    sig = "significant" if t["p"] < alpha else "not significant"
    ties = [x["policy"] for x in tests if x["p"] >= alpha]
    text += f"; {runner_up(t, sig)}"
    return text + (". Not significantly different from it (p ≥ 0.05): "
                   + ", ".join(f"`{x}`" for x in ties) + "." if ties else
                   "; better than every other row at p < 0.05.")


def comparison_lines(c: dict, alpha: float = 0.05) -> list[str]:
    """Plain sentences for one resolution's :func:`compare` entry."""
    h, w = c["resolution"]
    only = ", zero-shot policies only" if c.get("scope") == "zero-shot" else ""
    acc = _comparison_line(
        f"{h}x{w}{only}, accuracy", c["best_accuracy"], c["accuracy_tests"],
        lambda t, sig: (f"ahead of the runner-up `{t['policy']}` by "
                        f"{100 * t['difference']:.1f} points ({sig}, McNemar {_p(t['p'])}, "
                        f"{c['count']} paired samples)"), alpha)
    fd = _comparison_line(
        f"{h}x{w}{only}, Fréchet", c["best_frechet"], c["frechet_tests"],
        lambda t, sig: (f"the runner-up `{t['policy']}` is {t['difference']:.2f} higher (95% "
                        f"interval [{t['interval'][0]:.2f}, {t['interval'][1]:.2f}], {sig}, "
                        f"paired bootstrap {_p(t['p'])})"), alpha)
    return [acc, fd]


def _write_report(spec, rows: list[Row], curves: dict, out: Path, noop: dict | None = None,
                  comparisons: list[dict] | None = None, sampling: Sampling | None = None,
                  latency_batch: int = 1) -> None:
    noop, comparisons = noop or {}, comparisons or []
    latency = {}
    for r in rows:
        if r.latency_ms is not None:
            latency.setdefault(r.policy, []).append((r.resolution, r.latency_ms, r.gmacs))
    lat = {k: latency_slope(v) for k, v in latency.items()}
    results = {"spec": spec.name, "trained_resolution": list(spec.input.resolution),
               "sampling": sampling.recorded() if sampling else {},
               "rows": [asdict(r) for r in rows],
               "noop_at_training_resolution": noop, "comparisons": comparisons,
               "curves": {k: [[list(r), g] for r, g in v] for k, v in curves.items()},
               "slopes": {k: _slope(v) for k, v in curves.items()},
               "latency_slopes": {k: v["slope"] for k, v in lat.items()},
               "latency_fit": lat, "latency_batch": latency_batch}
    write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    plot = _plot(curves, out / "cost.png")

    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)

    h0, w0 = spec.input.resolution
    scored = [r for r in rows if r.metrics]
    md = [f"# Resolution extrapolation: {spec.name}", "", f"Trained at {h0}x{w0}."]
    if sampling:
        md[-1] += f" Samples: `{sampling.sampler}`, {sampling.steps} steps, seed {sampling.seed}"
        md[-1] += (", no guidance" if sampling.cfg_scale == 1.0 else
                   f", cfg-scale {sampling.cfg_scale}")
        if sampling.extras():  # a schedule, sigma range, eta, ... of its own
            md[-1] += f" ({', '.join(sampling.extras())})"
        md[-1] += "."
    md += ["", "GMACs are forward multiply-adds at batch 1 (the DiT paper's GFLOPs); latency is "
           f"the median of 3 forwards at batch {latency_batch}; peak MiB (same batch) is the "
           "most tensor memory alive at "
           "once during one forward above what was alive before (CUDA: the allocator's peak; "
           "CPU: PyTorch's allocator events under `torch.profiler`)."]
    if scored:
        counts = sorted({(r.resolution, r.metrics.get("count")) for r in scored})
        md += ["", "Metrics on fixed-seed class-conditional samples (labels cycling through the "
               "classes; the same noise and labels for every row of a resolution, so rows are "
               "compared pair by pair): " + ", ".join(f"{n} per cell at {h}x{w}"
                                                     for (h, w), n in counts) + ". *Accuracy* "
               "is the fraction a classifier trained on real images at that resolution labels as "
               "the requested class, with its 95% Wilson interval and, in brackets, the "
               "classifier's accuracy on held-out real images. *Fréchet* is the Fréchet "
               "distance between the classifier's hidden features of the samples and of real "
               "images, with a 95% bootstrap interval (resampling the samples) and, in brackets, "
               "the same distance for as many held-out real images (what a perfect generator "
               "would score at this sample size)."]
    base = next((r for r in scored if tuple(r.resolution) == (h0, w0) and r.same_as is None
                 and r.policy == "as_is"), None)
    if base is not None:
        m = base.metrics
        ratio = m["accuracy"] / m["real_accuracy"] if m["real_accuracy"] else float("nan")
        md += ["", f"**The trained model at its training resolution** ({h0}x{w0}, `as_is`): "
               f"{_pct(m['accuracy'])}% label accuracy, {ratio:.0%} of the real-image "
               f"classifier's {_pct(m['real_accuracy'])}%; Fréchet {m['frechet']:.2f} against "
               f"{m['frechet_real']:.2f} for real images. Every other row is this model adapted."]
    head = "| policy | resolution | GMACs | params | latency ms | peak MiB | re-initialised |"
    rule = "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
    if scored:
        head += " accuracy % [95% CI] (real) | Fréchet [95% CI] (real) |"
        rule += " ---: | ---: |"
    md += ["", head + " note |", rule + " --- |"]
    for r in rows:
        line = (f"| `{r.policy}` | {r.resolution[0]}x{r.resolution[1]} | {cell(r.gmacs, '.2f')} "
                f"| {r.params:,} | {cell(r.latency_ms, '.1f')} | {cell(r.peak_mib, '.1f')} "
                f"| {r.reinitialised} |")
        if scored:
            m = r.metrics
            line += f" {_acc_cell(m)} | {_fd_cell(m)} |" if m else " - | - |"
        note = r.error or (f"bit-identical to the trained model: the samples of `{r.same_as}`"
                           if r.same_as else "")
        md.append(line + f" {note} |")
    if noop:
        md += ["", "## Each policy at the training resolution", "",
               f"Every policy applied at {h0}x{w0} and compared with the trained model on fixed "
               "inputs (batch 3, σ = 0.1, 1, 10): *identical* means every output bit is equal; "
               "*no-op* equal to float rounding (≤ 1e-5 of the output's scale); anything else "
               "is marked.", "", "| policy | at the training resolution | max abs difference |",
               "| --- | --- | ---: |"]
        for label, chk in noop.items():
            status = chk["status"]
            shown = {"identical": "identical (exact no-op)", "no-op": "no-op (float rounding)",
                     "changes the model": "**NOT a no-op: changes the model**",
                     "invalid": f"**cannot be applied**: {chk.get('detail', '')}"}[status]
            md.append(f"| `{label}` | {shown} | {cell(chk.get('max_abs_diff'), '.3g')} |")
    if comparisons:
        md += ["", "## Which policy is best", "",
               "Per resolution, over the rows scored there (zero-shot policies and fine-tuned "
               "checkpoints), each compared with the best on the same samples: McNemar's exact "
               "test for accuracy, a paired bootstrap of the Fréchet difference (significant: "
               "p < 0.05, two-sided, not corrected for the number of rows). Where fine-tuned "
               "rows take part, the zero-shot policies are also ranked among themselves "
               "(*zero-shot policies only*): the choice without any training."]
        md += [""] + [line for c in comparisons for line in comparison_lines(c)]
    md += ["", "## Cost vs pixels (log-log slopes)", ""]
    md += [f"- {k}: GMACs slope {s:.3f}" for k, s in results["slopes"].items() if s is not None]
    for k, v in lat.items():
        over = ", ".join(f"{h}x{w}" for h, w in v["overhead_bound"])
        if v["slope"] is not None:
            span = " to ".join(f"{h}x{w}" for h, w in (v["compute_bound"][0],
                                                       v["compute_bound"][-1]))
            md.append(f"- {k}: measured latency slope {v['slope']:.3f} over the compute-bound "
                      f"points ({span})" + (f"; overhead-bound at {over}" if over else ""))
        elif len(v["compute_bound"]) + len(v["overhead_bound"]) >= 2:
            md.append(f"- {k}: no latency slope: " + (
                f"overhead-bound at {over} (time per GMAC more than {OVERHEAD_FACTOR}x the "
                "best point's: per-call overhead, not compute)" if over else
                "the compute-bound points span less than 4x in pixels"))
    if plot:
        md += ["", "![cost](cost.png)"]
    else:
        from ditkit.errors import missing_text

        md += ["", f"(no cost plot: {missing_text('matplotlib', 'the cost plot')})"]
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
    write_text(out / "report.md", "\n".join(md) + "\n")
    write_text(out / "report.html", _html("\n".join(md)))


def _plot(curves: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
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
    ax.legend(fontsize=9, loc="upper left", frameon=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def _html(markdown: str) -> str:
    """A minimal Markdown -> HTML for the report's own constructs (headings, paragraphs, lists,
    tables, images, code, **strong** and *emphasis*), so the report opens in a browser as a page
    without extra packages. Figures are shown at their natural size up to the page width."""
    import html
    import re

    def inline(text: str) -> str:
        text = html.escape(text, quote=False)
        text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)",
                      r'<img alt="\1" src="\2" style="max-width:100%;height:auto">', text)
        text = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)
        parts = re.split(r"(`[^`]+`)", text)  # no emphasis inside code spans
        for i, part in enumerate(parts):
            if part.startswith("`") and part.endswith("`") and len(part) > 1:
                parts[i] = f"<code>{part[1:-1]}</code>"
                continue
            part = re.sub(r"\*\*(?=\S)(.+?)(?<=\S)\*\*", r"<strong>\1</strong>", part)
            part = re.sub(r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])", r"<em>\1</em>",
                          part)
            parts[i] = part
        return "".join(parts)

    out = ["<!doctype html><meta charset=utf-8><title>ditkit extrapolation</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em;"
           "line-height:1.45}td,th{border:1px solid #ccc;padding:4px 6px}"
           "table{border-collapse:collapse;margin:.6em 0}th{background:#f3f3f3}"
           "img{display:block;margin:.5em 0}code{background:#f3f3f3;padding:0 3px}</style>"]
    table: list[list[str]] = []
    in_list = False
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                table.append(cells)
            continue
        if table:
            head, *body = table
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body]
            out.append("</table>")
            table = []
        if in_list and not line.startswith("- "):
            out.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line:
            out.append(f"<p>{inline(line)}</p>")
    return "\n".join(out)
