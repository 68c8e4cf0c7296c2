"""Every code block in the documentation runs (issue 31).

The fenced ```python, ```bash and ```yaml blocks of every page under ``docs/`` and of the
README are collected, one test each:

* ``python`` blocks are executed in order, one namespace per page, in a temporary folder per
  page that holds the repository's ``examples/`` (and its sub-folders, so an experiment's
  ``../tiny/...`` reference resolves);
* ``bash`` blocks must consist of ``ditkit ...`` commands; each runs through the command line
  (in-process, ``ditkit.cli.main``) in the page's folder and must exit 0;
* ``yaml`` blocks are validated with ditkit's loaders: a model spec (has ``levels``), an
  experiment (has ``model``), or a fragment of either (merged into a small experiment or spec);
* a block preceded by ``<!-- skip: reason -->`` is reported as skipped with that reason, one
  preceded by ``<!-- slow: reason -->`` runs under ``-m slow``; ``<!-- file: NAME -->`` also
  writes the block to ``NAME`` in the page's folder for later blocks to use.

Whether or not a block runs, every ``ditkit`` command in a bash or console block (also
``python -m ditkit.cli`` and ``torchrun ... -m -- ditkit.cli``) is checked against the parsers:
the command exists and each ``--flag`` is one of its options. So a command or flag that changes
breaks this test, not the reader.
"""

from __future__ import annotations

import contextlib
import json
import io
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLES, ROOT

DOCS = ROOT / "docs"
MARKER = re.compile(r"^<!--\s*(skip|slow|file):\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
RUN_LANGS = ("python", "bash", "yaml")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    markers: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}-{self.lang}"


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of a page, with the markers on the lines just above each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1).lower()
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        markers: dict = {}
        k = start - 1
        while k >= 0 and (MARKER.match(lines[k]) or not lines[k].strip()):
            mk = MARKER.match(lines[k])
            if mk:
                markers.setdefault(mk.group(1), mk.group(2))
            elif markers or k < start - 1:
                break  # a blank line ends the markers once one was read or after the first
            k -= 1
        out.append(Block(page, start + 1, lang, "\n".join(lines[start + 1 : j]) + "\n", markers))
        i = j + 1
    return out


def all_blocks() -> list[Block]:
    return [b for p in doc_pages() for b in blocks_of(p)]


def _params():
    params = []
    for b in all_blocks():
        if b.lang not in RUN_LANGS:
            continue
        marks = [pytest.mark.slow] if "slow" in b.markers else []
        params.append(pytest.param(b, id=b.id, marks=marks))
    return params


# ------------------------------------------------------------------------- the page folders

_FOLDERS: dict[Path, Path] = {}
_NAMESPACES: dict[Path, dict] = {}


@pytest.fixture
def page_dir(tmp_path_factory, request):
    block: Block = request.node.callspec.params["block"]
    if block.page not in _FOLDERS:
        d = tmp_path_factory.mktemp(block.page.stem)
        (d / "examples").symlink_to(EXAMPLES, target_is_directory=True)
        for sub in EXAMPLES.iterdir():  # `../tiny/x.yaml` from d/experiments-docs/ resolves
            if sub.is_dir():
                (d / sub.name).symlink_to(sub, target_is_directory=True)
        (d / "tests").mkdir()
        (d / "tests" / "data").symlink_to(ROOT / "tests" / "data", target_is_directory=True)
        (d / "docs-blocks").mkdir()
        _FOLDERS[block.page] = d
    return _FOLDERS[block.page]


@contextlib.contextmanager
def _cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# ------------------------------------------------------------------------------ commands


def _logical_lines(code: str) -> list[str]:
    """Lines with ``\\`` continuations joined, blank and comment-only lines dropped."""
    out, cur = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip() and not cur.strip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    return out


def _ditkit_argv(words: list[str]) -> list[str] | None:
    """The argv after ``ditkit`` of a command line that runs ditkit, else None."""
    if words and words[0] in ("ditkit", ".venv/bin/ditkit"):
        return words[1:]
    for i, w in enumerate(words):
        if w == "ditkit.cli" and i >= 1 and words[i - 1] in ("-m", "--"):
            return words[i + 1 :]
    return None


def _commands_in(block: Block) -> list[list[str]]:
    cmds = []
    for line in _logical_lines(block.code):
        if block.lang == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        for part in re.split(r"\s(?:&&|\|\||;)\s", line):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:
                continue
            argv = _ditkit_argv(words)
            if argv is not None:
                cmds.append(argv)
    return cmds


_PARSER = None


def _parser():
    global _PARSER
    if _PARSER is None:
        from ditkit.cli import build_parser

        _PARSER = build_parser()
    return _PARSER


def _subparsers(parser):
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices
    return None


