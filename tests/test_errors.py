"""``ditkit.errors.require``: the one helper every optional import goes through names the
``pip install 'ditkit[...]'`` line, and that extra exists and brings the module."""

from __future__ import annotations

import re
import sys
import tomllib

import pytest

from ditkit.errors import EXTRAS, MissingExtra, UserError, install_hint, require
from tests.conftest import ROOT


def _extras() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["optional-dependencies"]


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "_", re.split(r"[<>=;\[ ]", requirement)[0]).lower()


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_each_hint_names_an_extra_that_installs_the_module(module):
    extra = EXTRAS[module]
    assert install_hint(module).endswith(f"'ditkit[{extra}]'")
    assert module in {_name(r) for r in _extras()[extra]}, (module, extra)


def test_all_collects_the_extras_that_install_anywhere():
    (line,) = _extras()["all"]
    named = set(re.fullmatch(r"ditkit\[(.*)\]", line).group(1).split(","))
    assert named == {"onnx", "openvino", "vae", "diagram"}
    assert named <= set(_extras())


def test_a_missing_module_is_a_user_error_with_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` fails
    with pytest.raises(MissingExtra) as err:
        require("onnx", "exporting to ONNX")
    assert isinstance(err.value, UserError)
    assert str(err.value) == (
        "onnx is not installed (exporting to ONNX needs it): pip install 'ditkit[onnx]'"
    )
    monkeypatch.setitem(sys.modules, "natten", None)
    with pytest.raises(RuntimeError, match=r"pip install --no-build-isolation 'ditkit\[natten\]'"):
        require("natten", "a backend", RuntimeError)


def test_an_installed_module_is_returned_and_a_broken_one_is_not_hidden(tmp_path, monkeypatch):
    import json

    assert require("json", "json") is json
    (tmp_path / "ditkit_broken_pkg.py").write_text("import ditkit_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="ditkit_no_such_dependency"):
        require("ditkit_broken_pkg", "a test")
