"""Every attention kind of the spec has its presentation (legend name, colours, texts), and a
kind without one is an error when the presentation module is imported, not at draw time."""

import re
import runpy
from typing import Annotated, Literal, Union

import pytest
from pydantic import Field

from ditkit import spec as S
from ditkit.builder import presentation as P

KINDS = P.attention_kinds()


def test_the_union_is_read_from_the_spec():
    assert S.GlobalAttention in KINDS and S.NoAttention in KINDS
    assert {P.kind_of(c) for c in KINDS} == {
        "global",
        "neighborhood",
        "shifted_window",
        "aggregate",
        "none",
    }


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
def test_every_attention_kind_has_a_label_and_colours(cls):
    look = P.ATTENTION_LOOKS[cls]
    assert look.legend.strip()
    assert re.fullmatch(r"#[0-9a-f]{6}", look.fill) and re.fullmatch(r"#[0-9a-f]{6}", look.edge)
    assert P.LOOK_OF_KIND[P.kind_of(cls)] is look
    text = P.attention_text(cls.model_construct())  # defaults only: the texts need no more
    assert text.box.strip() and text.column.strip()


def test_kinds_are_told_apart():
    looks = list(P.ATTENTION_LOOKS.values())
    assert len({lk.legend for lk in looks}) == len(looks)
    assert len({lk.fill for lk in looks}) == len(looks)


def test_texts_carry_the_parameters():
    nb = P.attention_text(S.NeighborhoodAttention(kernel_size=5, dilation=2))
    assert (nb.box, nb.column) == ("neighborhood 5×5 dil 2×2", "neighborhood 5x5 dil 2x2")
    sw = P.attention_text(S.ShiftedWindowAttention(window_size=4))
    assert (sw.box, sw.column) == ("shifted window 4×4 (alt.)", "shifted_window 4")
    assert P.attention_heads(S.AggregateAttention(n_heads=18), 768, 64) == 18
    assert P.attention_heads(S.GlobalAttention(), 768, 64) == 12
    assert P.attention_heads(S.NoAttention(), 768, 64) is None


def test_a_kind_without_colours_fails_at_import(monkeypatch):
    class RingAttention(S.GlobalAttention):
        kind: Literal["ring"] = "ring"

    union = Annotated[Union[(*KINDS, RingAttention)], Field(discriminator="kind")]
    monkeypatch.setattr(S, "Attention", union)
    with pytest.raises(TypeError, match="ATTENTION_LOOKS has no entry for RingAttention"):
        runpy.run_path(P.__file__)
