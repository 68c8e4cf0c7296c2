"""``ditkit describe``: the per-level table of tokens, widths, params and GMACs; with
``--diagram`` the architecture picture; with a second spec, both and what differs."""

from __future__ import annotations

import json
import sys

from .common import add_json, add_set, load_spec, parse_resolution


def add_parser(sub) -> None:
    p = sub.add_parser("describe", help="per-level table of tokens, widths, params and GMACs")
    p.add_argument("spec", help="spec file (.yaml/.json), preset name, checkpoint or run folder")
    p.add_argument(
        "other",
        nargs="?",
        help="a second spec: both tables, what differs, and "
        "with --diagram both pictures, differences marked",
    )
    p.add_argument("--resolution", help="input H or HxW (default: the spec's training one)")
    p.add_argument(
        "--diagram",
        metavar="FILE",
        help="draw the architecture to FILE (.svg or .png; needs ditkit[diagram])",
    )
    add_set(p, "spec (both specs when comparing)")
    add_json(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .diff import check_diagram, compare

    check_diagram(args.diagram)  # before measuring anything
    if args.other is not None:
        return compare(
            load_spec(args.spec, overrides=args.overrides),
            load_spec(args.other, overrides=args.overrides),
            args.spec,
            args.other,
            parse_resolution(args.resolution),
            None,
            args,
            tables=True,
        )

    from ditkit.builder import describe, format_report

    spec = load_spec(args.spec, overrides=args.overrides)
    report = describe(spec, parse_resolution(args.resolution))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_report(report, spec))
    if args.diagram:
        from ditkit.builder.diagram_render import draw

        draw(spec, args.diagram, report.resolution, report)
        print(f"wrote {args.diagram}", file=sys.stderr if args.json else sys.stdout)
    return 0
