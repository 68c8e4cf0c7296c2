"""The extrapolation report's **measure** part: build or adapt each model, time it, sample its
grid and score its samples.

For every labelled policy and target resolution it adapts the spec and weights
(``ditkit.runtime.extrapolate``), counts GMACs (meta device), measures forward latency and peak
memory, samples a fixed-seed grid when weights are given and scores the samples with a
:class:`Scorer`. Each stage chain (multi-stage sampling, :mod:`ditkit.runtime.multistage`) adds
a ``multi-stage`` row per policy at the resolution the chain ends at. The result is a
:class:`Measured`: small :class:`Row` dataclasses plus the per-sample scores the compare part
(:mod:`ditkit.evaluate.report_compare`) tests pairwise.
Nothing here writes the report (:mod:`ditkit.evaluate.report_write`).
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import numpy as np
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from ditkit import spec as S
from ditkit.builder import build, describe
from ditkit.errors import UserError
from ditkit.evaluate.classifier import ResolutionMetrics
from ditkit.evaluate.stats import FrechetToReference
from ditkit.files import atomic_path
from ditkit.runtime.denoiser import AdaptingDenoiser, Denoiser, DenoiserError
from ditkit.runtime.extrapolate import adapt, adapt_spec, cost_curve
from ditkit.runtime.images import save_grid
from ditkit.runtime.multistage import sample_staged
from ditkit.runtime.samplers import sample
from ditkit.runtime.schedules import SamplingError
from ditkit.runtime.shape_rule import ExportError, check_shape
from ditkit.spec.sampling import Sampling, Stage

Resolution = tuple[int, int]
Tensors = dict[str, torch.Tensor]
ExtraRow = tuple[str, S.ModelSpec, Tensors]
"""A row of a model already at its resolution: ``(label, spec, tensors)``."""
Chain = tuple[Stage, ...]
"""The stages of one multi-stage row (:attr:`ditkit.spec.sampling.Sampling.stages`); the last
stage's resolution is the row's."""
RowKind = Literal["single-pass", "multi-stage"]


def chain_text(chain: Sequence[Stage]) -> str:
    """A chain in its command-line spelling, e.g. ``8,16:2`` (``parse_stages`` reads it)."""
    return ",".join(stage.text() for stage in chain)


# --- rows and scores: the data passed from measure to compare to write ---------------------


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
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    same_as: str | None = None
    """Set when the row's model is bit-identical to the trained one at the training
    resolution and it reuses that row's samples and scores."""
    kind: RowKind = "single-pass"
    """``single-pass``: sampled at its resolution directly (a policy's or an extra row);
    ``multi-stage``: drafted small, enlarged, re-noised and refined through ``stages``."""
    stages: str | None = None
    """A multi-stage row's chain in its command-line spelling (:func:`chain_text`)."""


@dataclass(frozen=True)
class PerSample:
    """What the intervals and paired tests need from one cell's samples: which samples the
    classifier labelled right, their features and the Fréchet distance to the real images'
    feature statistics (:class:`ditkit.evaluate.stats.FrechetToReference`)."""

    correct: np.ndarray
    features: np.ndarray
    frechet: FrechetToReference


@dataclass(frozen=True)
class Scores:
    """One cell's scores: label accuracy, Fréchet distance of the samples' features to real
    images', the same distance for as many held-out real images (``frechet_real``) and the
    classifier's accuracy on held-out real images (``real_accuracy``)."""

    accuracy: float
    frechet: float
    frechet_real: float
    real_accuracy: float
    count: int
    per_sample: PerSample | None = None

    def summary(self) -> dict[str, Any]:
        """The row's ``metrics`` (what results.json and report.md show)."""
        return {
            "accuracy": self.accuracy,
            "frechet": self.frechet,
            "frechet_real": self.frechet_real,
            "real_accuracy": self.real_accuracy,
            "count": self.count,
        }


class Scorer(Protocol):
    """What the runner needs to score a cell's samples: ``images`` (N, C, H, W) drawn for
    ``labels`` (N,), both on the CPU. :class:`ClassifierScorer` is the built-in one; a test
    substitutes its own."""

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> Scores: ...