def flag_problems(argv: list[str]) -> list[str]:
    """What in a documented ``ditkit`` command line the parsers do not know."""
    parser, words, path = _parser(), list(argv), ["ditkit"]
    top = set(parser._option_string_actions) | {"--no-size-limits"}
    while words and words[0].startswith("-"):  # `ditkit --version`, `ditkit --debug CMD`
        if words[0] not in top:
            return [f"`ditkit {words[0]}`: no such option of ditkit"]
        words.pop(0)
    while words:
        subs = _subparsers(parser)
        if subs is None:
            break
        if words[0] not in subs:
            if words[0].startswith("-"):
                break
            return [f"`{' '.join(path)} {words[0]}`: no such command"]
        path.append(words.pop(0))
        parser = subs[path[-1]]
    known = set(parser._option_string_actions) | {"--no-size-limits"}
    problems = []
    for w in words:
        if w.startswith("--") and len(w) > 2:
            flag = w.split("=", 1)[0]
            if flag not in known:
                problems.append(f"`{' '.join(path)}` has no option {flag}")
    return problems


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_documented_command_and_flag_exists(page):
    problems = []
    for b in blocks_of(page):
        if b.lang in ("bash", "console", "sh", "shell"):
            for argv in _commands_in(b):
                problems += [f"line {b.line}: {p}" for p in flag_problems(argv)]
    assert not problems, "\n".join(problems)


def _run_ditkit(argv: list[str]) -> int:
    from ditkit.cli import main

    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return e.code if isinstance(e.code, int) else 1


def _run_bash(block: Block) -> None:
    for line in _logical_lines(block.code):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] != "ditkit" or any(w in ("|", "&&", ";", ">", "||") for w in words):
            pytest.fail(
                f"{block.id}: {line!r} is not a plain `ditkit ...` command; precede the "
                "block with <!-- skip: reason --> (or make it one)"
            )
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = _run_ditkit(words[1:])
        assert rc == 0, (
            f"{block.id}: `{line}` exited {rc}\n{out.getvalue()[-2000:]}\n{err.getvalue()[-2000:]}"
        )


# ---------------------------------------------------------------------------------- yaml

_TINY_MODEL = "tiny/tiny-hdit-digits.yaml"


def _check_yaml(block: Block, folder: Path) -> None:
    from ditkit.spec import ModelSpec
    from ditkit.spec import loads as load_spec_text
    from ditkit.spec.experiment import Experiment, load_experiment

    data = yaml.safe_load(block.code)
    assert isinstance(data, dict), f"{block.id}: a yaml block is a mapping (spec or experiment)"
    target = folder / "docs-blocks" / f"block-{block.line}.yaml"
    if "levels" in data and "model" not in data:
        load_spec_text(block.code, source=block.id)
        return
    if "model" in data:
        target.write_text(block.code)
        load_experiment(target)
        return
    keys = set(data)
    if keys <= set(Experiment.model_fields):  # a fragment: merged into an example experiment
        latent = isinstance(data.get("data"), dict) and data["data"].get("kind") == "latents"
        base = EXAMPLES / "experiments" / ("digits-latents.yaml" if latent else "demo-digits.yaml")
        merged = {**yaml.safe_load(base.read_text()), "evaluation": {"enabled": False}, **data}
        target.write_text(yaml.safe_dump(merged))
        load_experiment(target)
        return
    if keys <= set(ModelSpec.model_fields):
        base = yaml.safe_load((EXAMPLES / _TINY_MODEL).read_text())
        load_spec_text(yaml.safe_dump({**base, **data}), source=block.id)
        return
    pytest.fail(
        f"{block.id}: keys {sorted(keys)} are neither a model spec's nor an "
        "experiment's; fix the block or mark it <!-- skip: reason -->"
    )


# ---------------------------------------------------------------------------------- tests


_DONE: set[str] = set()


def _execute(block: Block, folder: Path) -> None:
    if "file" in block.markers:
        (folder / block.markers["file"]).write_text(block.code)
    with _cwd(folder):
        if block.lang == "python":
            ns = _NAMESPACES.setdefault(block.page, {"__name__": "__docs__"})
            exec(compile(block.code, block.id, "exec"), ns)
        elif block.lang == "bash":
            _run_bash(block)
        else:
            _check_yaml(block, folder)
    _DONE.add(block.id)


@pytest.mark.parametrize("block", _params())
def test_doc_block(block: Block, page_dir: Path):
    if "skip" in block.markers:
        pytest.skip(block.markers["skip"] or "marked skip")
    # a block may use what earlier blocks of its page made (`-m slow` deselects those)
    for earlier in blocks_of(block.page):
        if earlier.line >= block.line:
            break
        if (
            earlier.lang in RUN_LANGS
            and earlier.id not in _DONE
            and not {"skip", "slow"} & set(earlier.markers)
        ):
            _execute(earlier, page_dir)
    _execute(block, page_dir)


# ------------------------------------------------------------------- the README and the site


