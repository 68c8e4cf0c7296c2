"""``ditkit validate``: check spec and experiment files; exit 2 if any is invalid.

An experiment file (it has a ``model:`` key) is validated as an experiment: its sections, its
model (inline or the file / preset it names) and how they fit together, with problems named by
the experiment's field paths (``training.batch_size``, ``model.levels[0].attention``)."""

from __future__ import annotations

import json
import sys

from ditkit.errors import UserError

from .common import add_json, add_set, load_spec, parse_resolution, resolve_source


def add_parser(sub) -> None:
    p = sub.add_parser(
        "validate", help="validate spec or experiment files; exit 2 if any is invalid"
    )
    p.add_argument(
        "specs", nargs="+", help="spec files, experiment files, preset names or checkpoints"
    )
    p.add_argument("--resolution", help="also check that the models run at this resolution")
    add_set(
        p,
        "specs or experiments (experiment paths, e.g. training.batch_size=8 or "
        "model.levels.0.d_model=256)",
    )
    add_json(p, "print one JSON object: per file, ok or its problems (field, message)")
    p.set_defaults(func=run)


def _load(ref: str, overrides):
    """``(kind, name, model spec)`` of a spec or experiment reference; raises ``UserError``."""
    src = resolve_source(ref, ("file", "preset", "checkpoint", "run"))
    if src.kind == "file":
        from ditkit.spec.experiment import is_experiment_data, load_experiment
        from ditkit.spec.io import load_yaml, read_text

        assert src.path is not None  # a file source has its path
        if is_experiment_data(load_yaml(read_text(src.path, "spec"), ref)):
            exp = load_experiment(src.path, overrides)
            return "experiment", exp.name, exp.model_spec
    spec = load_spec(ref, overrides=overrides)
    return "spec", spec.name, spec


def run(args) -> int:
    from ditkit import spec as S

    failed = 0
    res = parse_resolution(args.resolution)
    rows = []
    for ref in args.specs:
        try:
            kind, name, spec = _load(ref, args.overrides)
            if res:
                prefix = "model." if kind == "experiment" else ""
                issues = [
                    (f if f.startswith("-") else prefix + f, m)
                    for f, m in spec.check_resolution(res, "--resolution")
                ]
                if issues:
                    raise S.SpecError(issues, f"{ref} at {res[0]}x{res[1]}")
            rows.append({"spec": ref, "ok": True, "kind": kind, "name": name})
            if not args.json:
                what = f"experiment {name}, model {spec.name}" if kind == "experiment" else name
                print(f"ok  {ref} ({what})")
        except UserError as err:
            issues = getattr(err, "issues", None) or [("", str(err))]
            rows.append(
                {
                    "spec": ref,
                    "ok": False,
                    "problems": [{"field": f, "message": m} for f, m in issues],
                }
            )
            if not args.json:
                print(str(err), file=sys.stderr)
            failed += 1
    if args.json:
        print(json.dumps({"ok": not failed, "specs": rows}, indent=2))
    return 2 if failed else 0
