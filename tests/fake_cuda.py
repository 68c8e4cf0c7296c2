"""A fake CUDA device for CPU-only machines: device placement, dtype and autocast bugs of the
GPU paths are found without a GPU (``tests/test_fake_cuda.py``; guide:
``docs/guides/fake-cuda.md``).

PyTorch's ``FakeTensorMode`` runs every operator on tensors that carry a shape, a device and a
dtype but no data, and raises ``FakeTensorDeviceMismatchError`` where a kernel would get
tensors on two devices -- for ``cuda`` too on a CPU-only build. Three things stand between it
and ditkit's GPU paths on a build without CUDA, and :func:`install` removes them:

1. indexing (``x[:, None]``) and the autograd engine take a *device guard* for the tensor's
   device, and a CPU-only build registers none for CUDA ("PyTorch is not linked with support
   for cuda devices"). :func:`install` registers a no-op guard whose device type is CUDA (the
   same no-op guard that a CUDA build without a visible GPU gets from PyTorch itself);
2. the autograd engine asks for "the accelerator" to record streams: :func:`install` names a
   placeholder accelerator (PyTorch's own Python-backend hooks) so it finds one;
3. ``torch.cuda.is_available()`` and friends answer from the driver: :func:`fake_cuda` patches
   them for the duration of the block.

(1) and (2) are process-wide and cannot be undone, so the tests run the harness in a child
process (``python -m tests.fake_cuda``); nothing here is imported by ditkit.

Random initialisers cannot run on a fake CUDA tensor (``uniform_`` needs a CUDA generator), so
:func:`materialize` builds the model on ``meta``, allocates every parameter and buffer on the
fake device and re-runs the builder's own initialisation there with the in-place random fills
answered by their fake results.

Host synchronisations (``float(t)``, ``bool(t)``, ``t.item()``) have no value to return on a
fake tensor. :class:`FakeCuda` answers them with a stand-in (``1`` / ``True``) and records
where each happened, so a test can require that none happen inside ``forward``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import traceback
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._mode_utils import no_dispatch

DEVICE = torch.device("cuda", 0)
_installed = False


class Unavailable(RuntimeError):
    """This PyTorch build cannot host the fake CUDA device."""


class _CudaGuard(torch._C._acc.DeviceGuard):
    """A device guard that does nothing, of device type CUDA."""

    def type_(self):
        return torch._C._autograd.DeviceType.CUDA


def install() -> None:
    """Register a no-op CUDA device guard (process-wide, once; see the module docstring)."""
    global _installed
    if _installed or torch.cuda._is_compiled():
        _installed = True
        return
    try:
        registry = (ctypes.c_void_p * 21).in_dll(
            ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")),
            "_ZN3c104impl26device_guard_impl_registryE",
        )
    except (OSError, ValueError) as err:  # another platform's library name or symbol
        raise Unavailable(
            f"cannot register a CUDA device guard in this PyTorch build ({err})"
        ) from None
    cuda, private = 1, 20  # c10::DeviceType::CUDA, ::PrivateUse1
    if registry[cuda] is None:
        if registry[private] is not None:
            raise RuntimeError("a PrivateUse1 device guard is already registered")
        # the only way to make a guard object from Python is PyTorch's PrivateUse1 hook:
        # register ours there (it is kept alive by the registration), move it to CUDA's slot
        torch._C._acc.register_python_privateuseone_device_guard(_CudaGuard())
        registry[cuda], registry[private] = registry[private], None
    _installed = True


class HostSync(AssertionError):
    """A Python scalar read from a fake tensor where none may happen (inside ``forward``)."""


class _Mode(FakeTensorMode):
    """``FakeTensorMode`` for the device only, answering host synchronisations with a stand-in.

    An operator that touches no fake tensor and names no device other than the CPU runs for
    real: a sampler's noise schedule, the generators, the data and the DDPM tables are CPU
    computations whose values matter, and a real CPU tensor that meets a fake CUDA one still
    raises the device mismatch (0-dim CPU tensors excepted, as on a GPU).

    A fake tensor has no value: ``float(t)``, ``bool(t)`` and ``t.item()`` get the answer of
    a finite, healthy run -- ``1``, ``True``, but ``False`` for ``t.any()`` (nothing is out of
    range: ``isfinite(x).all()`` holds, ``trunc_normal_``'s rejection loop ends) -- and the
    call site of a device tensor's sync is recorded in ``syncs``. With ``strict`` set (inside
    ``forward``) a sync is a :class:`HostSync` error."""

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)
        self.syncs: list[str] = []
        self.strict = 0

    @property
    def avoid_device_init(self) -> bool:
        return True  # there is no device, whatever torch.cuda is patched to say

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = pytree.arg_tree_leaves(*args, **kwargs)
        if not any(
            isinstance(a, FakeTensor) or (isinstance(a, torch.device) and a.type != "cpu")
            for a in leaves
        ):
            # host-side work (schedules, generators, data, CPU bookkeeping) runs for real:
            # only what involves the device is fake
            with no_dispatch():
                return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            if t.device.type != "cpu":  # a read of a CPU tensor is no device sync
                where = _caller()
                if self.strict:
                    raise HostSync(
                        f"a data-dependent Python scalar inside forward at {where}: "
                        "it blocks tracing and costs a GPU a synchronisation"
                    )
                self.syncs.append(where)
            if t.dtype == torch.bool:
                return getattr(t, "_healthy", True)
            return 1.0 if t.is_floating_point() else 1
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func.overloadpacket in _ANY and isinstance(out, FakeTensor):
            out._healthy = False  # "is any value bad?" -- no (trunc_normal_'s rejection loop)
        return out


_ANY = (torch.ops.aten.any,)


def _caller() -> str:
    """The innermost ditkit frame of the current stack (where a sync came from)."""
    for frame in reversed(traceback.extract_stack()):
        if "/ditkit/" in frame.filename:
            return f"{frame.filename.split('/ditkit/', 1)[1]}:{frame.lineno}"
    return "outside ditkit"


@contextlib.contextmanager
def fake_cuda():
    """A block in which ``torch.cuda`` reports one bf16-capable GPU and every tensor is fake;
    yields the mode (its ``syncs`` list the host synchronisations that happened)."""
    install()
    mode = _Mode()
    with contextlib.ExitStack() as stack:
        # plain functions, not mocks: some are called for every fake tensor made
        for name, value in (
            ("is_available", True),
            ("device_count", 1),
            ("is_bf16_supported", True),
            ("current_device", 0),
            ("get_device_name", "fake"),
            ("set_device", None),
        ):
            stack.enter_context(mock.patch(f"torch.cuda.{name}", new=lambda *a, _v=value, **k: _v))
        stack.enter_context(mode)
        yield mode


@contextlib.contextmanager
def no_host_sync(mode: _Mode):
    """Inside: a host synchronisation is an error (:class:`HostSync`)."""
    mode.strict += 1
    try:
        yield
    finally:
        mode.strict -= 1


def is_fake_cuda(t: torch.Tensor) -> bool:
    return isinstance(t, FakeTensor) and t.device == DEVICE


def build_on_device(spec, device=DEVICE):
    """``ditkit.builder.build`` on the fake device (inside :func:`fake_cuda`): the builder's
    own construction and initialisation, run where the tensors live."""
    from ditkit.builder import build

    return build(spec, device=device)


# ------------------------------------------------------------------------ backward stand-in


class GraphOffDevice(AssertionError):
    """The autograd graph of a loss holds a node whose gradient would be on another device."""


def backward_standin(loss: torch.Tensor, device: torch.device = DEVICE) -> int:
    """What ``loss.backward()`` can be on a fake CUDA tensor of a CPU-only build.

    PyTorch's autograd engine cannot run a backward over CUDA tensors without the CUDA runtime
    (it asks it for the streams of every node: ``engine.cpp``'s stream checks), fake or not.
    The graph is there all the same: every node records the device and dtype of the gradient
    it will receive (``_input_metadata``). This walks the whole graph, raises
    :class:`GraphOffDevice` where a node's gradient would not be on ``device`` (a CPU tensor
    in the forward makes a CPU node), and gives every parameter the graph reaches a gradient
    like it (zeros, on its device), as the real backward would. Returns the number of nodes."""
    seen, todo, nodes = set(), [loss.grad_fn], 0
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        nodes += 1
        if type(fn).__name__ == "AccumulateGrad":
            p = fn.variable
            g = torch.zeros_like(p)
            p.grad = g if p.grad is None else p.grad + g
            continue
        for meta in fn._input_metadata:
            shape = tuple(meta.shape)
            if meta.device != device and shape != ():
                raise GraphOffDevice(
                    f"{fn.name()} receives a {tuple(shape)} gradient on {meta.device}, not {device}"
                )
        todo.extend(f for f, _ in fn.next_functions)
    return nodes


@contextlib.contextmanager
def standin_backward():
    """``Tensor.backward`` is :func:`backward_standin` inside the block; yields the list of
    the losses it was called on."""
    calls: list[torch.Tensor] = []

    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        calls.append(self)
        backward_standin(self)

    with mock.patch.object(torch.Tensor, "backward", backward):
        yield calls


# ------------------------------------------------------------------------ the checks

#: each family trains with its paper's objective; tiny-hdit-global runs all four
NATIVE_OBJECTIVE = {
    "tiny-dit": "ddpm_eps",
    "tiny-hdit": "edm",
    "tiny-mdit": "x0",
    "tiny-mpdit": "flow",
    "tiny-options": "edm",
}
ALL_OBJECTIVES_SPEC = "tiny-hdit-global"
#: every sampler runs on these (a learned-variance DDPM model and an EDM model)
ALL_SAMPLERS_SPECS = ("tiny-dit", "tiny-hdit-global")


def native_objective(name: str) -> str:
    return next(
        v
        for k, v in sorted(NATIVE_OBJECTIVE.items(), key=lambda kv: -len(kv[0]))
        if name.startswith(k)
    )


def load_spec(name: str, null_class: bool = True):
    """A tiny example spec; with a null class added (classifier-free guidance needs one)."""
    from ditkit import spec as S
    from tests.conftest import EXAMPLES

    spec = S.load(EXAMPLES / "tiny" / f"{name}.yaml")
    classes = spec.conditioning.classes
    if null_class and classes is not None and not classes.null_class:
        cond = spec.conditioning.model_copy(
            update={"classes": classes.model_copy(update={"null_class": True})}
        )
        spec = spec.model_copy(update={"conditioning": cond})
    return spec


def experiment(spec, objective: str, **blocks):
    """A training experiment for ``spec``: procedural shapes, batch 2, precision ``auto`` (bf16
    autocast on CUDA, as a GPU run gets it)."""
    from ditkit.spec.experiment import Experiment

    obj = {"kind": objective}
    if objective == "ddpm_eps":
        obj["learned_sigma"] = spec.head.learned_sigma
    doc = {
        "model": spec.model_dump(mode="json"),
        "objective": obj,
        "data": {"kind": "shapes", "count": 8},
        "training": {"batch_size": 2, "steps": 2, "label_dropout": 0.5},
        "preview": {"count": 2, "steps": 2},
        **blocks,
    }
    return Experiment.model_validate(doc)


def _stream(exp):
    """The run's batch stream of real CPU batches: procedural shapes for RGB models, random
    images (``TensorImages``) for the others (the shapes come in RGB only)."""
    from ditkit.data.datasets import BatchStream, TensorImages, make_dataset, make_stream

    spec, n = exp.model_spec, exp.training.batch_size
    if spec.input.channels == 3:
        return make_stream(make_dataset(exp), n, 0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, spec.input.channels, *spec.input.resolution, generator=g)
    return BatchStream(TensorImages(x, torch.arange(8) % 5, 5), n, 0)


class Probe:
    """Forward hooks on a model: inside ``forward`` a host sync is an error; records the dtype
    of every Linear's output (what autocast made of it) and the devices of every output."""

    def __init__(self, model: torch.nn.Module, mode: _Mode):
        self.linear_dtypes: set[torch.dtype] = set()
        self.devices: set[torch.device] = set()
        self.calls = 0
        self.handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._leave),
        ]
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                self.handles.append(m.register_forward_hook(self._linear))
        self.mode = mode

    def _enter(self, module, args):
        self.mode.strict += 1

    def _leave(self, module, args, out):
        self.mode.strict -= 1
        self.calls += 1
        self.devices.add(out.device)

    def _linear(self, module, args, out):
        self.linear_dtypes.add(out.dtype)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def check_forward(name: str, backend: str = "gather") -> None:
    """Forward in fp32 and under bf16 autocast: no host sync, output on the device, the
    autocast region in bf16 and the fp32 one in fp32."""
    from ditkit.builder import use_backend

    spec = load_spec(name)
    with fake_cuda() as mode, use_backend(backend):
        model = build_on_device(spec)
        _expect(
            all(is_fake_cuda(t) for t in [*model.parameters(), *model.buffers()]),
            "a parameter or buffer was built off the device",
        )
        b = 2
        x = torch.randn(b, spec.input.channels, *spec.input.resolution, device=DEVICE)
        t = torch.rand(b, device=DEVICE)
        y = torch.zeros(b, dtype=torch.long, device=DEVICE)
        cond = {a.name: torch.zeros(b, a.dims, device=DEVICE) for a in spec.conditioning.aux}
        for autocast in (False, True):
            probe = Probe(model, mode)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out = model(x, t, y, **cond)
            probe.remove()
            want = torch.bfloat16 if autocast else torch.float32
            _expect(is_fake_cuda(out), f"output on {out.device}")
            _expect(
                probe.linear_dtypes == {want},
                f"Linear outputs {probe.linear_dtypes} (autocast={autocast}), want {want}",
            )


