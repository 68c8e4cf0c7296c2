"""Weight-init helpers shared by the modules' ``init_special`` (``model.initialize`` runs them)."""

from __future__ import annotations

from torch import nn


def zero_linear_(layer: nn.Linear) -> None:
    """Zero a Linear's weight and bias: an output projection that starts as the identity of the
    residual stream (DiT's adaLN-Zero, HDiT's zero-init outputs)."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
