"""What a sampler needs from a denoiser, as a ``typing.Protocol``.

Three classes implement it: :class:`ditkit.runtime.denoiser.Denoiser` (eager PyTorch, optionally
``torch.compile``-d), :class:`ditkit.deploy.engines.OrtDenoiser` (an exported ONNX graph in
onnxruntime) and :class:`ditkit.deploy.tensorrt.TrtDenoiser` (a TensorRT engine). The samplers
read these attributes directly; a class missing one fails the conformance test
(``tests/runtime/test_protocols.py``), not a sampling run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from ditkit.runtime.objectives import Objective
    from ditkit.runtime.shape_rule import AxisRule


@runtime_checkable
class Denoiser(Protocol):
    """``D(x, sigma) -> x0`` in the VE convention, plus what samplers and CFG need to know."""

    #: the model's objective (:mod:`ditkit.runtime.objectives`): the trained sigma range, its
    #: own time and native schedule (schedules are built from it)
    noise_range: Objective
    #: the label that means "unconditional" (classifier-free guidance), or None
    null_class: int | None
    #: True for a graph exported with ``--cfg``: CFG runs inside :meth:`guided`, one call
    guides_inside: bool
    #: the channels such a graph guides (None: all); meaningless when ``guides_inside`` is False
    cfg_channels: int | None
    #: the resolutions an exported graph accepts per axis, or None (any the spec accepts)
    rules: tuple[AxisRule, AxisRule] | None

    @property
    def learned_variance(self) -> bool:
        """The model also returns a learned-sigma DDPM's variance channels."""
        ...

    def denoise(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        **cond: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x0, var_values | None)`` for ``x`` ``(B, C, H, W)`` at ``sigma`` ``(B,)``."""
        ...

    def guided(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        class_labels: torch.Tensor,
        scale,
        **cond: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CFG in one call (only where ``guides_inside``; others raise ValueError)."""
        ...
