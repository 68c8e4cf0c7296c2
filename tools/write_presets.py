"""Regenerate ``examples/dit`` and ``examples/hdit`` from the Python helpers, and the JSON
Schema. ``tests/test_presets.py`` checks the committed files equal what this writes."""

from __future__ import annotations

import json
from pathlib import Path

from ditkit import spec as S
from ditkit.spec.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
HEADER = (
    "# yaml-language-server: $schema=../../ditkit.schema.json\n"
    "# Generated from ditkit.spec.presets ({fn}); tests check the two stay equal.\n"
)


def preset_path(name: str) -> Path:
    family = name.split("-")[0]  # dit, hdit, mdit, mpdit
    return ROOT / "examples" / family / f"{name}.yaml"


def render(name: str) -> str:
    fn = PRESETS[name]
    label = getattr(fn, "__name__", name)
    if label in ("<lambda>", name):  # dit(size, patch) through functools.partial
        size, patch = name.split("-")[1:]
        label = f"dit({size!r}, {patch})"
    return HEADER.format(fn=label) + S.dumps(fn())


def schema_text() -> str:
    return json.dumps(S.json_schema(), indent=2) + "\n"


def experiment_schema_text() -> str:
    from ditkit.spec.experiment import Experiment

    return json.dumps(S.json_schema(Experiment), indent=2) + "\n"


if __name__ == "__main__":
    for name in PRESETS:
        path = preset_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(name))
        print("wrote", path.relative_to(ROOT))
    (ROOT / "ditkit.schema.json").write_text(schema_text())
    print("wrote ditkit.schema.json")
    (ROOT / "ditkit.experiment.schema.json").write_text(experiment_schema_text())
    print("wrote ditkit.experiment.schema.json")
