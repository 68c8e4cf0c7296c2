"""Generate the reference pages at build time (mkdocs-gen-files runs this script).

* ``reference/spec.md``, ``reference/experiment.md``, ``reference/policy.md``: every spec class
  reachable from :class:`ditkit.spec.ModelSpec`, :class:`ditkit.spec.experiment.Experiment` and
  the resolution policies, with every field's type, default, constraints (read off the JSON
  Schema pydantic generates) and description (the field's ``description=``, the docstring under
  it, or its trailing comment). The pages are made from the models themselves, so they cannot
  drift from what the loaders accept.
* ``reference/commands.md``: every command, every flag and its help text, from the argparse
  parsers (:func:`ditkit.cli.docs.command_reference`).
* ``reference/ditkit.schema.json``, ``reference/ditkit.experiment.schema.json``: the JSON Schemas.

Run it by hand to see the pages without mkdocs: ``python docs/gen_reference.py OUT_DIR``.
"""

from __future__ import annotations

import ast
import inspect
import json
import sys
import textwrap
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# --------------------------------------------------------------------------------- the walk


def _models_in(annotation) -> list[type[BaseModel]]:
    """The spec classes an annotation refers to, in order (unions, Annotated, containers)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        for m in _models_in(arg):
            if m not in out:
                out.append(m)
    return out


def walk(root: type[BaseModel], stop: set[type] = frozenset()) -> dict[type, list[str]]:
    """Every class reachable from ``root`` -> the field paths where it appears (breadth first)."""
    found: dict[type, list[str]] = {root: ["(top level)"]}
    queue: list[tuple[type[BaseModel], str]] = [(root, "")]
    while queue:
        model, prefix = queue.pop(0)
        for name, field in model.model_fields.items():
            listy = _is_listy(field.annotation)
            path = f"{prefix}{name}" + ("[i]" if listy else "")
            for sub in _models_in(field.annotation):
                if sub in stop:
                    found.setdefault(sub, []).append(path)
                    continue
                if sub not in found:
                    found[sub] = [path]
                    queue.append((sub, path + "."))
                elif len(found[sub]) < 6 and path not in found[sub]:
                    found[sub].append(path)
    return found


def _is_listy(annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return origin is list or (len(args) == 2 and args[1] is Ellipsis)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return any(
            _is_listy(a) for a in typing.get_args(annotation) if not isinstance(a, (str, int))
        )
    return False


# ------------------------------------------------------------------------------- rendering


def anchor(model: type) -> str:
    return model.__name__.lower()


def render_type(annotation, link) -> str:
    """A short, readable type: ``int``, ``"a" or "b"``, ``[int, int]``, ``list of [X](#x)``."""
    if annotation is type(None):
        return "null"
    if annotation is typing.Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return link(annotation)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return render_type(args[0], link)
    if origin is typing.Literal:
        return " or ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts: list[str] = []
        for a in args:
            r = render_type(a, link)
            if r not in parts:
                parts.append(r)
        return " or ".join(parts)
    if origin is list:
        return f"list of {render_type(args[0], link)}" if args else "list"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {render_type(args[0], link)}"
        return "[" + ", ".join(render_type(a, link) for a in args) + "]"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type):
        return {"str": "string", "NoneType": "null"}.get(annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


_BOUNDS = {
    "minimum": "≥ {}",
    "exclusiveMinimum": "> {}",
    "maximum": "≤ {}",
    "exclusiveMaximum": "< {}",
    "minLength": "length ≥ {}",
    "maxLength": "length ≤ {}",
    "pattern": "matches `{}`",
    "multipleOf": "multiple of {}",
}


def constraints(schema: dict) -> list[str]:
    """The bounds of a JSON Schema property, looking through anyOf / items / prefixItems."""
    out: list[str] = []

    def visit(node):
        if not isinstance(node, dict):
            return
        for key, fmt in _BOUNDS.items():
            if key in node:
                text = fmt.format(node[key])
                if text not in out:
                    out.append(text)
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            for sub in node.get(key, []):
                visit(sub)
        if isinstance(node.get("items"), dict):
            visit(node["items"])
        if "minItems" in node and node.get("minItems") != node.get("maxItems"):
            out.append(f"≥ {node['minItems']} items")
        if "maxItems" in node and node.get("minItems") != node.get("maxItems"):
            out.append(f"≤ {node['maxItems']} items")

    visit(schema)
    return out


def _field_docs(model: type) -> dict[str, str]:
    """Field descriptions written in the source: the string under a field, or its comment."""
    docs: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(cls))
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        body = ast.parse(source).body[0].body
        for i, node in enumerate(body):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            name = node.target.id
            nxt = body[i + 1] if i + 1 < len(body) else None
            if (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[name] = inspect.cleandoc(nxt.value.value)
                continue
            line = lines[node.end_lineno - 1]
            if "  # " in line:
                comment = line.split("  # ", 1)[1].strip()
                if not comment.startswith(("type:", "noqa")):
                    docs[name] = comment
    return docs


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(computed)"
    else:
        value = field.default
    if value is PydanticUndefined:
        return "**required**"
    if isinstance(value, BaseModel):
        kind = getattr(value, "kind", None)
        return f"`{{kind: {kind}}}`" if isinstance(kind, str) else "its defaults"
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"`{value:g}`"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _md_doc(text: str) -> str:
    """A class docstring as Markdown: reST ``literals`` and :role:`x` made plain."""
    import re

    text = inspect.cleandoc(text)
    text = re.sub(r":(?:class|func|data|meth|attr|mod):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def model_section(model: type[BaseModel], paths: list[str], link) -> str:
    schema = model.model_json_schema()
    props = schema.get("properties", {})
    docs = _field_docs(model)
    from ditkit.spec.model import Block

    inherited = (
        set(Block.model_fields)
        if model is not Block and all(n in model.model_fields for n in Block.model_fields)
        else set()
    )
    out = [f"### {model.__name__} {{#{anchor(model)}}}", ""]
    kind = model.model_fields.get("kind")
    if kind is not None and typing.get_origin(kind.annotation) is typing.Literal:
        out += [f"`kind: {typing.get_args(kind.annotation)[0]}`", ""]
    where = ", ".join(p if p.startswith("(") else f"`{p}`" for p in paths)
    out += [f"*Where:* {where}", ""]
    if model.__doc__ and model.__doc__ is not BaseModel.__doc__:
        out += [_md_doc(model.__doc__), ""]
    rows = []
    for name, field in model.model_fields.items():
        if (
            name == "kind"
            and typing.get_origin(field.annotation) is typing.Literal
            and len(typing.get_args(field.annotation)) == 1
        ):
            continue
        desc = field.description or docs.get(name, "")
        if not desc and name in inherited:
            desc = (
                f"Overrides `block.{name}` for these blocks (see [Block](#block)); "
                "unset: inherited."
            )
        bounds = ", ".join(constraints(props.get(name, {})))
        rows.append(
            f"| `{name}` | {_cell(render_type(field.annotation, link))} | "
            f"{_cell(_default(field))} | {_cell(bounds)} | "
            f"{_cell(_md_doc(desc) if desc else '')} |"
        )
    if rows:
        out += [
            "| field | type | default | constraints | description |",
            "| --- | --- | --- | --- | --- |",
            *rows,
            "",
        ]
    else:
        out += ["No fields besides `kind`.", ""]
    return "\n".join(out)


def reference_page(
    title: str, intro: str, found: dict[type, list[str]], pages: dict[type, str], here: str
) -> str:
    def link(model: type) -> str:
        page = pages.get(model, here)
        target = "" if page == here else page.split("/")[-1]
        return f"[{model.__name__}]({target}#{anchor(model)})"

    classes = [m for m in found if pages.get(m, here) == here]
    out = [
        f"# {title}",
        "",
        intro,
        "",
        "Generated from the pydantic models by `docs/gen_reference.py` when the site is built; "
        "every class is frozen and refuses unknown keys. A field whose type is a list of "
        "classes with a `kind` is a *variant*: write `{kind: NAME, ...}` with that variant's "
        "fields.",
        "",
        "## Classes",
        "",
    ]
    out += [", ".join(link(m) for m in classes), "", "## Fields", ""]
    out += [model_section(m, found[m], link) for m in classes]
    return "\n".join(out)


# --------------------------------------------------------------------------------- pages


def pages() -> dict[str, str]:
    """``{path under docs/: text}`` of every generated page."""
    from ditkit.cli.docs import command_reference
    from ditkit.spec import ModelSpec, json_schema
    from ditkit.spec import policy as policy_mod
    from ditkit.spec.experiment import Experiment

    spec_found = walk(ModelSpec)
    policy_found: dict[type, list[str]] = {}
    for model in _models_in(policy_mod.Policy):
        for sub, where in walk(model).items():
            policy_found.setdefault(sub, []).extend(
                ["(a `--policy` / `ditkit.spec.policy` value)"] if sub is model else where
            )
    exp_found = walk(Experiment, stop=set(spec_found) | set(policy_found))
    for m, where in exp_found.items():  # say where a policy appears in an experiment too
        if m in policy_found:
            policy_found[m] += where
    owner: dict[type, str] = {}
    for found, page in (
        (spec_found, "reference/spec.md"),
        (policy_found, "reference/policy.md"),
        (exp_found, "reference/experiment.md"),
    ):
        for m in found:
            owner.setdefault(m, page)

    out = {
        "reference/spec.md": reference_page(
            "Model spec reference",
            "Every field of a model spec (`ditkit.spec.ModelSpec`), outer class first. For the "
            "ideas behind them, read [The spec language](../spec/index.md); the JSON Schema "
            "that editors use is [ditkit.schema.json](ditkit.schema.json) "
            "(`ditkit schema --out ditkit.schema.json`).",
            spec_found,
            owner,
            "reference/spec.md",
        ),
        "reference/experiment.md": reference_page(
            "Experiment reference",
            "Every field of an experiment (`ditkit.spec.experiment.Experiment`: what `ditkit "
            "train` reads), with its objective, data, optimizer and the other sections. The "
            "model part is the [model spec](spec.md#modelspec). JSON Schema: "
            "[ditkit.experiment.schema.json](ditkit.experiment.schema.json) (`ditkit schema "
            "--experiment`).",
            exp_found,
            owner,
            "reference/experiment.md",
        ),
        "reference/policy.md": reference_page(
            "Resolution policies reference",
            "The spec transforms of `ditkit.spec.policy` that adapt a trained model to another "
            "resolution (`--policy` of `ditkit sample`, `diff` and `extrapolate`; written "
            "`NAME:key=value,...` on the command line). See the "
            "[extrapolation guide](../guides/extrapolation.md).",
            policy_found,
            owner,
            "reference/policy.md",
        ),
        "reference/commands.md": "\n".join(
            [
                "# Command reference",
                "",
                "Every `ditkit` command, every option and its help text, generated from the "
                "argparse parsers in `ditkit/cli/` when the site is built (`ditkit CMD -h` prints "
                "the same). Conventions shared by all commands: [Commands](../commands/index.md).",
                "",
                command_reference(),
            ]
        ),
        "reference/ditkit.schema.json": json.dumps(json_schema(ModelSpec), indent=1) + "\n",
        "reference/ditkit.experiment.schema.json": json.dumps(json_schema(Experiment), indent=1)
        + "\n",
    }
    return out


def _editor():
    """The mkdocs-gen-files editor when mkdocs runs this script, else None."""
    try:
        from mkdocs_gen_files.editor import FilesEditor

        return FilesEditor._current
    except Exception:  # not installed, or not inside a build
        return None


def main() -> None:
    generated = pages()
    if _editor() is not None:
        import mkdocs_gen_files

        for path, text in generated.items():
            with mkdocs_gen_files.open(path, "w") as f:
                f.write(text)
        return
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "site-reference")
    for path, text in generated.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_text(text)
    print(f"wrote {len(generated)} pages under {out}")


if __name__ == "__main__" or _editor() is not None:  # by hand, or by mkdocs-gen-files
    main()
