"""The ``ditkit`` command: the top floor. Thin: it parses arguments, calls the library, prints.

Each command is a module of this package with ``add_parser(subparsers)``, which registers its
parser with ``set_defaults(func=...)``. Command modules import nothing heavy at module level
(torch, onnx): ``ditkit --help``, ``--version``, ``presets``, ``schema`` and ``validate`` start
without torch. Errors become exit codes in one place, :func:`ditkit.cli.common.run_command`:
bad input prints one line naming the field and the fix and exits 2, a refusing machine (disk
full, read-only, no permission) exits 1; ``--debug`` or ``DITKIT_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import sys

from . import (
    bench,
    convert,
    demo,
    describe,
    diff,
    encode,
    evaluate,
    export,
    extrapolate,
    presets,
    sample,
    schema,
    shards,
    train,
    trt,
    validate,
)
from .common import Parser, run_command

# the order of `ditkit --help`
COMMANDS = (
    describe,
    diff,
    validate,
    schema,
    presets,
    demo,
    bench,
    convert,
    sample,
    export,
    trt,
    train,
    evaluate,
    encode,
    shards,
    extrapolate,
)


def build_parser() -> Parser:
    from ditkit import __version__

    parser = Parser(
        prog="ditkit",
        description=__doc__.splitlines()[0],
        epilog="Every command also takes --no-size-limits: specs, batches and step counts "
        "beyond the built-in size limits, for people who have the memory.",
    )
    parser.add_argument("--version", action="version", version=f"ditkit {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show tracebacks for handled errors too (also DITKIT_DEBUG=1)",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--no-size-limits" in argv:  # accepted by every command: lifts ditkit.spec.limits
        import os

        from ditkit.spec.limits import ENV

        argv = [a for a in argv if a != "--no-size-limits"]
        os.environ[ENV] = "1"
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


__all__ = ["main", "build_parser", "COMMANDS", "run_command"]

if __name__ == "__main__":  # pragma: no cover - `python -m ditkit.cli` runs __main__.py
    sys.exit(main())
