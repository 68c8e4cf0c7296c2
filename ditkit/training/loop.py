"""The training loop: an experiment spec -> a run folder.

``train(experiment, run_dir)`` builds the model, AdamW with parameter groups, the LR schedule
and the EMA, then steps through deterministic batches with gradient accumulation and clipping.
Launched by ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DDP or FSDP2 (gloo on CPU, nccl on
CUDA; :mod:`ditkit.training.distributed`); each rank draws its own slice of every global batch and
its own noise, and only rank 0 writes.

The run folder::

    run/scalars.csv            step, loss, lr, grad_norm, img/s (+ objective extras)
    run/tensorboard/           the same scalars (when the tensorboard package is installed)
    run/previews/step-*.png    EMA samples with a fixed seed (one column per class)
    run/checkpoints/step-*/    model + EMA safetensors, state.json + state.safetensors (no pickle),
                               experiment.yaml (atomic)
    run/experiment.yaml        the resolved experiment
    run/loss.png               the loss curve, written at the end
    run/summary.json           final step, wall time, throughput, checkpoint, rank fingerprints

``resume=True`` restores the newest complete checkpoint (weights, EMA, optimizer, scheduler,
every rank's generators and the data position), so the continued run computes the same losses
as one that never stopped; ``resume="auto"`` does so when the folder has a checkpoint and
starts afresh otherwise (what a job restarted by a scheduler wants).

One process writes a run folder: rank 0 holds ``RUN/.lock`` for the whole run
(:mod:`ditkit.training.runlock`). SIGTERM or SIGUSR1 (a cluster's preemption notice) finishes the
current step, writes a checkpoint and raises :class:`Preempted`; the command line exits with
:data:`EXIT_PREEMPTED`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed as tdist
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ditkit import spec as S
from ditkit.builder import build, use_backend
from ditkit.builder.model import Block
from ditkit.builder.tags import MAPPING, NO_DECAY, param_tags
from ditkit.data.datasets import make_dataset, make_stream, resolution_at
from ditkit.device import pick_device
from ditkit.errors import UserError
from ditkit.files import write_text
from ditkit.runtime.denoiser import compile_network
from ditkit.runtime.generate import sample_images
from ditkit.spec.experiment import DATA_CLASSES, Experiment
from ditkit.training import checkpoints as C
from ditkit.training import finetune
from ditkit.training.distributed import Placement
from ditkit.training.evaluation import RunEvaluation
from ditkit.training.guards import compare_for_resume, memory_issues, record_changes
from ditkit.training.logs import Scalars, image_grid, plot_loss, read_scalars, save_png
from ditkit.training.objectives import DiffusionLoss, drop_labels
from ditkit.training.runlock import acquire


class TrainingError(RuntimeError):
    """The run stopped (non-finite loss, nothing to resume): reported without a traceback."""


EXIT_PREEMPTED = 75
"""Exit status of a run stopped by SIGTERM/SIGUSR1 after writing its checkpoint (``EX_TEMPFAIL``
of sysexits.h: try again). Not 0, so ``torchrun --max-restarts`` and schedulers restart it;
not 143, so it is told apart from a process killed before it could save."""

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(TrainingError):
    """A stop signal arrived: the run wrote a checkpoint at the step boundary and stopped.
    ``train --resume auto`` continues it, bit-identically."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(
            f"{signal_name}: stopped at step {step} after writing the checkpoint "
            f"{checkpoint}; run the same command with --resume auto to continue"
        )


class _StopSignals:
    """SIGTERM / SIGUSR1 set a flag that the loop reads at the next step boundary. A second
    signal of the same kind kills at once (the default action). Installed only in the main
    thread (Python delivers signals there); the previous handlers come back on exit."""

    def __init__(self) -> None:

        self.received: str | None = None
        self._old: dict = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            sig = getattr(signal, name)
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:

        name = signal.Signals(signum).name
        if self.received == name:  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = name

    def restore(self) -> None:

        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old = {}


