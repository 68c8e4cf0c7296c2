"""Sampling settings as one frozen spec: :class:`Sampling`, and the names of the samplers and
step schedules (``ditkit.runtime.samplers`` implements them).

Every caller of the sampler takes a :class:`Sampling` -- ``samplers.sample``, ``sample_npz``,
training previews and evaluations, FID, the extrapolation report, ``bench`` and every command
line that samples (one argument group, ``ditkit.cli.common.add_sampling``) -- so a setting
cannot be dropped on one path and honoured on another. It lives in the spec layer so that
experiment files and the command line can check it without importing torch.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import (
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ditkit.errors import UserError
from ditkit.spec.components import Spec
from ditkit.spec.io import validate

SAMPLERS = (
    "euler",
    "heun",
    "ddim",
    "ddpm",
    "dpmpp_2m",
    "dpmpp_3m_sde",
    "euler_ancestral",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_2m_sde",
    "unipc",
    "dpm_adaptive",
)
SCHEDULES = ("native", "karras", "uniform")

DEFAULT_SAMPLER = "dpmpp_2m"
"""The sampler of previews, evaluations and every sampling command unless one is named. DPM++ 2M
is a second-order multistep method with one network evaluation per step: at 20 steps it scored
the same as Heun at 20 steps (39 evaluations) in the demo's ablation (docs/measurements.md,
*The demo*), so it gives the same quality at half the time."""

UPSAMPLE_MODES = ("bicubic", "nearest")
"""How a multi-stage run enlarges one stage's sample for the next (:class:`Stage`)."""

SamplerName = Literal[SAMPLERS]  # type: ignore[valid-type]
ScheduleName = Literal[SCHEDULES]  # type: ignore[valid-type]


class Stage(Spec):
    """One stage of multi-stage sampling (SDEdit-style refinement, DemoFusion's progressive
    upscaling): sample at ``resolution``; every stage after the first starts from the previous
    stage's result, enlarged to ``resolution`` (``upsample``) and re-noised to ``sigma``, and
    samples from ``sigma`` down to 0 in ``steps`` steps."""

    resolution: tuple[PositiveInt, PositiveInt]
    """Height and width of this stage's samples (an int: a square)."""
    sigma: PositiveFloat | None = None
    """The noise level this stage re-noises to and starts from (the first stage: unset, it
    starts from pure noise at the schedule's top). Lower keeps more of the draft."""
    steps: PositiveInt | None = None
    """This stage's noise levels (``None``: the sampling's ``steps``)."""
    upsample: Literal[UPSAMPLE_MODES] = "bicubic"  # type: ignore[valid-type]
    """How the previous stage's sample is enlarged: ``bicubic`` (smooth; the default) or
    ``nearest`` (blocky, keeps values exactly)."""

    @field_validator("resolution", mode="before")
    @classmethod
    def _square(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return (value, value)
        return value

    @field_validator("sigma", mode="before")
    @classmethod
    def _finite_sigma(cls, value: Any) -> Any:
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and not 0 < value < math.inf
        ):
            raise ValueError(
                "use a positive, finite noise level (e.g. 2.0); leave it unset on the first stage"
            )
        return value

    def text(self) -> str:
        """The command-line spelling of this stage (:func:`parse_stages` reads it back)."""
        h, w = self.resolution
        out = str(h) if h == w else f"{h}x{w}"
        if self.sigma is not None:
            out += f":{self.sigma:g}"
            if self.steps is not None:
                out += f":{self.steps}"
        elif self.steps is not None:
            out += f"::{self.steps}"
        if self.upsample != "bicubic":
            out += f":{self.upsample}"
        return out


def parse_stages(text: str | None, flag: str = "--stages") -> tuple[dict[str, Any], ...] | None:
    """The fields of each :class:`Stage` from their command-line spelling: comma-separated
    ``RES[:SIGMA[:STEPS]]``
    (``RES`` is ``N`` or ``HxW``; a ``:bicubic`` / ``:nearest`` part picks the upsampling),
    e.g. ``8,16:2.0,32:1.0:10``: draft at 8x8 from pure noise, re-noise to sigma 2 at 16x16,
    then to sigma 1 at 32x32 with 10 steps. ``None`` for ``None``; a bad item is a
    :class:`ditkit.errors.UserError` naming it and the form."""
    if text is None:
        return None
    form = (
        f"{flag}: write comma-separated RES[:SIGMA[:STEPS]] items, e.g. 8,16:2.0 "
        "(draft at 8x8, then re-noise to sigma 2.0 at 16x16)"
    )
    stages = []
    for item in text.split(","):
        parts = item.strip().split(":")
        mode = [p for p in parts[1:] if p in UPSAMPLE_MODES]
        numbers = [p for p in parts[1:] if p not in UPSAMPLE_MODES]
        if not parts[0] or len(numbers) > 2 or len(mode) > 1:
            raise UserError(f"{form}; got {item.strip()!r}")
        try:
            size = [int(v) for v in parts[0].lower().split("x")]
            if len(size) not in (1, 2):
                raise ValueError
            sigma = float(numbers[0]) if numbers and numbers[0] else None
            steps = int(numbers[1]) if len(numbers) > 1 and numbers[1] else None
        except ValueError:
            raise UserError(f"{form}; got {item.strip()!r}") from None
        data: dict[str, Any] = {"resolution": size * 2 if len(size) == 1 else size}
        if sigma is not None:
            data["sigma"] = sigma
        if steps is not None:
            data["steps"] = steps
        if mode:
            data["upsample"] = mode[0]
        stages.append(data)
    return tuple(stages)  # the fields of each Stage; Sampling validates them


