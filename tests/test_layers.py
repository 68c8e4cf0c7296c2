"""Imports only point down (DESIGN.md): the ground (``errors``, ``files``, ``device``) <- spec <-
builder <- runtime <- deploy <- data <- evaluate <- train <- cli, function-level imports included,
and no ditkit module imports another in a circle. The front door (``ditkit/__init__``) sits on
top and imports lazily."""

import ast

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "ditkit"
LAYERS = ("spec", "builder", "runtime", "deploy", "data", "evaluate", "training", "cli")
GROUND = ("errors.py", "files.py", "device.py")  # the ground floor: imports only itself
BELOW = {layer: LAYERS[:i] for i, layer in enumerate(LAYERS)}


def _module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = ROOT.joinpath(*name.split("."))
    return rel.with_suffix(".py").is_file() or (rel / "__init__.py").is_file()


def _ditkit_imports(path):
    """Every ditkit module ``path`` imports, at any depth of the file: ``from a import b``
    counts as ``a.b`` when ``a.b`` is a module, else as ``a``. ``importlib.import_module`` with a
    literal name counts too (a registry of strings is an import)."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(ROOT).parent.parts  # ("ditkit", "runtime", ...)
    for node in _walk_runtime(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = ".".join(
                    package[: len(package) - node.level + 1]
                    + ((node.module,) if node.module else ())
                )
            elif node.module:
                base = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield sub if _is_module(sub) else base
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value


def _walk_runtime(tree):
    """``ast.walk`` without the ``if TYPE_CHECKING:`` blocks (annotations only: never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, (ast.Name, ast.Attribute))
            and ast.unparse(node.test).endswith("TYPE_CHECKING")
        ):
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def _files():
    return sorted(PACKAGE.rglob("*.py"))


def _layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "ditkit" and len(parts) > 1 and parts[1] in BELOW else None


def test_cli_is_a_package_on_top():
    assert (PACKAGE / "cli" / "__init__.py").is_file() and (PACKAGE / "cli" / "common.py").is_file()
    assert not (PACKAGE / "cli.py").exists()
    # every module of ditkit belongs to a layer or to the ground floor (the package's own
    # __init__, the front door, excepted)
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", *GROUND)]
    assert not loose, f"modules outside the layers: {loose}"


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below(layer):
    allowed = set(BELOW[layer]) | {layer}
    bad = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in _ditkit_imports(path):
            other = _layer(name)
            if other is not None and other not in allowed:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_ground_floor_imports_only_the_ground():
    ground = {f"ditkit.{n[:-3]}" for n in GROUND}
    for name in GROUND:
        imports = [
            n for n in _ditkit_imports(PACKAGE / name) if n.startswith("ditkit") and n not in ground
        ]
        assert imports == [], f"ditkit/{name} imports {imports}"


def test_the_front_door_is_on_top_and_imports_lazily():
    """ditkit/__init__ (the Python front door) may call every floor, but only from inside its
    functions (or for annotations under ``TYPE_CHECKING``), so ``import ditkit`` stays cheap;
    and no module below it imports the front door (``__version__`` excepted)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    eager = []
    for node in tree.body:  # module-level statements only; function bodies run when called
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                break
            names = (
                [a.name for a in sub.names]
                if isinstance(sub, ast.Import)
                else [sub.module or ""]
                if isinstance(sub, ast.ImportFrom)
                else []
            )
            eager += [n for n in names if n.startswith("ditkit")]
    assert eager == [], f"ditkit/__init__.py imports {eager} when it is imported"
    bad = []
    for path in _files():
        if path == PACKAGE / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "ditkit" and not node.level:
                bad += [
                    f"{path.relative_to(ROOT)}: from ditkit import {a.name}"
                    for a in node.names
                    if a.name != "__version__" and not _is_module(f"ditkit.{a.name}")
                ]
    assert not bad, "\n".join(bad)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in _files()}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target in _ditkit_imports(path):
            # the nearest enclosing module that exists (``ditkit.spec.Thing`` -> ditkit.spec)
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(_graph())
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )
