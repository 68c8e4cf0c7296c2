"""The code blocks of the conversion guides run, in order, in one folder (each block a fresh
process, as a reader would run them); a block after ``<!-- skip: reason -->`` is left out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDES = ROOT / "docs" / "guides"


def blocks(path: Path) -> list[tuple[str, str]]:
    """``(language, code)`` of every runnable fenced block (python / bash) not marked skip."""
    text = path.read_text()
    out = []
    for m in re.finditer(r"(<!-- skip:[^\n]*-->\n)?```(python|bash)\n(.*?)```", text, re.DOTALL):
        if not m.group(1):
            out.append((m.group(2), m.group(3)))
    return out


def run_blocks(path: Path, folder: Path) -> list[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    outputs = []
    for lang, code in blocks(path):
        cmd = (
            [sys.executable, "-c", code]
            if lang == "python"
            else ["bash", "-euo", "pipefail", "-c", code]
        )
        r = subprocess.run(
            cmd, check=False, cwd=folder, env=env, capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, f"{path.name} block failed:\n{code}\n{r.stdout}\n{r.stderr}"
        outputs.append(r.stdout)
    return outputs


@pytest.mark.slow
def test_diffusers_guide_runs(tmp_path):
    pytest.importorskip("diffusers")
    out = run_blocks(GUIDES / "diffusers.md", tmp_path)
    assert "(4, 8, 8, 1)" in out[2]
    diff = float(re.search(r"max difference / scale: (\S+)", out[2]).group(1))
    assert diff <= 1e-5
    assert "conditioning.noise.frequency_shift" in out[-1]


@pytest.mark.slow
def test_bring_your_config_guide_runs(tmp_path):
    out = run_blocks(GUIDES / "bring-your-config.md", tmp_path)
    assert any("85,079,300" in o for o in out)