def check_train_step(
    name: str, objective: str, accumulate: int = 1, precision: dict | None = None
) -> None:
    """One optimizer step as ``ditkit train`` takes it (``loop.accumulate_gradients`` and
    ``loop.optimizer_step``): data to the device, label dropout, the objective's loss under
    the run's autocast, backward (:func:`backward_standin`), clipping, AdamW, EMA.
    ``precision``: the experiment's block (default ``dtype: auto``: bf16 on CUDA)."""
    import copy

    from ditkit.builder import use_backend
    from ditkit.training import loop
    from ditkit.training.distributed import Placement
    from ditkit.training.objectives import DiffusionLoss

    spec = load_spec(name, null_class=False)
    exp = experiment(
        spec,
        objective,
        training={
            "batch_size": 2 * accumulate,
            "steps": 2,
            "label_dropout": 0.5,
            "accumulate": accumulate,
        },
        precision=precision or {},
    )
    want = torch.float32 if exp.precision.dtype == "fp32" else torch.bfloat16
    stream = _stream(exp)
    with fake_cuda() as mode, use_backend("gather"), standin_backward() as losses:
        model = build_on_device(spec)
        ema = copy.deepcopy(model).requires_grad_(False)
        if exp.precision.activation_checkpointing:
            loop.enable_activation_checkpointing(model)
        placement = Placement(exp, 1, 0, DEVICE)
        net = placement.wrap(model, ema)
        # foreach: what AdamW picks for CUDA tensors (it cannot tell that fake ones are)
        opt = torch.optim.AdamW(loop.param_groups(model, exp.optimizer), lr=1e-4, foreach=True)
        loss_fn = DiffusionLoss(exp.objective, spec)
        gen = torch.Generator().manual_seed(0)
        probe = Probe(model, mode)
        with mock.patch.object(loop, "autocast_for", wraps=loop.autocast_for) as ac:
            loop.accumulate_gradients(net, opt, placement, loss_fn, stream, exp, gen, 0, DEVICE)
        probe.remove()
        _expect(
            ac.call_count == accumulate and ac.call_args.args[1] == DEVICE,
            "autocast_for was not asked for the device",
        )
        _expect(
            probe.calls == accumulate and probe.devices == {DEVICE},
            f"forward outputs on {probe.devices}",
        )
        _expect(
            probe.linear_dtypes == {want},
            f"Linear outputs in {probe.linear_dtypes}, want {want} ({exp.precision})",
        )
        _expect(
            len(losses) == accumulate
            and all(
                is_fake_cuda(loss) and loss.dtype == torch.float32 and loss.ndim == 0
                for loss in losses
            ),
            f"the loss is {[(x.device, x.dtype, tuple(x.shape)) for x in losses]}",
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        _expect(
            all(p.grad is not None for p in trainable),
            "a trainable parameter is not reached by the loss",
        )
        loop.optimizer_step(model, ema, opt, placement, exp, 0)
        _expect(
            all(is_fake_cuda(p) and p.dtype == torch.float32 for p in model.parameters()),
            "master weights left the device or fp32",
        )
        _expect(
            all(is_fake_cuda(p) and p.dtype == torch.float32 for p in ema.parameters()),
            "EMA weights left the device or fp32",
        )
        state = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
        _expect(
            state and all(is_fake_cuda(v) and v.dtype == torch.float32 for v in state),
            "AdamW moments off the device or not fp32",
        )


def _denoiser(spec, objective: str):
    from ditkit.runtime.denoiser import Denoiser

    return Denoiser(build_on_device(spec).eval(), experiment(spec, objective).objective)


def check_sampling(name: str, sampler: str, objective: str | None = None) -> None:
    """``ditkit.runtime.samplers.sample`` with classifier-free guidance (scale 2, the two
    passes batched) on the device: the samples stay there, in fp32, and ``forward`` never
    synchronises."""
    from ditkit.builder import use_backend
    from ditkit.runtime.samplers import sample

    spec = load_spec(name)
    with fake_cuda() as mode, use_backend("gather"):
        den = _denoiser(spec, objective or native_objective(name))
        probe = Probe(den.model, mode)
        labels = torch.tensor([0, 1])
        cond = {a.name: torch.zeros(2, a.dims) for a in spec.conditioning.aux}
        x = sample(
            den,
            (2, spec.input.channels, *spec.input.resolution),
            steps=2,
            sampler=sampler,
            seed=0,
            class_labels=labels,
            cfg_scale=2.0,
            device=DEVICE,
            cond=cond,
        )
        probe.remove()
        _expect(is_fake_cuda(x) and x.dtype == torch.float32, f"samples {x.device} {x.dtype}")
        _expect(probe.calls >= 1 and probe.devices == {DEVICE}, "the model ran off the device")


def check_npz_chunk(name: str) -> None:
    """The ``--npz`` path: :func:`ditkit.evaluate.npz.processes` picks the device from
    ``--device cuda`` and :func:`ditkit.evaluate.npz.draw_chunk` samples one chunk (CFG) on it."""
    import numpy as np

    from ditkit.builder import use_backend
    from ditkit.evaluate import npz
    from ditkit.spec.sampling import Sampling

    spec = load_spec(name)
    with fake_cuda(), use_backend("gather"):
        proc = npz.processes("cuda")
        _expect(proc.device == "cuda:0", f"--device cuda gave {proc.device}")
        den = _denoiser(spec, native_objective(name))
        x = npz.draw_chunk(
            den,
            1,
            2,
            2,
            np.array([3, 4]),
            shape=(spec.input.channels, *spec.input.resolution),
            sampling=Sampling(steps=1, sampler="dpmpp_2m", cfg_scale=2.0),
            decode=None,
            device=proc.device,
        )
        _expect(is_fake_cuda(x) and x.dtype == torch.float32, f"chunk {x.device} {x.dtype}")


def check_hooks(name: str, tmp: str) -> None:
    """The training loop's preview (``loop.preview``) and evaluation (``RunEvaluation``)
    hooks on the EMA model on the device: they sample there and hand CPU images on (the PNG
    writer and the classifier, which need data, get the images and are not run)."""
    from pathlib import Path

    from ditkit.builder import use_backend
    from ditkit.training import evaluation, loop

    spec = load_spec(name, null_class=False)
    exp = experiment(
        spec, native_objective(name), evaluation={"enabled": True, "count": 2, "steps": 2}
    )
    got: dict[str, torch.Tensor] = {}
    with (
        fake_cuda(),
        use_backend("gather"),
        mock.patch.object(loop, "save_png", lambda img, path: got.update(preview=img)),
        mock.patch.object(evaluation, "save_png", lambda img, path: got.update(grid=img)),
        mock.patch.object(
            evaluation.RunEvaluation,
            "_labels",
            lambda self, images, labels: got.update(eval=images) or {},
        ),
    ):
        ema = build_on_device(spec).requires_grad_(False)
        loop.preview(ema, exp, Path(tmp) / "preview.png", DEVICE)
        hook = loop._evaluation(exp, Path(tmp), DEVICE, 0, None)
        _expect(hook is not None and hook.device == DEVICE, "the evaluation is off the device")
        hook(ema, 2)
    for key in ("preview", "grid", "eval"):
        t = got.get(key)
        where = str(getattr(t, "device", None))  # a tensor, or image_grid's numpy array
        _expect(where == "cpu", f"{key} images on {where}")


def check_distributed_plan(strategy: str) -> None:
    """What the DDP / FSDP2 wrappers receive from ``Placement`` on a GPU rank (torch.distributed
    needs real tensors: DDP checks every parameter's shape across ranks, FSDP2 takes its device
    from the mesh, so the wrappers themselves cannot run on fake ones): the model on the
    rank's GPU in fp32, DDP's ``device_ids``, FSDP2's bf16 compute / fp32 reduction policy,
    and gradient sync skipped on all but the last micro-batch."""
    import copy

    from ditkit.training import distributed

    spec = load_spec("tiny-dit", null_class=False)
    exp = experiment(spec, "ddpm_eps", distributed={"strategy": strategy})
    got: dict = {}

    class DDP(torch.nn.Module):  # records what DistributedDataParallel is given
        def __init__(self, module, device_ids=None):
            super().__init__()
            got.update(module=module, device_ids=device_ids)
            self.module = module

        def no_sync(self):
            got["no_sync"] = True
            return contextlib.nullcontext()

    def shard(model, **options):
        got.setdefault("sharded", []).append((model, options))
        return model

    with (
        fake_cuda(),
        mock.patch.object(distributed, "DDP", DDP),  # the use site
        mock.patch.object(distributed, "shard", shard),
    ):
        model = build_on_device(spec)
        ema = copy.deepcopy(model).requires_grad_(False)
        placement = distributed.Placement(exp, 2, 1, DEVICE)
        net = placement.wrap(model, ema)
        for m in (model, ema):
            _expect(
                all(is_fake_cuda(p) and p.dtype == torch.float32 for p in m.parameters()),
                "the wrapped weights are not fp32 on the rank's GPU",
            )
        if strategy == "ddp":
            _expect(
                got["module"] is model and got["device_ids"] == [DEVICE.index],
                f"DDP got device_ids {got['device_ids']}",
            )
            with placement.no_sync(net, last=False):
                pass
            _expect(got.get("no_sync"), "gradient sync was not skipped before the last micro-batch")
        else:
            _expect([m for m, _ in got["sharded"]] == [model, ema], "model and EMA not sharded")
            for _, options in got["sharded"]:
                mp = options["mp_policy"]
                _expect(
                    mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32,
                    f"FSDP2 policy {mp}: precision auto on CUDA computes in bf16, reduces in fp32",
                )


# ------------------------------------------------------------------------ canaries
# The harness must fail where a GPU would: each canary plants one bug in a tiny model and
# passes only when the harness reports it.


def _planted(bug: str):
    """A forward hook on the first Linear of tiny-dit that plants ``bug``."""

    def hook(module, args, out):
        if bug == "cpu_tensor":  # a constant made without a device
            return out + torch.ones(out.shape[-1])
        if bug == "host_sync":  # a Python scalar read from the output
            return out * float(out.abs().max())
        if bug == "cpu_round_trip":  # computed on the CPU, moved back
            return (out.cpu() * 2).to(out.device)
        if bug == "fp32_in_autocast":  # autocast switched off inside the region
            with torch.autocast("cuda", enabled=False):
                return torch.nn.functional.linear(args[0].float(), module.weight, module.bias)
        raise ValueError(bug)

    return hook


CANARIES = {
    "cpu_tensor": "FakeTensorDeviceMismatchError",
    "host_sync": "HostSync",
    "cpu_round_trip": "GraphOffDevice",
    "fp32_in_autocast": "AssertionError",
}


def check_canary(bug: str) -> None:
    from ditkit.builder.model import DiffusionTransformer

    real_init = DiffusionTransformer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        next(m for m in self.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(
            _planted(bug)
        )

    with mock.patch.object(DiffusionTransformer, "__init__", init):
        try:
            check_train_step("tiny-dit", "ddpm_eps")
        except Exception as err:  # which error is the finding
            if type(err).__name__ != CANARIES[bug]:
                raise AssertionError(
                    f"planted {bug}: the harness raised {type(err).__name__} "
                    f"({err}), not {CANARIES[bug]}"
                ) from err
            return
    raise AssertionError(f"planted {bug}: the harness did not notice")


# ------------------------------------------------------------------------ the runner


def tiny_names() -> list[str]:
    from tests.conftest import tiny_specs

    return [p.stem for p in tiny_specs()]


def all_checks() -> dict[str, tuple]:
    """Check id -> (function, arguments). Every tiny spec: a training step with its family's
    objective and an ``--npz`` chunk with CFG; ``tiny-dit`` (the cheapest) besides: the other
    objectives, every sampler, the preview and evaluation hooks and the canaries."""
    from ditkit.spec.sampling import SAMPLERS

    checks: dict[str, tuple] = {}
    for name in tiny_names():
        checks[f"train/{name}"] = (check_train_step, name, native_objective(name))
        checks[f"npz/{name}"] = (check_npz_chunk, name)
    base = "tiny-dit"
    for obj in ("edm", "x0", "flow"):
        checks[f"train/{base}/{obj}"] = (check_train_step, base, obj)
    checks[f"train/{base}/accumulate2"] = (check_train_step, base, "ddpm_eps", 2)
    checks[f"train/{base}/fp32"] = (check_train_step, base, "ddpm_eps", 1, {"dtype": "fp32"})
    checks[f"train/{base}/checkpointing"] = (
        check_train_step,
        base,
        "ddpm_eps",
        1,
        {"activation_checkpointing": True},
    )
    for sampler in SAMPLERS:
        checks[f"sample/{base}/{sampler}"] = (check_sampling, base, sampler)
    checks[f"hooks/{base}"] = (check_hooks, base, None)
    for strategy in ("ddp", "fsdp2"):
        checks[f"distributed/{strategy}-plan"] = (check_distributed_plan, strategy)
    for bug in CANARIES:
        checks[f"canary/{bug}"] = (check_canary, bug)
    return checks


def run(ids: list[str] | None = None) -> dict[str, dict]:
    """Run the checks (all, or ``ids``): id -> {"ok", "error", "seconds"}."""
    import tempfile
    import time

    out = {}
    for cid, (fn, *args) in all_checks().items():
        if ids and cid not in ids:
            continue
        t0 = time.process_time()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                fn(*[tmp if a is None and fn is check_hooks else a for a in args])
            out[cid] = {"ok": True, "error": ""}
        except Exception as err:  # noqa: BLE001 -- reported per check
            out[cid] = {
                "ok": False,
                "error": "".join(traceback.format_exception(err, limit=-6))[-3000:],
            }
        out[cid]["seconds"] = round(time.process_time() - t0, 2)
    return out


def main(argv=None) -> int:
    import argparse
    import json
    import warnings

    ap = argparse.ArgumentParser(description="ditkit's GPU paths on a fake CUDA device")
    ap.add_argument("ids", nargs="*", help="check ids (default: all)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
    torch.set_num_threads(1)
    try:
        install()
    except Unavailable as err:
        print(json.dumps({"_unavailable": str(err)}) if args.json else err)
        return 0
    results = run(args.ids or None)
    if args.json:
        print(json.dumps(results))
    else:
        for cid, r in results.items():
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['seconds']:6.2f}s {cid}")
            if not r["ok"]:
                print(r["error"])
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
