"""The eager-only fast forms (issue 30) compute what the traced forms compute.

Eager calls without autograd take fused / re-laid-out forms (q and k shaped together on the qkv
layout, a ``vector_norm`` RMSNorm, GEGLU from two weight halves, the chunked ``tiled``
neighborhood inference path); traces keep the op patterns the ONNX rewrites match, and calls
with autograd the same arithmetic. Both must give the same numbers within the fp32 parity
tolerance (DESIGN.md: 1e-5 of the output scale)."""

from __future__ import annotations

import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build, kernels
from ditkit.builder import neighborhood as nb
from ditkit.device import tune_cpu_allocator
from tests.conftest import ROOT


def _perturbed(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised layers too: every path carries signal
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("name", ["tiny-hdit-neighborhood", "tiny-hdit-shapes16"])
def test_eager_forward_equals_the_traced_form(name):
    spec = S.load(ROOT / "examples" / "tiny" / f"{name}.yaml")
    torch.manual_seed(0)
    model = _perturbed(build(spec)).eval()
    res = tuple(spec.input.resolution)
    x = torch.randn(2, spec.input.channels, *res)
    sigma, labels = torch.tensor([0.5, 3.0]), torch.tensor([1, 2])
    with torch.no_grad():
        fast = model(x, sigma, labels)  # auto: tiled inference path, fused q/k, GEGLU halves
        with kernels.use_backend("gather", export=True):  # the traced forms, run eagerly
            traced = model(x, sigma, labels)
    scale = traced.abs().max()
    assert scale > 0.1
    err = (fast - traced).abs().max() / scale
    assert err <= 1e-5, err


@pytest.mark.parametrize("name", ["tiny-hdit-shapes16", "tiny-mdit"])
def test_calls_with_autograd_keep_the_traced_arithmetic_bit_for_bit(name):
    """Training keeps the exact arithmetic of the traced forms (a few Adam steps from
    zero-initialised layers amplify any rounding difference into another trajectory)."""
    spec = S.load(ROOT / "examples" / "tiny" / f"{name}.yaml")
    torch.manual_seed(0)
    model = _perturbed(build(spec))
    size = spec.input.resolution[0]
    x = torch.randn(2, spec.input.channels, size, size)
    sigma, labels = torch.tensor([0.5, 3.0]), torch.tensor([1, 2])

    def run(export: bool):
        model.zero_grad()
        ctx = kernels.use_backend("gather", export=True) if export else kernels.use_backend("auto")
        with ctx:
            out = model(x, sigma, labels)
            out.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return out.detach(), grads

    (out, grads), (ref, ref_grads) = run(False), run(True)
    assert torch.equal(out, ref)
    assert len(grads) == len(ref_grads) and all(map(torch.equal, grads, ref_grads))


@pytest.mark.parametrize(
    "shape, kernel, dilation",
    [
        ((2, 3, 13, 17, 32), (5, 7), (1, 2)),
        ((1, 2, 24, 20, 16), (7, 7), (1, 1)),
        ((1, 1, 9, 9, 8), (3, 3), (3, 3)),
        ((3, 2, 8, 8, 32), (5, 5), (1, 1)),
    ],
)
@pytest.mark.parametrize("chunk_bytes", [4096, 1 << 20])  # several chunks a grid / grids a chunk
def test_tiled_inference_equals_masked_on_strided_qkv_views(
    shape, kernel, dilation, chunk_bytes, monkeypatch
):
    b, nh, hh, ww, d = shape
    monkeypatch.setattr(nb, "TILE_CHUNK_BYTES", chunk_bytes)
    qkv = torch.randn(b, hh, ww, 3, nh, d)  # what the attention modules pass: strided views
    q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
    ref = nb.masked(q, k, v, kernel, dilation, 0.3)
    out = nb.tiled_inference(q, k, v, kernel, dilation, 0.3)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_auto_on_cpu_picks_tiled_inference_without_autograd_and_gather_with_it(monkeypatch):
    seen = []
    for name in ("gather", "tiled"):
        impl = kernels._IMPLEMENTATIONS[name]
        monkeypatch.setitem(
            kernels._IMPLEMENTATIONS,
            name,
            lambda *a, _n=name, _f=impl: (seen.append(_n), _f(*a))[1],
        )
    q, k, v = (torch.randn(1, 2, 9, 9, 8, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        kernels.neighborhood_attention(q, k, v, (3, 3), (1, 1), 1.0)
    kernels.neighborhood_attention(q, k, v, (3, 3), (1, 1), 1.0)
    with kernels.use_backend("gather"), torch.no_grad():  # a named backend is what runs
        kernels.neighborhood_attention(q, k, v, (3, 3), (1, 1), 1.0)
    assert seen == ["tiled", "gather", "gather"]


def test_allocator_tuning_can_be_turned_off():
    assert tune_cpu_allocator({"DITKIT_CPU_ALLOCATOR": "default"}) is False
    first = tune_cpu_allocator({})
    assert tune_cpu_allocator({}) is first  # once per process