def test_readme_is_at_most_200_lines():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 200, f"README.md has {n} lines; move detail into docs/ (issue 31)"


def test_markers_are_well_formed_and_name_a_reason():
    bad = []
    for page in doc_pages():
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("<!--") and re.match(r"<!--\s*(skip|slow|file)\b", line):
                m = MARKER.match(line)
                if not m or not m.group(2):
                    bad.append(f"{page.relative_to(ROOT)}:{n}: {line}")
    assert not bad, "write <!-- skip: reason -->:\n" + "\n".join(bad)


def test_the_collector_reads_markers_commands_and_flags():
    page = DOCS / "getting-started.md"
    blocks = blocks_of(page)
    setup = next(b for b in blocks if "setup.sh" in b.code)
    assert setup.lang == "bash" and "skip" in setup.markers
    first = next(b for b in blocks if b.markers.get("file") == "my-model.yaml")
    assert first.lang == "yaml" and "levels:" in first.code
    fake = Block(page, 1, "console", "$ ditkit sample x --stepz 3 \\\n  --count 2\n$ ditkit nope\n")
    problems = [p for argv in _commands_in(fake) for p in flag_problems(argv)]
    assert problems == ["`ditkit sample` has no option --stepz", "`ditkit nope`: no such command"]
    torchrun = Block(
        page,
        1,
        "bash",
        "torchrun --nproc_per_node=8 -m -- ditkit.cli train e.yaml --out r --resume\n",
    )
    assert _commands_in(torchrun) == [["train", "e.yaml", "--out", "r", "--resume"]]
    assert flag_problems(["train", "e.yaml", "--out", "r", "--resume"]) == []


# --------------------------------------------------- the generated references and the nav


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_docs_{name}", DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_spec_reference_has_every_class_and_field_with_defaults_and_bounds():
    from ditkit.spec import ModelSpec
    from ditkit.spec.experiment import Distributed, Experiment

    gen = _load_script("gen_reference")
    pages = gen.pages()
    spec, exp = pages["reference/spec.md"], pages["reference/experiment.md"]
    for model in gen.walk(ModelSpec):
        assert f"### {model.__name__} {{#{model.__name__.lower()}}}" in spec, model
        for name in model.model_fields:
            assert f"| `{name}` |" in spec or name == "kind", (model, name)
    section = spec.split("### NeighborhoodAttention", 1)[1].split("\n### ", 1)[0]
    assert "`kind: neighborhood`" in section and "`levels[i].attention`" in section
    assert "| `kernel_size` | int or [int, int] | `7` | > 0 |" in section
    assert "### AggregateAttention" in spec and "| `factor` | int | `2` | ≥ 2 |" in spec
    for model in (Experiment, Distributed):
        assert f"### {model.__name__} " in exp
    assert "| `batch_size` | int | `64` | > 0 | Global batch" in exp  # the docstring under it
    assert "[ModelSpec](spec.md#modelspec)" in exp  # cross-page links
    assert "### AsIs " in pages["reference/policy.md"] and "### AsIs " not in exp
    schema = json.loads(pages["reference/ditkit.schema.json"])
    assert schema["title"] == "ModelSpec" and "NeighborhoodAttention" in schema["$defs"]


def test_the_guides_nav_adds_new_pages_and_drops_missing_ones(tmp_path):
    hooks = _load_script("hooks")
    (tmp_path / "guides").mkdir()
    (tmp_path / "guides" / "training.md").write_text("# Training\n")
    (tmp_path / "guides" / "bring-your-config.md").write_text("intro\n# Bring your config\n")
    (tmp_path / "guides" / "preemption.md").write_text("no heading\n")
    (tmp_path / "index.md").write_text("# Home\n")
    nav = [
        {"Home": "index.md"},
        {"Spec": [{"Reference": "reference/spec.md"}]},
        {"Guides": [{"Training": "guides/training.md"}, {"Gone": "guides/gone.md"}]},
    ]
    config = hooks.on_config({"docs_dir": str(tmp_path), "nav": nav})
    assert config["nav"] == [
        {"Home": "index.md"},
        {"Spec": [{"Reference": "reference/spec.md"}]},
        {
            "Guides": [
                {"Training": "guides/training.md"},
                {"Bring your config": "guides/bring-your-config.md"},
                {"Preemption": "guides/preemption.md"},
            ]
        },
    ]


def test_every_page_is_in_the_nav():
    """A page outside the nav is built but unreachable; guides are added by docs/hooks.py."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed: set[str] = set()

    def visit(entries):
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            if isinstance(value, list):
                visit(value)
            else:
                listed.add(value)

    visit(config["nav"])
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    missing = sorted(p for p in pages - listed if not p.startswith("guides/"))
    assert not missing, f"add these pages to the nav of mkdocs.yml: {missing}"
    assert {"reference/spec.md", "reference/commands.md", "api.md"} <= listed
