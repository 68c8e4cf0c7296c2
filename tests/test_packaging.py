"""Packaging a user can trust: ``python -m build`` makes a wheel and an sdist, and in a fresh
venv that holds only ditkit's core dependencies (the CPU torch among them, no extras) the
installed wheel runs ``ditkit --version``, ``ditkit presets`` and a short ``ditkit demo``.

No network: the wheel is built without build isolation (setuptools from this interpreter) and
installed with ``--no-index``; the fresh venv sees this interpreter's copies of the core
dependencies through a ``.pth`` file naming a folder of links to exactly those distributions
(so a dependency that is only in the ``dev`` extra, or an optional import the demo does not
guard, fails here as it would for a user)."""

from __future__ import annotations

import email
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

OPTIONAL = (
    "onnx",
    "onnxruntime",
    "onnxscript",
    "natten",
    "diffusers",
    "matplotlib",
    "tensorrt",
    "hypothesis",
    "pytest",
)


def _clean_env() -> dict[str, str]:
    """The environment without this checkout on the path (a user's shell)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """sdist + wheel of a copy of the package (the checkout itself is left untouched)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "ditkit", src / "ditkit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _version() -> str:
    text = (ROOT / "ditkit" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


@pytest.mark.slow  # ~5 s idle, 12 s on a loaded machine; .ci/run runs it
def test_build_makes_a_wheel_and_an_sdist_with_the_demo_and_one_version(dist):
    version = _version()
    wheel = dist / f"ditkit-{version}-py3-none-any.whl"
    assert wheel.is_file() and (dist / f"ditkit-{version}.tar.gz").is_file()
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = email.message_from_bytes(z.read(f"ditkit-{version}.dist-info/METADATA"))
    assert {
        "ditkit/training/assets/demo-digits.yaml",
        "ditkit/training/assets/tiny-hdit-digits.yaml",
        "ditkit/py.typed",
    } <= names
    assert meta["Version"] == version
    requires = meta.get_all("Requires-Dist")
    core = {re.split(r"[<>=;\[ ]", r)[0].lower() for r in requires if "extra ==" not in r}
    assert {"torch", "scikit-learn", "pydantic"} <= core
    assert not core & set(OPTIONAL), "an optional package became a core dependency"
    assert "all" in meta.get_all("Provides-Extra")
    # the version is written once: pyproject reads it from ditkit/__init__.py
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]


def _requirement_names(dist_name: str) -> list[str]:
    """Names of ``dist_name``'s requirements that apply here without extras."""
    from packaging.requirements import Requirement

    out = []
    for text in md.distribution(dist_name).requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(req.name)
    return out


def _core_closure() -> list[md.Distribution]:
    """The installed distributions ditkit's core dependencies need (torch included)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [re.split(r"[<>=;\[ ]", r)[0] for r in project["dependencies"]]
    seen: dict[str, md.Distribution] = {}
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            d = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional requirement of a dependency that is not installed here
        seen[key] = d
        todo.extend(_requirement_names(name))
    return list(seen.values())


def _link_core_dependencies(folder: Path) -> list[str]:
    """Symlink the core closure's top-level files and metadata folders into ``folder``."""
    folder.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    names = []
    for d in _core_closure():
        names.append(d.metadata["Name"])
        tops = {Path(str(f)).parts[0] for f in d.files or []}
        for top in tops:
            path = Path(d.locate_file(top))
            if top.endswith(".pth") or not path.exists() or top in ("..", "__pycache__"):
                continue
            if not (folder / top).exists():
                (folder / top).symlink_to(path)
        assert site.exists()
    return names


@pytest.mark.slow
def test_the_wheel_runs_the_demo_in_a_fresh_venv(dist, tmp_path):
    """~1 min: venv, install, ``--version``, ``presets``, a 20-step demo scored on 10 digits."""
    env = _clean_env()
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env, timeout=120
    )
    py = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    deps = _link_core_dependencies(tmp_path / "core-deps")
    Path(purelib, "core-deps.pth").write_text(str(tmp_path / "core-deps") + "\n")
    assert "torch" in deps and "scikit-learn" in deps
    hidden = subprocess.run(
        [
            str(py),
            "-c",
            f"import importlib.util as u; print([m for m in {list(OPTIONAL)!r} if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert hidden.stdout.strip() == "[]", f"optional packages visible: {hidden.stdout}"

    wheel = next(dist.glob("*.whl"))
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-index",
            "--no-cache-dir",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    ditkit = venv / "bin" / "ditkit"

    def run(*args, timeout=300):
        return subprocess.run(
            [str(ditkit), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=timeout,
        )

    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"ditkit {_version()}", proc
    proc = run("presets")
    assert (
        proc.returncode == 0 and "dit-xl-2" in proc.stdout and "hdit-imagenet-128" in proc.stdout
    ), proc.stderr
    where = subprocess.run(
        [str(py), "-c", "import ditkit; print(ditkit.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert Path(where.stdout.strip()).is_relative_to(purelib), where  # not the checkout
    proc = run(
        "demo",
        "--steps",
        "20",
        "--count",
        "10",
        "--out",
        str(tmp_path / "demo"),
        "--no-progress",
        "--json",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["frechet"] > 0
    assert (tmp_path / "demo" / "samples.png").is_file()
    assert (tmp_path / "demo" / "eval.json").is_file()
