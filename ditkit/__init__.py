"""ditkit: config-as-code builder for hierarchical diffusion transformers.

The Python front door: the few functions most users need. Each takes plain values (a path, a
preset name, a spec object), does what the command of the same name does, and returns a value::

    import ditkit

    spec = ditkit.load_spec("dit-s-2")                  # a preset, spec file, checkpoint or run
    network = ditkit.build(spec)                        # torch.nn.Module, random weights
    model = ditkit.load("runs/x")                       # network + spec + objective
    images = ditkit.sample(model, labels=[1, 2], steps=20, seed=0, out="grid.png")
    ditkit.train("exp.yaml", out="runs/x", steps=1000)
    ditkit.export(model, "model.onnx")
    bigger = ditkit.adapt(model, resolution=64, policy="as_is")

``import ditkit`` is cheap: torch (and pydantic) are imported by the first function that needs
them. Bad input raises :class:`ditkit.errors.UserError` (a ``ValueError``) whose message names
the argument and the fix. ``ditkit.DEMO`` is the path of the demo's experiment (the tiny HDiT on
scikit-learn's digits), which ships inside the package.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence, Union, cast

if TYPE_CHECKING:  # only for annotations: importing ditkit must not import torch
    import torch
    from typing_extensions import TypeIs  # pydantic's dependency; annotations only

    from ditkit.deploy.export import ExportResult
    from ditkit.runtime.denoiser import Denoiser
    from ditkit.spec import ModelSpec, Objective, Policy
    from ditkit.spec.experiment import Experiment
    from ditkit.training.loop import TrainResult

__version__ = "0.2.0"

__all__ = [
    "__version__",
    "Model",
    "load_spec",
    "build",
    "load",
    "sample",
    "train",
    "export",
    "adapt",
]

PathLike = Union[str, "os.PathLike[str]"]
Source = Union[PathLike, "ModelSpec"]
"""What :func:`load` and friends accept: a spec file, preset name, checkpoint, run folder or a
spec object."""


@dataclass(frozen=True)
class Model:
    """A network with what sampling and export need to know about it.

    ``network`` is the ``torch.nn.Module`` (in ``eval()`` mode, its ``.spec`` is ``spec``),
    ``objective`` the training objective (EDM, DDPM, x0, flow: it fixes the noise range and
    the preconditioning), ``metadata`` the checkpoint's string metadata (empty for a spec),
    ``checkpoint`` the file the weights came from (``None``: random weights) and
    ``checkpoint_hash`` its weights' sha256 (recorded in exported files). A model from
    :func:`adapt` also keeps ``adapted_from`` (the trained network, the policy and the seed),
    so that multi-stage sampling runs each stage on the trained model adapted to that stage's
    grid.

    >>> import ditkit
    >>> m = ditkit.load("dit-s-8", overrides=["levels.0.middle=2"])
    >>> m.spec.name, m.objective.kind, m.checkpoint is None
    ('dit-s-8', 'ddpm_eps', True)
    """

    network: "torch.nn.Module"
    spec: "ModelSpec"
    objective: "Objective"
    metadata: Mapping[str, str] = field(default_factory=dict)
    checkpoint: Path | None = None
    checkpoint_hash: str | None = None
    adapted_from: "tuple[torch.nn.Module, Policy, int] | None" = None

    def denoiser(self) -> "Denoiser":
        """The network wrapped in its objective's preconditioning: ``D(x, sigma, labels)``
        (``ditkit.runtime.denoiser.Denoiser``), what the samplers call. For an adapted model,
        an ``AdaptingDenoiser``: ``at(resolution)`` adapts the trained network to another grid
        (a multi-stage draft)."""
        from ditkit.runtime.denoiser import AdaptingDenoiser, Denoiser

        if self.adapted_from is None:
            return Denoiser(self.network, self.objective)
        trained, policy, seed = self.adapted_from
        from ditkit.runtime.extrapolate import adapt_model

        device = next(self.network.parameters()).device
        network = self.network
        h, w = self.spec.input.resolution

        def make(res: tuple[int, int]) -> "torch.nn.Module":
            if res == (h, w):
                return network
            return adapt_model(trained, policy, res, device=device, seed=seed)

        return AdaptingDenoiser(make, self.objective, (h, w))


def load_spec(source: Source, *, overrides: Sequence[str] = ()) -> "ModelSpec":
    """The model spec of a spec file (``.yaml``/``.json``), a preset name, a checkpoint (the spec
    it carries) or a run folder (its newest checkpoint's), with ``overrides`` (``PATH=VALUE``,
    as ``--set``) applied and validated. A spec object is returned as is (overrides applied).

    >>> import ditkit
    >>> spec = ditkit.load_spec("dit-s-2", overrides=["input.resolution=[16,16]"])
    >>> spec.name, spec.input.resolution
    ('dit-s-2', (16, 16))
    """
    from ditkit.cli.common import load_spec as _load_spec
    from ditkit.cli.common import override_spec

    if _is_spec(source):
        return override_spec(source, list(overrides))
    return _load_spec(os.fspath(source), overrides=list(overrides))


def build(spec: Source, *, device: str = "cpu", seed: int | None = None) -> "torch.nn.Module":
    """The ``torch.nn.Module`` a spec describes, with freshly initialised weights (seeded with
    ``seed`` when given, without touching torch's global random state). ``spec`` may also be
    anything :func:`load_spec` takes. The module's ``forward(x, sigma_or_t, class_labels)``
    takes the network's raw inputs; :func:`load` pairs it with its objective for sampling.

    >>> import ditkit
    >>> net = ditkit.build(ditkit.load_spec("dit-s-8"), seed=0)
    >>> sum(p.numel() for p in net.parameters()) > 10**7
    True
    """
    import torch

    from ditkit.builder import build as _build

    spec = load_spec(spec) if not _is_spec(spec) else spec
    device = _device(device)
    if seed is None:
        return _build(spec, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(spec, device=device)


def load(
    source: Source | Model,
    *,
    objective: str | None = None,
    device: str = "cpu",
    overrides: Sequence[str] = (),
) -> Model:
    """A :class:`Model` from a checkpoint (``.safetensors``), a run folder (its newest
    checkpoint's EMA weights), or a spec file / preset / spec object (random weights, seed 0;
    ``overrides`` apply to these). ``objective`` (``edm``, ``ddpm_eps``, ``x0``, ``flow``) is
    for a source that records none (a spec: the usual one for its noise embedding).

    >>> import ditkit
    >>> m = ditkit.load("dit-s-8", overrides=["input.resolution=[16,16]", "levels.0.middle=2"])
    >>> type(m.network).__name__, m.spec.input.resolution
    ('DiffusionTransformer', (16, 16))
    """
    from ditkit.cli.common import default_objective, load_model_source, resolve_source

    if isinstance(source, Model):
        return source
    device = _device(device)
    if _is_spec(source) or resolve_source(
        os.fspath(source), ("file", "preset", "checkpoint", "run")
    ).kind in ("file", "preset"):
        spec = load_spec(source, overrides=overrides)
        network = build(spec, device=device, seed=0).eval()
        return Model(network, spec, default_objective(spec, objective or spec.default_objective))
    from ditkit.cli.common import checkpoint_path

    network, obj, meta, digest = load_model_source(
        os.fspath(source), objective, device, list(overrides)
    )
    return Model(network, network.spec, obj, dict(meta), checkpoint_path(os.fspath(source)), digest)


def sample(
    model: Model | Source | "torch.nn.Module",
    labels: Sequence[int] | int | None = None,
    *,
    count: int | None = None,
    steps: int = 50,
    sampler: str | None = None,
    schedule: str = "native",
    eta: float | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] | None = None,
    seed: int = 0,
    resolution: int | tuple[int, int] | None = None,
    device: str | None = None,
    out: PathLike | None = None,
    cols: int | None = None,
    stages: "Sequence | str | None" = None,
    progress: bool = False,
) -> "torch.Tensor":
    """Draw ``count`` samples; returns a ``(count, C, H, W)`` float tensor, about [-1, 1]
    (not clamped; a latent-space model returns latents). ``labels``: one class label per
    sample (repeated up to ``count``), or one label for all; ``None`` samples unconditionally
    (16 unless ``count`` says). ``out``: also write a PNG grid there (pixel-space models; one
    column per label when several are given). ``model``: a :class:`Model`, anything
    :func:`load` takes, or a network from :func:`build`.

    The settings have the names of the ``sampling`` spec fields: ``sampler`` (default
    ``dpmpp_2m``), ``steps``, ``schedule`` (``native``, ``karras``, ``uniform``), ``eta``,
    ``sigma_min`` / ``sigma_max`` (default: the objective's), ``rho`` (karras),
    ``cfg_scale`` (classifier-free guidance; needs labels), ``cfg_interval`` (guide only for
    sigma in it), ``seed``. ``resolution``: sample another size than the spec's (the same
    weights on a bigger grid; see :func:`adapt`). ``device``: default the network's.
    ``stages``: multi-stage sampling (draft small, enlarge, re-noise, refine; the guide
    *Multi-stage sampling*): ``Stage`` objects, mappings of their fields, or the command
    line's string ``"8,16:2.0"``; the last stage's resolution is the output's (``resolution``
    defaults to it).

    >>> import ditkit
    >>> m = ditkit.load("dit-s-8", overrides=["input.resolution=[16,16]", "levels.0.middle=2"])
    >>> x = ditkit.sample(m, labels=[1, 2], steps=2, seed=0)
    >>> tuple(x.shape)
    (2, 4, 16, 16)
    """
    import torch

    from ditkit.errors import UserError
    from ditkit.runtime.checkpoint import cfg_channels_of
    from ditkit.runtime.multistage import sample_staged
    from ditkit.runtime.shape_rule import check_shape
    from ditkit.spec.sampling import DEFAULT_SAMPLER, Sampling, parse_stages

    m = _model(model)
    spec = m.spec
    if device is None:
        device = str(next(m.network.parameters()).device)
    device = _device(device)
    if count is not None and count < 1:
        raise UserError(f"count {count}: must be positive")
    label_list = _labels(labels, spec)
    n = count or (len(label_list) if label_list else 16)
    class_labels = None
    if label_list:
        class_labels = torch.tensor([label_list[i % len(label_list)] for i in range(n)])
    if cfg_scale != 1.0 and class_labels is None:
        raise UserError(
            "cfg_scale: guidance needs labels (it contrasts a class with the null class)"
        )
    if isinstance(stages, str):
        stages = parse_stages(stages, flag="stages")
    stages = tuple(stages or ())
    last = stages[-1] if stages else None
    if last is not None and resolution is None:
        last = last.resolution if hasattr(last, "resolution") else last.get("resolution")
        resolution = tuple(last) if isinstance(last, (list, tuple)) else last
    res = _resolution(resolution) or tuple(spec.input.resolution)
    den = m.denoiser()
    sampling = Sampling.of(
        None,
        sampler=sampler or DEFAULT_SAMPLER,
        steps=steps,
        schedule=schedule,
        eta=eta,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        rho=rho,
        cfg_scale=cfg_scale,
        cfg_interval=cfg_interval,
        cfg_channels=cfg_channels_of(m.metadata),
        seed=seed,
        stages=stages,
    )
    x = sample_staged(
        den,
        (n, spec.input.channels, *res),
        sampling,
        class_labels=class_labels,
        device=device,
        progress=progress,
        check=lambda s: check_shape(spec, s, den.rules, "resolution"),
    )
    if out is not None:
        if spec.input.space == "latent":
            raise UserError(
                f"out: {spec.name} samples latents, not images; decode them first "
                "(ditkit sample --vae) or leave out= out"
            )
        from ditkit.runtime.images import save_grid

        if cols is None and label_list and len(label_list) > 1:
            cols = min(n, len(label_list))
        save_grid(x, out, ncol=cols)
    return x


def train(
    experiment: PathLike | "Experiment",
    out: PathLike | None = None,
    *,
    steps: int | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> "TrainResult":
    """Train an experiment (a YAML/JSON file, an ``Experiment`` object, or a run folder to
    resume) into the run folder ``out`` (default: the run folder given, else
    ``runs/<experiment name>``), as ``ditkit train`` does. ``steps`` is short for the override
    ``training.steps=N``. Returns the run's ``TrainResult`` (``run``, ``step``, ``losses``,
    ``checkpoint``, ``evaluation``); load the trained model with ``ditkit.load(result.run)``.

    >>> import ditkit, tempfile
    >>> run = tempfile.mkdtemp() + "/digits"
    >>> result = ditkit.train(ditkit.DEMO, out=run, steps=2, progress=False,
    ...                       overrides=["evaluation.enabled=false", "preview.every=0"])
    >>> result.step
    2
    """
    from ditkit.errors import UserError
    from ditkit.training.loop import train as _train

    overrides = list(overrides)
    if steps is not None:
        if steps < 1:
            raise UserError(f"steps {steps}: must be positive")
        overrides.append(f"training.steps={steps}")
    run = None
    if isinstance(experiment, (str, os.PathLike)):
        from ditkit.cli.common import load_experiment_source

        exp, run = load_experiment_source(os.fspath(experiment), overrides)
    else:
        exp = experiment
        if overrides:
            from ditkit import spec as S
            from ditkit.spec.experiment import experiment_from_data
            from ditkit.spec.overrides import apply_overrides

            data = apply_overrides(S.to_data(exp, full=True), overrides)
            exp = experiment_from_data(data, Path.cwd(), f"experiment with {overrides}")
    out = Path(out) if out is not None else (run or Path("runs") / exp.name)
    return _train(exp, out, resume=resume, progress=progress, device=_device(device))


def export(
    model: Model | Source | "torch.nn.Module",
    path: PathLike,
    *,
    precision: str = "fp32",
    dynamic: Sequence[str] = ("batch", "resolution"),
    opset: int | None = None,
    target: str = "onnxruntime",
    resolution: int | tuple[int, int] | None = None,
    check: bool = True,
    bake_cfg: bool = False,
    quantize: str | None = None,
    log=None,
) -> "ExportResult":
    """Export the denoiser (network + preconditioning) to an ONNX file at ``path`` and check
    it (onnx.checker, the dynamic dims, and onnxruntime against eager unless ``check=False``),
    as ``ditkit export`` does. ``precision``: fp32, fp16 or bf16; ``dynamic``: which of
    ``batch`` / ``resolution`` stay free; ``target``: ``onnxruntime`` or ``tensorrt-10.x``;
    ``bake_cfg``: classifier-free guidance inside the graph; ``quantize="int8"``: int8
    MatMuls (fp32 only, approximate). Needs ``pip install 'ditkit[onnx]'``.

    >>> import ditkit, tempfile
    >>> m = ditkit.load("dit-s-8", overrides=["input.resolution=[16,16]", "levels.0.middle=2"])
    >>> result = ditkit.export(m, tempfile.mkdtemp() + "/m.onnx", check=False)
    >>> result.path.suffix, result.dynamic
    ('.onnx', ('batch', 'resolution'))
    """
    from ditkit.deploy.export import export_onnx
    from ditkit.runtime.checkpoint import CFG_CHANNELS_KEY, cfg_channels_of

    m = _model(model)
    extra = {k: v for k, v in m.metadata.items() if k == CFG_CHANNELS_KEY}
    return export_onnx(
        m.network,
        m.objective,
        path,
        opset=opset,
        dynamic=tuple(dynamic),
        precision=precision,
        target=target,
        resolution=_resolution(resolution),
        checkpoint_hash=m.checkpoint_hash,
        metadata=extra,
        check=check,
        cfg=bake_cfg,
        cfg_channels=cfg_channels_of(m.metadata) if bake_cfg else None,
        log=log,
        quantize=quantize,
    )


def adapt(
    model: Model | Source | "torch.nn.Module",
    resolution: int | tuple[int, int],
    policy: "str | Policy" = "as_is",
    *,
    seed: int = 0,
) -> Model:
    """The model adapted to another ``resolution`` under an extrapolation ``policy``, as
    ``ditkit sample --policy`` and ``ditkit extrapolate`` do: trained weights carried exactly,
    new ones initialised with ``seed``. ``policy``: a policy object (``ditkit.spec.AsIs``,
    ``LocalCore``, ``AddLevels``, ``CorePatch``) or its text form: ``as_is``
    (``as_is:rope=extrapolate``), ``local_core:kernel_size=15``, ``add_levels``,
    ``core_patch:factor=4``. Returns a new :class:`Model` (same objective and metadata).

    >>> import ditkit
    >>> m = ditkit.load("dit-s-8", overrides=["input.resolution=[16,16]", "levels.0.middle=2"])
    >>> ditkit.adapt(m, resolution=32).spec.input.resolution
    (32, 32)
    """
    from dataclasses import replace

    from ditkit.runtime.extrapolate import adapt_model

    m = _model(model)
    if isinstance(policy, str):
        from ditkit.evaluate.report import parse_policy

        policy = parse_policy(policy, flag="policy")
    res = _resolution(resolution)
    assert res is not None  # resolution is required
    device = next(m.network.parameters()).device
    network = adapt_model(m.network, policy, res, device=device, seed=seed)
    return replace(
        m,
        network=network,
        spec=cast("ModelSpec", network.spec),
        adapted_from=(m.network, policy, seed),
    )


def __getattr__(name: str):
    # ``ditkit.DEMO``: the demo experiment shipped inside the package (a path), looked up lazily
    if name == "DEMO":
        from ditkit.training.demo import DEMO_EXPERIMENT

        return DEMO_EXPERIMENT
    raise AttributeError(f"module 'ditkit' has no attribute {name!r}")


# ------------------------------------------------------------------------------- helpers


def _is_spec(value: object) -> TypeIs[ModelSpec]:
    if isinstance(value, (str, os.PathLike)):
        return False
    from ditkit.spec import ModelSpec

    return isinstance(value, ModelSpec)


def _model(value) -> Model:
    """A :class:`Model` from a Model, a built network (the usual objective for its spec) or
    anything :func:`load` takes."""
    if isinstance(value, Model):
        return value
    spec = getattr(value, "spec", None)
    if spec is not None and hasattr(value, "state_dict"):
        from ditkit.cli.common import default_objective

        return Model(value, spec, default_objective(spec, spec.default_objective))
    return load(value)


def _device(text: str) -> str:
    """``auto`` -> cuda when available, else cpu; other names are checked
    (``ditkit.device``)."""
    from ditkit.device import pick_device

    return str(pick_device(str(text), flag="device"))


def _resolution(value) -> tuple[int, int] | None:
    from ditkit.errors import UserError

    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"resolution {value!r}: give an int or a (height, width) pair") from None
    if h <= 0 or w <= 0:
        raise UserError(f"resolution {value!r}: must be positive")
    return (h, w)


def _labels(labels, spec) -> list[int]:
    from ditkit.errors import UserError

    if labels is None:
        return []
    classes = spec.conditioning.classes
    if classes is None:
        raise UserError(
            f"labels: {spec.name} has no class conditioning "
            "(conditioning.classes); leave labels out"
        )
    if isinstance(labels, int):
        labels = [labels]
    try:
        values = [int(v) for v in labels]
    except (TypeError, ValueError):
        raise UserError(f"labels {labels!r}: give class labels as integers") from None
    bad = [v for v in values if not 0 <= v < classes.count]
    if not values or bad:
        raise UserError(
            f"labels: must be in [0, {classes.count}) for {spec.name}; got {bad or values}"
        )
    return values
