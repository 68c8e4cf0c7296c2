"""``ditkit validate``: check spec files; exit 2 if any is invalid."""

from __future__ import annotations

import json
import sys

from ditkit.errors import UserError

from .common import add_json, add_set, load_spec, parse_resolution


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="validate spec files; exit 2 if any is invalid")
    p.add_argument("specs", nargs="+", help="spec files, preset names or checkpoints")
    p.add_argument("--resolution", help="also check that the specs run at this resolution")
    add_set(p, "specs")
    add_json(p, "print one JSON object: per spec, ok or its problems (field, message)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ditkit import spec as S

    failed = 0
    res = parse_resolution(args.resolution)
    rows = []
    for ref in args.specs:
        try:
            spec = load_spec(ref, overrides=args.overrides)
            if res:
                issues = spec.check_resolution(res, "--resolution")
                if issues:
                    raise S.SpecError(issues, f"{ref} at {res[0]}x{res[1]}")
            rows.append({"spec": ref, "ok": True, "name": spec.name})
            if not args.json:
                print(f"ok  {ref} ({spec.name})")
        except UserError as err:
            issues = getattr(err, "issues", None) or [("", str(err))]
            rows.append({"spec": ref, "ok": False,
                         "problems": [{"field": f, "message": m} for f, m in issues]})
            if not args.json:
                print(str(err), file=sys.stderr)
            failed += 1
    if args.json:
        print(json.dumps({"ok": not failed, "specs": rows}, indent=2))
    return 2 if failed else 0
