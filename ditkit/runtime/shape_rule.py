"""The valid input shapes of a network or an exported graph: an :class:`AxisRule` per spatial
axis and :func:`check_shape`. Pure data on the runtime floor, so the denoiser contract
(:mod:`ditkit.runtime.protocols`) and the deploy floor's exporter and engines share it."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ditkit import spec as S
from ditkit.errors import UserError

MAX_SIDE = 8192  # largest exported H / W (pixels or latents)


class ExportError(UserError):
    """An export that cannot be done or did not pass its checks (the message says which)."""


@dataclass(frozen=True)
class AxisRule:
    """Valid sizes of one axis: ``minimum + k * step`` for ``k >= 0`` (up to ``maximum``)."""

    minimum: int
    step: int
    maximum: int = MAX_SIDE

    def valid(self, n: int) -> bool:
        return self.minimum <= n <= self.maximum and (n - self.minimum) % self.step == 0

    def text(self) -> str:
        return (
            f"{self.minimum} + k*{self.step}"
            if self.minimum % self.step
            else f"multiple of {self.step}, >= {self.minimum}"
        )


def check_shape(
    spec: S.ModelSpec, shape, rules: tuple[AxisRule, AxisRule] | None = None, where: str = "input"
) -> None:
    """Raise :class:`ExportError` naming the rule if ``(B, C, H, W)`` is not valid."""
    if len(shape) != 4 or shape[1] != spec.input.channels:
        raise ExportError(
            f"{where}: expected (batch, {spec.input.channels}, H, W), got {tuple(shape)}"
        )
    issues = spec.check_resolution((int(shape[2]), int(shape[3])), where)
    if issues:
        raise ExportError("; ".join(f"{p}: {m}" for p, m in issues))
    if rules is not None:
        for n, rule, name in zip(shape[2:], rules, ("height", "width")):
            if not rule.valid(int(n)):
                raise ExportError(
                    f"{where}: {name} {n} is outside this model's rule "
                    f"({rule.text()}, <= {rule.maximum})"
                )


def rules_from_metadata(meta: dict[str, str]) -> tuple[AxisRule, AxisRule] | None:
    """The ``(height, width)`` rule recorded in an exported file's ``ditkit.resolution_rule``
    metadata, or ``None`` when it records none."""

    try:
        rule = json.loads(meta.get("ditkit.resolution_rule", "{}"))
        if not rule:
            return None
        height, width = (
            AxisRule(rule[a]["min"], rule[a]["step"], rule[a]["max"]) for a in ("height", "width")
        )
        return height, width
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise UserError(
            f"metadata ditkit.resolution_rule is damaged ({type(err).__name__}: "
            f"{str(err)[:120]}); re-export the model with `ditkit export`"
        ) from None
