"""Parameter tags set where parameters are made, and the optimizer groups built from them."""

import copy

import pytest
import torch
from torch import nn

from ditkit import spec as S
from ditkit.builder import build
from ditkit.builder import heads as heads_module
from ditkit.builder.norm import LayerNorm, Norm
from ditkit.builder.tags import MAPPING, NO_DECAY, param_tags, tag
from ditkit.training.loop import param_groups
from tests.conftest import EXAMPLES, example_specs

OPT = S.experiment.Optimizer(lr=1e-3, weight_decay=0.1, mapping_lr_scale=0.5)


def _groups_by_name(model) -> dict[str, tuple[float, float]]:
    """``{parameter name: (weight_decay, lr)}`` from the optimizer groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: (g["weight_decay"], g["lr"])
        for g in param_groups(model, OPT)
        for p in g["params"]
    }


@pytest.mark.parametrize("path", example_specs(), ids=lambda p: p.stem)
def test_tags_give_the_published_grouping_on_every_example(path):
    """No decay on norms, learned scales, biases and embedding tables; the conditioning path
    at the mapping LR -- written here from the module types, independently of the tags."""
    model = build(S.load(path), device="meta", init=False)
    expected = {}
    for prefix, m in model.named_modules():
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad:  # a fixed table (sincos positions) is not optimised
                continue
            full = f"{prefix}.{name}" if prefix else name
            no_decay = isinstance(m, (Norm, nn.Embedding)) or name in ("bias", "scale", "fac")
            mapping = full.startswith("conditioning.")
            expected[full] = (0.0 if no_decay else 0.1, 5e-4 if mapping else 1e-3)
    assert _groups_by_name(model) == expected


def test_a_new_module_kind_lands_in_the_right_groups_without_touching_train(monkeypatch):
    class Gain(nn.Module):  # a made-up component: its own learned gain, a norm, a Linear
        def __init__(self, d):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(d))
            tag(self, "gain", NO_DECAY)
            self.norm = LayerNorm(d, affine=True)
            self.proj = nn.Linear(d, d)

    class GainHead(heads_module.LinearHead):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.extra = Gain(8)

    monkeypatch.setattr(heads_module, "LinearHead", GainHead)
    model = build(S.load(EXAMPLES / "tiny" / "tiny-hdit-neighborhood.yaml"))
    got = _groups_by_name(model)
    assert got["head.extra.gain"] == (0.0, 1e-3)
    assert got["head.extra.norm.scale"] == got["head.extra.norm.bias"] == (0.0, 1e-3)
    assert got["head.extra.proj.bias"] == (0.0, 1e-3)
    assert got["head.extra.proj.weight"] == (0.1, 1e-3)


def test_tags_survive_copies_and_name_the_mapping_network():
    model = build(S.load(EXAMPLES / "tiny" / "tiny-hdit-neighborhood.yaml"))
    tags = param_tags(model)
    assert tags == param_tags(copy.deepcopy(model))  # the EMA model is a deep copy
    assert MAPPING in tags["conditioning.mapping.blocks.0.up.weight"]
    assert NO_DECAY not in tags["conditioning.mapping.blocks.0.up.weight"]
    assert tags["levels.0.encoder.0.attn.scale"] == {NO_DECAY}
    assert tags["levels.0.encoder.0.attn.qkv.weight"] == frozenset()
