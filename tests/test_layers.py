"""Imports only point down: spec <- builder <- runtime <- train (DESIGN.md)."""

import ast

import pytest

from tests.conftest import ROOT

BELOW = {"spec": (), "builder": ("spec",), "runtime": ("spec", "builder"),
         "train": ("spec", "builder", "runtime")}


def _ditkit_imports(path):
    tree = ast.parse(path.read_text())
    package = path.relative_to(ROOT).parent.parts  # ("ditkit", "runtime", ...)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package[:len(package) - node.level + 1]
                yield ".".join(base + ((node.module,) if node.module else ()))
            elif node.module:
                yield node.module


@pytest.mark.parametrize("layer", list(BELOW))
def test_a_layer_imports_only_the_layers_below(layer):
    allowed = set(BELOW[layer]) | {layer}
    bad = []
    for path in sorted((ROOT / "ditkit" / layer).rglob("*.py")):
        for name in _ditkit_imports(path):
            parts = name.split(".")
            if parts[0] == "ditkit" and len(parts) > 1 and parts[1] in BELOW \
                    and parts[1] not in allowed:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)
