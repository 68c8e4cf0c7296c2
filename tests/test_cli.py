"""The ``ditkit`` command: output formats, exit codes, no tracebacks on bad input."""

import json
import subprocess
import sys

import pytest

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


# ------------------------------------------------------------------------------ fast start

_PROBE = """
import sys
from ditkit.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as stop:
    status = stop.code
heavy = sorted(m for m in ("torch", "onnx", "onnxruntime", "numpy") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
sys.exit(status)
"""


@pytest.mark.parametrize("args", [
    ["--help"], ["--version"], ["presets"], ["schema"], ["schema", "--experiment"],
    ["validate", "examples/tiny/tiny-hdit-neighborhood.yaml", "hdit-imagenet-128"],
    ["sample", "--help"], ["train", "--help"],
])
def test_light_commands_do_not_import_torch(args):
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    heavy = proc.stderr.strip().splitlines()[-1]
    assert heavy.startswith("HEAVY=")
    assert "torch" not in heavy.split("=")[1].split(","), f"{args} imported {heavy}"


def test_version_and_module_entry_point():
    from ditkit import __version__

    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"ditkit {__version__}"


# ------------------------------------------------------------------------------ error boundary


def test_error_boundary_maps_errors_to_exit_codes(capsys, monkeypatch):
    import errno

    from ditkit.cli.common import run_command
    from ditkit.errors import EnvironmentFault, UserError
    from ditkit.spec import SpecError

    monkeypatch.delenv("DITKIT_DEBUG", raising=False)

    def raising(exc):
        def func(args):
            raise exc
        return func

    class Args:
        debug = False

    assert run_command(lambda a: None, Args()) == 0
    assert run_command(lambda a: 3, Args()) == 3
    assert run_command(raising(UserError("--steps 0: must be positive")), Args()) == 2
    assert capsys.readouterr().err == "error: --steps 0: must be positive\n"
    assert run_command(raising(SpecError([("levels[0].d_model", "too small")], "x.yaml")),
                       Args()) == 2
    assert "levels[0].d_model" in capsys.readouterr().err
    assert run_command(raising(EnvironmentFault("disk full writing run/ckpt")), Args()) == 1
    assert capsys.readouterr().err == "error: disk full writing run/ckpt\n"
    full = OSError(errno.ENOSPC, "No space left on device", "runs/x/model.safetensors")
    assert run_command(raising(full), Args()) == 1
    err = capsys.readouterr().err
    assert err == "error: runs/x/model.safetensors: No space left on device\n"
    assert run_command(raising(PermissionError(errno.EACCES, "Permission denied", "/ro")),
                       Args()) == 1
    # a bug is not an input error: its traceback stays
    with pytest.raises(ZeroDivisionError):
        run_command(raising(ZeroDivisionError("bug")), Args())
    with pytest.raises(FileNotFoundError):  # ENOENT is not the machine refusing
        run_command(raising(FileNotFoundError(errno.ENOENT, "gone", "x")), Args())


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec_version: 1\nname: x\n")
    proc = run("describe", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = run("--debug", "describe", str(bad))
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "error:" in proc.stderr


# ------------------------------------------------------------------------------ the resolver


def test_resolver_kinds(tmp_path):
    from ditkit.cli.common import UsageError, resolve_source

    spec = tmp_path / "m.yaml"
    spec.write_text("x")
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert resolve_source(str(spec)).kind == "file"
    assert resolve_source("hdit-imagenet-128").kind == "preset"
    assert resolve_source(str(ckpt)).kind == "checkpoint"
    assert resolve_source(str(run_dir), ("run",)).kind == "run"
    with pytest.raises(UsageError, match="presets:"):
        resolve_source("no-such-thing")
    with pytest.raises(UsageError, match="a run folder, but this takes"):
        resolve_source(str(run_dir), ("file", "preset"))
    with pytest.raises(UsageError, match="no such checkpoint"):
        resolve_source(str(tmp_path / "missing.safetensors"))
    with pytest.raises(UsageError, match="a preset name"):  # a preset where only files go
        resolve_source("hdit-imagenet-128", ("checkpoint", "run"))


def test_run_folder_without_checkpoints_exits_2(tmp_path):
    proc = run("evaluate", str(tmp_path))
    assert proc.returncode == 2 and "no checkpoints" in proc.stderr
