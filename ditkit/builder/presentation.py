"""How each attention kind is shown: its legend name and colours (diagrams), its box text
(diagrams), its column text (``ditkit describe``) and its head count -- in one place.

A new attention kind adds one row to :data:`ATTENTION_LOOKS` and one case to
:func:`attention_text` (exhaustive: ``assert_never``). A kind of the spec's ``Attention``
union without a row is an error when this module is imported, so no drawing can reach a kind
it has no colour for (``tests/builder/test_presentation.py`` checks it too)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import assert_never

from ditkit import spec as S


@dataclass(frozen=True)
class AttentionLook:
    """``legend``: the kind's name in a diagram's legend; ``fill`` / ``edge``: its boxes'
    colours."""

    legend: str
    fill: str
    edge: str


#: every attention kind of the spec, in legend order
ATTENTION_LOOKS: dict[type, AttentionLook] = {
    S.GlobalAttention: AttentionLook("global", "#d6e4f5", "#3b6ea8"),
    S.NeighborhoodAttention: AttentionLook("neighborhood", "#d8eedb", "#3c8a4a"),
    S.ShiftedWindowAttention: AttentionLook("shifted window", "#fbe3c8", "#c0701c"),
    S.AggregateAttention: AttentionLook("aggregate", "#e6dcf3", "#7650a8"),
    S.NoAttention: AttentionLook("no attention", "#ececec", "#7a7a7a"),
}


def attention_kinds() -> tuple[type, ...]:
    """The variant classes of the spec's ``Attention`` union."""
    union = typing.get_args(S.Attention)[0]  # Annotated[Union[...], Field] -> Union[...]
    return typing.get_args(union)


def kind_of(cls: type[S.Spec]) -> str:
    """A variant class's ``kind`` string (``S.NeighborhoodAttention`` -> ``neighborhood``)."""
    return str(cls.model_fields["kind"].default)


_missing = [c.__name__ for c in attention_kinds() if c not in ATTENTION_LOOKS]
if _missing:
    raise TypeError(
        f"ditkit.builder.presentation.ATTENTION_LOOKS has no entry for "
        f"{', '.join(_missing)}: add its legend name and colours"
    )

#: ``kind`` string -> look (a diagram element records the kind as a string)
LOOK_OF_KIND: dict[str, AttentionLook] = {kind_of(c): look for c, look in ATTENTION_LOOKS.items()}


@dataclass(frozen=True)
class AttentionText:
    """``box``: a diagram box's first line; ``column``: ``ditkit describe``'s attention
    column."""

    box: str
    column: str


def attention_text(att: S.Attention) -> AttentionText:
    """The texts of one block's attention, with its parameters."""
    match att:
        case S.GlobalAttention():
            return AttentionText("global attention", "global")
        case S.NeighborhoodAttention(kernel_size=k, dilation=d):
            (kh, kw), (dh, dw) = S.pair(k), S.pair(d)
            plain = (dh, dw) == (1, 1)
            return AttentionText(
                f"neighborhood {kh}×{kw}" + ("" if plain else f" dil {dh}×{dw}"),
                f"neighborhood {kh}x{kw}" + ("" if plain else f" dil {dh}x{dw}"),
            )
        case S.ShiftedWindowAttention(window_size=w, shift=shift):
            return AttentionText(
                f"shifted window {w}×{w}" + (" (alt.)" if shift == "alternate" else ""),
                f"shifted_window {w}",
            )
        case S.AggregateAttention(factor=f):
            return AttentionText(f"aggregate {f}×{f}", "aggregate")
        case S.NoAttention():
            return AttentionText("no attention", "none")
        case other:
            assert_never(other)


def attention_heads(att: S.Attention, d_model: int, d_head: int) -> int | None:
    """Attention heads of a block: ``d_model / d_head``, unless the kind declares its own
    count (aggregate attention); None without attention."""
    match att:
        case S.AggregateAttention(n_heads=n):
            return n
        case S.NoAttention():
            return None
        case _:
            return d_model // d_head
