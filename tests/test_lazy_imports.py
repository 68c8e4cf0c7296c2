"""Function-level imports are for the command line (start-up time) and for optional extras
only: everywhere else a module states what it needs at its top (DESIGN.md)."""

import ast

from tests.conftest import ROOT

PACKAGE = ROOT / "ditkit"
#: the optional extras (and their import names): a module may import them where used, so
#: ditkit works without them and says which extra to install (``ditkit.errors.require``)
OPTIONAL = {"onnx", "onnxruntime", "onnxscript", "natten", "diffusers", "matplotlib",
            "tensorrt", "torch_tensorrt", "sklearn", "openvino", "onnxruntime_ep_openvino",
            "scipy", "webdataset", "triton", "pynvml", "psutil", "k_diffusion",
            "huggingface_hub", "transformers"}
OPTIONAL_MODULES = ("torch.utils.tensorboard",)
#: the ground floor is imported by the command line at start-up (``ditkit --help`` must not
#: import torch): its few torch uses import it where they run
GROUND_LAZY = ("device.py", "errors.py", "files.py")


def _guarded(node, parents) -> bool:
    """Inside ``try: ... except ImportError`` (an optional import handled where it is made)."""
    p = parents.get(node)
    while p is not None:
        if isinstance(p, ast.Try) and any(
                h.type is not None and "ImportError" in ast.unparse(h.type) for h in p.handlers):
            return True
        p = parents.get(p)
    return False


def lazy_imports(path) -> list[str]:
    tree = ast.parse(path.read_text())
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else ["." * node.level + (node.module or "")])
            if all(n.split(".")[0] in OPTIONAL or n.startswith(OPTIONAL_MODULES)
                   for n in names) or _guarded(node, parents):
                continue
            out.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return sorted(set(out))


def test_lazy_imports_only_in_the_cli_and_for_optional_extras():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli" or str(rel) == "__init__.py" or str(rel) in GROUND_LAZY:
            continue
        found += lazy_imports(path)
    assert not found, ("function-level imports outside cli/ and the front door, not of an "
                       "optional extra (move them to the module's top):\n" + "\n".join(found))


def test_the_check_sees_a_lazy_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    import json\n    import onnx\n"
                   "    try:\n        import yaml\n    except ImportError:\n        pass\n")
    (tmp_path / "ditkit").mkdir()
    moved = tmp_path / "ditkit" / "m.py"
    bad.rename(moved)
    import tests.test_lazy_imports as me

    old = me.ROOT
    me.ROOT = tmp_path
    try:
        assert [line.split(": ", 1)[1] for line in lazy_imports(moved)] == ["import json"]
    finally:
        me.ROOT = old
