"""Parameter tags: what the optimizer needs to know about a parameter, said where it is made.

A module tags its own parameters in ``__init__`` (``tag(self, "scale", NO_DECAY)``; a whole
sub-tree with ``tag_module``), and ``build()`` tags the parameters of PyTorch's own layers once
(``tag_torch_layers``: every bias and every embedding table), so a new module kind made of
``nn.Linear`` layers needs nothing more. ``ditkit.training`` groups by these tags
(``param_groups``) and never looks at a parameter's name or shape.

Tags live on the module that owns the parameter (``module._ditkit_tags``: parameter name ->
tags), not on the tensor: FSDP2, ``to_empty`` and ``load_state_dict(assign=True)`` replace
parameter tensors but keep modules and names.
"""

from __future__ import annotations

from torch import nn

#: no weight decay: norms, learned scales, biases, embedding tables
NO_DECAY = "no_decay"
#: trained at ``lr * mapping_lr_scale``: the conditioning path (HDiT's mapping network and the
#: noise / class embeddings feeding it)
MAPPING = "mapping"

_ATTR = "_ditkit_tags"


def tag(module: nn.Module, name: str, *tags: str) -> None:
    """Add ``tags`` to ``module``'s own parameter ``name`` (a no-op when it is None)."""
    if getattr(module, name, None) is None:
        return
    table = module.__dict__.setdefault(_ATTR, {})
    table[name] = table.get(name, frozenset()) | frozenset(tags)


def tag_module(module: nn.Module, *tags: str) -> None:
    """Add ``tags`` to every parameter under ``module``."""
    for m in module.modules():
        for name, _ in m.named_parameters(recurse=False):
            tag(m, name, *tags)


def tag_torch_layers(model: nn.Module) -> None:
    """``NO_DECAY`` on the biases of every layer and on embedding tables (PyTorch's modules
    cannot tag themselves)."""
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            tag(m, "weight", NO_DECAY)
        if isinstance(getattr(m, "bias", None), nn.Parameter):
            tag(m, "bias", NO_DECAY)


def param_tags(model: nn.Module) -> dict[str, frozenset[str]]:
    """Tags of every parameter of ``model`` by its ``named_parameters`` name."""
    out: dict[str, frozenset[str]] = {}
    for prefix, m in model.named_modules():
        table = m.__dict__.get(_ATTR, {})
        for name, _ in m.named_parameters(recurse=False):
            out[f"{prefix}.{name}" if prefix else name] = table.get(name, frozenset())
    return out
