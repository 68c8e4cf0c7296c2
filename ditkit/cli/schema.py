"""``ditkit schema``: the JSON Schema of model specs (or of experiments)."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("schema", help="write the JSON Schema of the spec language")
    p.add_argument("--out", help="file to write (default: stdout)")
    p.add_argument(
        "--experiment",
        action="store_true",
        help="the schema of experiment files (`ditkit train`) instead of model specs",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ditkit import spec as S

    if args.experiment:
        from ditkit.spec.experiment import Experiment

        schema = S.json_schema(Experiment)
    else:
        schema = S.json_schema()
    text = json.dumps(schema, indent=2) + "\n"
    if args.out:
        from ditkit.files import write_text

        write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0
