"""Every neighborhood backend gives the same numbers (fp32, CPU), and the switch fails clearly.

References: ``natten.na2d`` for forward outputs, and the dense ``masked`` backend (SDPA with an
n x n mask) for outputs and for the gradients of q, k and v -- natten cannot backpropagate on
CPU (it runs through FlexAttention there, which has no CPU backward), so the gradient reference
is ``masked``, itself checked against natten's forward here.
"""

import itertools

import pytest
import torch

from ditkit.builder import kernels
from ditkit.builder import neighborhood as nb
from tests.perturb import perturb

GRIDS = [(7, 7), (12, 17), (31, 9)]
KERNELS = [(3, 3), (5, 5), (7, 7), (7, 3)]
DILATIONS = [(1, 1), (2, 2)]


def _valid(grid, kernel, dilation):
    return all(n >= k * d for n, k, d in zip(grid, kernel, dilation))


CASES = [c for c in itertools.product(GRIDS, KERNELS, DILATIONS) if _valid(*c)]
INVALID = [c for c in itertools.product(GRIDS, KERNELS, DILATIONS) if not _valid(*c)]
SLOW_CASES = [((64, 64), k, d) for k, d in itertools.product(KERNELS, DILATIONS)]
IDS = [f"{g[0]}x{g[1]}-k{k[0]}x{k[1]}-d{d[0]}" for g, k, d in CASES]
SLOW_IDS = [f"64x64-k{k[0]}x{k[1]}-d{d[0]}" for g, k, d in SLOW_CASES]


def _qkv(grid, seed, batch=2, heads=3, d=16, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, *grid, d, generator=g).requires_grad_(grad) for _ in range(3)]


def _run(backend, q, k, v, kernel, dilation, scale=0.25):
    with kernels.use_backend(backend):
        return kernels.neighborhood_attention(q, k, v, kernel, dilation, scale)


def _natten(q, k, v, kernel, dilation, scale=0.25):
    natten = pytest.importorskip("natten", reason="natten is not installed")
    heads_last = lambda t: t.permute(0, 2, 3, 1, 4)  # noqa: E731
    with torch.no_grad():
        out = natten.na2d(
            heads_last(q),
            heads_last(k),
            heads_last(v),
            kernel_size=kernel,
            dilation=dilation,
            scale=scale,
        )
    return out.permute(0, 3, 1, 2, 4)


def _max_err(a, b):
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


_NATTEN_REFS: dict = {}  # natten is slow to set up on CPU: one reference per case, shared


def _check_forward(backend, grid, kernel, dilation):
    q, k, v = _qkv(grid, seed=sum(grid) + 10 * kernel[0] + kernel[1] + 100 * dilation[0])
    key = (grid, kernel, dilation)
    if key not in _NATTEN_REFS:
        _NATTEN_REFS[key] = _natten(q, k, v, kernel, dilation)
    ref = _NATTEN_REFS[key]
    with torch.no_grad():
        out = _run(backend, q, k, v, kernel, dilation)
        dense = _run("masked", q, k, v, kernel, dilation)
    assert out.shape == q.shape
    assert _max_err(out, ref) <= 1e-5
    assert _max_err(out, dense) <= 1e-5


def _check_gradients(backend, grid, kernel, dilation):
    q, k, v = _qkv(grid, seed=7, grad=True)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    grads = {}
    for name in (backend, "masked"):
        out = _run(name, q, k, v, kernel, dilation)
        grads[name] = torch.autograd.grad((out * weight).sum(), (q, k, v))
    for mine, ref in zip(grads[backend], grads["masked"]):
        assert ref.abs().max() > 1e-3  # the reference gradient is not trivially zero
        assert _max_err(mine, ref) <= 1e-5


@pytest.mark.parametrize("backend", ["gather", "tiled", "flex", "masked"])
@pytest.mark.parametrize("grid,kernel,dilation", CASES, ids=IDS)
def test_forward_equals_natten_and_masked(backend, grid, kernel, dilation):
    _check_forward(backend, grid, kernel, dilation)


@pytest.mark.parametrize("backend", ["gather", "tiled"])
@pytest.mark.parametrize("grid,kernel,dilation", CASES, ids=IDS)
def test_gradients_equal_masked(backend, grid, kernel, dilation):
    _check_gradients(backend, grid, kernel, dilation)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gather", "tiled", "flex"])
@pytest.mark.parametrize("grid,kernel,dilation", SLOW_CASES, ids=SLOW_IDS)
def test_forward_large_grid(backend, grid, kernel, dilation):
    _check_forward(backend, grid, kernel, dilation)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gather", "tiled"])
@pytest.mark.parametrize("grid,kernel,dilation", SLOW_CASES, ids=SLOW_IDS)
def test_gradients_large_grid(backend, grid, kernel, dilation):
    _check_gradients(backend, grid, kernel, dilation)


@pytest.mark.parametrize("tile", [1, 3, 8, 16])
def test_tiled_result_does_not_depend_on_tile_size(tile):
    q, k, v = _qkv((13, 10), seed=5)
    ref = _natten(q, k, v, (5, 3), (2, 1))
    out = nb.tiled(q, k, v, (5, 3), (2, 1), 0.25, tile=tile)
    assert _max_err(out, ref) <= 1e-5


def test_grid_equal_to_kernel_attends_to_everything():
    # a 7x7 grid with a 7x7 kernel is global attention: every window is the whole grid
    q, k, v = _qkv((7, 7), seed=2)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), scale=0.25
    ).view_as(q)
    for backend in ("gather", "tiled", "flex", "masked"):
        with torch.no_grad():
            assert _max_err(_run(backend, q, k, v, (7, 7), (1, 1)), dense) <= 1e-5, backend