class Sampling(Spec):
    """How to draw samples: which sampler, on which noise levels, with what guidance and seed.

    ``sigma_min`` / ``sigma_max`` ``None`` mean the objective's own noise range (a converted
    k-diffusion config's, for instance); ``eta`` ``None`` means the sampler's default (1 for
    the ancestral / SDE samplers, 0 for ``ddim`` and ``dpm_adaptive``)."""

    sampler: SamplerName = DEFAULT_SAMPLER
    steps: PositiveInt = 50
    """Noise levels (model evaluations of a first-order sampler)."""
    schedule: ScheduleName = "native"
    """``native`` (the model family's own), ``karras`` (EDM's rho-spaced sigmas) or
    ``uniform`` (uniform in the objective's time)."""
    eta: float | None = Field(default=None, ge=0.0)
    """Noise of the ancestral / SDE samplers (0: deterministic)."""
    sigma_min: PositiveFloat | None = None
    """Lowest non-zero noise level (``None``: the objective's)."""
    sigma_max: PositiveFloat | None = None
    """Highest noise level (``None``: the objective's)."""
    rho: PositiveFloat = 7.0
    """The ``karras`` schedule's exponent."""
    cfg_scale: float = 1.0
    """Classifier-free guidance scale ``w`` in ``u + w (c - u)`` (1: the conditional model)."""
    cfg_interval: tuple[float, float] | None = None
    """Guide only for sigma in ``[lo, hi]`` (``None``: at every step)."""
    cfg_channels: PositiveInt | None = None
    """Guide only the first N channels (DiT: 3 of 4 latent channels; ``None``: all)."""
    seed: NonNegativeInt = 0
    """Seed of the initial noise and of every stochastic step."""
    stages: tuple[Stage, ...] = ()
    """Multi-stage sampling (``ditkit.runtime.multistage``): draft at the first stage's
    resolution, then refine at each next one (enlarge, re-noise to its ``sigma``, sample). The
    last stage's resolution is the output's. Empty: one pass at the requested resolution."""

    @field_validator("sampler", "schedule", mode="before")
    @classmethod
    def _known_name(cls, value: Any, info: ValidationInfo) -> Any:
        names = SAMPLERS if info.field_name == "sampler" else SCHEDULES
        if isinstance(value, str) and value not in names:
            raise ValueError(
                f"unknown {info.field_name} {value!r}; choose one of {', '.join(names)}"
            )
        return value

    @field_validator("sigma_min", "sigma_max", "cfg_scale", mode="before")
    @classmethod
    def _finite(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if info.field_name == "cfg_scale" and not math.isfinite(value):
                raise ValueError("must be a finite number (1 = no guidance)")
            if info.field_name != "cfg_scale" and not 0 < value < math.inf:
                raise ValueError("use a positive, finite noise level")
        return value

    @field_validator("cfg_interval")
    @classmethod
    def _interval_ordered(cls, value: Any) -> Any:
        if value is not None and not 0 <= value[0] < value[1]:
            raise ValueError("need 0 <= lo < hi (two sigmas), e.g. [0.3, 5]")
        return value

    @model_validator(mode="after")
    def _sigmas_ordered(self) -> Sampling:
        if (
            self.sigma_min is not None
            and self.sigma_max is not None
            and not self.sigma_min < self.sigma_max
        ):
            raise ValueError(
                f"sigma_min: must be below sigma_max {self.sigma_max}; swap them or leave one unset"
            )
        return self

    @model_validator(mode="after")
    def _stages_chain(self) -> Sampling:
        for i, stage in enumerate(self.stages):
            if i == 0 and stage.sigma is not None:
                raise ValueError(
                    f"stages[0].sigma: the first stage starts from pure noise; "
                    f"drop its sigma {stage.sigma:g} (or add a draft stage "
                    "before it)"
                )
            if i > 0 and stage.sigma is None:
                raise ValueError(
                    f"stages[{i}].sigma: a refinement stage needs the noise level "
                    "to re-noise the previous stage's sample to, e.g. 2.0"
                )
            if i > 0 and any(
                a < b for a, b in zip(stage.resolution, self.stages[i - 1].resolution)
            ):
                raise ValueError(
                    f"stages[{i}].resolution: {list(stage.resolution)} is smaller "
                    f"than stage {i - 1}'s {list(self.stages[i - 1].resolution)}; "
                    "stages go from small to large"
                )
        return self

    @classmethod
    def of(
        cls, base: "Sampling | None" = None, source: str = "sampling", **changes: Any
    ) -> "Sampling":
        """``base`` (default: the defaults) with ``changes`` applied, validated: a bad value is
        a :class:`ditkit.spec.SpecError` naming the field (``Sampling(...)`` itself raises
        pydantic's error)."""

        if base is not None and not isinstance(base, Sampling):
            raise TypeError(f"sampling must be a Sampling, got {type(base).__name__}")
        if not changes and base is not None:
            return base
        data = {} if base is None else base.model_dump(exclude_unset=True)
        data.update(changes)
        return validate(data, cls, source)

    def recorded(self) -> dict[str, Any]:
        """Every setting as JSON data (what an ``.npz`` and a report record)."""
        data = self.model_dump(mode="json")
        data["cfg_interval"] = list(self.cfg_interval) if self.cfg_interval else None
        if not self.stages:  # one pass: recorded as before multi-stage sampling existed
            del data["stages"]
        return data

    def describe(self) -> str:
        """One short line: ``dpmpp_2m, 50 steps, cfg-scale 1.0, seed 0`` (+ :meth:`extras`)."""
        text = f"{self.sampler}, {self.steps} steps, cfg-scale {self.cfg_scale}, seed {self.seed}"
        return ", ".join([text, *self.extras()])

    def extras(self) -> list[str]:
        """The settings besides sampler, steps, cfg scale and seed that differ from their
        defaults, as ``["schedule karras", "sigma-min 0.1"]`` (command-line spelling)."""
        out = []
        for name in (
            "schedule",
            "eta",
            "sigma_min",
            "sigma_max",
            "rho",
            "cfg_interval",
            "cfg_channels",
            "stages",
        ):
            value = getattr(self, name)
            if name == "stages":
                if value:
                    out.append("stages " + ",".join(stage.text() for stage in value))
                continue
            if value != type(self).model_fields[name].default:
                if isinstance(value, tuple):
                    value = ",".join(str(v) for v in value)
                out.append(f"{name.replace('_', '-')} {value}")
        return out


PREVIEW_SAMPLING: dict[str, Any] = {"steps": 20, "seed": 0}
EVALUATION_SAMPLING: dict[str, Any] = {"steps": 20, "seed": 1}
"""The settings an experiment's previews and evaluations start from (:class:`Sampling` fills
in the rest); an experiment's ``sampling:`` mapping changes only the keys it names."""
EVALUATION_DEFAULTS = Sampling(**EVALUATION_SAMPLING)
"""What ``fid_model`` and ``evaluate_model`` sample with unless told otherwise."""


def legacy_sampling(data: Any, defaults: dict[str, Any]) -> Any:
    """Experiment data of ``preview`` / ``evaluation`` with the sampling keys written flat
    (``steps``, ``sampler``, ``cfg_scale``, ``seed``: the form before :class:`Sampling`) moved
    into ``sampling``; a partial ``sampling`` mapping is completed from ``defaults`` (the
    section's own defaults, e.g. 20 steps). Writing both forms is an error."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    flat = {k: data.pop(k) for k in list(data) if k in Sampling.model_fields}
    given = data.get("sampling")
    if flat and given is not None:
        raise ValueError(
            f"{', '.join(sorted(flat))}: write the sampling settings once, under "
            "`sampling:` (the flat form is the old spelling)"
        )
    if isinstance(given, Sampling):
        return data
    if given is None:
        given = flat
    if isinstance(given, dict):
        data["sampling"] = {**defaults, **given}
    return data


def fold_flat_keys(section: Any) -> Any:
    """A ``preview`` / ``evaluation`` mapping with its flat sampling keys moved into its
    ``sampling`` mapping, replacing keys of the same name there. ``--set`` overrides use it:
    before they apply (an older file's flat keys become the mapping, so
    ``--set preview.sampling.steps=5`` changes them) and after (so the older spelling
    ``--set preview.steps=5`` still works)."""
    if not isinstance(section, dict):
        return section
    flat = {k: v for k, v in section.items() if k in Sampling.model_fields}
    if not flat:
        return section
    out = {k: v for k, v in section.items() if k not in flat}
    given = out.get("sampling")
    out["sampling"] = {**(given if isinstance(given, dict) else {}), **flat}
    return out


__all__ = [
    "Sampling",
    "Stage",
    "parse_stages",
    "UPSAMPLE_MODES",
    "fold_flat_keys",
    "SAMPLERS",
    "SCHEDULES",
    "DEFAULT_SAMPLER",
    "legacy_sampling",
    "PREVIEW_SAMPLING",
    "EVALUATION_SAMPLING",
    "EVALUATION_DEFAULTS",
]
