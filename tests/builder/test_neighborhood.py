"""The reference neighborhood attention equals ``natten.na2d`` (NATTEN's border rule)."""

import pytest
import torch

from ditkit.builder import kernels

natten = pytest.importorskip(
    "natten", reason="natten is not installed (pip install natten --no-build-isolation)"
)

CASES = [  # (H, W, kernel, dilation)
    (7, 7, (3, 3), (1, 1)),
    (7, 7, (7, 7), (1, 1)),
    (8, 8, (5, 5), (1, 1)),
    (12, 17, (5, 5), (1, 1)),
    (12, 17, (7, 3), (1, 1)),
    (31, 9, (3, 3), (2, 2)),
    (16, 10, (5, 3), (2, 3)),
    (9, 13, (3, 5), (3, 2)),
]


def _qkv(h, w, seed=0, batch=2, heads=3, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, h, w, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("h,w,kernel,dilation", CASES)
def test_gather_equals_natten(h, w, kernel, dilation):
    q, k, v = _qkv(h, w)
    scale = 8**-0.5
    with kernels.use_backend("gather"):
        ours = kernels.neighborhood_attention(q, k, v, kernel, dilation, scale)
    heads_last = lambda t: t.float().permute(0, 2, 3, 1, 4)  # noqa: E731
    ref = natten.na2d(
        heads_last(q),
        heads_last(k),
        heads_last(v),
        kernel_size=kernel,
        dilation=dilation,
        scale=scale,
    ).permute(0, 3, 1, 2, 4)
    assert (ours.float() - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("h,w,kernel,dilation", CASES)
def test_gather_equals_masked_dense(h, w, kernel, dilation):
    q, k, v = _qkv(h, w, seed=1)
    with kernels.use_backend("gather"):
        a = kernels.neighborhood_attention(q, k, v, kernel, dilation, 0.3)
    with kernels.use_backend("masked"):
        b = kernels.neighborhood_attention(q, k, v, kernel, dilation, 0.3)
    assert (a - b).abs().max() <= 1e-10


def test_window_indices_shift_inward_at_borders():
    idx = kernels.window_start_index(7, 3, 1)
    assert idx[0].tolist() == [0, 1, 2] and idx[3].tolist() == [2, 3, 4]
    assert idx[6].tolist() == [4, 5, 6]
    dil = kernels.window_start_index(10, 3, 2)
    assert dil[9].tolist() == [5, 7, 9] and dil[0].tolist() == [0, 2, 4]


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        with kernels.use_backend("fast"):
            pass


def _brute_force_window(n, kernel, dilation, i):
    """NATTEN's window by its definition: among the runs of ``kernel`` consecutive members of
    i's dilation group that contain i, the one whose middle member is nearest to i."""
    members = list(range(i % dilation, n, dilation))
    runs = [
        members[s : s + kernel]
        for s in range(len(members) - kernel + 1)
        if i in members[s : s + kernel]
    ]
    return min(runs, key=lambda run: abs(run[kernel // 2] - i))


@pytest.mark.parametrize(
    "n,kernel,dilation",
    [
        (3, 3, 1),
        (7, 7, 1),
        (8, 3, 2),
        (9, 3, 3),
        (10, 5, 2),
        (11, 3, 2),
        (12, 5, 2),
        (17, 7, 1),
        (31, 3, 2),
        (31, 7, 2),
        (14, 7, 2),
        (64, 7, 1),
    ],
)
def test_window_indices_match_the_definition(n, kernel, dilation):
    idx = kernels.window_start_index(n, kernel, dilation)
    assert idx.shape == (n, kernel)
    for i in range(n):
        assert idx[i].tolist() == _brute_force_window(n, kernel, dilation, i), i
