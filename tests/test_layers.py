"""Imports only point down (DESIGN.md): the ground (``errors``, ``files``, ``device``) <- spec <-
builder <- runtime <- deploy <- data <- evaluate <- train <- cli, function-level imports included,
and no ditkit module imports another in a circle."""

import ast

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "ditkit"
LAYERS = ("spec", "builder", "runtime", "deploy", "data", "evaluate", "train", "cli")
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
                base = ".".join(package[:len(package) - node.level + 1]
                                + ((node.module,) if node.module else ()))
            elif node.module:
                base = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield sub if _is_module(sub) else base
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(
                node.func, "id", None)) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.args[0].value


def _walk_runtime(tree):
    """``ast.walk`` without the ``if TYPE_CHECKING:`` blocks (annotations only: never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if (isinstance(node, ast.If) and isinstance(node.test, (ast.Name, ast.Attribute))
                and ast.unparse(node.test).endswith("TYPE_CHECKING")):
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
        imports = [n for n in _ditkit_imports(PACKAGE / name)
                   if n.startswith("ditkit") and n not in ground]
        assert imports == [], f"ditkit/{name} imports {imports}"


def test_the_package_init_imports_no_layer_at_import_time():
    imports = [n for n in _ditkit_imports(PACKAGE / "__init__.py") if n.startswith("ditkit")]
    assert imports == [], f"ditkit/__init__.py imports {imports}"


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
        " <-> ".join(c) for c in cycles)
