"""Field-by-field differences between two model specs, as data.

``diff(a, b)`` compares the full data of two specs (every field, defaults written out) and
returns one :class:`Change` per differing leaf: its field path, the value in ``a`` and the value
in ``b``. Two rules keep the rows readable:

- a variant whose ``kind`` changed (``attention: global -> neighborhood``) is one row holding
  both whole variants, not a row per field of either;
- levels are aligned before they are compared (``align_levels``), so a spec with a level added
  outside (HDiT's ``add_levels`` policy) shows one added level, not every level shifted by one.
  A level path names both indices when they differ: ``levels[0→1].d_model`` is level 0 of ``a``
  against level 1 of ``b``.

Pure data: no torch. The diagram (``ditkit.builder.diagram``) uses the same level alignment to
highlight what differs.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any

from .io import to_data
from .model import Level, ModelSpec


class _Missing:
    """The value on the side of a diff where a field or a level does not exist."""

    _instance = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()


@dataclass(frozen=True)
class Change:
    """One differing field. ``a`` / ``b`` are plain data (or ``MISSING``); ``level_a`` /
    ``level_b`` are the level indices the path is under on each side (``None`` outside levels
    or where the level does not exist on that side)."""

    path: str
    a: Any
    b: Any
    level_a: int | None = None
    level_b: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "a": _json_value(self.a),
            "b": _json_value(self.b),
            "level_a": self.level_a,
            "level_b": self.level_b,
        }


def _json_value(v: Any) -> Any:
    return None if v is MISSING else v


def align_levels(a: ModelSpec, b: ModelSpec) -> list[tuple[int | None, int | None]]:
    """Pairs ``(index in a, index in b)`` in outer -> inner order; ``None`` on the side where a
    level has no counterpart (added or removed). Identical levels are matched first (longest
    common runs, ``difflib``); what remains between two matches is paired position by position,
    and the surplus on one side counts as added / removed."""
    ka = [_level_key(lvl) for lvl in a.levels]
    kb = [_level_key(lvl) for lvl in b.levels]
    pairs: list[tuple[int | None, int | None]] = []
    for tag, i0, i1, j0, j1 in difflib.SequenceMatcher(a=ka, b=kb, autojunk=False).get_opcodes():
        if tag == "equal":
            pairs += [(i0 + k, j0 + k) for k in range(i1 - i0)]
            continue
        na, nb = i1 - i0, j1 - j0
        n = min(na, nb)
        # pair the inner ends: levels are added or removed outside (as add_levels does)
        extra_a = [(i0 + k, None) for k in range(na - n)]
        extra_b = [(None, j0 + k) for k in range(nb - n)]
        pairs += extra_a + extra_b + [(i1 - n + k, j1 - n + k) for k in range(n)]
    return pairs


def _level_key(level: Level) -> str:
    return json.dumps(to_data(level, full=True), sort_keys=True)


def diff(a: ModelSpec, b: ModelSpec) -> list[Change]:
    """Every differing field of ``a`` and ``b`` (empty when the specs are equal)."""
    da, db = to_data(a, full=True), to_data(b, full=True)
    rows: list[Change] = []
    for key in _keys(da, db):
        if key == "levels":  # compared below, level by level
            continue
        _compare(key, da.get(key, MISSING), db.get(key, MISSING), rows, None, None)
    # levels last: they are the body of the model and usually where the differences are
    levels: list[Change] = []
    for ia, ib in align_levels(a, b):
        if ia is None:
            assert ib is not None  # align_levels never pairs two gaps
            levels.append(Change(f"levels[→{ib}]", MISSING, _set(b.levels[ib]), None, ib))
        elif ib is None:
            levels.append(Change(f"levels[{ia}→]", _set(a.levels[ia]), MISSING, ia, None))
        else:
            name = f"levels[{ia}]" if ia == ib else f"levels[{ia}→{ib}]"
            _compare(name, da["levels"][ia], db["levels"][ib], levels, ia, ib)
    # the top-level fields keep the spec's own order, levels after them
    return rows + levels


def _set(level: Level) -> dict[str, Any]:
    """A whole level as it would be written: its fields that are set (inherited ones left out)."""
    return {k: v for k, v in to_data(level).items() if v is not None}


def _keys(da: dict[str, Any], db: dict[str, Any]) -> list[str]:
    return list(da) + [k for k in db if k not in da]


def _compare(
    path: str, va: Any, vb: Any, out: list[Change], la: int | None, lb: int | None
) -> None:
    if va == vb:
        return
    if isinstance(va, dict) and isinstance(vb, dict) and va.get("kind") == vb.get("kind"):
        for key in _keys(va, vb):
            _compare(f"{path}.{key}", va.get(key, MISSING), vb.get(key, MISSING), out, la, lb)
        return
    if (
        isinstance(va, list)
        and isinstance(vb, list)
        and va
        and vb
        and all(isinstance(v, dict) for v in va + vb)
    ):
        for k in range(max(len(va), len(vb))):
            _compare(
                f"{path}[{k}]",
                va[k] if k < len(va) else MISSING,
                vb[k] if k < len(vb) else MISSING,
                out,
                la,
                lb,
            )
        return
    out.append(Change(path, va, vb, la, lb))


def format_value(value: Any, limit: int | None = None) -> str:
    """A value as one line of flow YAML-ish text (``-`` where it is missing)."""
    if value is MISSING:
        return "-"
    if isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = json.dumps(value, separators=(", ", ": "), ensure_ascii=False)
        text = text.replace('"', "")
    if limit is not None and len(text) > limit:
        text = text[: max(1, limit - 1)] + "…"
    return text


def format_diff(rows: list[Change], name_a: str = "a", name_b: str = "b") -> str:
    """The rows as an aligned three-column text table."""
    if not rows:
        return f"{name_a} and {name_b} are the same spec (no field differs)"
    table = [("field", name_a, name_b)] + [
        (r.path, format_value(r.a), format_value(r.b)) for r in rows
    ]
    w0 = max(len(r[0]) for r in table)
    w1 = min(48, max(len(r[1]) for r in table))
    lines = []
    for k, (p, x, y) in enumerate(table):
        lines.append(f"{p.ljust(w0)}  {x.ljust(w1)}  {y}".rstrip())
        if k == 0:
            lines.append(f"{'-' * w0}  {'-' * w1}  {'-' * max(4, len(name_b))}")
    lines.append(f"{len(rows)} field(s) differ")
    return "\n".join(lines)


__all__ = ["Change", "MISSING", "align_levels", "diff", "format_diff", "format_value"]
