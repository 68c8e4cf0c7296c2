"""``ditkit presets``: the built-in preset names."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("presets", help="list the built-in preset names")
    p.set_defaults(func=run)


def run(args) -> int:
    from ditkit.spec.presets import PRESETS

    for name in PRESETS:
        print(name)
    return 0