class TrainingSetupError(TrainingError, UserError):
    """The run cannot start as asked (an unknown sampler or backend, nothing to resume, a run
    folder that already holds a run, more memory than the device has): exit status 2."""


@dataclass
class TrainResult:
    run: Path
    step: int
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    checkpoint: Path | None = None
    fingerprints: list[str] = field(default_factory=list)
    evaluation: dict | None = None
    """The last ``evaluation:`` metrics (rank 0; see :mod:`ditkit.training.evaluation`)."""


# -------------------------------------------------------------------------------- setup


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(exp: Experiment, device: torch.device) -> Dist:
    """Join the ``torchrun`` process group; ``backend: auto`` follows the device this process
    trains on (nccl on CUDA, gloo on the CPU -- a ``--device cpu`` run on a GPU machine too)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()

    backend = exp.distributed.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def param_groups(model: nn.Module, opt: S.experiment.Optimizer) -> list[dict]:
    """AdamW groups by the tags the builder set where each parameter was made
    (``ditkit.builder.tags``): ``no_decay`` (norms, scales, biases, embedding tables) without
    weight decay; ``mapping`` (the conditioning path) at ``lr * mapping_lr_scale``."""

    tags = param_tags(model)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        t = tags.get(name, frozenset())
        groups.setdefault((NO_DECAY not in t, MAPPING in t), []).append(p)
    out = []
    for (decay, mapping), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "weight_decay": opt.weight_decay if decay else 0.0,
                "lr": opt.lr * (opt.mapping_lr_scale if mapping else 1.0),
                "name": f"{'mapping' if mapping else 'main'}/{'decay' if decay else 'no_decay'}",
            }
        )
    return out


def lr_factor(schedule, step: int, total: int) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based)."""
    warm = schedule.warmup_steps
    if warm and step < warm:
        return (step + 1) / warm
    if schedule.kind == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return schedule.min_factor + (1 - schedule.min_factor) * cos


def ema_decay(ema: S.experiment.EMA, step: int) -> float:
    if ema.warmup_power == 0:
        return ema.decay
    return min(ema.decay, 1 - (1 + step) ** -ema.warmup_power)


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for eb, b in zip(ema_model.buffers(), model.buffers()):
        eb.copy_(b)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block's activations in the backward pass (less memory, ~30% slower)."""

    def wrap(f):
        def forward(x, cond, ctx=None):
            # ctx (memory tokens, shared modulation) is passed through: MDiT/MPDiT blocks need it
            return checkpoint(f, x, cond, ctx, use_reentrant=False)

        return forward

    for m in model.modules():
        if isinstance(m, Block):
            m.forward = wrap(m.forward)


def autocast_for(exp: Experiment, device: torch.device):
    dtype = exp.precision.dtype
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -------------------------------------------------------------------------------- sampling


def _data_classes(exp: Experiment) -> int | None:

    if exp.data.kind == "shapes":
        return exp.data.classes
    return DATA_CLASSES.get(exp.data.kind)


