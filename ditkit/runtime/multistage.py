"""Multi-stage sampling: draft small, enlarge, re-noise, refine (SDEdit; DemoFusion's
progressive upscaling).

A :class:`~ditkit.spec.sampling.Sampling` with ``stages`` samples the first stage's
resolution from pure noise; every next stage enlarges the previous stage's result to its own
resolution (bicubic by default, or nearest), adds Gaussian noise of its ``sigma`` and samples
from that ``sigma`` down to 0 with the same sampler and the same network. Each stage is one
:func:`ditkit.runtime.samplers.sample` call: its ``sigmas`` argument is the stage's schedule
(the sampling's schedule between ``sigma_min`` and the stage's ``sigma``, whose first value
is exactly that ``sigma``) and its ``noise`` argument the starting point divided by that
``sigma`` (``sample`` multiplies the initial noise by the first sigma).

Seeds: stage 0 uses the sampling's ``seed`` (so one stage is plain sampling, bit for bit);
stage ``k``'s sampler uses :func:`stage_seed` ``(seed, k)`` and its re-noise that seed + 1.

    from ditkit.runtime.multistage import sample_staged
    x = sample_staged(denoiser, (4, 3, 32, 32), Sampling.of(stages=parse_stages("8,32:2.0")))
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ditkit.spec.sampling import Sampling, Stage

from .objectives import Objective
from .samplers import get_sigmas, sample
from .schedules import SamplingError
from .shape_rule import check_shape

_GOLDEN = 0x9E3779B97F4A7C15  # spreads stage seeds away from the chunk seeds seed + k


def stage_seed(seed: int, k: int) -> int:
    """The seed of stage ``k`` of a run with ``seed``: ``seed`` itself for the first stage,
    else a fixed mix of both (not ``seed + k``, which the next batch of an ``.npz`` run uses)."""
    return seed if k == 0 else (seed + k * _GOLDEN) % (1 << 63)


def _stage_range(objective: Objective, sampling: Sampling, stage: Stage) -> tuple[float, float]:
    """``(lowest sigma, stage.sigma)`` of a refinement ``stage``, or a :class:`SamplingError`
    when its sigma lies outside the model's noise range."""
    lo = sampling.sigma_min if sampling.sigma_min is not None else objective.sigma_min
    sigma = stage.sigma
    if sigma is None:  # the Sampling spec requires it on every stage after the first
        raise SamplingError("stages: a refinement stage needs a sigma to re-noise to")
    if not sigma > lo:
        raise SamplingError(
            f"stages: sigma {stage.sigma:g} is not above the lowest noise "
            f"level {lo:g}; re-noise to a higher sigma"
        )
    if sigma > objective.sigma_max * (1 + 1e-6):
        raise SamplingError(
            f"stages: sigma {stage.sigma:g} is above the model's highest "
            f"noise level {objective.sigma_max:g}; use a lower one (the "
            "first stage already starts from pure noise)"
        )
    return lo, sigma


def check_stages(objective: Objective, sampling: Sampling) -> None:
    """Refuse (:class:`SamplingError`) a ``sampling`` whose refinement stages re-noise outside
    ``objective``'s noise range, before anything is sampled (``stage_sigmas`` refuses the same
    stage when it comes to it)."""
    for stage in sampling.stages[1:]:
        _stage_range(objective, sampling, stage)


def stage_sigmas(denoiser, sampling: Sampling, stage: Stage) -> torch.Tensor:
    """The schedule of a refinement ``stage``: ``steps + 1`` descending sigmas from exactly
    ``stage.sigma`` to 0 (the sampling's schedule kind and ``sigma_min``)."""
    objective = denoiser.noise_range
    lo, sigma = _stage_range(objective, sampling, stage)
    sigmas = get_sigmas(
        objective,
        stage.steps or sampling.steps,
        sampling.schedule,
        sigma_min=lo,
        sigma_max=sigma,
        rho=sampling.rho,
    ).clone()
    sigmas[0] = sigma  # exactly the stage's level, whatever the schedule's rounding
    return sigmas


