"""The ``ditkit`` command: output formats, exit codes, no tracebacks on bad input."""

import json
import subprocess
import sys

import pytest

from ditkit.cli import main
from tests.conftest import ROOT


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "ditkit.cli", *args], cwd=ROOT, capture_output=True, text=True
    )


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
    bad.write_text(
        (ROOT / "examples/tiny/tiny-hdit-neighborhood.yaml")
        .read_text()
        .replace("kernel_size: 3", "kernel_size: 4")
    )
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


def test_validate_json_names_every_problem(tmp_path):
    proc = run(
        "validate",
        "examples/tiny/tiny-hdit-neighborhood.yaml",
        "tests/data/bad-spec.yaml",
        "--json",
    )
    assert proc.returncode == 2
    out = json.loads(proc.stdout)
    assert out["ok"] is False and [s["ok"] for s in out["specs"]] == [True, False]
    fields = {p["field"] for p in out["specs"][1]["problems"]}
    assert {"block.d_head", "levels[0].attention.kernel_size", "input.resolution"} <= fields


def test_validate_all_examples():
    """Specs and experiment files alike (an experiment is validated as one, model included)."""
    specs = sorted(str(p) for p in (ROOT / "examples").rglob("*.yaml"))
    experiments = [p for p in specs if "/experiments/" in p]
    assert experiments
    proc = run("validate", *specs)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ok ") == len(specs)
    assert proc.stdout.count("(experiment ") == len(experiments)


def test_demo_runs(tmp_path):
    # a shortened demo (the full one trains for minutes): 2 steps, 20 evaluation samples
    proc = run("demo", "--steps", "2", "--count", "20", "--out", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr
    assert "label accuracy" in proc.stdout and "Frechet distance" in proc.stdout
    assert (tmp_path / "demo" / "samples.png").is_file()
    # guided (the experiment's scale) and unguided numbers, both printed and both on disk
    assert "without guidance: label accuracy" in proc.stdout
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    unguided = json.loads((tmp_path / "demo" / "eval-unguided.json").read_text())
    assert unguided["count"] == 20
    assert final["unguided_accuracy"] == round(unguided["accuracy"], 4)
    assert {"accuracy", "frechet", "unguided_frechet"} <= final.keys()


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


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["presets"],
        ["schema"],
        ["schema", "--experiment"],
        ["validate", "examples/tiny/tiny-hdit-neighborhood.yaml", "hdit-imagenet-128"],
        ["sample", "--help"],
        ["train", "--help"],
    ],
)
def test_light_commands_do_not_import_torch(args):
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], cwd=ROOT, capture_output=True, text=True
    )
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
    assert (
        run_command(raising(SpecError([("levels[0].d_model", "too small")], "x.yaml")), Args()) == 2
    )
    assert "levels[0].d_model" in capsys.readouterr().err
    assert run_command(raising(EnvironmentFault("disk full writing run/ckpt")), Args()) == 1
    assert capsys.readouterr().err == "error: disk full writing run/ckpt\n"
    full = OSError(errno.ENOSPC, "No space left on device", "runs/x/model.safetensors")
    assert run_command(raising(full), Args()) == 1
    err = capsys.readouterr().err
    assert err == (
        "error: runs/x/model.safetensors: No space left on device; the command "
        "stopped there, nothing written earlier was lost\n"
    )
    assert (
        run_command(raising(PermissionError(errno.EACCES, "Permission denied", "/ro")), Args()) == 1
    )
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


# ------------------------------------------------------------------------------ vocabulary


def _all_parsers():
    import argparse

    from ditkit.cli import build_parser
    from ditkit.cli.docs import _commands

    return [(name, p) for name, p, _ in _commands(build_parser())], argparse


def test_every_option_has_help_and_shows_its_default():
    parsers, argparse = _all_parsers()
    assert len(parsers) >= 16
    for name, parser in parsers:
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name} {action.option_strings[0]}: no help text"
            default = action.default
            if default not in (None, False, [], argparse.SUPPRESS) and not isinstance(
                action, argparse._HelpAction
            ):
                assert "default" in (
                    action.help % {"default": default}
                    if "%(default)" in action.help
                    else action.help
                ) or f"(default: {default})" in " ".join(text.split()), (
                    f"{name} {action.option_strings[0]}: default {default!r} not in help"
                )


def test_one_vocabulary_across_commands():
    """The same option names for the same things; no command keeps an old spelling visible."""
    parsers, argparse = _all_parsers()
    visible = {
        name: {o for a in p._actions if a.help != argparse.SUPPRESS for o in a.option_strings}
        for name, p in parsers
    }
    for name, opts in visible.items():
        assert not opts & {"--cfg", "--num", "--samples", "--eval-count"}, (name, opts)
    computing = [
        "ditkit sample",
        "ditkit evaluate",
        "ditkit train",
        "ditkit extrapolate",
        "ditkit bench sample",
        "ditkit bench attention",
        "ditkit encode",
        "ditkit export",
        "ditkit demo",
    ]
    for name in computing:
        assert "--threads" in visible[name], name
    for name in computing[:-2] + ["ditkit encode"]:
        assert "--device" in visible[name], name
    for name in [
        "ditkit sample",
        "ditkit evaluate",
        "ditkit extrapolate",
        "ditkit train",
        "ditkit demo",
        "ditkit bench sample",
        "ditkit bench attention",
        "ditkit encode",
        "ditkit shards",
    ]:
        assert "--no-progress" in visible[name], name
    for name in ["ditkit sample", "ditkit evaluate", "ditkit extrapolate"]:
        parser = dict(parsers)[name]
        sampler = next(a for a in parser._actions if "--sampler" in a.option_strings)
        assert sampler.choices and "heun" in sampler.choices, name
    for name, parser in parsers:
        for a in parser._actions:
            if "--device" in a.option_strings:
                assert a.default == "auto", name
            if "--json" in a.option_strings:  # a switch (the old bench FILE form is optional)
                assert a.nargs in (0, "?"), name


