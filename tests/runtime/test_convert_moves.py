"""The move declarations of ditkit.runtime.convert.remap: one list, both directions."""

import pytest
import torch

from ditkit.runtime.convert import remap
from ditkit.runtime.convert.remap import Concat, ConversionError, Derived, Move, Transform

TRANSPOSE = Transform(lambda t: t.T.contiguous(), lambda t: t.T.contiguous())


def _moves(freqs):
    return [
        Move("a.weight", "x.weight", TRANSPOSE),
        Move("a.bias", "x.bias"),
        Concat(("n1.w", "n2.w"), "mod.w"),
        Derived(
            "rope.freqs",
            freqs,
            dtype_of="x.weight",
            wrong_shape="needs {shape}",
            wrong_value="{source} differs (max abs diff {diff:.3g})",
        ),
    ]


def _source(freqs):
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "a.bias": torch.randn(5, generator=g),
        "n1.w": torch.randn(2, 4, generator=g),
        "n2.w": torch.randn(2, 4, generator=g),
        "rope.freqs": freqs.clone(),
    }


def test_one_list_converts_both_ways_bit_for_bit():
    freqs = torch.arange(6.0).view(2, 3)
    src = _source(freqs)
    expected = {"x.weight": (5, 3), "x.bias": (5,), "mod.w": (4, 4)}
    out = remap.to_ditkit(_moves(freqs), src, "test", expected)
    assert set(out) == set(expected)
    assert torch.equal(out["x.weight"], src["a.weight"].T)
    assert torch.equal(out["mod.w"][2:], src["n2.w"])
    back = remap.from_ditkit(_moves(freqs), out, "test")
    assert list(back) == list(src)
    assert all(torch.equal(back[k], src[k]) for k in src)


def test_derived_tensors_are_checked_in_and_regenerated_in_the_weights_dtype():
    freqs = torch.arange(6.0).view(2, 3)
    src = _source(freqs)
    src["rope.freqs"] = src["rope.freqs"] + 0.5
    with pytest.raises(ConversionError, match=r"rope.freqs differs \(max abs diff 0.5\)"):
        remap.to_ditkit(_moves(freqs), src, "test", None)
    src["rope.freqs"] = torch.zeros(3, 2)
    with pytest.raises(ConversionError, match=r"rope.freqs: got \(3, 2\), needs \(2, 3\)"):
        remap.to_ditkit(_moves(freqs), src, "test", None)
    half = {
        "x.weight": torch.zeros(5, 3, dtype=torch.float16),
        "x.bias": torch.zeros(5),
        "mod.w": torch.zeros(4, 4),
    }
    assert remap.from_ditkit(_moves(freqs), half, "test")["rope.freqs"].dtype == torch.float16


def test_a_missing_tensor_is_reported_in_either_direction():
    freqs = torch.arange(6.0).view(2, 3)
    src = _source(freqs)
    del src["n2.w"]
    with pytest.raises(ConversionError, match="missing.*n2.w"):
        remap.to_ditkit(_moves(freqs), src, "test", None)
    with pytest.raises(ConversionError, match="missing.*mod.w"):
        remap.from_ditkit(
            _moves(freqs), {"x.weight": torch.zeros(5, 3), "x.bias": torch.zeros(5)}, "test"
        )