def preview(ema_model: nn.Module, exp: Experiment, path: Path, device: torch.device) -> None:
    p, spec = exp.preview, exp.model_spec
    classes = spec.conditioning.classes
    n_cls = _data_classes(exp) or (classes.count if classes else None)

    images, _ = sample_images(
        ema_model, spec, exp.objective, p.count, p.sampling, device, n_classes=n_cls
    )
    ncol = min(p.count, n_cls or 8)
    scale = max(1, 64 // max(spec.input.resolution))
    save_png(image_grid(images, ncol, scale=scale), path)


# -------------------------------------------------------------------------------- one step


def accumulate_gradients(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    placement: Placement,
    loss_fn: DiffusionLoss,
    stream,
    exp: Experiment,
    gen: torch.Generator,
    step: int,
    device: torch.device,
    *,
    stop_requested: bool = False,
) -> tuple[float, dict[str, float], bool]:
    """The forward and backward passes of one optimizer step: ``training.accumulate``
    micro-batches from ``stream`` moved to ``device``, label dropout from ``gen``, the loss
    under the run's autocast, gradients reduced across processes on the last micro-batch only.
    Returns the mean loss over every process, the objective's extra scalars, and whether any
    process asked to stop (``stop_requested``: this one got SIGTERM / SIGUSR1), agreed by every
    process in the same collective as the loss."""
    tr, spec = exp.training, exp.model_spec
    micro = tr.batch_size // tr.accumulate  # global samples per micro-batch
    if tr.resolutions is not None:  # bucketed: the whole step at one resolution
        stream.dataset.set_resolution(resolution_at(tr, step))
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64)
    extras_sum: dict[str, float] = {}
    for k in range(tr.accumulate):
        x0, labels = stream.next(micro)
        x0 = x0.to(device)
        labels = labels.to(device) if spec.conditioning.classes is not None else None
        labels = drop_labels(labels, tr.label_dropout, spec.null_label, gen)
        with placement.no_sync(net, last=k == tr.accumulate - 1):
            with autocast_for(exp, device):
                loss, extras = loss_fn(net, x0, labels, gen, step)
            (loss / tr.accumulate).backward()
        loss_sum += loss.detach().double().cpu()
        for name, v in extras.items():
            extras_sum[name] = extras_sum.get(name, 0.0) + v / tr.accumulate
    loss_value = loss_sum / tr.accumulate
    stop_seen = stop_requested
    if placement.world > 1:
        both = torch.stack([loss_value, torch.tensor(float(stop_requested), dtype=torch.float64)])
        dist.all_reduce(both)  # one collective: the mean loss and the stop flag
        loss_value, stop_seen = both[0] / placement.world, bool(both[1] > 0)
    return float(loss_value), extras_sum, stop_seen


def optimizer_step(
    model: nn.Module,
    ema_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    placement: Placement,
    exp: Experiment,
    step: int,
) -> float:
    """Clip the gradients, step AdamW, update the EMA; returns the gradient norm."""
    gnorm = placement.clip_gradients(model, exp.optimizer.grad_clip)
    optimizer.step()
    ema_update(ema_model, model, ema_decay(exp.ema, step))
    return gnorm


# -------------------------------------------------------------------------------- the loop


def train(
    exp: Experiment,
    run: str | Path,
    *,
    resume: bool | str = False,
    progress: bool = True,
    data_base: Path | None = None,
    stop_after: int | None = None,
    device: str | None = None,
    allow_changes: bool = False,
) -> TrainResult:
    """Train ``exp`` (resolved) into the folder ``run``. ``stop_after``: stop (without a final
    checkpoint) after this many optimizer steps of *this invocation* (tests). ``data_base``:
    the folder relative data paths start at. ``allow_changes``: on ``resume``, accept an
    experiment that differs from the run's in what is trained (recorded in the run folder).
    ``resume="auto"``: resume when ``run`` holds a complete checkpoint, else start.

    Rank 0 holds the run folder's lock (:func:`ditkit.training.runlock.acquire`) until it returns;
    a second writer fails at once with :class:`~ditkit.training.runlock.RunLockedError`.

    A run that fails before its first optimizer step leaves no run folder behind (when this
    call created it). Under torchrun, a process group this call creates is destroyed when it
    returns (after a barrier) or fails; a caller that runs collectives of its own around
    ``train`` initialises the group first, and then keeps it."""

    if resume not in (True, False, "auto"):
        raise TrainingSetupError(f"resume: {resume!r}; use True, False or 'auto'")
    run = Path(run)
    created = None  # the outermost folder this call creates (run itself or a parent)
    for folder in [run, *run.parents]:
        if folder.exists():
            break
        created = folder
    main_rank = int(os.environ.get("RANK", "0")) == 0
    lock = acquire(run) if main_rank else None  # before anything is read or written
    try:
        if lock is not None:
            C.remove_stale_temporaries(run / "checkpoints")  # a killed run's; we are the writer
        if resume == "auto":
            resume = C.latest_checkpoint(run / "checkpoints") is not None
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    done = {"steps": 0}

    # under torchrun this call creates the process group (init_distributed); it also takes it
    # down, so gloo's threads are joined before the interpreter exits (left to the exit, the
    # destructor race ended a rank with "terminate called without an active exception")
    owns_group = tdist.is_available() and not tdist.is_initialized()
    try:
        result = _train(
            exp,
            run,
            resume=bool(resume),
            progress=progress,
            data_base=data_base,
            stop_after=stop_after,
            device=device,
            allow_changes=allow_changes,
            done=done,
        )
    except BaseException:
        if created is not None and done["steps"] == 0 and main_rank:
            shutil.rmtree(created, ignore_errors=True)
        if owns_group and tdist.is_initialized():
            tdist.destroy_process_group()
        raise
    finally:
        if lock is not None:
            lock.release()
    if owns_group and tdist.is_initialized():
        tdist.barrier()  # every rank is done with its collectives
        tdist.destroy_process_group()
    return result


