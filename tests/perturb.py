"""One helper for the tests that must move a model off its zero initialisation.

ditkit zero-initialises output projections, adaLN / AdaRMSNorm modulations and heads (as the
reference code does), so a freshly built model ignores most of its inputs: a test comparing two
implementations on it could pass with a bug in every zeroed path. ``perturb`` adds Gaussian noise
to the parameters so every path shapes the output.
"""

from __future__ import annotations

import torch


def perturb(
    model: torch.nn.Module,
    scale: float = 0.05,
    *,
    seed: int | None = None,
    skip: tuple[str, ...] = (),
    trainable_only: bool = False,
    only_zero: bool = False,
) -> torch.nn.Module:
    """Add ``N(0, scale²)`` noise to ``model``'s parameters in place and return the model.

    - ``seed``: draw from a private generator seeded with it; ``None`` draws from torch's global
      generator (so ``torch.manual_seed`` before the call decides the noise);
    - ``skip``: leave parameters whose name contains one of these strings (e.g. ``"position"``
      keeps a fixed sin-cos table);
    - ``trainable_only``: leave parameters that do not require gradients;
    - ``only_zero``: touch only the tensors that are all zero (the zero-initialised ones).
    """
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (
                any(s in name for s in skip)
                or (trainable_only and not p.requires_grad)
                or (only_zero and bool(p.abs().sum()))
            ):
                continue
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model
