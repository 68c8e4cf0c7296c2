"""The ``ditkit`` command: output formats, exit codes, no tracebacks on bad input."""

import json
import subprocess
import sys

from ditkit.cli import main
from tests.conftest import ROOT


def run(*args):
    return subprocess.run([sys.executable, "-m", "ditkit.cli", *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_describe_json_dit_xl_2(capsys):
    assert main(["describe", "examples/dit/dit-xl-2.yaml", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == 675_129_632
    assert round(data["gmacs"], 1) == 118.6
    assert data["resolution"] == [32, 32]
    assert data["levels"][0]["grid"] == [16, 16]


def test_describe_table_and_preset_name(capsys):
    assert main(["describe", "hdit-imagenet-128", "--resolution", "256"]) == 0
    out = capsys.readouterr().out
    assert "neighborhood 7x7" in out and "64x64" in out and "GMACs" in out


def test_validate_bad_spec_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "examples/tiny/tiny-hdit-neighborhood.yaml").read_text()
                   .replace("kernel_size: 3", "kernel_size: 4"))
    proc = run("validate", str(bad))
    assert proc.returncode == 2
    assert "levels[0].attention.kernel_size" in proc.stderr and "odd" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_describe_bad_resolution_exits_2():
    proc = run("describe", "hdit-imagenet-128", "--resolution", "100")
    assert proc.returncode == 2 and "--resolution" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("describe", "hdit-imagenet-128", "--resolution", "big")
    assert proc.returncode == 2 and "HxW" in proc.stderr


def test_unknown_spec_reference_exits_2():
    proc = run("describe", "no-such-model")
    assert proc.returncode == 2 and "presets:" in proc.stderr and "Traceback" not in proc.stderr


def test_schema_subcommand(tmp_path):
    out = tmp_path / "schema.json"
    assert main(["schema", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["title"] == "ModelSpec"


def test_validate_all_examples():
    specs = sorted(str(p) for p in (ROOT / "examples").rglob("*.yaml")
                   if "experiments" not in p.parts)  # experiment specs: tests/train
    proc = run("validate", *specs)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ok ") == len(specs)


def test_demo_runs(tmp_path):
    # a shortened demo (the full one trains for minutes): 2 steps, 20 evaluation samples
    proc = run("demo", "--steps", "2", "--samples", "20", "--out", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr
    assert "label accuracy" in proc.stdout and "Frechet distance" in proc.stdout
    assert (tmp_path / "demo" / "samples.png").is_file()
