"""Resolution-adaptation policies, as data (HDiT section 4.1, MDiT appendices I and J).

A policy turns a spec trained at one resolution into a spec for another resolution; the
runtime (``ditkit.runtime.extrapolate``) applies it to the weights too. Pure data, no torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, NonNegativeInt, PositiveInt, model_validator

from .components import NoRopeScaling, RopeScaling, Spec


class _Options(Spec):
    """Options every policy kind takes, applied after its own change, per level, wherever a
    level's token grid differs from the trained one (so at the training resolution, and on the
    levels a policy keeps at their trained grid, they change nothing).

    ``rope_scaling``: ``ntk`` or ``yarn`` (:class:`ditkit.spec.NtkScaling`,
    :class:`ditkit.spec.YarnScaling`): RoPE positions keep the trained spacing and the
    frequencies are rescaled by the level's grid ratio.
    ``attention_scaling``: ``entropy`` multiplies each attention's logits by
    ``log(n') / log(n)``, ``n`` the tokens one query attends to (the whole grid for global
    attention and aggregate attention's coarse grid; a neighborhood or window attends to a fixed
    count, so there it is a no-op)."""

    rope_scaling: RopeScaling = Field(default_factory=NoRopeScaling)
    attention_scaling: Literal["none", "entropy"] = "none"

    @model_validator(mode="after")
    def _derived_left_out(self) -> "_Options":
        given = [
            n
            for n in ("scale", "trained_length")
            if getattr(self.rope_scaling, n, None) is not None
        ]
        if given:
            raise ValueError(
                f"rope_scaling.{given[0]} is derived per level from the "
                "resolution in a policy; leave it out"
            )
        if self.rope_scaling.kind != "none" and getattr(self, "rope", "keep") != "keep":
            raise ValueError(
                "rope_scaling sets the positions itself (trained spacing, "
                "rescaled frequencies); leave rope at keep"
            )
        return self


class AsIs(_Options):
    """Same modules on the new grid. ``rope``: ``keep`` the positions as trained;
    ``interpolate`` keeps positions inside the trained range (HDiT's normalised positions do
    this by themselves; integer positions get scaled down); ``extrapolate`` keeps the trained
    spacing (integer positions do this by themselves; normalised ones get scaled up). Both act
    through ``rope.position_scale`` (= a frequency rescaling)."""

    kind: Literal["as_is"] = "as_is"
    rope: Literal["keep", "interpolate", "extrapolate"] = "keep"


class LocalCore(_Options):
    """Replace global attention with neighborhood attention of ``kernel_size`` in ``levels``
    (default: every level that uses global attention); weights unchanged (MDiT appendix I uses
    k = 15 for a 16x16 core)."""

    kind: Literal["local_core"] = "local_core"
    levels: tuple[NonNegativeInt, ...] | None = None
    kernel_size: PositiveInt = 15


class AddLevels(_Options):
    """HDiT: for each doubling of resolution add one level outside (a copy of the outermost
    level's design: same attention, ``d_model``, depth, merge and skip), so the inner levels
    keep their token grids. ``share_weights`` initialises the new levels' blocks from the
    outermost trained level; otherwise they (and the new merges/splits) start fresh."""

    kind: Literal["add_levels"] = "add_levels"
    d_model: PositiveInt | None = None
    depth: NonNegativeInt | None = None
    share_weights: bool = False


def _merge_factor(value: Any) -> Any:
    """``auto`` or a whole number >= 1, checked before the union so that a bad value gets one
    message instead of one per branch."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"a whole number >= 1 or auto, got {value!r}")


class CorePatch(_Options):
    """MDiT appendix J: enlarge the merge factor of transition ``level`` (e.g. 2 -> 4) so the
    inner levels keep their token grid; the merge/split projections are re-initialised by
    replication (a constant patch maps to the same token as before)."""

    kind: Literal["core_patch"] = "core_patch"
    level: NonNegativeInt = 0
    factor: Annotated[PositiveInt | Literal["auto"], BeforeValidator(_merge_factor)] = "auto"
    """The new merge factor, or ``auto``: the trained factor times the resolution ratio, so the
    inner levels keep exactly their trained grid (and at the training resolution the policy is
    a no-op)."""


Policy = Annotated[Union[AsIs, LocalCore, AddLevels, CorePatch], Field(discriminator="kind")]