class ClassifierScorer:
    """Scores samples with the ``data`` classifier (``digits`` or ``shapes``, of ``classes``
    classes) of :mod:`ditkit.evaluate.classifier`, one classifier per resolution, trained on
    first use on real images of that resolution."""

    def __init__(self, data: str, classes: int = 10, **classifier_args: Any) -> None:

        self.data, self.classes = data, classes
        self._metrics = ResolutionMetrics(data, classes, **classifier_args)

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> Scores:
        found = dict(self._metrics(images, labels))
        per = found.pop("per_sample")
        return Scores(**found, per_sample=PerSample(**per))


@dataclass(frozen=True)
class Plan:
    """How every cell is measured. ``scorer`` scores ``count`` samples per cell (``count_at``:
    another count at some resolutions) at ``scored`` resolutions (``None``: all); the grid
    shows the first ``grid_count`` of them. ``time``: measure latency and peak memory (at
    ``latency_batch``)."""

    sampling: Sampling
    grid_count: int = 8
    device: str = "cpu"
    time: bool = True
    latency_batch: int = 1
    scorer: Scorer | None = None
    count: int = 0
    count_at: dict[Resolution, int] = field(default_factory=dict)
    scored: frozenset[Resolution] | None = None
    progress: bool = True

    def scorer_at(self, res: Resolution) -> Scorer | None:
        return self.scorer if self.scored is None or res in self.scored else None

    def count_for(self, res: Resolution) -> int:
        return self.count_at.get(res, self.count)


@dataclass
class Measured:
    """The measure part's result: the rows (the policies' first, then the extra rows, then
    the multi-stage rows), the per-sample scores by row index, each policy's no-op check and
    the cost curves."""

    rows: list[Row]
    scores: dict[int, PerSample]
    noop: dict[str, dict[str, Any]]
    curves: dict[str, list[tuple[Resolution, float]]]
    n_policy_rows: int


# --- cost, latency and memory ---------------------------------------------------------------


def dit_reference(spec: S.ModelSpec) -> S.ModelSpec:
    """An isotropic DiT with the spec's patch size and input, its innermost width, and the depth
    whose parameter count comes closest to the spec's -- the O(n^2) baseline in cost plots."""
    target = describe(spec).params
    inner = spec.levels[-1]
    d_head = spec.stack(len(spec.levels) - 1, "middle")[0].d_head if inner.middle else 64
    best: tuple[int, S.ModelSpec] | None = None
    for depth in range(1, 49):
        cand = S.ModelSpec(
            name=f"dit-like-{spec.name}",
            input=spec.input,
            patch=spec.patch,
            position=S.SincosPosition(),
            conditioning=S.Conditioning(classes=spec.conditioning.classes),
            block=S.Block(d_head=d_head),
            levels=(S.Level(d_model=inner.d_model, middle=depth),),
            head=S.AdaLNHead(),
        )
        n = sum(p.numel() for p in build(cand, device="meta").parameters())
        if best is None or abs(n - target) < abs(best[0] - target):
            best = (n, cand)
        if n > target:
            break
    assert best is not None  # depth 1 is always a candidate
    return best[1]


def cost_curves(
    spec: S.ModelSpec, policies: list[tuple[str, S.Policy]], resolutions: list[Resolution]
) -> dict[str, list[tuple[Resolution, float]]]:
    """GMACs per resolution for each labelled policy, and for :func:`dit_reference`."""
    curves = {}
    for label, policy in policies:
        pts = cost_curve(spec, policy, resolutions)
        if pts:
            curves[label] = pts
    ref = dit_reference(spec)
    curves[f"isotropic DiT ({ref.levels[0].d_model}x{ref.levels[0].middle})"] = cost_curve(
        ref, S.AsIs(), resolutions
    )
    return curves


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
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


