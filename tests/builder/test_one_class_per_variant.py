"""DESIGN principle 11: ``build()`` picks one module class per spec variant; no ``forward`` in
ditkit/builder/ branches again on a kind (no ``match``, no ``isinstance``, no comparison with a
string such as ``self.kind == "layer"`` or ``"label" in self.sources``)."""

import ast
from pathlib import Path

import ditkit.builder

BUILDER = Path(ditkit.builder.__file__).parent


def _kind_branches(tree: ast.AST) -> list[str]:
    found = []
    for fn in ast.walk(tree):
        if not (isinstance(fn, ast.FunctionDef) and fn.name == "forward"):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Match):
                found.append(f"line {node.lineno}: match")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "isinstance"
            ):
                found.append(f"line {node.lineno}: isinstance")
            elif isinstance(node, ast.Compare) and any(
                isinstance(x, ast.Constant) and isinstance(x.value, str)
                for x in (node.left, *node.comparators)
            ):
                found.append(f"line {node.lineno}: comparison with a string")
    return found


def test_no_forward_in_the_builder_branches_on_a_kind():
    problems = {
        p.name: _kind_branches(ast.parse(p.read_text())) for p in sorted(BUILDER.glob("*.py"))
    }
    assert {k: v for k, v in problems.items() if v} == {}


def test_the_check_sees_each_form_of_branch():
    src = """
class Norm:
    def forward(self, x):
        if self.kind == "layer":
            return x
        if "label" in self.sources:
            return x
        if isinstance(self.head, Head):
            return x
        match self.kind:
            case _:
                return x
"""
    assert len(_kind_branches(ast.parse(src))) == 4
