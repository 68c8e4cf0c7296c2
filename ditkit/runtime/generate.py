"""Batches of samples from a model, as evaluation and training previews draw them."""

from __future__ import annotations

import torch
from torch import nn

from ditkit import spec as S
from ditkit.spec.limits import check_sample_size
from ditkit.spec.sampling import Sampling

from .denoiser import Denoiser
from .multistage import sample_staged


@torch.no_grad()
def sample_images(
    model: nn.Module,
    spec: S.ModelSpec,
    objective,
    count: int,
    sampling: Sampling,
    device: torch.device | str,
    labels: torch.Tensor | None = None,
    n_classes: int | None = None,
    batch: int = 250,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``count`` samples from ``model`` with ``ditkit.runtime.samplers`` and the settings
    ``sampling``; batch ``i`` uses seed ``sampling.seed + i``. Unless ``labels`` are given they
    cycle through the first ``n_classes`` classes (a class-conditional model). Leaves the
    global RNG untouched."""

    check_sample_size(spec, count, batch=batch)  # every sample is kept: refused before
    classes = spec.conditioning.classes  # anything is allocated
    if labels is None and classes is not None:
        labels = torch.arange(count) % (n_classes or classes.count)
    denoiser = Denoiser(model, objective).to(device)
    was_training = model.training
    model.eval()
    h, w = spec.input.resolution
    if sampling.stages:  # multi-stage: the output is the last stage's size
        h, w = sampling.stages[-1].resolution
    out = []
    rng = torch.get_rng_state()
    try:
        for i, start in enumerate(range(0, count, batch)):
            n = min(batch, count - start)
            lab = labels[start : start + n] if labels is not None else None
            out.append(
                sample_staged(
                    denoiser,
                    (n, spec.input.channels, h, w),
                    sampling,
                    seed=sampling.seed + i,
                    class_labels=lab,
                    device=str(device),
                    progress=progress,
                )
                .float()
                .cpu()
            )
    finally:
        torch.set_rng_state(rng)
        model.train(was_training)
    return torch.cat(out), labels