def cpu_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Peak bytes of CPU tensors alive at once while ``fn()`` runs, above what was alive before:
    the running sum of PyTorch's CPU allocator events (allocations and frees, in time order),
    recorded by ``torch.profiler`` with ``profile_memory``. Unlike the process's resident size
    it sees memory the allocator reuses, and nothing outside tensors (Python objects, the
    profiler itself). Reads the profiler's event tree (``experimental_event_tree``, an API
    PyTorch marks experimental): ``None`` when that is unavailable."""

    try:
        from torch._C._profiler import _EventType

        with (
            _native_stderr_silenced(),
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
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


def measure_forward(
    model: torch.nn.Module,
    spec: S.ModelSpec,
    resolution: Resolution,
    device: str = "cpu",
    repeats: int = 3,
    batch: int = 1,
) -> tuple[float, float | None]:
    """Median forward latency (ms) at ``batch`` and peak memory above the baseline (MiB): the
    CUDA allocator's peak, or on a CPU :func:`cpu_peak_bytes` in one more (profiled) forward
    that does not count towards the latency."""
    h, w = resolution
    x = torch.randn(batch, spec.input.channels, h, w, device=device)
    sigma = torch.ones(batch, device=device)
    labels = (
        torch.zeros(batch, dtype=torch.long, device=device) if spec.conditioning.classes else None
    )
    times = []
    peak: float | None
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


# --- the no-op check at the training resolution ---------------------------------------------


def issues_text(err: S.SpecError) -> str:
    return "; ".join(f"{p}: {m}" for p, m in err.issues)


def noop_check(
    spec: S.ModelSpec, tensors: Tensors, policy: S.Policy, seed: int = 0
) -> dict[str, Any]:
    """Is ``policy`` a no-op at the training resolution? Adapt the trained weights to the
    training resolution and compare the network's outputs with the trained model's on fixed
    inputs (batch 3, noise levels 0.1, 1 and 10, labels 0-2). ``status``: ``identical`` (every
    output bit equal), ``no-op`` (equal to float rounding: ``max |diff| <= 1e-5 max |out|``, e.g.
    another attention kernel over the same keys), ``changes the model``, or ``invalid`` (the
    policy cannot be applied there)."""
    res = (spec.input.resolution[0], spec.input.resolution[1])
    try:
        adapted = adapt(spec, tensors, policy, res, seed=seed)
    except (S.SpecError, ValueError) as err:
        detail = issues_text(err) if isinstance(err, S.SpecError) else str(err)
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
    return {
        "status": status,
        "max_abs_diff": diff,
        "output_scale": scale,
        "reinitialised": len(adapted.record["reinitialised"]),
    }


# --- samples ----------------------------------------------------------------------------------


def sample_grid(
    model: torch.nn.Module,
    objective: S.Objective,
    spec: S.ModelSpec,
    res: Resolution,
    out: Path,
    label: str,
    plan: Plan,
    stages: Chain = (),
    denoiser: Denoiser | None = None,
) -> tuple[str, Scores | None]:
    """Sample ``max(grid_count, count)`` images with a fixed seed (labels cycling through the
    classes), save the first ``grid_count`` as a grid, score all of them with the plan's
    scorer at ``res`` (if any): ``(grid path relative to out, scores or None)``.

    ``stages``: sample through these stages instead (ending at ``res``; each stage's shape is
    checked against the model first, and the plan's ``progress`` shows one bar per stage): a
    stage the model cannot sample is a :class:`ExportError` or :class:`SamplingError`.
    ``denoiser``: the one to sample with (default ``Denoiser(model, objective)``; an
    :class:`AdaptingDenoiser` runs each stage on the model adapted to its grid)."""

    scorer, count, n = plan.scorer_at(res), plan.count_for(res), plan.grid_count
    device = plan.device
    classes = spec.conditioning.classes
    total = max(n, count if scorer is not None else 0)
    labels = torch.arange(total, device=device) % classes.count if classes else None
    shape = (total, spec.input.channels, *res)
    if denoiser is None:
        denoiser = Denoiser(model, objective)
    if stages:
        x = sample_staged(
            denoiser,
            shape,
            Sampling.of(plan.sampling, stages=stages),
            class_labels=labels,
            device=device,
            progress=plan.progress,
            check=lambda s: check_shape(spec, s, None, "stages"),
        )
    else:
        x = sample(denoiser, shape, plan.sampling, class_labels=labels, device=device)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", label.replace(":", "_").replace("=", "-"))
    name = f"grids/{stem.strip('_')}_{res[0]}x{res[1]}.png"
    save_grid(x[:n], out / name)
    compact_png(out / name)
    if scorer is not None and count and labels is not None:
        return name, scorer.score(x.float().cpu(), labels.cpu())
    return name, None


def compact_png(path: Path, colours: int = 256) -> None:
    """Re-save a grid with an adaptive palette of ``colours`` (a third of the bytes for the
    large grids, which a committed report keeps many of; the shapes have few colours)."""

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colours)
    with atomic_path(path) as tmp:
        small.save(tmp, format="PNG", optimize=True)


# --- the cells --------------------------------------------------------------------------------


def _loaded(spec: S.ModelSpec, tensors: Tensors, device: str) -> torch.nn.Module:
    model = build(spec, device=device)
    model.load_state_dict(tensors)
    return model.eval()


def _timed(
    row: Row, model: torch.nn.Module | None, spec: S.ModelSpec, res: Resolution, plan: Plan
) -> Row:
    if model is None or not plan.time:
        return row
    latency, peak = measure_forward(model, spec, res, plan.device, batch=plan.latency_batch)
    return replace(row, latency_ms=latency, peak_mib=peak)


def _scored(row: Row, grid: str, scores: Scores | None) -> Row:
    metrics = scores.summary() if scores is not None else {}
    return replace(row, grid=grid, metrics=metrics)


def measure(
    spec: S.ModelSpec,
    tensors: Tensors | None,
    objective: S.Objective | None,
    policies: list[tuple[str, S.Policy]],
    resolutions: list[Resolution],
    out: Path,
    plan: Plan,
    extra: Sequence[ExtraRow] = (),
    curve: list[Resolution] | None = None,
    chains: Sequence[Chain] = (),
    chain_policies: Sequence[str] | None = None,
) -> Measured:
    """Measure every labelled policy at every resolution, then every ``extra`` row ``(label,
    spec, tensors)`` of a model already at its resolution (e.g. a fine-tuned adaptation), then
    every policy through every stage chain in ``chains`` (:func:`measure_chain`); with
    ``chain_policies`` (policy labels) only those policies run the chains.

    Without ``tensors`` a policy's row has costs (and, if the plan times, the latency of random
    weights seeded by the plan's seed) but no samples; without an ``objective`` nothing is
    sampled. Every policy is also run at the training resolution against the trained model
    (:func:`noop_check`); a row there whose outputs are bit-identical to the trained model's
    reuses the samples and scores of the first such row instead of drawing them again."""

    seed = plan.sampling.seed
    trained_res = tuple(spec.input.resolution)
    base_tensors = tensors
    if base_tensors is None:
        torch.manual_seed(seed)
        base_tensors = build(spec, device="cpu").state_dict()
    noop = {label: noop_check(spec, base_tensors, p, seed=seed) for label, p in policies}
    out.mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(exist_ok=True)
    rows: list[Row] = []
    scores: dict[int, PerSample] = {}
    identical: tuple[Row, PerSample | None] | None = None  # the first bit-identical cell
    jobs = [(label, p, (r[0], r[1])) for label, p in policies for r in resolutions]
    for label, policy, res in tqdm(jobs, desc="extrapolate", unit="run", disable=not plan.progress):
        try:
            new_spec = adapt_spec(spec, policy, res)
        except S.SpecError as err:
            rows.append(Row(label, res, float("nan"), 0, error=issues_text(err)))
            continue
        rep = describe(new_spec)
        row = Row(label, res, rep.gmacs, rep.params)
        model = None
        if tensors is not None:
            adapted = adapt(spec, tensors, policy, res, seed=seed)
            row = replace(row, reinitialised=len(adapted.record["reinitialised"]))
            model = _loaded(adapted.spec, adapted.tensors, plan.device)
        elif plan.time:
            torch.manual_seed(seed)
            model = build(new_spec, device=plan.device).eval()
        row = _timed(row, model, new_spec, res, plan)
        if tensors is not None and objective is not None:
            same = res == trained_res and noop[label]["status"] == "identical"
            if same and identical is not None:
                first, per = identical
                row = replace(
                    row, grid=first.grid, metrics=dict(first.metrics), same_as=first.policy
                )
            else:
                assert model is not None  # weights were given
                grid, found = sample_grid(model, objective, new_spec, res, out, label, plan)
                row = _scored(row, grid, found)
                per = found.per_sample if found is not None else None
                if same:
                    identical = (row, per)
            if per is not None:
                scores[len(rows)] = per
        rows.append(row)
    n_policy_rows = len(rows)
    for label, x_spec, x_tensors in tqdm(
        extra, desc="extra rows", unit="run", disable=not (extra and plan.progress)
    ):
        res = (x_spec.input.resolution[0], x_spec.input.resolution[1])
        rep = describe(x_spec)
        model = _loaded(x_spec, x_tensors, plan.device)
        row = _timed(Row(label, res, rep.gmacs, rep.params), model, x_spec, res, plan)
        if objective is not None:
            grid, found = sample_grid(model, objective, x_spec, res, out, label, plan)
            row = _scored(row, grid, found)
            if found is not None and found.per_sample is not None:
                scores[len(rows)] = found.per_sample
        rows.append(row)
    # a chain's row starts from the policy's single-pass row where the chain ends (the same
    # model: its costs, its refusal)
    single = {(r.policy, r.resolution): r for r in rows[:n_policy_rows]}
    staged = [
        (p, single.get((label, _end(chain))), chain)
        for label, p in policies
        if chain_policies is None or label in chain_policies
        for chain in chains
    ]
    for policy, base, chain in tqdm(
        staged, desc="multi-stage", unit="run", disable=not (staged and plan.progress)
    ):
        if base is None:
            end = _end(chain)
            raise UserError(
                f"stages {chain_text(chain)}: ends at {end[0]}x{end[1]}, which is not one of "
                "the measured resolutions; end each chain at one of them"
            )
        row, per = measure_chain(spec, tensors, objective, policy, base, chain, out, plan)
        if per is not None:
            scores[len(rows)] = per
        rows.append(row)
    curves = cost_curves(spec, policies, curve or resolutions)
    return Measured(rows, scores, noop, curves, n_policy_rows)


def _end(chain: Chain) -> Resolution:
    return (chain[-1].resolution[0], chain[-1].resolution[1])


def measure_chain(
    spec: S.ModelSpec,
    tensors: Tensors | None,
    objective: S.Objective | None,
    policy: S.Policy,
    base: Row,
    chain: Chain,
    out: Path,
    plan: Plan,
) -> tuple[Row, PerSample | None]:
    """One ``multi-stage`` row: each stage of ``chain`` runs the policy's model for that
    stage's grid (an :class:`AdaptingDenoiser`, as ``ditkit sample --policy --stages`` does):
    a draft at the trained resolution runs the trained model, the last stage the model of
    ``base``, the policy's single-pass row at the resolution the chain ends at. The row is labelled
    ``BASE + stages CHAIN`` and has ``base``'s GMACs, parameters and re-initialised count; it
    is not timed again (its forward is ``base``'s). Where ``base`` has an error (the policy
    cannot reach the resolution) the row has it too; a stage shape the adapted model cannot
    take gives a row with an ``error`` instead of samples."""
    text = chain_text(chain)
    row = replace(
        base,
        policy=f"{base.policy} + stages {text}",
        latency_ms=None,
        peak_mib=None,
        grid=None,
        metrics={},
        same_as=None,
        kind="multi-stage",
        stages=text,
    )
    if base.error is not None or tensors is None or objective is None:
        return row, None
    res = base.resolution

    def make(at: Resolution) -> torch.nn.Module:
        adapted = adapt(spec, tensors, policy, at, seed=plan.sampling.seed)
        return _loaded(adapted.spec, adapted.tensors, plan.device)

    try:
        den = AdaptingDenoiser(make, objective, res)
        model = den.model
        target = cast(S.ModelSpec, model.spec)  # a built model carries its spec
        grid, found = sample_grid(
            model, objective, target, res, out, row.policy, plan, stages=chain, denoiser=den
        )
    except (SamplingError, ExportError, DenoiserError) as err:  # a stage it cannot sample
        return replace(row, error=str(err)), None
    return _scored(row, grid, found), found.per_sample if found is not None else None