def enlarge(x: torch.Tensor, resolution: tuple[int, int], mode: str) -> torch.Tensor:
    """``x`` ``(B, C, h, w)`` resized to ``resolution`` by ``mode`` (bicubic or nearest),
    computed in float32; the same size is returned unchanged."""
    if tuple(x.shape[-2:]) == tuple(resolution):
        return x
    if mode == "bicubic":
        out = F.interpolate(x.float(), size=tuple(resolution), mode="bicubic", align_corners=False)
    else:
        out = F.interpolate(x.float(), size=tuple(resolution), mode="nearest-exact")
    return out.to(x.dtype)


def sample_staged(
    denoiser,
    shape,
    sampling: Sampling,
    *,
    class_labels=None,
    cond: dict | None = None,
    device="cpu",
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
    on_stage: Callable[[int, torch.Tensor], None] | None = None,
    check: Callable[[tuple], None] | None = None,
    **settings,
) -> torch.Tensor:
    """Samples of ``shape`` ``(B, C, H, W)`` with ``sampling``: one :func:`sample` call
    when it has no ``stages``, else one per stage (see the module docstring). The last
    stage's resolution must be ``(H, W)``. ``on_stage(k, x)`` sees each stage's result;
    ``check(shape)`` vets each stage's shape first (a model's resolution rule). ``progress``
    shows one bar per stage."""
    sampling = Sampling.of(sampling, **settings)
    if not sampling.stages:
        if check is not None:
            check(tuple(shape))
        return sample(
            denoiser,
            shape,
            sampling,
            class_labels=class_labels,
            cond=cond,
            device=device,
            progress=progress,
            dtype=dtype,
        )
    last = tuple(sampling.stages[-1].resolution)
    if last != tuple(shape[-2:]):
        raise SamplingError(
            f"stages: the last stage samples {last[0]}x{last[1]} but "
            f"{shape[-2]}x{shape[-1]} was asked for; end the stages at the "
            "output resolution"
        )
    one_pass = Sampling.of(sampling, stages=())
    x = None
    for k, stage in enumerate(sampling.stages):
        stage_shape = (*shape[:-2], *stage.resolution)
        # the network for this stage's grid (an AdaptingDenoiser adapts its model per stage)
        den = denoiser.at(tuple(stage.resolution)) if hasattr(denoiser, "at") else denoiser
        if den is not denoiser:  # a model adapted to this stage: its own resolution rule
            check_shape(den.model.spec, stage_shape, None, "stages")
        elif check is not None:
            check(stage_shape)
        seed = stage_seed(sampling.seed, k)
        changes: dict[str, Any] = {"seed": seed}
        if stage.steps is not None:
            changes["steps"] = stage.steps
        run = Sampling.of(one_pass, **changes)
        noise = sigmas = None
        if x is not None:
            sigmas = stage_sigmas(den, sampling, stage)
            gen = torch.Generator().manual_seed((seed + 1) % (1 << 63))  # not the sampler's
            eps = torch.randn(stage_shape, generator=gen, dtype=torch.float32)
            start = enlarge(x, stage.resolution, stage.upsample).float().cpu()
            noise = start / float(sigmas[0]) + eps  # sample() starts at noise * sigmas[0]
        x = sample(
            den,
            stage_shape,
            run,
            class_labels=class_labels,
            cond=cond,
            device=device,
            progress=progress,
            dtype=dtype,
            sigmas=sigmas,
            noise=noise,
            progress_label=(
                f"stage {k + 1}/{len(sampling.stages)} {stage.resolution[0]}x{stage.resolution[1]}"
            ),
        )
        if on_stage is not None:
            on_stage(k, x)
    assert x is not None  # stages is not empty
    return x


__all__ = ["sample_staged", "stage_sigmas", "stage_seed", "enlarge", "check_stages"]
