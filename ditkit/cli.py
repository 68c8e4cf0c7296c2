"""The ``ditkit`` command. Thin: it parses arguments and calls the library.

Bad input (a spec that does not validate, a missing file, an invalid resolution) prints a
message naming the field and the fix to stderr and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ditkit import spec as S
from ditkit.errors import UserError
from ditkit.spec.presets import PRESETS, preset


UsageError = UserError  # the name the command modules use


def load_spec(ref: str) -> S.ModelSpec:
    """A path to a YAML/JSON spec or to a ditkit checkpoint (``.safetensors``: the spec it
    carries), or the name of a built-in preset."""
    path = Path(ref)
    if path.suffix == ".safetensors":
        from ditkit.runtime.checkpoint import read_metadata, spec_from_metadata

        try:
            return spec_from_metadata(read_metadata(path), str(path))[0]
        except S.SpecError:
            raise
        except ValueError as err:
            raise UsageError(str(err)) from None
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        return S.load(path)
    if ref in PRESETS:
        return preset(ref)
    raise UsageError(f"{ref}: not a spec file or a preset name; presets: {', '.join(PRESETS)}")


def parse_resolution(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise UsageError(f"--resolution {text!r}: use H or HxW with positive integers, e.g. 256 "
                         "or 256x512")
    return (parts[0], parts[-1])


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:,.2f}M"


def format_report(report, spec: S.ModelSpec) -> str:
    h, w = report.resolution
    space = (f"latent {spec.input.channels}ch, image {h * spec.input.latent_factor}x"
             f"{w * spec.input.latent_factor}" if spec.input.space == "latent"
             else f"pixel {spec.input.channels}ch")
    rows = [("level", "tokens", "d_model", "heads", "blocks", "attention", "params", "GMACs")]
    for lv in report.levels:
        rows.append((str(lv.index), f"{lv.grid[0]}x{lv.grid[1]}", str(lv.d_model), lv.heads,
                     lv.blocks, lv.attention, _fmt_params(lv.params), f"{lv.gmacs:.2f}"))
    for name, vals in report.other.items():
        rows.append(("-", "", "", "", "", name, _fmt_params(vals["params"]),
                     f"{vals['gmacs']:.2f}"))
    rows.append(("total", "", "", "", "", "", _fmt_params(report.params), f"{report.gmacs:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{report.name} at {h}x{w} ({space})"]
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) if i < 6 else c.rjust(widths[i])
                               for i, c in enumerate(r)).rstrip())
        if k == 0 or k == len(rows) - 2:
            lines.append("  ".join("-" * wd for wd in widths))
    lines.append(f"params {report.params:,} ({report.trainable:,} trainable); "
                 f"attention QK^T+AV {report.attention_gmacs:.2f} GMACs")
    lines.append("GMACs: forward multiply-adds at batch 1, the DiT paper's 'GFLOPs' convention")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# subcommands


def cmd_describe(args) -> int:
    from ditkit.builder import describe

    spec = load_spec(args.spec)
    report = describe(spec, parse_resolution(args.resolution))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_report(report, spec))
    return 0


def cmd_validate(args) -> int:
    failed = 0
    for ref in args.specs:
        try:
            spec = load_spec(ref)
            res = parse_resolution(args.resolution)
            if res:
                issues = spec.check_resolution(res, "--resolution")
                if issues:
                    raise S.SpecError(issues, f"{ref} at {res[0]}x{res[1]}")
            print(f"ok  {ref} ({spec.name})")
        except (S.SpecError, UsageError) as err:
            print(str(err), file=sys.stderr)
            failed += 1
    return 2 if failed else 0


def cmd_schema(args) -> int:
    if args.experiment:
        from ditkit.spec.experiment import Experiment

        schema = S.json_schema(Experiment)
    else:
        schema = S.json_schema()
    text = json.dumps(schema, indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_presets(args) -> int:
    for name in PRESETS:
        print(name)
    return 0


def cmd_demo(args) -> int:
    from ditkit.demo import run_demo

    return run_demo(args)


# Subcommands that live beside the code they drive. Each module defines
# ``add_parser(subparsers)``, which registers its parser with ``set_defaults(func=...)``; its
# ``func`` raises ``UsageError`` / ``SpecError`` for bad input. Imported when the parser is built.
COMMAND_MODULES: tuple[str, ...] = (
    "ditkit.builder.bench",
    "ditkit.runtime.convert_cli",
    "ditkit.runtime.cli",
    "ditkit.train.cli",
    "ditkit.train.extrapolate_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ditkit", description=__doc__.splitlines()[0],
        epilog="Every command also takes --no-size-limits (specs, batches and step counts "
               "beyond the built-in size limits, for people who have the memory) and honours "
               "DITKIT_DEBUG=1 (tracebacks instead of one-line errors).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("describe", help="per-level table of tokens, widths, params and GMACs")
    p.add_argument("spec", help="spec file (.yaml/.json) or preset name")
    p.add_argument("--resolution", help="input H or HxW (default: the spec's training one)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("validate", help="validate spec files; exit 2 if any is invalid")
    p.add_argument("specs", nargs="+")
    p.add_argument("--resolution", help="also check that the specs run at this resolution")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="write the JSON Schema of the spec language")
    p.add_argument("--out", help="file to write (default: stdout)")
    p.add_argument("--experiment", action="store_true",
                   help="the schema of experiment files (`ditkit train`) instead of model specs")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("presets", help="list the built-in preset names")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("demo", help="train a tiny HDiT on digits (CPU), sample and evaluate it")
    from ditkit.demo import add_arguments as add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)

    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    from ditkit.errors import EnvironmentFault

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--no-size-limits" in argv:  # accepted by every command: lifts ditkit.spec.limits
        from ditkit.spec.limits import ENV

        argv = [a for a in argv if a != "--no-size-limits"]
        os.environ[ENV] = "1"
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("DITKIT_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return args.func(args)
    except (S.SpecError, UsageError) as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (EnvironmentFault, OSError) as err:
        if debug:
            raise
        print(f"error: {_environment_message(err)}", file=sys.stderr)
        return 1


def _environment_message(err: OSError) -> str:
    """One line for an environment fault (disk full, read-only, permissions)."""
    from ditkit.runtime.files import environment_reason
    from ditkit.errors import EnvironmentFault

    if isinstance(err, EnvironmentFault):
        return str(err)
    reason = environment_reason(err) or (err.strerror or str(err))
    where = err.filename if getattr(err, "filename", None) else "a file"
    return f"{where}: {reason}; the operation stopped and nothing written earlier was lost"


if __name__ == "__main__":
    # `python -m ditkit.cli` runs this file as `__main__`; go through the imported module so the
    # command modules' `from ditkit.cli import UsageError` names the same class this catches.
    from ditkit.cli import main as _main

    raise SystemExit(_main())
