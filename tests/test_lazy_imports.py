"""Function-level imports are for the command line (start-up time) and for optional extras
only: everywhere else a module states what it needs at its top (DESIGN.md, "Imports").

Allowed inside a function:
- anything in ``ditkit/cli/`` and the front door ``ditkit/__init__.py`` (``ditkit --help`` and
  ``import ditkit`` must not pay for torch);
- ``torch`` on the ground floor (``ditkit/device.py``): ``spec`` imports the ground floor and
  never imports torch;
- an optional extra (:data:`OPTIONAL`), or a module that exists to wrap one (:data:`WRAPPERS`);
- an import guarded by ``try: ... except ImportError`` (handled where it is made).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ditkit"
#: the optional extras (by import name): a module may import them where used, so ditkit works
#: without them and says which extra to install (``ditkit.errors.require``)
OPTIONAL = {
    "onnx",
    "onnxruntime",
    "onnxscript",
    "natten",
    "diffusers",
    "matplotlib",
    "tensorrt",
    "torch_tensorrt",
    "sklearn",
    "openvino",
    "onnxruntime_ep_openvino",
    "scipy",
    "webdataset",
    "triton",
    "pynvml",
    "psutil",
    "k_diffusion",
    "huggingface_hub",
    "transformers",
    "mkdocs",
    "griffe",
    "accelerate",
}
OPTIONAL_MODULES = ("torch.utils.tensorboard",)
#: ditkit modules that import an optional extra at their top (importing them needs the extra)
WRAPPERS = ("ditkit.deploy.tensorrt",)
GROUND_TORCH = {"device.py"}


def _guarded(node: ast.AST, parents: dict) -> bool:
    """Inside ``try: ... except ImportError`` (an optional import handled where it is made)."""
    p = parents.get(node)
    while p is not None:
        if isinstance(p, ast.Try) and any(
            h.type is not None and "ImportError" in ast.unparse(h.type) for h in p.handlers
        ):
            return True
        p = parents.get(p)
    return False


def _allowed(name: str, rel: Path) -> bool:
    top = name.split(".")[0]
    if top in OPTIONAL or name.startswith(OPTIONAL_MODULES) or name.startswith(WRAPPERS):
        return True
    return top == "torch" and len(rel.parts) == 1 and rel.name in GROUND_TORCH


def lazy_imports(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: import`` for each function-level import in ``path`` that is not allowed."""
    tree = ast.parse(path.read_text())
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    rel = path.relative_to(root / "ditkit") if (root / "ditkit") in path.parents else path
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ["." * node.level + (node.module or "")]
            )
            if all(_allowed(n, rel) for n in names) or _guarded(node, parents):
                continue
            out.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return sorted(set(out))


def test_lazy_imports_only_in_the_cli_and_for_optional_extras():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli" or rel == Path("__init__.py"):
            continue
        found += lazy_imports(path)
    assert not found, (
        "function-level imports outside cli/ and the front door, not of an optional extra "
        "(move them to the module's top; see tests/test_lazy_imports.py for what may stay):\n"
        + "\n".join(found)
    )


def test_the_check_sees_a_lazy_import(tmp_path):
    (tmp_path / "ditkit").mkdir()
    bad = tmp_path / "ditkit" / "m.py"
    bad.write_text(
        "import os\n"
        "def f():\n    import json\n    import onnx\n    import torch\n"
        "    from ditkit.deploy.tensorrt import x\n"
        "    try:\n        import yaml\n    except ImportError:\n        pass\n"
    )
    found = [line.split(": ", 1)[1] for line in lazy_imports(bad, tmp_path)]
    assert found == ["import json", "import torch"]
    ground = tmp_path / "ditkit" / "device.py"
    ground.write_text("def f():\n    import torch\n    import json\n")
    assert [line.split(": ", 1)[1] for line in lazy_imports(ground, tmp_path)] == ["import json"]
