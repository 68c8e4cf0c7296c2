"""``ditkit describe --diagram``, ``ditkit describe A B`` and ``ditkit diff``."""

import json
import subprocess
import sys

from ditkit.cli import main
from tests.conftest import ROOT

TINY = "examples/tiny/tiny-hdit-neighborhood.yaml"
TINY_GLOBAL = "examples/tiny/tiny-hdit-global.yaml"


def test_describe_diagram_writes_svg_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "sub" / "arch.svg"
    assert main(["describe", TINY, "--diagram", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GMACs" in printed and f"wrote {out}" in printed
    svg = out.read_text()
    assert svg.startswith("<?xml") and "neighborhood 3×3" in svg


def test_describe_two_specs_prints_both_tables_and_the_differences(tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert main(["describe", TINY_GLOBAL, TINY, "--diagram", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("GMACs: forward multiply-adds") == 2
    assert "levels[0].attention" in printed and "2 field(s) differ" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diff_policy_shows_the_adapted_spec(capsys):
    assert main(["diff", "hdit-imagenet-128", "--policy", "core_patch", "--resolution", "256"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["field", "hdit-imagenet-128", "core_patch", "at", "256x256"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:-1]}
    assert rows["levels[0].down.factor"] == ["2", "4"]
    assert rows["input.resolution"] == ["[128,", "128]", "[256,", "256]"]


def test_diff_json(capsys):
    assert main(["diff", TINY_GLOBAL, TINY, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    paths = {c["path"]: c for c in data["changes"]}
    assert set(paths) == {"name", "levels[0].attention"}
    assert paths["levels[0].attention"]["b"] == {
        "kind": "neighborhood",
        "kernel_size": 3,
        "dilation": 1,
    }


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ditkit.cli",
            "describe",
            TINY,
            "--diagram",
            str(tmp_path / "a.pdf"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "write .svg or .png" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""  # checked before measuring
    for argv, message in [
        (["diff", TINY, "--policy", "add_levels"], "--resolution"),
        (["diff", TINY], "second spec"),
        (["diff", TINY, TINY_GLOBAL, "--policy", "as_is", "--resolution", "32"], "not both"),
        (["diff", TINY, "--policy", "add_levels", "--resolution", "48"], "power of two"),
    ]:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    assert main(["describe", TINY, "--diagram", str(tmp_path / "a.svg")]) == 2
    captured = capsys.readouterr()
    assert "pip install 'ditkit[diagram]'" in captured.err
    assert captured.out == ""  # refused before measuring anything
    assert not (tmp_path / "a.svg").exists()


def test_diff_of_two_specs_starts_without_torch_or_matplotlib():
    code = (
        "import sys; from ditkit.cli import main; "
        f"status = main(['diff', '{TINY_GLOBAL}', '{TINY}']); "
        "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules)); "
        "sys.exit(status)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "levels[0].attention" in proc.stdout
