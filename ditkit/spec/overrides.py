"""Command-line overrides of spec fields: ``--set training.batch_size=8 --set optimizer.lr=3e-4``.

An override is ``PATH=VALUE``. ``PATH`` is dotted field names; list items are numbered from 0
(``levels.1.d_model=512``, also ``levels[1].d_model``). ``VALUE`` is read as YAML (``8`` is an
int, ``true`` a bool, ``[64, 64]`` a list, ``{kind: global}`` a mapping, ``null`` clears an
optional field), and a number written without a dot such as ``3e-4`` is a float, as a person
means it. Overrides change the plain data before validation, so the result goes through the
same schema as the file and a wrong name or value gets the same field-named error.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from .io import MAX_NESTING, SpecError, StrictLoader, nesting_depth

SOURCE = "--set"
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``"a.b.0.c=v"`` -> ``(["a", "b", 0, "c"], value)``."""

    path, eq, raw = text.partition("=")
    path = re.sub(r"\[(\d+)\]", r".\1", path.strip())
    keys = path.split(".") if path else []
    if not eq or not keys or any(not k for k in keys):
        raise SpecError(
            [
                (
                    "",
                    f"{text!r}: write PATH=VALUE, e.g. training.batch_size=8 or "
                    "levels.0.d_model=256",
                )
            ],
            SOURCE,
        )
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw.strip() else None
    except yaml.YAMLError as err:
        raise SpecError(
            [(path, f"value {raw[:40]!r} is not valid YAML ({err.problem})")], SOURCE
        ) from None
    except RecursionError:
        raise SpecError([(path, "the value is nested too deeply")], SOURCE) from None
    except ValueError as err:  # int(): more digits than sys.get_int_max_str_digits()
        raise SpecError(
            [
                (
                    path,
                    f"the value could not be read ({str(err).split(';')[0]}); "
                    "no spec field takes a number that long",
                )
            ],
            SOURCE,
        ) from None
    if nesting_depth(value) > MAX_NESTING:
        raise SpecError(
            [(path, f"the value is nested more than {MAX_NESTING} levels deep")], SOURCE
        )
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)
    return [int(k) if k.isdigit() else k for k in keys], value


def _text(keys: list[str | int]) -> str:
    return ".".join(str(k) for k in keys)


def set_path(data: dict[str, Any], keys: list[str | int], value: Any) -> None:
    """Set ``data[keys[0]][keys[1]]... = value`` in place; missing mappings are created (the
    schema then names an unknown field), list indices must exist."""
    node: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = _text(keys[:depth]) or "the top level"
        if isinstance(node, dict):
            if isinstance(key, int):
                key = str(key)
            if last:
                node[key] = value
                return
            if not isinstance(node.get(key), (dict, list)):
                node[key] = {} if node.get(key) is None else node[key]
                if not isinstance(node[key], (dict, list)):
                    raise SpecError(
                        [
                            (
                                _text(keys[: depth + 1]),
                                f"is {node[key]!r}, not a mapping or list; set "
                                f"{_text(keys[: depth + 1])}=VALUE instead",
                            )
                        ],
                        SOURCE,
                    )
            node = node[key]
        elif isinstance(node, list):
            if not isinstance(key, int):
                raise SpecError(
                    [
                        (
                            _text(keys[: depth + 1]),
                            f"{where} is a list; index it with a number (0..{len(node) - 1})",
                        )
                    ],
                    SOURCE,
                )
            if key >= len(node):
                raise SpecError(
                    [
                        (
                            _text(keys[: depth + 1]),
                            f"{where} has {len(node)} item(s) (0..{len(node) - 1})",
                        )
                    ],
                    SOURCE,
                )
            if last:
                node[key] = value
                return
            node = node[key]
        else:  # pragma: no cover - guarded above
            raise SpecError([(_text(keys[:depth]), "is not a mapping or list")], SOURCE)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of the plain ``data`` with every ``PATH=VALUE`` of ``overrides`` applied in
    order."""
    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        set_path(out, keys, value)
    return out


def touches(overrides: list[str] | tuple[str, ...], prefix: str) -> bool:
    """Whether any override's path starts with the field ``prefix``."""
    return any(parse_override(o)[0][0] == prefix for o in overrides)
