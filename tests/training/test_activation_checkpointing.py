"""Activation checkpointing recomputes blocks in backward: same loss and gradients, every family."""

from pathlib import Path

import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build
from ditkit.training.loop import enable_activation_checkpointing

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny"


def _loss_and_grads(spec, checkpointed: bool):
    torch.manual_seed(0)
    model = build(spec)
    if checkpointed:
        enable_activation_checkpointing(model)
    h, w = spec.input.resolution
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, spec.input.channels, h, w, generator=gen)
    sigma = torch.tensor([0.5, 2.0])
    labels = torch.tensor([1, 3]) if spec.conditioning.classes is not None else None
    for p in model.parameters():  # zero-initialised outputs would make every gradient trivial
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
    out = model(x, sigma, labels)
    loss = (out.float() ** 2).mean()
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("name", ["tiny-hdit-digits", "tiny-mdit", "tiny-mpdit", "tiny-dit"])
def test_checkpointed_blocks_give_the_same_gradients(name):
    spec = S.load(TINY / f"{name}.yaml")
    loss_a, grads_a = _loss_and_grads(spec, False)
    loss_b, grads_b = _loss_and_grads(spec, True)
    assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-7), n