def _train(
    exp: Experiment,
    run: Path,
    *,
    resume: bool,
    progress: bool,
    data_base: Path | None,
    stop_after: int | None,
    device: str | torch.device | None,
    allow_changes: bool,
    done: dict,
) -> TrainResult:

    exp, ft_plan = finetune.prepare(exp)  # a fine-tune run trains the adapted spec

    try:  # None/auto: cuda:LOCAL_RANK when there is CUDA, else cpu
        device = pick_device(str(device) if device is not None else "auto")
    except UserError as err:
        raise TrainingSetupError(str(err)) from None
    dist_info = init_distributed(exp, device)
    rank, world = dist_info.rank, dist_info.world
    if device.type == "cuda":
        torch.cuda.set_device(device)
    spec, tr = exp.model_spec, exp.training
    ckpt_root = run / "checkpoints"

    too_big = memory_issues(exp, world, device)
    if too_big:
        raise TrainingSetupError("; ".join(f"{f}: {m}" for f, m in too_big))

    start_step, state = 0, None
    if resume:
        found = C.latest_checkpoint(ckpt_root)
        if found is None:
            raise TrainingSetupError(
                f"--resume: no complete checkpoint under {ckpt_root}; start without --resume"
            )
        start_step, ckpt_dir = found
        changes = compare_for_resume(ckpt_dir, exp, run, start_step, allow_changes)
        state = C.read_state(ckpt_dir)
        if state["world"] != world:
            raise TrainingError(
                f"--resume: the checkpoint was written by {state['world']} "
                f"process(es) but this run has {world}; resume with the same "
                "number of processes"
            )
    elif C.latest_checkpoint(ckpt_root) is not None:
        raise TrainingSetupError(
            f"{run} already holds checkpoints; pass --resume to continue "
            "it or choose a new --out folder"
        )
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "previews").mkdir(exist_ok=True)
        write_text(run / "experiment.yaml", S.dumps(exp))  # a planted symlink is replaced
        if state is not None:
            record_changes(run, start_step, changes)

    # model, EMA, optimizer, schedule --------------------------------------------------------
    torch.manual_seed(tr.seed)  # identical initial weights on every rank
    model = build(spec).to(device)
    ft_meta = None
    if ft_plan is not None:  # adapted checkpoint weights in, all but `trainable` frozen
        ft_record = finetune.apply(model, exp, ft_plan, load_weights=state is None, seed=tr.seed)
        ft_meta = finetune.metadata(ft_record)
        if rank == 0:
            C.write_json(run / "finetune.json", ft_record)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    if exp.precision.activation_checkpointing:
        enable_activation_checkpointing(model)
    placement = Placement(exp, world, rank, device)
    net: nn.Module = placement.wrap(model, ema_model)  # FSDP2 shards model and EMA in place
    opt_spec = exp.optimizer
    groups = param_groups(model, opt_spec)
    optimizer = torch.optim.AdamW(groups, lr=opt_spec.lr, betas=opt_spec.betas, eps=opt_spec.eps)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    dataset = make_dataset(exp, data_base)
    stream = make_stream(dataset, tr.batch_size, tr.seed, rank, world)
    gen = torch.Generator().manual_seed(tr.seed * 7919 + 104729 * (rank + 1))
    pos_gen = None  # randomised RoPE positions (rope.train_positions: random) draw from it
    if model.random_positions:
        pos_gen = torch.Generator().manual_seed(tr.seed * 7919 + 104729 * (rank + 1) + 1)
        model.position_generator = pos_gen
    if state is not None:
        placement.load(
            model,
            ema_model,
            optimizer,
            C.read_tensors(ckpt_dir / "model.safetensors"),
            C.read_tensors(ckpt_dir / "ema.safetensors"),
            state["optimizer"],
        )
        gen.set_state(state["generators"][rank])
        torch.set_rng_state(state["torch_rng"][rank])
        stream.restore(state["data_position"])
        if pos_gen is not None and "position_generators" in state:
            pos_gen.set_state(state["position_generators"][rank])
    if exp.precision.compile:  # one graph (fullgraph) except under DDP's bucketed graphs
        net = compile_network(
            net, device=device, training=True, fullgraph=placement.strategy != "ddp"
        )
    loss_fn = DiffusionLoss(exp.objective, spec)
    evaluation = _evaluation(exp, run, device, rank, start_step if resume else None)
    scalars = None
    if rank == 0:
        fields = ["step", "loss", "lr", "grad_norm", "img_per_s", "mse", "vb", "var"]
        fields += evaluation.fields if evaluation is not None else []
        scalars = Scalars(run, fields, start_step if resume else None, exp.logging.tensorboard)
    bar = tqdm(
        total=tr.steps,
        initial=start_step,
        disable=not (progress and rank == 0),
        desc=exp.name,
        unit="it",
        dynamic_ncols=True,
    )
    result = TrainResult(run, start_step)
    t0 = time.perf_counter()
    latest = C.latest_checkpoint(ckpt_root) if resume else None  # checked above on resume
    last_ckpt: Path | None = latest[1] if latest is not None else None
    result.checkpoint = last_ckpt
    window_t, window_imgs = time.perf_counter(), 0
    model.train()

    def save(step: int) -> Path | None:  # None on ranks other than 0
        gens = _gather([gen.get_state()], world)
        rngs = _gather([torch.get_rng_state()], world)
        pos_gens = _gather([pos_gen.get_state()], world) if pos_gen is not None else None
        model_state, ema_state, opt_state = placement.full_state(model, ema_model, optimizer)
        if rank != 0:
            return None
        train_state = {
            "step": step,
            "world": world,
            "optimizer": opt_state,
            "generators": gens,
            "torch_rng": rngs,
            "data_position": stream.state(),
            "lr_factor": lr_factor(opt_spec.schedule, step, tr.steps),
        }
        if pos_gens is not None:
            train_state["position_generators"] = pos_gens
        return C.write_checkpoint(
            ckpt_root,
            step,
            exp,
            model_state,
            ema_state,
            train_state,
            exp.checkpoint.keep_last,
            metadata=ft_meta,
        )

    step = start_step
    saved_step = start_step if resume else None

    try:
        backend = use_backend(exp.precision.attention_backend)
        backend.__enter__()
    except ValueError as err:
        raise TrainingSetupError(f"precision.attention_backend: {err}") from None
    signals = _StopSignals()
    try:
        while step < tr.steps:
            if stop_after is not None and step - start_step >= stop_after:
                break
            factor = lr_factor(opt_spec.schedule, step, tr.steps)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * factor
            loss_value, extras_sum, stop_seen = accumulate_gradients(
                net,
                optimizer,
                placement,
                loss_fn,
                stream,
                exp,
                gen,
                step,
                device,
                stop_requested=signals.received is not None,
            )
            if not math.isfinite(loss_value):
                where = (
                    f"the last good checkpoint is {last_ckpt} (continue with --resume)"
                    if last_ckpt
                    else "no checkpoint was written before it"
                )
                raise TrainingError(
                    f"loss is {loss_value} at step {step + 1}; training stopped "
                    f"and nothing was saved for this step; {where}. Lower "
                    "optimizer.lr or set optimizer.grad_clip."
                )
            gnorm = optimizer_step(model, ema_model, optimizer, placement, exp, step)
            step += 1
            done["steps"] += 1
            result.step = step
            result.losses.append(loss_value)
            window_imgs += tr.batch_size
            bar.update(1)

            if rank == 0 and (step % exp.logging.every == 0 or step == tr.steps):
                now = time.perf_counter()
                ips = window_imgs / max(now - window_t, 1e-9)
                window_t, window_imgs = now, 0
                assert scalars is not None  # rank 0 writes them
                scalars.write(
                    {
                        "step": step,
                        "loss": loss_value,
                        "lr": opt_spec.lr * factor,
                        "grad_norm": gnorm,
                        "img_per_s": ips,
                        **extras_sum,
                    }
                )
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{ips:.0f}")
            if step % exp.checkpoint.every == 0 or step == tr.steps:
                last_ckpt = save(step) or last_ckpt
                result.checkpoint, saved_step = last_ckpt, step
            if exp.preview.every and step % exp.preview.every == 0 or step == tr.steps:
                sampler_model = placement.sampling_model(ema_model, lambda: build(spec))
                if rank == 0:
                    assert sampler_model is not None  # rank 0 samples
                    preview(sampler_model, exp, run / "previews" / f"step-{step:06d}.png", device)
            if evaluation is not None and evaluation.due(step, tr.steps):
                result.evaluation = evaluation(
                    placement.sampling_model(ema_model, lambda: build(spec)), step, scalars
                )
            if (stop_seen or world == 1 and signals.received) and step < tr.steps:
                if saved_step != step:  # preempted: keep every step done so far
                    last_ckpt = save(step) or last_ckpt
                    result.checkpoint, saved_step = last_ckpt, step
                raise Preempted(
                    signals.received or "a stop signal on another rank", step, last_ckpt
                )
    finally:
        signals.restore()
        backend.__exit__(None, None, None)
        bar.close()
        if scalars is not None:
            scalars.close()

    result.wall_s = time.perf_counter() - t0
    result.fingerprints = _gather([placement.fingerprint(model)], world)
    if rank == 0 and step == tr.steps:
        rows = read_scalars(run / "scalars.csv")
        if rows:
            plot_loss(rows, run / "loss.png", exp.name)
        C.write_json(
            run / "summary.json",
            {
                "experiment": exp.name,
                "step": step,
                "world": world,
                "wall_s": result.wall_s,
                "final_loss": result.losses[-1] if result.losses else None,
                "checkpoint": str(result.checkpoint or last_ckpt),
                "rank_fingerprints": result.fingerprints,
                "ranks_identical": len(set(result.fingerprints)) == 1,
            },
        )
    return result


def _evaluation(
    exp: Experiment, run: Path, device: torch.device, rank: int, resume_step: int | None
):
    """The ``evaluation:`` block ready to run (``None`` when disabled); its files are checked
    now, so a wrong path fails before the first step."""

    try:
        return RunEvaluation.create(exp, run, device, rank, resume_step, _data_classes(exp))
    except UserError as err:  # stays a usage error (exit 2), named after the block
        raise UserError(f"evaluation: {err}") from None


def _gather(items: list, world: int) -> list:
    """Every rank's ``items[0]``, in rank order (a plain list on one process)."""
    if world == 1:
        return items

    out = [None] * world
    dist.all_gather_object(out, items[0])
    return out
