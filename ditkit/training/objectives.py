"""The training loss: draws noise and noise levels, and asks the objective for the loss.

Everything that differs between objectives (how noise levels are drawn, the network's input,
the weighting, DDPM's variational term, MDiT's variance regulariser) belongs to the objective
classes of :mod:`ditkit.runtime.objectives`, shared with the samplers; this module is what
only training adds around them (the noise, classifier-free-guidance label dropout).

Every loss draws its randomness from the ``torch.Generator`` it is given (on the CPU), so a run
that restores the generator's state draws the same noise.
"""

from __future__ import annotations

import torch
from torch import nn

from ditkit import spec as S
from ditkit.runtime.objectives import (
    DDPMTables,
    approx_standard_normal_cdf,  # noqa: F401
    ddpm_hybrid_loss,
    ddpm_vlb_terms,
    discretized_gaussian_log_likelihood,
    normal_kl,
    objective_of,
)

# the densities and weights, importable from here as before (their home: ``runtime.schedules``)
from ditkit.runtime.schedules import (
    cosine_interpolated_sigma,
    edm_weight,  # noqa: F401
    sample_sigma,
    sample_time,
)

__all__ = [
    "DiffusionLoss",
    "drop_labels",
    # re-exported from the runtime, where the objectives live
    "DDPMTables",
    "approx_standard_normal_cdf",
    "ddpm_hybrid_loss",
    "ddpm_vlb_terms",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
    "cosine_interpolated_sigma",
    "edm_weight",
    "sample_sigma",
    "sample_time",
]


def _randn(shape, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=like.device, dtype=like.dtype)


class DiffusionLoss:
    """``loss(model, x0, labels, gen, step) -> (scalar loss, {name: float})``.

    ``model`` is the (possibly DDP-wrapped) network; ``x0`` a batch in [-1, 1]; ``labels``
    already include the classifier-free-guidance dropout; ``step`` the optimizer step (for
    schedules such as MDiT's ``var_off_after``). :meth:`draw` takes the noise and noise level
    from the generator, :meth:`per_sample` computes the losses for given ones (what the tests
    pin to the reference implementations' formulas). ``objective``: an objective spec (or an
    :class:`~ditkit.runtime.objectives.Objective`), kept as :attr:`objective` in its class."""

    def __init__(self, objective, spec: S.ModelSpec):
        self.objective, self.spec = objective_of(objective), spec
        # k-diffusion's cosine-interpolated density: image_d = max(input_size)
        self.resolution = max(spec.input.resolution)

    def draw(self, x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noise, level)``: unit Gaussian noise like ``x0`` and one noise level per sample
        (EDM: sigma, float64; DDPM: integer timestep; x0 / flow / v: t, float64), in that
        order from ``gen``."""
        noise = _randn(x0.shape, gen, x0)
        # the batch's own size: a multi-resolution run (training.resolutions) trains at several
        resolution = max(x0.shape[-2:]) if x0.ndim == 4 else self.resolution
        return noise, self.objective.draw_level(x0.shape[0], gen, resolution)

    def __call__(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor | None,
        gen: torch.Generator,
        step: int = 0,
        **cond: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        noise, level = self.draw(x0, gen)
        per, extras = self.per_sample(model, x0, labels, noise, level, step, **cond)
        return per.mean(), extras

    def per_sample(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor | None,
        noise: torch.Tensor,
        level: torch.Tensor,
        step: int = 0,
        **cond: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``((B,) losses, {name: float})`` for the given noise and noise levels (see
        :meth:`draw`): the objective's :meth:`~ditkit.runtime.objectives.Objective.loss` (each
        class's docstring names the paper's recipe it follows)."""
        return self.objective.loss(model, x0, labels, noise, level, step, **cond)


def drop_labels(
    labels: torch.Tensor | None, rate: float, null_class: int | None, gen: torch.Generator
) -> torch.Tensor | None:
    """Classifier-free guidance: each label becomes ``null_class`` with probability ``rate``."""
    if labels is None or null_class is None:
        return labels
    drop = torch.rand(labels.shape[0], generator=gen) < rate
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)
