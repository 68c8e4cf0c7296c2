"""The exportable backends export to ONNX with dynamic batch, height and width.

A tiny hierarchical model with a neighborhood (or shifted-window) level is exported once through
``torch.export`` (Dim constraints that respect the spec's resolution multiple) and
``torch.onnx.export(..., dynamo=True)``, then run in onnxruntime at resolutions other than the
traced one -- including non-square ones -- and compared with eager PyTorch (<= 1e-4).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build, kernels
from tests.perturb import perturb

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (torch.onnx dynamo export)")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "tiny"


class _Denoise(torch.nn.Module):
    """Positional signature for export: (x, sigma, labels)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, sigma, labels):
        return self.model(x, sigma, labels)


def _model(name: str):
    spec = S.load(EXAMPLES / name)
    torch.manual_seed(0)
    model = build(spec).eval()
    perturb(model)  # move off the zero init so attention shapes the output
    return spec, _Denoise(model)


def _export(
    wrapper,
    spec,
    backend: str,
    path: Path,
    example_hw=(16, 24),
    multiple: tuple[int, int] | None = None,
) -> Path:
    mh, mw = multiple or spec.resolution_multiple()
    b = torch.export.Dim("batch", min=1, max=64)
    h = torch.export.Dim("h", min=1, max=64)
    w = torch.export.Dim("w", min=1, max=64)
    x = torch.randn(2, spec.input.channels, *example_hw)
    args = (x, torch.tensor([0.5, 2.0]), torch.tensor([1, 3]))
    shapes = {"x": {0: b, 2: mh * h, 3: mw * w}, "sigma": {0: b}, "labels": {0: b}}
    with torch.no_grad(), kernels.use_backend(backend, export=True):
        program = torch.export.export(wrapper, args, dynamic_shapes=shapes)
        torch.onnx.export(program, args, str(path), dynamo=True, verbose=False)
    return path


def _check(wrapper, path: Path, batch: int, hw: tuple[int, int], backend: str):
    g = torch.Generator().manual_seed(hw[0] * 100 + hw[1])
    x = torch.randn(batch, 3, *hw, generator=g)
    sigma = torch.rand(batch, generator=g) + 0.3
    labels = torch.randint(0, 10, (batch,), generator=g)
    with torch.no_grad(), kernels.use_backend(backend):
        ref = wrapper(x, sigma, labels).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), (x, sigma, labels))}
    out = sess.run(None, feeds)[0]
    assert out.shape == ref.shape
    assert np.abs(ref).max() > 0.1  # a real output, not the zero-init head
    assert np.abs(out - ref).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gather", "tiled"])
def test_neighborhood_model_exports_with_dynamic_sizes(backend, tmp_path):
    spec, wrapper = _model("tiny-hdit-neighborhood.yaml")
    path = _export(wrapper, spec, backend, tmp_path / "model.onnx")
    # the traced size, a non-square one, and one whose level-0 grid (6x4) is barely bigger
    # than the 3x3 kernel; batch differs from the traced batch of 2
    for batch, hw in ((2, (16, 24)), (3, (40, 24)), (2, (12, 8))):
        _check(wrapper, path, batch, hw, "masked")  # eager reference: the dense backend


@pytest.mark.slow
def test_shifted_window_model_exports_with_dynamic_sizes(tmp_path):
    spec, wrapper = _model("tiny-hdit-shifted-window.yaml")
    # level 0's token grid must be a multiple of the window: sizes step by patch x window
    step = spec.patch.size * spec.levels[0].attention.window_size
    step = step if isinstance(step, int) else step[0]
    path = _export(
        wrapper,
        spec,
        "auto",
        tmp_path / "model.onnx",
        example_hw=(2 * step, 3 * step),
        multiple=(step, step),
    )
    for batch, hw in ((2, (2 * step, 3 * step)), (3, (3 * step, step))):
        _check(wrapper, path, batch, hw, "auto")


def test_export_with_a_non_exportable_backend_is_refused_before_tracing():
    with pytest.raises(ValueError, match="'natten' cannot be exported"):
        with kernels.use_backend("natten", export=True):
            pass


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gather", "tiled"])
@pytest.mark.parametrize("kernel,dilation", [((7, 3), (1, 1)), ((3, 5), (2, 2))])
def test_kernel_exports_with_dilation_and_small_grids(backend, kernel, dilation, tmp_path):
    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return kernels.neighborhood_attention(q, k, v, kernel, dilation, 0.3)

    hmin, wmin = kernel[0] * dilation[0], kernel[1] * dilation[1]
    h = torch.export.Dim("h", min=hmin, max=128)
    w = torch.export.Dim("w", min=wmin, max=128)
    args = tuple(torch.randn(2, 2, 15, 17, 8) for _ in range(3))
    with torch.no_grad(), kernels.use_backend(backend, export=True):
        program = torch.export.export(
            Attend(), args, dynamic_shapes={n: {2: h, 3: w} for n in "qkv"}
        )
        torch.onnx.export(program, args, str(tmp_path / "na.onnx"), dynamo=True)
    sess = ort.InferenceSession(str(tmp_path / "na.onnx"), providers=["CPUExecutionProvider"])
    for hw in ((hmin, wmin), (31, max(9, wmin)), (64, 40)):
        q, k, v = (torch.randn(2, 2, *hw, 8) for _ in range(3))
        with torch.no_grad(), kernels.use_backend("masked"):
            ref = Attend()(q, k, v).numpy()
        out = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]
        assert np.abs(out - ref).max() <= 1e-5
