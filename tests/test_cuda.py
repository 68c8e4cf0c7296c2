"""CUDA checks (marker ``gpu``: excluded by default, run by ``pytest -m gpu`` and by
``benchmarks/gpu_check.py``). Each skips with its reason where no CUDA device is visible.

What they guard is what CPU tests cannot reach: the neighborhood backends on CUDA (flex compiled,
natten's kernels, gather/tiled on the GPU) against the masked reference, forward and gradients;
a whole model on CUDA against the same model on CPU; a bf16 training step; sampling on CUDA;
a CUDA graph of the denoiser; onnxruntime's IO-binding path where a CUDA provider exists."""

from __future__ import annotations

import pytest
import torch

from ditkit import spec as S
from ditkit.builder import kernels
from ditkit.builder import neighborhood as nb
from ditkit.runtime.denoiser import Denoiser
from tests.runtime.conftest import perturbed

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device is visible")
    dev = torch.device("cuda", torch.cuda.current_device())
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # exact fp32
    yield dev
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


@pytest.mark.parametrize("backend", ["flex", "natten", "tiled", "gather"])
@pytest.mark.parametrize(
    "grid,kernel,dilation", [((12, 17), (7, 7), (1, 1)), ((31, 9), (5, 3), (2, 1))]
)
def test_backend_equals_masked_on_cuda(cuda, backend, grid, kernel, dilation):
    if backend == "natten" and not kernels.natten_available():
        pytest.skip("natten is not installed")
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 3, *grid, 32, generator=g).to(cuda).requires_grad_() for _ in range(3)
    )
    grads = []
    outs = []
    for name in (backend, "masked"):
        with kernels.use_backend(name):
            out = kernels.neighborhood_attention(q, k, v, kernel, dilation, 0.2)
        (gq, gk, gv) = torch.autograd.grad(out, (q, k, v), torch.cos(out.detach()))
        outs.append(out.detach())
        grads.append((gq, gk, gv))
    assert _rel(outs[0], outs[1]) < 1e-4
    for a, b in zip(*grads):
        assert _rel(a, b) < 1e-4


def test_model_on_cuda_equals_cpu(cuda):
    model = perturbed("tiny-hdit-neighborhood")
    g = torch.Generator().manual_seed(1)
    x, s, y = torch.randn(2, 3, 16, 24, generator=g), torch.tensor([0.3, 4.0]), torch.tensor([1, 2])
    with torch.no_grad():
        ref = Denoiser(model, S.EDMObjective())(x, s, y)
        model.to(cuda)
        with kernels.use_backend("auto"):  # natten or flex on CUDA
            got = Denoiser(model, S.EDMObjective())(x.to(cuda), s.to(cuda), y.to(cuda))
    assert _rel(got.cpu(), ref) < 1e-4


def test_bf16_training_step_on_cuda(cuda):
    from ditkit.training.objectives import DiffusionLoss

    model = perturbed("tiny-hdit-neighborhood").to(cuda).train()
    spec = model.spec
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    loss_fn = DiffusionLoss(S.EDMObjective(), spec)
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1).to(cuda)
    labels = torch.tensor([0, 1, 2, 3], device=cuda)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16), kernels.use_backend("auto"):
            loss, _ = loss_fn(model, x0, labels, gen)
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_sampling_on_cuda_equals_cpu(cuda):
    from ditkit.runtime.samplers import sample

    model = perturbed("tiny-hdit-neighborhood")
    den = Denoiser(model, S.EDMObjective())
    labels = torch.tensor([3, 5])
    ref = sample(den, (2, 3, 16, 16), steps=4, sampler="heun", seed=0, class_labels=labels)
    model.to(cuda)
    got = sample(
        den, (2, 3, 16, 16), steps=4, sampler="heun", seed=0, class_labels=labels, device=cuda
    )
    assert got.device.type == "cuda"
    assert _rel(got.cpu(), ref) < 1e-3


def test_cuda_graph_of_the_denoiser_replays_eager(cuda):
    model = perturbed("tiny-hdit-neighborhood").to(cuda)
    den = Denoiser(model, S.EDMObjective())
    x = torch.randn(1, 3, 16, 16, device=cuda)
    s, y = torch.full((1,), 2.0, device=cuda), torch.zeros(1, dtype=torch.long, device=cuda)
    with torch.no_grad(), kernels.use_backend("auto"):
        ref = den(x, s, y).clone()
        stream = torch.cuda.Stream(cuda)
        stream.wait_stream(torch.cuda.current_stream(cuda))
        with torch.cuda.stream(stream):
            for _ in range(3):
                den(x, s, y)
        torch.cuda.current_stream(cuda).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = den(x, s, y)
        x.copy_(x * 0.5)
        graph.replay()
        torch.cuda.synchronize(cuda)
        ref2 = den(x, s, y)
    assert not torch.allclose(ref, ref2)  # the input changed, so must the output
    assert _rel(out, ref2) < 1e-5


def test_onnxruntime_io_binding_on_cuda(cuda, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)"
        )
    from ditkit.deploy.engines import OrtDenoiser
    from ditkit.deploy.export import export_onnx

    model = perturbed("tiny-hdit-neighborhood")
    path = tmp_path / "m.onnx"
    export_onnx(model, S.EDMObjective(), path, check=False)
    x, s, y = torch.randn(2, 3, 16, 24), torch.tensor([0.3, 4.0]), torch.tensor([1, 2])
    with torch.no_grad():
        ref = Denoiser(model, S.EDMObjective())(x, s, y)
    runner = OrtDenoiser(path, device=cuda)
    got, _ = runner.denoise(x.to(cuda), s.to(cuda), y.to(cuda))
    assert got.device.type == "cuda"
    assert _rel(got.cpu(), ref) < 1e-3


def test_flex_block_mask_lives_on_the_query_device(cuda):
    mask = nb.block_mask(16, 16, (7, 7), (1, 1), cuda)
    assert mask.kv_num_blocks.device.type == "cuda"
