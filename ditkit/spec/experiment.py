"""The experiment spec: model + objective + data + optimisation + precision + checkpoints +
logging + previews, as typed, frozen data (no torch).

An experiment names its model inline (a mapping) or by reference (a path relative to the
experiment file, or a preset name). :func:`load_experiment` resolves the reference and checks
that the parts fit together (objective vs head, data channels and classes vs the model); the
*resolved* experiment, with the model inlined, is what a run saves next to its checkpoints so
it can be rerun from that one file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BeforeValidator,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from ditkit.spec.components import AxialRope, Spec
from ditkit.spec.io import SpecError, load, load_yaml, read_text, to_data, validate
from ditkit.spec.model import ModelSpec
from ditkit.spec.objective import EDMObjective, Objective
from ditkit.spec.overrides import apply_overrides, touches
from ditkit.spec.policy import AsIs, Policy
from ditkit.spec.presets import PRESETS, preset
from ditkit.spec.sampling import (
    EVALUATION_SAMPLING,
    PREVIEW_SAMPLING,
    Sampling,
    fold_flat_keys,
    legacy_sampling,
)

EXPERIMENT_VERSION: Literal[1] = 1

Probability = Annotated[float, Field(ge=0.0, le=1.0)]

# ---------------------------------------------------------------- data


LABELLED_DATA = ("digits", "shapes")
"""Data kinds with a built-in classifier (``ditkit.evaluate.classifier``): label accuracy and a
Fréchet distance need no reference images."""


class DigitsData(Spec):
    """scikit-learn's bundled handwritten digits (1,797 8x8 grey images, 10 classes), resized
    bilinearly to the model's resolution and scaled to [-1, 1]. Grey is repeated when the
    model has 3 channels."""

    kind: Literal["digits"] = "digits"


class ShapesData(Spec):
    """Procedural class-conditional images at any resolution: class ``k`` is one of
    ``disc, square, triangle, ring, cross, bars_h, bars_v, diamond, checker, ellipse`` with a
    random position, size and colour; image ``i`` is the same for a given ``seed``."""

    kind: Literal["shapes"] = "shapes"
    count: PositiveInt = 10000
    classes: Annotated[int, Field(ge=1, le=10)] = 10
    seed: NonNegativeInt = 0


class ImageFolderData(Spec):
    """A folder of images, one sub-folder per class (sorted names -> labels 0..n-1), or images
    directly in ``path`` (unconditional). Resized so the shorter side matches, centre-cropped;
    ``flip``: random horizontal flips."""

    kind: Literal["image_folder"] = "image_folder"
    path: Annotated[str, Field(min_length=1)]
    flip: bool = True


class WebDatasetData(Spec):
    """Tar shards in the webdataset layout: the members of one sample share a key (the name up
    to the first dot of its file name), ``KEY.png`` / ``KEY.jpg`` ... holds the image and
    ``KEY.cls`` the integer label (needed when the model is class-conditional). ``shards``: a
    list of paths, a brace pattern (``data/shard-{000..099}.tar``) or a glob
    (``data/*.tar``), relative to the experiment file. Each process reads its own shards;
    samples are shuffled within a shard and shards are shuffled every epoch. Images are resized
    and centre-cropped like ``image_folder``; ``flip``: random horizontal flips."""

    kind: Literal["webdataset"] = "webdataset"
    shards: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    )
    flip: bool = True


class LatentsData(Spec):
    """Precomputed autoencoder latents (``ditkit encode`` writes them): ``.safetensors`` or
    ``.npz`` shards holding ``latents`` ``(N, C, h, w)`` and, for class-conditional models,
    ``labels`` ``(N,)``. ``path``: a folder (every shard in it), one file, a brace pattern or a
    glob, relative to the experiment file. The model must be latent-space
    (``input.space: latent``) with ``input.channels = C`` and ``input.resolution = (h, w)``.
    ``scale`` multiplies the stored latents: 1 for ``ditkit encode`` shards (they are stored
    already multiplied by the autoencoder's scaling factor), e.g. 0.18215 for raw SD-VAE
    latents."""

    kind: Literal["latents"] = "latents"
    path: Annotated[str, Field(min_length=1)]
    scale: PositiveFloat = 1.0


Data = Annotated[
    Union[DigitsData, ShapesData, ImageFolderData, WebDatasetData, LatentsData],
    Field(discriminator="kind"),
]

# ---------------------------------------------------------------- optimisation


class ConstantLR(Spec):
    kind: Literal["constant"] = "constant"
    warmup_steps: NonNegativeInt = 0
    """Linear warm-up from 0 over this many steps."""


class CosineLR(Spec):
    """Linear warm-up, then cosine decay to ``min_factor * lr`` at the last step."""

    kind: Literal["cosine"] = "cosine"
    warmup_steps: NonNegativeInt = 0
    min_factor: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


Schedule = Annotated[Union[ConstantLR, CosineLR], Field(discriminator="kind")]


class Optimizer(Spec):
    """AdamW. Norm weights, scales, embeddings and biases get no weight decay; the mapping
    network's learning rate is ``lr * mapping_lr_scale`` (HDiT)."""

    kind: Literal["adamw"] = "adamw"
    lr: PositiveFloat = 1e-4
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.9,
        0.999,
    )
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 0.0
    mapping_lr_scale: PositiveFloat = 1.0
    schedule: Schedule = Field(default_factory=ConstantLR)
    grad_clip: PositiveFloat | None = 1.0
    """Clip the global gradient norm to this (``null``: no clipping)."""


class EMA(Spec):
    """Exponential moving average of the weights. The decay warms up as
    ``min(decay, 1 - (1 + step)^-warmup_power)`` (k-diffusion's inverse-gamma warm-up with
    gamma 1); ``warmup_power: 0`` disables the warm-up."""

    decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    warmup_power: NonNegativeFloat = 0.75


def _square(value: Any) -> Any:
    """``16`` is short for ``[16, 16]``."""
    return [value, value] if isinstance(value, int) and not isinstance(value, bool) else value


TrainingResolution = Annotated[
    tuple[PositiveInt, PositiveInt],
    BeforeValidator(_square, json_schema_input_type=PositiveInt | tuple[PositiveInt, PositiveInt]),
]
"""One training resolution, ``[height, width]`` in pixels; an integer is square."""


class Training(Spec):
    """Steps, batch, seed, classifier-free-guidance dropout, and the resolutions trained at.

    ``resolutions`` (multi-resolution training, bucketed): optimizer step ``s`` trains every
    micro-batch of its batch at one resolution, drawn from this list by a stateless schedule,
    ``resolution(s) = choice(resolutions, p=weights)`` with the generator
    ``numpy.random.default_rng([seed, 0x5EED, s])`` -- deterministic, the same on every
    process of a ``torchrun`` launch, and nothing to checkpoint (a resumed run draws the same
    resolutions). ``resolution_weights``: ``uniform`` (every resolution equally often),
    ``pixels`` (in proportion to ``height * width``: every pixel equally often) or one weight
    per resolution. Images are rendered at each resolution by the datasets that can (digits,
    shapes) and resized from the source file by image folders and shards; latent data cannot
    be resized. Previews and evaluations stay at the model's ``input.resolution``. Absent (the
    default): every step trains at ``input.resolution``."""

    steps: PositiveInt = 1000
    batch_size: PositiveInt = 64
    """Global batch (all ranks, all accumulation micro-batches) per optimizer step."""
    accumulate: PositiveInt = 1
    """Micro-batches per optimizer step (gradient accumulation)."""
    label_dropout: Probability = 0.1
    """Classifier-free guidance: replace the class label by the null class with this rate."""
    aux_dropout: Probability = 0.0
    """... and zero the auxiliary conditioning inputs with this rate."""
    seed: NonNegativeInt = 0
    resolutions: Annotated[tuple[TrainingResolution, ...], Field(min_length=1)] | None = None
    """Train at several resolutions, one per optimizer step (see the class docstring);
    ``null``: only the model's ``input.resolution``."""
    resolution_weights: Literal["uniform", "pixels"] | tuple[PositiveFloat, ...] = "uniform"
    """How often each of ``resolutions`` is drawn: ``uniform``, ``pixels`` (by pixel count) or
    one positive weight per resolution."""

    @model_validator(mode="after")
    def _weights_fit(self) -> "Training":
        w = self.resolution_weights
        if w != "uniform" and self.resolutions is None:
            raise ValueError(
                "resolution_weights: weights only apply to training.resolutions; "
                "set resolutions or remove resolution_weights"
            )
        if isinstance(w, tuple) and self.resolutions is not None:
            if len(w) != len(self.resolutions):
                raise ValueError(
                    f"resolution_weights: {len(w)} weight(s) for {len(self.resolutions)} "
                    "resolutions; give one weight per entry of training.resolutions"
                )
        return self

    def resolution_probabilities(self) -> tuple[float, ...]:
        """The probability of each of ``resolutions`` per step (``resolution_weights``
        normalised)."""
        assert self.resolutions is not None  # only asked when resolutions are set
        given = self.resolution_weights
        if given == "uniform":
            w = [1.0] * len(self.resolutions)
        elif given == "pixels":
            w = [float(h * wd) for h, wd in self.resolutions]
        else:
            w = [float(v) for v in given]
        total = sum(w)
        return tuple(v / total for v in w)


class Precision(Spec):
    """How the run computes -- runtime switches, not architecture. ``dtype: auto``: bf16
    autocast on CUDA, fp32 on CPU. ``attention_backend``: the neighborhood-attention kernel
    (``ditkit.builder.use_backend``; ``masked`` is fastest for tiny grids on a CPU)."""

    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    attention_backend: Annotated[str, Field(min_length=1)] = "auto"


class Distributed(Spec):
    """How a ``torchrun`` launch (``WORLD_SIZE`` > 1) spreads the run; a single process ignores
    it. ``backend: auto``: nccl on CUDA, gloo on CPU.

    ``strategy: ddp`` -- data parallel: every process holds the whole model and optimizer and
    gradients are averaged after each backward.

    ``strategy: fsdp2`` -- fully sharded (``torch.distributed.fsdp.fully_shard``): each
    transformer block, then the whole model, is sharded across the processes; each holds 1/N
    of the weights, gradients, EMA and optimizer state and gathers a block's weights just in
    time. Same numbers as DDP up to summation order. Checkpoints hold the full (gathered)
    state either way, so they load into a plain model and resume under either strategy.
    Its options (set only with fsdp2):

    * ``param_dtype``: the dtype blocks compute in (weights are all-gathered in it); ``auto``:
      bf16 when the run computes in bf16 (``precision.dtype: bf16``, or ``auto`` on CUDA),
      else fp32. Master weights and optimizer state stay fp32.
    * ``reduce_dtype``: the dtype gradients are averaged in.
    * ``reshard_after_forward``: free the gathered weights after each block's forward (ZeRO-3,
      least memory); ``false`` keeps them until the backward (less communication)."""

    strategy: Literal["ddp", "fsdp2"] = "ddp"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    param_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    reshard_after_forward: bool = True


FSDP2_OPTIONS = ("param_dtype", "reduce_dtype", "reshard_after_forward")


class Checkpointing(Spec):
    every: PositiveInt = 1000
    """Write a checkpoint every this many steps (and always at the end)."""
    keep_last: PositiveInt = 3


class Logging(Spec):
    every: PositiveInt = 10
    """Write the scalars (CSV, TensorBoard when installed) every this many steps."""
    tensorboard: bool = True


class Preview(Spec):
    """Sample grids from the EMA model with a fixed seed (one row per class when the model is
    class-conditional)."""

    every: NonNegativeInt = 1000
    """Steps between previews (0: only at the end)."""
    count: PositiveInt = 40
    sampling: Sampling = Field(default_factory=lambda: Sampling(**PREVIEW_SAMPLING))
    """How the previews are sampled (default: 20 steps of the default sampler, seed 0; keys
    left out of a ``sampling`` mapping take these defaults)."""

    @model_validator(mode="before")
    @classmethod
    def _flat_sampling_keys(cls, data: Any) -> Any:
        # preview: {steps: 10, sampler: heun} (older files)
        return legacy_sampling(data, PREVIEW_SAMPLING)


class Evaluation(Spec):
    """Metrics of ``count`` EMA samples (fixed seed, labels cycling over the classes), run by
    ``ditkit train`` at the end -- and every ``every`` steps -- into ``eval.json`` and the
    scalars (``eval/...`` columns of ``scalars.csv``, TensorBoard):

    * ``data: {kind: digits}`` or ``{kind: shapes}`` with a class-conditional model: label
      accuracy and a Fréchet distance on a small classifier's features, trained on that data's
      real images (``ditkit.evaluate.classifier``);
    * ``reference`` (an image folder or an ``.npz`` with uint8 ``arr_0``): FID, and improved
      precision / recall with ``k``-nearest-neighbour radii, on the Inception features of the
      local weights file ``inception`` (default: ``$DITKIT_FID_WEIGHTS``, else torch's hub
      cache; nothing is downloaded). Latent-space models are decoded with ``vae``.

    Paths are relative to the experiment file."""

    enabled: bool = False
    every: NonNegativeInt = 0
    """Steps between evaluations during training (0: only at the end)."""
    count: PositiveInt = 500
    sampling: Sampling = Field(default_factory=lambda: Sampling(**EVALUATION_SAMPLING))
    """How the evaluated images are sampled (default: 20 steps of the default sampler, seed
    1; keys left out of a ``sampling`` mapping take these defaults)."""
    reference: Annotated[str, Field(min_length=1)] | None = None
    """Reference images for FID / precision / recall: a folder or an ``.npz``."""
    inception: Annotated[str, Field(min_length=1)] | None = None
    """The FID Inception weights file (``pt_inception-2015-12-05-6726825d.pth``)."""
    k: NonNegativeInt = 3
    """Neighbours of precision / recall (3, as the ADM evaluator; 0: FID only)."""
    batch: PositiveInt = 64
    """Images per Inception / autoencoder call (the sampler draws 250 at a time, as
    ``ditkit evaluate`` does, so both give the same samples)."""
    vae: Annotated[str, Field(min_length=1)] | None = None
    """Latent-space models with a ``reference``: the local AutoencoderKL folder that decodes
    the samples."""

    @model_validator(mode="before")
    @classmethod
    def _flat_sampling_keys(cls, data: Any) -> Any:
        # evaluation: {steps: 10, seed: 2} (older files)
        return legacy_sampling(data, EVALUATION_SAMPLING)

    @field_validator("sampling")
    @classmethod
    def _one_pass(cls, value: Sampling) -> Sampling:
        if value.stages:
            raise ValueError(
                "stages: the metrics score samples at the model's own resolution; "
                "drop the stages here (multi-stage sampling is for `ditkit sample`"
                " and `ditkit extrapolate --stages`)"
            )
        return value


TRAINABLE_PRESETS = {
    "new": "every tensor the policy re-initialised or replicated (new levels, resized merges)",
    "patch": "the patch embedding, the head and every merge/split projection "
    "(embed.*, head.*, levels.*.down.*, levels.*.up.*)",
    "aggregate": "every block whose attention is `aggregate` (MDiT's aggregate blocks)",
}
"""Names usable in ``finetune.trainable`` besides patterns."""


class Finetune(Spec):
    """Fine-tune a trained checkpoint at another resolution: apply ``policy`` (the same policy
    specs as ``ditkit extrapolate``) at ``resolution`` to the checkpoint's spec and weights,
    then train only the parameters named by ``trainable``; everything else stays frozen
    (bit-identical). ``model`` is the checkpoint's spec, as it was trained.

    ``trainable`` entries: a glob over parameter names (``levels.0.down.*``), a regular
    expression prefixed with ``re:`` (``re:levels\\.[01]\\.``), or a preset name
    (``new``, ``patch``, ``aggregate``; see ``TRAINABLE_PRESETS``).
    """

    checkpoint: Annotated[str, Field(min_length=1)]
    """The trained ditkit checkpoint (.safetensors; relative paths start at the experiment
    file's folder). Only read when the run starts (not on --resume)."""
    policy: Policy = Field(default_factory=AsIs)
    resolution: tuple[PositiveInt, PositiveInt] | None = None
    """Target resolution (default: the model's)."""
    trainable: Annotated[tuple[Annotated[str, Field(min_length=1)], ...], Field(min_length=1)]
    source_model: ModelSpec | None = None
    """Filled by the trainer in the run's saved experiment: the checkpoint's spec before the
    policy. When set, ``model`` is already the adapted spec (so a resumed run does not adapt
    twice)."""

    @field_validator("trainable", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("trainable")
    @classmethod
    def _patterns_compile(cls, value: tuple[str, ...]) -> tuple[str, ...]:

        for i, pat in enumerate(value):
            if pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as err:
                    raise ValueError(
                        f"entry {i} ({pat!r}) is not a valid regular expression: {err}"
                    ) from None
        return value


class Experiment(Spec):
    """One training run, as data."""

    spec_version: Literal[1] = EXPERIMENT_VERSION
    name: Annotated[str, Field(min_length=1)] = "experiment"
    description: str = ""
    model: ModelSpec | Annotated[str, Field(min_length=1)]
    """The model spec inline, or a path (relative to this file) / preset name."""
    objective: Objective = Field(default_factory=EDMObjective)
    data: Data = Field(default_factory=DigitsData)
    training: Training = Field(default_factory=Training)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    ema: EMA = Field(default_factory=EMA)
    precision: Precision = Field(default_factory=Precision)
    distributed: Distributed = Field(default_factory=Distributed)
    checkpoint: Checkpointing = Field(default_factory=Checkpointing)
    logging: Logging = Field(default_factory=Logging)
    preview: Preview = Field(default_factory=Preview)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    finetune: Finetune | None = None
    """Start from a trained checkpoint adapted to another resolution and train only part of
    it (see :class:`Finetune`)."""

    @property
    def model_spec(self) -> ModelSpec:
        if not isinstance(self.model, ModelSpec):
            raise ValueError(
                "the experiment's model is a reference; resolve it with "
                "ditkit.spec.load_experiment / resolve_experiment first"
            )
        return self.model


DATA_CHANNELS = {"digits": 1, "shapes": 3}
DATA_CLASSES = {"digits": 10}


def resolve_experiment(
    exp: Experiment, base: str | Path | None = None, source: str = "experiment"
) -> Experiment:
    """Inline a model reference (a path relative to ``base``, or a preset name) and check that
    the parts of the experiment fit together. Raises :class:`ditkit.spec.SpecError`."""

    if isinstance(exp.model, str):
        ref = exp.model
        path = Path(base or ".") / ref
        if path.suffix in (".yaml", ".yml", ".json") or path.exists():
            if not path.exists():
                raise SpecError(
                    [
                        (
                            "model",
                            f"no such model spec file: {path} (paths are relative "
                            "to the experiment file)",
                        )
                    ],
                    source,
                )
            try:
                model: ModelSpec = load(path)
            except SpecError as err:  # report the model's problems under `model.`
                raise SpecError(
                    [(f"model.{p}" if p else "model", f"{m} (in {path})") for p, m in err.issues],
                    source,
                ) from None
        elif ref in PRESETS:
            model = preset(ref)
        else:
            raise SpecError(
                [
                    (
                        "model",
                        f"{ref!r} is neither a spec file nor a preset name; "
                        f"presets: {', '.join(PRESETS)}",
                    )
                ],
                source,
            )
        exp = exp.model_copy(update={"model": model})
    issues = experiment_issues(exp)
    if issues:
        raise SpecError(issues, source)
    return exp


def experiment_issues(exp: Experiment) -> list[tuple[str, str]]:
    """Cross-field problems of a resolved experiment: ``[(field path, message)]``."""
    spec = exp.model_spec
    out: list[tuple[str, str]] = []
    out.extend(exp.objective.model_issues(spec))
    ch = DATA_CHANNELS.get(exp.data.kind)
    if ch is not None and spec.input.channels not in (ch, 3 if ch == 1 else ch):
        out.append(
            (
                "data.kind",
                f"{exp.data.kind} images have {ch} channel(s) but the model's "
                f"input.channels is {spec.input.channels}; use {ch}" + (" or 3" if ch == 1 else ""),
            )
        )
    n_cls = DATA_CLASSES.get(exp.data.kind) or (
        exp.data.classes if exp.data.kind == "shapes" else None
    )
    cls = spec.conditioning.classes
    if cls is not None and n_cls is not None and cls.count < n_cls:
        out.append(
            (
                "model.conditioning.classes.count",
                f"{cls.count} classes but the {exp.data.kind} data has {n_cls}; set count: {n_cls}",
            )
        )
    if exp.data.kind == "latents" and spec.input.space != "latent":
        out.append(
            (
                "model.input.space",
                "latents data trains a latent-space model; set "
                "input.space: latent (with input.channels and input.resolution of the "
                "latents)",
            )
        )
    if exp.training.label_dropout > 0 and cls is not None and not cls.null_class:
        out.append(
            (
                "training.label_dropout",
                "label dropout needs a null class; set "
                "model.conditioning.classes.null_class: true or label_dropout: 0",
            )
        )
    if exp.training.batch_size % exp.training.accumulate:
        out.append(
            (
                "training.accumulate",
                f"{exp.training.accumulate} does not divide batch_size {exp.training.batch_size}",
            )
        )
    if exp.distributed.strategy != "fsdp2":
        for name in FSDP2_OPTIONS:
            if name in exp.distributed.model_fields_set:
                out.append(
                    (
                        f"distributed.{name}",
                        "is an option of strategy fsdp2; remove it "
                        "or set distributed.strategy: fsdp2",
                    )
                )
    if exp.precision.compile and any(
        isinstance(b.rope, AxialRope) and b.rope.train_positions.kind == "random"
        for *_, b in spec.blocks()
    ):
        out.append(
            (
                "precision.compile",
                "randomised RoPE positions (rope.train_positions: random) draw their "
                "positions inside the forward, which torch.compile cannot trace; set "
                "precision.compile: false, or rope.train_positions: {kind: grid}",
            )
        )
    out += _evaluation_issues(exp.evaluation, exp.data.kind, spec)
    out += training_resolution_issues(exp.training, exp.data.kind, spec)
    return out


def training_resolution_issues(
    tr: Training, data_kind: str, spec: ModelSpec
) -> list[tuple[str, str]]:
    """``training.resolutions``: each must run through the model (patch x merges, every
    level's kernel / window) and the data must be able to produce it."""
    if tr.resolutions is None:
        return []
    if data_kind == "latents":
        return [
            (
                "training.resolutions",
                "latents data is stored at one resolution and cannot be rendered or resized "
                "per batch; remove training.resolutions, or train on images (image_folder, "
                "webdataset, digits, shapes)",
            )
        ]
    out = []
    for i, (h, w) in enumerate(tr.resolutions):
        field = f"training.resolutions[{i}]"
        for path, msg in spec.check_resolution((h, w), field):
            where = "" if path == field else f"{path}: "
            out.append((field, f"[{h}, {w}] does not fit the model: {where}{msg}"))
    return out


def _evaluation_issues(ev: Evaluation, data_kind: str, spec: ModelSpec) -> list[tuple[str, str]]:
    out = []
    if not ev.enabled:
        if ev.every:
            out.append(("evaluation.every", "evaluations only run with enabled: true"))
        return out
    labelled = data_kind in LABELLED_DATA and spec.conditioning.classes is not None
    if ev.reference is None and not labelled:
        why = (
            "label accuracy needs a class-conditional model (model.conditioning.classes)"
            if data_kind in LABELLED_DATA
            else f"the built-in classifier metrics are for `data: {{kind: digits}}` or "
            f"`{{kind: shapes}}`, not {data_kind}"
        )
        out.append(
            (
                "evaluation.reference",
                f"nothing to evaluate: {why}; set reference to "
                "an image folder or .npz for FID / precision / recall, or enabled: false",
            )
        )
    if ev.reference is not None and spec.input.space == "latent" and ev.vae is None:
        out.append(
            (
                "evaluation.vae",
                "a latent-space model's samples must be decoded for FID; "
                "set vae to the local AutoencoderKL folder the latents were encoded with",
            )
        )
    if ev.vae is not None and spec.input.space != "latent":
        out.append(
            (
                "evaluation.vae",
                "the model is pixel-space; its samples are images already, remove vae",
            )
        )
    return out


def experiment_from_data(
    data: Any, base: str | Path | None = None, source: str = "experiment"
) -> Experiment:
    """Validate plain data into a resolved experiment. An inline model is validated as a
    model spec first, so its problems are reported as ``model.<field>``."""

    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        try:
            model = validate(data["model"], ModelSpec, source)
        except SpecError as err:
            issues = [(f"model.{p}" if p else "model", m) for p, m in err.issues]
            try:  # the other sections' problems too, in one report
                validate({**data, "model": "<invalid>"}, Experiment, source)
            except SpecError as rest:
                issues += rest.issues
            raise SpecError(issues, source) from None
        data = {**data, "model": model}
    return resolve_experiment(validate(data, Experiment, source), base, source)


def is_experiment_data(data: Any) -> bool:
    """Whether plain data read from a file is an experiment rather than a model spec: an
    experiment has a ``model`` key (a model spec never has one) or only experiment sections."""
    if not isinstance(data, dict) or not data:
        return False
    if "model" in data:
        return True
    own = set(Experiment.model_fields) - set(ModelSpec.model_fields)
    return bool(set(data) & own) and not set(data) & (
        set(ModelSpec.model_fields) - set(Experiment.model_fields)
    )


def read_experiment_data(path: str | Path) -> Any:
    """The plain data of an experiment file (YAML/JSON), unvalidated. Raises ``SpecError``."""

    path = Path(path)
    return load_yaml(read_text(path, "experiment"), str(path))


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Load, resolve and check an experiment file (YAML/JSON), with ``--set`` style
    ``overrides`` (``ditkit.spec.overrides``) applied before validation. Raises ``SpecError``."""
    path = Path(path)
    data = read_experiment_data(path)
    source = str(path)
    if overrides:
        if (
            isinstance(data, dict)
            and isinstance(data.get("model"), str)
            and touches(overrides, "model")
        ):
            data = {**data, "model": _model_data(data["model"], path.parent, source)}
        if isinstance(data, dict):
            data = _fold_sampling(data, only_old=True)
            data = _fold_sampling(apply_overrides(data, overrides))
        source = f"{path} with --set {' '.join(overrides)}"
    return experiment_from_data(data, path.parent, source)


def _fold_sampling(data: dict[str, Any], only_old: bool = False) -> dict[str, Any]:
    """``data`` with the flat sampling keys of ``preview`` / ``evaluation`` folded into their
    ``sampling`` mappings (:func:`ditkit.spec.sampling.fold_flat_keys`); ``only_old``: only in
    sections written entirely in the older flat form."""
    out = dict(data)
    for name in ("preview", "evaluation"):
        section = out.get(name)
        if isinstance(section, dict) and not (only_old and "sampling" in section):
            out[name] = fold_flat_keys(section)
    return out


def _model_data(ref: str, base: Path, source: str) -> Any:
    """The plain data of an experiment's ``model:`` reference (a file or a preset), so that
    ``--set model.x=v`` can change it."""
    path = base / ref
    if path.is_file() or path.exists() and not path.is_dir():  # a FIFO is refused, not read
        try:
            return load_yaml(read_text(path, "spec"), str(path))
        except SpecError as err:
            raise SpecError([("model", f"{path}: {m}") for _, m in err.issues], source) from None
    if ref in PRESETS:
        return to_data(preset(ref))
    raise SpecError([("model", f"{ref!r} is neither a spec file nor a preset name")], source)


def absolute_data_paths(data: Data, base: str | Path) -> Data:
    """``data`` with its paths (folders, shard patterns) made absolute from ``base`` (the
    experiment file's folder), so the run folder's experiment.yaml works from anywhere."""

    root = Path(base).resolve()

    def fix(p: str) -> str:
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(root, p))

    if data.kind in ("image_folder", "latents"):
        return data.model_copy(update={"path": fix(data.path)})
    if data.kind == "webdataset":
        shards = fix(data.shards) if isinstance(data.shards, str) else [fix(p) for p in data.shards]
        return data.model_copy(update={"shards": shards})
    return data


def absolute_evaluation_paths(ev: Evaluation, base: str | Path) -> Evaluation:
    """``ev`` with ``reference``, ``inception`` and ``vae`` made absolute from ``base``."""

    root = Path(base).resolve()

    def fix(p: str | None) -> str | None:
        return p if p is None or os.path.isabs(p) else os.path.normpath(os.path.join(root, p))

    return ev.model_copy(
        update={"reference": fix(ev.reference), "inception": fix(ev.inception), "vae": fix(ev.vae)}
    )


def experiment_with_absolute_paths(exp: Experiment, base: str | Path) -> Experiment:
    """``exp`` with every path relative to ``base`` (data paths, a fine-tune checkpoint, the
    evaluation's reference, weights and autoencoder) made absolute: the form a run folder
    records."""
    exp = exp.model_copy(
        update={
            "data": absolute_data_paths(exp.data, base),
            "evaluation": absolute_evaluation_paths(exp.evaluation, base),
        }
    )
    ft = exp.finetune
    if ft is not None and ft.source_model is None and not Path(ft.checkpoint).is_absolute():
        ft = ft.model_copy(update={"checkpoint": str((Path(base) / ft.checkpoint).resolve())})
        exp = exp.model_copy(update={"finetune": ft})
    return exp


RUN_EXPERIMENT = "experiment.yaml"  # the resolved experiment a run folder records


def load_experiment_or_run(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[Experiment, Path | None]:
    """``(experiment, run folder or None)`` from an experiment file (its relative paths made
    absolute) or a run folder (its recorded ``experiment.yaml``), with ``overrides`` applied
    (see :func:`load_experiment`). Raises ``SpecError``."""

    path = Path(path)
    if path.is_dir():
        if not (path / RUN_EXPERIMENT).is_file():
            raise SpecError(
                [("", f"a folder, but not a run folder (no {RUN_EXPERIMENT})")], str(path)
            )
        return load_experiment(path / RUN_EXPERIMENT, overrides), path
    return experiment_with_absolute_paths(load_experiment(path, overrides), path.parent), None


__all__ = [
    "Experiment",
    "DigitsData",
    "ShapesData",
    "ImageFolderData",
    "WebDatasetData",
    "LatentsData",
    "Data",
    "ConstantLR",
    "CosineLR",
    "Optimizer",
    "EMA",
    "Training",
    "Precision",
    "Distributed",
    "Checkpointing",
    "Logging",
    "Preview",
    "Evaluation",
    "Finetune",
    "TRAINABLE_PRESETS",
    "resolve_experiment",
    "experiment_issues",
    "load_experiment",
    "read_experiment_data",
    "is_experiment_data",
    "experiment_from_data",
    "EXPERIMENT_VERSION",
    "absolute_data_paths",
    "absolute_evaluation_paths",
    "experiment_with_absolute_paths",
    "load_experiment_or_run",
    "RUN_EXPERIMENT",
]
