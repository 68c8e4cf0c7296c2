"""``ditkit validate``: check spec files; exit 2 if any is invalid."""

from __future__ import annotations

import sys

from ditkit.errors import UserError

from .common import load_spec, parse_resolution


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="validate spec files; exit 2 if any is invalid")
    p.add_argument("specs", nargs="+", help="spec files, preset names or checkpoints")
    p.add_argument("--resolution", help="also check that the specs run at this resolution")
    p.set_defaults(func=run)


def run(args) -> int:
    from ditkit import spec as S

    failed = 0
    res = parse_resolution(args.resolution)
    for ref in args.specs:
        try:
            spec = load_spec(ref)
            if res:
                issues = spec.check_resolution(res, "--resolution")
                if issues:
                    raise S.SpecError(issues, f"{ref} at {res[0]}x{res[1]}")
            print(f"ok  {ref} ({spec.name})")
        except UserError as err:
            print(str(err), file=sys.stderr)
            failed += 1
    return 2 if failed else 0
