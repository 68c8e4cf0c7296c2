"""``ditkit describe``: the per-level table of tokens, widths, params and GMACs."""

from __future__ import annotations

import json

from .common import load_spec, parse_resolution


def add_parser(sub) -> None:
    p = sub.add_parser("describe", help="per-level table of tokens, widths, params and GMACs")
    p.add_argument("spec", help="spec file (.yaml/.json), preset name, checkpoint or run folder")
    p.add_argument("--resolution", help="input H or HxW (default: the spec's training one)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from ditkit.builder import describe, format_report

    spec = load_spec(args.spec)
    report = describe(spec, parse_resolution(args.resolution))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_report(report, spec))
    return 0
