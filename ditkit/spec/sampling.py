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

from pydantic import (Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator,
                      model_validator, ValidationInfo)

from ditkit.spec.components import Spec

SAMPLERS = ("euler", "heun", "ddim", "ddpm", "dpmpp_2m", "dpmpp_3m_sde", "euler_ancestral",
            "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
            "unipc", "dpm_adaptive")
SCHEDULES = ("native", "karras", "uniform")

DEFAULT_SAMPLER = "dpmpp_2m"
"""The sampler of previews, evaluations and every sampling command unless one is named. DPM++ 2M
is a second-order multistep method with one network evaluation per step: at 20 steps it scored
the same as Heun at 20 steps (39 evaluations) in the demo's ablation (docs/measurements.md,
*The demo*), so it gives the same quality at half the time."""

SamplerName = Literal[SAMPLERS]  # type: ignore[valid-type]
ScheduleName = Literal[SCHEDULES]  # type: ignore[valid-type]


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

    @field_validator("sampler", "schedule", mode="before")
    @classmethod
    def _known_name(cls, value: Any, info: ValidationInfo) -> Any:
        names = SAMPLERS if info.field_name == "sampler" else SCHEDULES
        if isinstance(value, str) and value not in names:
            raise ValueError(f"unknown {info.field_name} {value!r}; choose one of "
                             f"{', '.join(names)}")
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
        if (self.sigma_min is not None and self.sigma_max is not None
                and not self.sigma_min < self.sigma_max):
            raise ValueError(f"sigma_min: must be below sigma_max {self.sigma_max}; swap them "
                             "or leave one unset")
        return self

    @classmethod
    def of(cls, base: "Sampling | None" = None, source: str = "sampling", **changes: Any
           ) -> "Sampling":
        """``base`` (default: the defaults) with ``changes`` applied, validated: a bad value is
        a :class:`ditkit.spec.SpecError` naming the field (``Sampling(...)`` itself raises
        pydantic's error)."""
        from ditkit.spec.io import validate

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
        return data

    def describe(self) -> str:
        """One short line: ``dpmpp_2m, 50 steps, cfg-scale 1.0, seed 0`` (+ :meth:`extras`)."""
        text = f"{self.sampler}, {self.steps} steps, cfg-scale {self.cfg_scale}, seed {self.seed}"
        return ", ".join([text, *self.extras()])

    def extras(self) -> list[str]:
        """The settings besides sampler, steps, cfg scale and seed that differ from their
        defaults, as ``["schedule karras", "sigma-min 0.1"]`` (command-line spelling)."""
        out = []
        for name in ("schedule", "eta", "sigma_min", "sigma_max", "rho", "cfg_interval",
                     "cfg_channels"):
            value = getattr(self, name)
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
        raise ValueError(f"{', '.join(sorted(flat))}: write the sampling settings once, under "
                         "`sampling:` (the flat form is the old spelling)")
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


__all__ = ["Sampling", "fold_flat_keys", "SAMPLERS", "SCHEDULES", "DEFAULT_SAMPLER",
           "legacy_sampling", "PREVIEW_SAMPLING", "EVALUATION_SAMPLING", "EVALUATION_DEFAULTS"]
