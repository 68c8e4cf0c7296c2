"""``ditkit diff``: field-by-field differences of two specs, or of a spec and what a
resolution-extrapolation policy makes of it; ``--diagram`` draws both, differences marked."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from ditkit.cli.common import UsageError, load_spec, parse_resolution

if TYPE_CHECKING:
    from ditkit.builder import Report


def add_parser(sub) -> None:
    p = sub.add_parser(
        "diff",
        help="field-by-field differences of two specs, or of a spec "
        "and its resolution-adapted spec (--policy)",
    )
    p.add_argument("a", help="spec file, preset name, checkpoint or run folder")
    p.add_argument("b", nargs="?", help="the other spec (or use --policy)")
    p.add_argument(
        "--policy",
        help="compare A with A adapted by this extrapolation policy: "
        "as_is[:rope=...] local_core[:kernel_size=15] add_levels "
        "core_patch[:factor=4,level=0]",
    )
    p.add_argument(
        "--resolution",
        help="with --policy: the target resolution (H or HxW); "
        "otherwise the resolution both are drawn at",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--diagram",
        metavar="FILE",
        help="draw both, differences highlighted (.svg or .png; needs ditkit[diagram])",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    check_diagram(args.diagram)
    a = load_spec(args.a)
    res = parse_resolution(args.resolution)
    if args.policy:
        if args.b is not None:
            raise UsageError("diff: give a second spec B or --policy, not both")
        if res is None:
            raise UsageError(
                "diff --policy needs --resolution, the target the policy adapts "
                "the spec to (e.g. --resolution 256)"
            )
        from ditkit.evaluate.report import parse_policy, policy_label
        from ditkit.runtime.extrapolate import adapt_spec

        policy = parse_policy(args.policy)
        b = adapt_spec(a, policy, res)
        label = f"{policy_label(policy)} at {res[0]}x{res[1]}"
        return compare(a, b, args.a, label, None, res, args)
    if args.b is None:
        raise UsageError(
            "diff: give a second spec B, or --policy P --resolution R to compare "
            "A with its adapted spec"
        )
    return compare(a, load_spec(args.b), args.a, args.b, res, res, args)


def check_diagram(path: str | None) -> None:
    """Refuse a diagram ditkit cannot draw (suffix, matplotlib missing) before any work."""
    if path:
        from ditkit.builder.diagram_render import check_target

        check_target(path)


def compare(a, b, label_a: str, label_b: str, res_a, res_b, args, tables: bool = False) -> int:
    """Print the differing fields (with ``tables``, both ``describe`` tables first) and draw
    the comparison when ``--diagram`` asks for it."""
    from ditkit.spec.diff import diff, format_diff

    rows = diff(a, b)
    reports: tuple[Report, Report] | None = None
    if tables or args.diagram:
        from ditkit.builder import describe

        reports = describe(a, res_a), describe(b, res_b)
    if args.json:
        out = {"a": label_a, "b": label_b, "changes": [r.to_json() for r in rows]}
        if tables:
            assert reports is not None  # described above
            out["reports"] = [r.to_json() for r in reports]
        print(json.dumps(out, indent=2))
    else:
        if tables:
            from ditkit.builder import format_report

            assert reports is not None  # described above
            print(format_report(reports[0], a) + "\n\n" + format_report(reports[1], b) + "\n")
        print(format_diff(rows, label_a, label_b))
    if args.diagram:
        from ditkit.builder.diagram_render import draw_comparison

        assert reports is not None  # described above
        draw_comparison(
            a,
            b,
            args.diagram,
            reports[0].resolution,
            reports[1].resolution,
            label_a,
            label_b,
            reports=reports,
        )
        print(f"wrote {args.diagram}", file=sys.stderr if args.json else sys.stdout)
    return 0