def test_the_command_reference_lists_every_command_and_option():
    """The site's command reference is generated from the parsers (docs/gen_reference.py):
    every command gets a section, every visible option a row with its help text."""
    import argparse

    from ditkit.cli import build_parser
    from ditkit.cli.docs import _commands, command_reference

    text = command_reference()
    names = [name for name, _, _ in _commands(build_parser())]
    assert "ditkit bench attention" in names and "ditkit trt build" in names
    for name, sub, _ in _commands(build_parser()):
        section = text.split(f"## `{name}`\n", 1)[1].split("\n## ", 1)[0]
        for a in sub._actions:
            if a.option_strings and a.help != argparse.SUPPRESS and "-h" not in a.option_strings:
                assert f"`{a.option_strings[-1]}`" in section, (name, a.option_strings)
    sample = text.split("## `ditkit sample`", 1)[1].split("\n## ", 1)[0]
    assert "| `--cfg-scale` | `CFG_SCALE` |" in sample and "guidance" in sample


def test_set_overrides_on_describe_and_validate(capsys):
    assert main(["describe", "hdit-imagenet-128", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert main(["describe", "hdit-imagenet-128", "--set", "levels.0.d_model=256", "--json"]) == 0
    smaller = json.loads(capsys.readouterr().out)
    assert smaller["levels"][0]["d_model"] == 256 and smaller["params"] < base["params"]
    proc = run("describe", "hdit-imagenet-128", "--set", "levels.0.d_modl=256")
    assert proc.returncode == 2 and "levels[0].d_modl" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run(
        "validate",
        "examples/tiny/tiny-hdit-neighborhood.yaml",
        "--set",
        "levels.0.attention.kernel_size=4",
    )
    assert proc.returncode == 2 and "kernel_size" in proc.stderr and "odd" in proc.stderr


def test_train_with_set_records_the_resolved_experiment(tmp_path):
    import yaml

    exp = ROOT / "examples" / "experiments" / "demo-digits.yaml"
    out = tmp_path / "run"
    proc = run(
        "train",
        str(exp),
        "--out",
        str(out),
        "--no-progress",
        "--steps",
        "1",
        "--set",
        "training.batch_size=8",
        "--set",
        "optimizer.lr=3e-4",
        "--set",
        "checkpoint.every=1",
        "--set",
        "preview.every=0",
        "--set",
        "evaluation.enabled=false",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["step"] == 1 and summary["run"] == str(out) and summary["threads"] == 1
    assert summary["device"] == "cpu" and summary["checkpoint"].startswith(str(out))
    recorded = yaml.safe_load((out / "experiment.yaml").read_text())
    assert recorded["training"]["batch_size"] == 8 and recorded["training"]["steps"] == 1
    assert recorded["optimizer"]["lr"] == pytest.approx(3e-4)
    assert isinstance(recorded["model"], dict)  # the model inlined: resolved
    proc = run(
        "train", str(exp), "--out", str(tmp_path / "bad"), "--set", "training.batch_size=zero"
    )
    assert proc.returncode == 2 and "training.batch_size" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_cuda_on_a_machine_without_it_is_one_line_exit_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the branch is unit-tested in test_device.py")
    proc = run("describe", "hdit-imagenet-128")  # sanity: the machine runs commands
    assert proc.returncode == 0
    for args in (
        ["bench", "attention", "--device", "cuda", "--grids", "14", "--kernel", "3"],
        ["sample", "hdit-imagenet-128", "--device", "cuda", "--steps", "1"],
        ["sample", "hdit-imagenet-128", "--device", "gpu", "--steps", "1"],
    ):
        proc = run(*args)
        assert proc.returncode == 2, args
        assert (
            "no CUDA device is available" in proc.stderr
            or "use cpu, cuda, cuda:N or auto" in proc.stderr
        ), proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_one_list_syntax(capsys):
    from ditkit.cli.common import list_arg, parse_list
    from ditkit.cli.extrapolate import policy_list

    assert parse_list(" 0, 1,,2 ") == ["0", "1", "2"]
    assert list_arg(["32,48x64"], "--resolutions") == ["32", "48x64"]
    assert capsys.readouterr().err == ""
    assert list_arg(["32", "48x64"], "--resolutions") == ["32", "48x64"]  # the old form
    assert "space-separated --resolutions values are deprecated" in capsys.readouterr().err
    # a policy's own key=value options stay with it
    assert policy_list(
        ["as_is,core_patch:factor=4,level=0,local_core:kernel_size=7,add_levels"]
    ) == ["as_is", "core_patch:factor=4,level=0", "local_core:kernel_size=7", "add_levels"]
    assert policy_list(["as_is", "add_levels"]) == ["as_is", "add_levels"]


def test_every_help_text_is_torch_free():
    """Formatting every command's help (all parsers built) imports no torch."""
    code = (
        "import sys\n"
        "from ditkit.cli import build_parser\n"
        "from ditkit.cli.docs import _commands\n"
        "n = sum(len(p.format_help()) > 0 for _, p, _ in _commands(build_parser()))\n"
        "print(n, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    count, torch_loaded = proc.stdout.split()
    assert int(count) >= 16 and torch_loaded == "False"
