"""docs/guides/python.md: every ```python block runs (from a folder that has the checkout's
examples/), one fresh namespace per block; a block preceded by ``<!-- skip: reason -->`` is
left out. The blocks that train or export are in the slow set."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

GUIDE = ROOT / "docs" / "guides" / "python.md"


def _blocks() -> list[str]:
    text = GUIDE.read_text()
    out = []
    for match in re.finditer(r"(?m)^```python\n(.*?)^```$", text, re.S):
        before = text[: match.start()].rstrip().splitlines()[-1:]
        if before and before[0].startswith("<!-- skip"):
            continue
        out.append(match.group(1))
    return out


def _params():
    for i, code in enumerate(_blocks()):
        slow = "ditkit.train(" in code or "ditkit.export(" in code
        yield pytest.param(code, id=f"block{i}", marks=[pytest.mark.slow] if slow else [])


def test_the_guide_has_blocks_for_every_front_door_function():
    code = "\n".join(_blocks())
    for name in ("load_spec", "build", "load", "sample", "train", "export", "adapt"):
        assert f"ditkit.{name}(" in code, name


@pytest.mark.parametrize("code", list(_params()))
def test_guide_block_runs(code, tmp_path, monkeypatch):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(GUIDE), "exec"), {"__name__": "__guide__"})