def test_rope_cosine_and_qk_norm_give_the_same_model_output_on_every_backend():
    # the attention module applies RoPE / cosine logits / QK norm before the kernel, so a model
    # using them gives the same output and parameter gradients through any backend
    from ditkit import spec as S
    from ditkit.builder import build

    spec = S.load("examples/tiny/tiny-hdit-neighborhood.yaml")
    torch.manual_seed(0)
    model = build(spec)
    perturb(model)  # leave the zero init so the attention path matters
    x, sigma = torch.randn(2, 3, 16, 24), torch.tensor([0.5, 2.0])
    outs, grads = {}, {}
    for backend in ("masked", "gather", "tiled"):
        model.zero_grad()
        with kernels.use_backend(backend):
            out = model(x, sigma, torch.tensor([1, 4]))
        out.square().mean().backward()
        outs[backend] = out.detach()
        grads[backend] = torch.cat(
            [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        )
    with torch.no_grad(), kernels.use_backend("flex"):
        outs["flex"] = model(x, sigma, torch.tensor([1, 4]))
    for backend in ("gather", "tiled", "flex"):
        assert _max_err(outs[backend], outs["masked"]) <= 1e-5, backend
    for backend in ("gather", "tiled"):
        assert _max_err(grads[backend], grads["masked"]) <= 1e-5, backend


# --------------------------------------------------------------------------------------------
# the switch


@pytest.mark.parametrize("grid,kernel,dilation", INVALID[:3])
def test_grid_smaller_than_kernel_times_dilation_is_a_clear_error(grid, kernel, dilation):
    q, k, v = _qkv(grid, seed=0)
    with pytest.raises(ValueError, match="smaller than kernel .* use a larger input"):
        _run("gather", q, k, v, kernel, dilation)


def test_auto_resolution(monkeypatch):
    with kernels.use_backend("auto"):
        assert kernels.resolve_backend(torch.device("cpu")) == "gather"
        monkeypatch.setattr(kernels, "natten_available", lambda: True)
        assert kernels.resolve_backend(torch.device("cuda")) == "natten"
        monkeypatch.setattr(kernels, "natten_available", lambda: False)
        assert kernels.resolve_backend(torch.device("cuda")) == "flex"
    with kernels.use_backend("auto", export=True):
        assert kernels.resolve_backend(torch.device("cuda")) == "gather"
        assert kernels.is_exporting()
    assert not kernels.is_exporting()


def test_export_refuses_a_non_exportable_choice():
    for name in ("natten", "flex", "masked"):
        with pytest.raises(ValueError, match=f"'{name}' cannot be exported.*gather, tiled"):
            with kernels.use_backend(name, export=True):
                pass
    with kernels.use_backend("tiled", export=True):
        assert kernels.resolve_backend(torch.device("cpu")) == "tiled"


def test_export_trace_under_a_non_exportable_choice_fails_clearly(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    with kernels.use_backend("masked"):
        with pytest.raises(ValueError, match="'masked' cannot be exported; select one of"):
            kernels.resolve_backend(torch.device("cpu"))


def test_exportable_backend_keeps_an_exportable_choice_and_replaces_others():
    with kernels.use_backend("tiled"), kernels.exportable_backend():
        assert kernels.current_backend() == "tiled" and kernels.is_exporting()
    with kernels.use_backend("natten"), kernels.exportable_backend():
        assert kernels.resolve_backend(torch.device("cpu")) == "gather"
    with pytest.raises(ValueError, match="'flex' cannot be exported"):
        with kernels.exportable_backend("flex"):
            pass
    assert kernels.current_backend() == "auto"


def test_natten_requested_but_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "natten_available", lambda: False)
    with pytest.raises(
        RuntimeError,
        match=r"natten is not installed .*pip install "
        r"--no-build-isolation 'ditkit\[natten\]'",
    ):
        with kernels.use_backend("natten"):
            pass


@pytest.mark.parametrize("backend", ["flex", "natten"])
def test_backward_on_cpu_through_flex_or_natten_is_a_clear_error(backend):
    q, k, v = _qkv((8, 8), seed=0, grad=True)
    with pytest.raises(
        RuntimeError, match=f"'{backend}' cannot backpropagate on CPU.*'gather' or 'tiled'"
    ):
        _run(backend, q, k, v, (3, 3), (1, 1))


def test_flex_block_masks_are_cached_per_grid_kernel_and_dilation():
    nb._block_masks.clear()
    a = nb.block_mask(9, 12, (3, 3), (1, 1), torch.device("cpu"))
    assert nb.block_mask(9, 12, (3, 3), (1, 1), torch.device("cpu")) is a
    assert nb.block_mask(9, 12, (3, 3), (2, 1), torch.device("cpu")) is not a
    assert nb.block_mask(12, 9, (3, 3), (1, 1), torch.device("cpu")) is not a
    assert len(nb._block_masks) == 3


def test_counting_ignores_the_backend():
    q, k, v = (torch.empty(2, 3, 12, 17, 16, device="meta") for _ in range(3))
    for backend in ("gather", "tiled", "masked"):
        with kernels.use_backend(backend), kernels.count_attention() as counts:
            kernels.neighborhood_attention(q, k, v, (7, 3), (1, 1), 0.25)
        assert counts == {"": 2 * 2 * 3 * 12 * 17 * 7 * 3 * 16}


# --------------------------------------------------------------------------------------------
# ditkit bench attention


@pytest.mark.slow
def test_bench_attention_command_prints_a_table(capsys):
    from ditkit.cli import main

    assert (
        main(
            [
                "bench",
                "attention",
                "--device",
                "cpu",
                "--backends",
                "gather,tiled",
                "--grids",
                "14",
                "--repeats",
                "1",
                "--kernel",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "kernel 3x3, 2 heads x 64 dims, batch 1, fp32 on CPU" in out
    for backend in ("gather", "tiled"):
        line = next(ln for ln in out.splitlines() if ln.startswith(backend))
        cells = line.split()
        assert cells[1] == "14x14" and float(cells[2].replace(",", "")) > 0  # fwd ms
        assert float(cells[4].replace(",", "")) > 0  # fwd+bwd ms


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--backends", "fast"], "--backends: unknown backend 'fast'"),
        (["--grids", "4"], "--grids '4': .* at least the kernel"),
        (["--kernel", "4", "--grids", "32"], "--kernel 4: neighborhood kernels must be odd"),
    ],
)
def test_bench_attention_bad_input_exits_2(argv, message, capsys):
    from ditkit.cli import main

    assert main(["bench", "attention", "--device", "cpu", *argv]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_bench_summary_reports_speedups_and_memory_growth():
    from ditkit.builder.bench import Row, format_table

    rows = [
        Row("masked", 128, "fwd", 400.0, 1000.0),
        Row("masked", 128, "fwd+bwd", 900.0, 2000),
        Row("gather", 128, "fwd", 20.0, 100.0),
        Row("gather", 128, "fwd+bwd", 30.0, 200.0),
        Row("gather", 256, "fwd", 80.0, 400.0),
        Row("gather", 256, "fwd+bwd", 120.0, 880.0),
        Row("masked", 256, "fwd", note="skipped: needs ~99 GiB > 10 GiB"),
        Row("masked", 256, "fwd+bwd", note="skipped: needs ~99 GiB > 10 GiB"),
    ]
    text = format_table(rows, "CPU", 7, 2, 64, 1)
    assert "gather fwd at 128x128: 20.0x faster than masked" in text
    assert "gather fwd+bwd at 128x128: 30.0x faster than masked" in text
    assert "gather fwd+bwd peak memory 128x128 -> 256x256: x4.40 (tokens x4)" in text
    assert "skipped: needs ~99 GiB > 10 GiB" in text


# ---- eager fast paths vs the traced (export) paths ----------------------------------------


@pytest.mark.parametrize(
    "grid,kernel,dilation", [((12, 17), (5, 3), (2, 1)), ((9, 9), (7, 7), (1, 1))]
)
@pytest.mark.parametrize("grids_a_chunk", [0, 2.5])
def test_chunked_gather_equals_the_one_pass_reference(
    grid, kernel, dilation, grids_a_chunk, monkeypatch
):
    # chunks of 3 queries within a grid (the last one partial), or of whole grids (2 per chunk
    # in the forward, 1 in the backward; 6 grids = batch 2 x 3 heads)
    queries = max(3, int(grids_a_chunk * grid[0] * grid[1]))
    monkeypatch.setattr(nb, "CHUNK_BYTES", queries * 2 * kernel[0] * kernel[1] * 16 * 4)
    q, k, v = _qkv(grid, seed=11, grad=True)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    results = []
    out_fn = nb.gather(q, k, v, kernel, dilation, 0.25).grad_fn.name()
    for fn in (nb.gather, nb.gather_reference):
        out = fn(q, k, v, kernel, dilation, 0.25)
        results.append((out.detach(), *torch.autograd.grad((out * weight).sum(), (q, k, v))))
    assert out_fn.startswith("_GatherAttention")  # the chunked path ran
    for mine, ref in zip(*results):
        assert _max_err(mine, ref) <= 1e-5


def test_gather_backward_accepts_an_expanded_gradient():
    q, k, v = _qkv((8, 8), seed=12, grad=True)
    nb.gather(q, k, v, (3, 3), (1, 1), 0.25).sum().backward()  # grad_out is expanded ones
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    nb.gather_reference(q, k, v, (3, 3), (1, 1), 0.25).sum().backward()
    for mine, t in zip(grads, (q, k, v)):
        assert _max_err(mine, t.grad) <= 1e-5


def test_chunk_loops_restore_the_thread_count(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    real_bmm = torch.bmm

    def bmm(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_bmm(*args, **kwargs)

    try:
        monkeypatch.setattr(nb, "LOOP_THREADS", 1)
        monkeypatch.setattr(torch, "bmm", bmm)
        q, k, v = _qkv((8, 8), seed=13, grad=True)
        nb.gather(q, k, v, (3, 3), (1, 1), 0.25).sum().backward()
        assert seen and set(seen) == {1}  # the loops ran on LOOP_THREADS threads
        assert torch.get_num_threads() == 2  # and the setting came back
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", ["gather", "tiled"])
def test_traced_path_equals_the_eager_path(backend, monkeypatch):
    # what export traces (no plan cache, boolean mask, one-pass gather) against the eager path
    q, k, v = _qkv((13, 10), seed=14, grad=True)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    results = []
    for eager in (True, False):
        monkeypatch.setattr(nb, "_eager", lambda *t, _e=eager: _e)
        out = _run(backend, q, k, v, (5, 3), (2, 1))
        results.append((out.detach(), *torch.autograd.grad((out * weight).sum(), (q, k, v))))
    for mine, ref in zip(*results):
        assert _max_err(mine, ref) <= 1e-5


def test_eager_detection_is_false_under_torch_export():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(nb._eager(x))
            return x + 1

    assert nb._eager(torch.zeros(2))
    torch.export.export(Probe(), (torch.zeros(2),))
    assert seen and not any(seen)
