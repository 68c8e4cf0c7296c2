"""Issue 13: bad input and faults end in one clear line and the right exit status (2: the user
can fix it; 1: the machine refused), never a traceback or a silently wrong result.

Each test names the case of the issue it covers. The commands run in this process through
``ditkit.cli.main`` (fast: torch is imported once)."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml

from ditkit.cli import main
from tests.patching import patch_everywhere
from ditkit.runtime.checkpoint import load_checkpoint, save_checkpoint
from ditkit.training import checkpoints as C
from ditkit.training.loop import train

from .training.conftest import tiny_experiment, tiny_experiment_data, tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny" / "tiny-hdit-digits.yaml"


@pytest.fixture(autouse=True)
def _plain(monkeypatch):
    monkeypatch.delenv("DITKIT_DEBUG", raising=False)
    monkeypatch.delenv("DITKIT_NO_SIZE_LIMITS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(capsys, *args) -> tuple[int, str]:
    """``(exit status, stderr)``; asserts the error is one clean report, no traceback."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trained run folder (2 steps, one checkpoint)."""
    folder = tmp_path_factory.mktemp("run") / "run"
    torch.set_num_threads(1)
    train(tiny_experiment(steps=2, checkpoint={"every": 2}), folder, progress=False)
    return folder


# ------------------------------------------------------------------ files of the wrong kind


@pytest.mark.parametrize(
    "command",
    [["validate"], ["describe"], ["sample", "--out", "g.png"], ["export", "--out", "m.onnx"]],
)
def test_a_pytorch_pt_points_to_ditkit_convert(tmp_path, capsys, command):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pt")
    code, err = cli(capsys, command[0], tmp_path / "model.pt", *command[1:])
    assert code == 2 and "PyTorch checkpoint" in err and "ditkit convert" in err


@pytest.mark.parametrize(
    "payload", [b"\x00\x01\x02\xff" * 10, "d_model: caf\u00e9".encode("latin-1")]
)
def test_binary_and_non_utf8_spec_and_experiment_files(tmp_path, capsys, payload):
    (tmp_path / "spec.yaml").write_bytes(payload)
    for args in (
        ["validate", tmp_path / "spec.yaml"],
        ["describe", tmp_path / "spec.yaml"],
        ["train", tmp_path / "spec.yaml", "--out", tmp_path / "run"],
    ):
        code, err = cli(capsys, *args)
        assert code == 2 and "not a text file" in err, (args, err)
    assert not (tmp_path / "run").exists()


def test_an_experiment_whose_model_is_a_binary_file(tmp_path, capsys):
    (tmp_path / "model.yaml").write_bytes(b"\x80\x04\x95\x00\xff")
    data = tiny_experiment_data(steps=2)
    data["model"] = "model.yaml"
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    code, err = cli(capsys, "train", tmp_path / "exp.yaml", "--out", tmp_path / "run")
    assert code == 2 and "model" in err and "model.yaml" in err
    assert not (tmp_path / "run").exists()


def test_a_directory_given_as_a_spec(tmp_path, capsys):
    code, err = cli(capsys, "describe", tmp_path)
    assert code == 2 and "a directory" in err


def test_a_file_that_is_not_onnx(tmp_path, capsys):
    (tmp_path / "m.onnx").write_bytes(b"this is not a protobuf at all \xff\xff")
    code, err = cli(capsys, "sample", tmp_path / "m.onnx", "--out", tmp_path / "g.png")
    assert code == 2 and "not an ONNX model" in err


def test_a_bf16_onnx_on_onnxruntime_cpu_says_which_runtimes_can_run_it(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    # a one-op bf16 graph: onnxruntime's CPU provider has no bf16 Gemm kernel
    node = helper.make_node("Gemm", ["a", "b"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.BFLOAT16, [2, 2]),
            helper.make_tensor_value_info("b", TensorProto.BFLOAT16, [2, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "bf16.onnx")
    code, err = cli(capsys, "sample", tmp_path / "bf16.onnx", "--out", tmp_path / "g.png")
    assert code == 2 and "bf16" in err and "CUDA" in err and "TensorRT" in err, err


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--count", "0"], "--count 0"),  # wrote 16 samples before
        (["--count", "-3"], "--count -3"),
        (["--cfg-scale", "nan", "--classes", "1"], "--cfg-scale nan: must be a finite number"),
        (["--cfg-scale", "inf", "--classes", "1"], "--cfg-scale inf: must be a finite number"),
        (["--steps", "100000000"], "steps 100000000"),  # 6 GB before
    ],
)
def test_sample_arguments_that_gave_garbage_are_refused(tmp_path, capsys, args, needle):
    code, err = cli(
        capsys, "sample", TINY, "--out", tmp_path / "g.png", "--objective", "edm", *args
    )
    assert code == 2 and needle in err, err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_without_cuda(tmp_path, capsys):
    code, err = cli(capsys, "sample", TINY, "--out", tmp_path / "g.png", "--device", "cuda")
    assert code == 2 and "CUDA" in err and "--device cpu" in err


def test_fid_weights_that_are_a_pickle(tmp_path, capsys):
    from PIL import Image

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    torch.save({"x": Evil()}, tmp_path / "weights.pth")
    for name in ("real", "fake"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / name / f"{i}.png")
    code, err = cli(
        capsys,
        "evaluate",
        "--real",
        tmp_path / "real",
        "--fake",
        tmp_path / "fake",
        "--fid-weights",
        tmp_path / "weights.pth",
    )
    assert code == 2 and "can be read safely" in err and "weights_only" in err
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------ exit codes of `train`


def _exp(tmp_path, name="exp.yaml", **sections):
    sections.setdefault("checkpoint", {"every": 2})
    data = tiny_experiment_data("edm", 2, **sections)
    (tmp_path / name).write_text(yaml.safe_dump(data))
    return tmp_path / name


@pytest.mark.parametrize(
    "sections, needle",
    [
        ({"precision": {"attention_backend": "nope"}}, "unknown attention backend"),
        ({"preview": {"sampler": "nope"}}, "unknown sampler"),
        ({"training": {"batch_size": 10**12}}, "training.batch_size"),  # 15 GB in 60 s before
        ({"preview": {"every": 1, "count": 10**12}}, "preview.count"),
    ],
)
def test_train_setup_errors_exit_2_and_leave_no_run_folder(tmp_path, capsys, sections, needle):
    code, err = cli(
        capsys,
        "train",
        _exp(tmp_path, **sections),
        "--out",
        tmp_path / "runs" / "r",
        "--no-progress",
    )
    assert code == 2 and needle in err, err
    assert not (tmp_path / "runs").exists()


def test_resume_on_an_empty_folder_and_out_onto_an_existing_run_exit_2(tmp_path, capsys):
    exp = _exp(tmp_path)
    (tmp_path / "empty").mkdir()
    code, err = cli(capsys, "train", exp, "--out", tmp_path / "empty", "--resume")
    assert code == 2 and "no complete checkpoint" in err
    assert cli(capsys, "train", exp, "--out", tmp_path / "r", "--no-progress")[0] == 0
    code, err = cli(capsys, "train", exp, "--out", tmp_path / "r", "--no-progress")
    assert code == 2 and "already holds checkpoints" in err


def test_resume_with_another_experiment_is_refused_unless_intended(tmp_path, capsys):
    exp = _exp(tmp_path)
    other = _exp(tmp_path, "other.yaml", training={"batch_size": 32}, optimizer={"lr": 1e-3})
    run = tmp_path / "r"
    assert cli(capsys, "train", exp, "--out", run, "--no-progress")[0] == 0
    before = (run / "experiment.yaml").read_text()
    code, err = cli(capsys, "train", other, "--out", run, "--resume", "--steps", "4")
    assert code == 2 and "training.batch_size: 16 -> 32" in err and "optimizer.lr" in err
    assert (run / "experiment.yaml").read_text() == before  # not overwritten
    # total steps and cadences may change, and are recorded
    assert (
        cli(capsys, "train", exp, "--out", run, "--resume", "--steps", "4", "--no-progress")[0] == 0
    )
    record = json.loads((run / "resume-changes.json").read_text())["resumes"]
    assert record[-1]["step"] == 2
    assert record[-1]["changes"] == {"training.steps": {"old": 2, "new": 4, "allowed": True}}
    # an intended change, recorded with what it was
    assert (
        cli(
            capsys,
            "train",
            other,
            "--out",
            run,
            "--resume",
            "--steps",
            "6",
            "--allow-changes",
            "--no-progress",
        )[0]
        == 0
    )
    changes = json.loads((run / "resume-changes.json").read_text())["resumes"][-1]["changes"]
    assert changes["training.batch_size"] == {"old": 16, "new": 32, "allowed": False}
    assert changes["optimizer.lr"]["new"] == 1e-3


# ------------------------------------------------------------------ no silent garbage


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_tensors(run_dir, tmp_path, capsys):
    ckpt = load_checkpoint(C.latest_checkpoint(run_dir / "checkpoints")[1] / "ema.safetensors")
    tensors = dict(ckpt.tensors)
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_checkpoint(tmp_path / "bad.safetensors", tensors, ckpt.spec, objective=ckpt.objective)
    code, err = cli(capsys, "sample", tmp_path / "bad.safetensors", "--out", tmp_path / "g.png")
    assert code == 2 and name in err and "NaN or inf" in err
    assert not (tmp_path / "g.png").exists()


def test_shards_checks_every_image(tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "images" / "a"
    src.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(src / f"{i}.png")
    good = (src / "0.png").read_bytes()
    (src / "9.png").write_bytes(good[: len(good) // 2])  # truncated: PIL fails on decode
    code, err = cli(
        capsys,
        "shards",
        tmp_path / "images",
        "--out",
        tmp_path / "shards",
        "--shard-size",
        "2",
        "--no-progress",
    )
    assert code == 2 and "9.png" in err and "not a readable image" in err
    assert not list((tmp_path / "shards").glob("*.tar"))  # no half dataset


# ------------------------------------------------------------------ the environment


def test_disk_full_while_writing_a_checkpoint_exits_1_and_keeps_earlier_ones(
    tmp_path, capsys, monkeypatch
):
    from safetensors import SafetensorError

    exp = _exp(tmp_path, training={"steps": 4}, checkpoint={"every": 2})
    run = tmp_path / "r"
    import safetensors.torch as st

    real = st.save_file
    calls = {"n": 0}

    def full(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint (model, EMA, state) goes through
            raise SafetensorError(
                "Error while serializing: IoError(Os { code: 28, kind: "
                'StorageFull, message: "No space left on device" })'
            )
        return real(tensors, path, metadata=metadata)

    patched = patch_everywhere(monkeypatch, st, "save_file", full)
    assert "ditkit.training.checkpoints" in patched  # the writer the run uses
    code, err = cli(capsys, "train", exp, "--out", run, "--no-progress")
    assert code == 1 and err.count("\n") == 1
    assert "step-000004" in err and "the disk is full" in err and "intact" in err
    assert [s for s, _ in C.list_checkpoints(run / "checkpoints")] == [2]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    C.read_state(run / "checkpoints" / "step-000002")  # complete and readable


@pytest.mark.parametrize(
    "code_, reason", [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied")]
)
def test_read_only_or_unwritable_output_exits_1(tmp_path, capsys, monkeypatch, code_, reason):
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(code_, os.strerror(code_), str(tmp_path / "out"))

    (tmp_path / "g.png").write_bytes(b"earlier")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, err = cli(
        capsys,
        "sample",
        TINY,
        "--out",
        tmp_path / "g.png",
        "--steps",
        "1",
        "--count",
        "1",
        "--objective",
        "edm",
        "--no-progress",
    )
    assert code == 1 and reason in err and "untouched" in err and err.count("\n") == 1
    assert (tmp_path / "g.png").read_bytes() == b"earlier"


def test_an_unreadable_spec_exits_1(tmp_path, capsys, monkeypatch):
    from ditkit.spec import io as spec_io

    (tmp_path / "m.yaml").write_text(TINY.read_text())

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "m.yaml"))

    monkeypatch.setattr(spec_io, "open", denied, raising=False)
    code, err = cli(capsys, "describe", tmp_path / "m.yaml")
    assert code == 1 and "permission denied" in err


def test_written_files_honour_the_umask(tmp_path):
    from ditkit.files import atomic_path

    old = os.umask(0o002)
    try:
        with atomic_path(tmp_path / "a.json") as tmp:
            Path(tmp).write_text("{}")
        os.umask(0o077)
        with atomic_path(tmp_path / "b.json") as tmp:
            Path(tmp).write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o664  # was 0600
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600


def test_a_run_folder_is_readable_by_the_group(tmp_path):
    old = os.umask(0o022)
    try:
        train(
            tiny_experiment(
                steps=2, checkpoint={"every": 2}, preview={"every": 2, "count": 2, "steps": 1}
            ),
            tmp_path / "run",
            progress=False,
        )
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert {
        "run/scalars.csv",
        "run/summary.json",
        "run/previews/step-000002.png",
        "run/loss.png",
        "run/checkpoints/step-000002/ema.safetensors",
    } <= set(modes)
    wrong = {k: oct(m) for k, m in modes.items() if m != 0o644}
    assert not wrong, wrong


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DITKIT_DEBUG", "1")
    capsys.readouterr()
    assert main(["sample", str(TINY), "--out", str(tmp_path / "g.png"), "--count", "0"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_tiny_model_fixture_is_valid():
    from ditkit import spec as S

    S.validate(tiny_model())


def test_no_size_limits_flag_lifts_the_limits(tmp_path, capsys, monkeypatch):
    data = tiny_model()
    data["levels"][1]["d_model"] = 2**17  # ~170 B parameters by the estimate
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("DITKIT_NO_SIZE_LIMITS", "0")  # restored (unset) after the test
    code, err = cli(capsys, "validate", tmp_path / "big.yaml")
    assert code == 2 and "levels[1].d_model" in err and "--no-size-limits" in err
    assert cli(capsys, "validate", tmp_path / "big.yaml", "--no-size-limits")[0] == 0


@pytest.mark.parametrize(
    "args, says",
    [
        (["--sigma-min", "-1"], "--sigma-min -1.0: use a positive, finite noise level"),
        (["--sigma-max", "nan"], "--sigma-max nan: use a positive, finite noise level"),
        (
            ["--sigma-min", "5", "--sigma-max", "1"],
            "--sigma-min 5.0: must be below --sigma-max 1.0",
        ),
    ],
)
def test_sample_sigma_range_flags_are_checked_by_name(args, says, capsys, tmp_path):
    from ditkit.cli import main

    rc = main(
        [
            "sample",
            "examples/tiny/tiny-dit.yaml",
            *args,
            "--steps",
            "2",
            "--out",
            str(tmp_path / "g.png"),
        ]
    )
    assert rc == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_evaluate_a_file_where_a_folder_is_expected_says_so(tmp_path, capsys):
    from ditkit.cli import main

    stray = tmp_path / "real.yaml"
    stray.write_bytes(b"\x00\x01not images")
    assert main(["evaluate", "--real", str(stray), "--fake", str(stray)]) == 2
    assert "is a file, not a folder of images or an .npz" in capsys.readouterr().err


# ------------------------------------------------------------------ issue 27: hostile files
# Batteries over classes of input, so a new command is covered by construction: every option
# that names an output is exercised with symlinks planted at every path it writes (or listed
# below with why not), and every command that reads a file is given a FIFO.

OUTPUT_OPTIONS = ("--out", "--diagram", "--grid", "--npz", "--samples")
TINY_EXP = ROOT / "examples" / "experiments" / "demo-digits.yaml"


def _train_args(tmp_path: Path, out: Path) -> list:
    exp = tmp_path / "exp.yaml"
    if not exp.exists():
        exp.write_text(
            yaml.safe_dump(
                tiny_experiment_data(
                    "edm", 2, checkpoint={"every": 2}, preview={"every": 2, "count": 2, "steps": 1}
                )
            )
        )
    return ["train", exp, "--out", out, "--no-progress"]


# (command, option) -> arguments writing to OUT (a file or folder path)
WRITERS = {
    ("describe", "--diagram"): lambda t, out: ["describe", TINY, "--diagram", out],
    ("diff", "--diagram"): lambda t, out: [
        "diff",
        TINY,
        ROOT / "examples/tiny/tiny-dit.yaml",
        "--diagram",
        out,
    ],
    ("schema", "--out"): lambda t, out: ["schema", "--out", out],
    ("sample", "--out"): lambda t, out: [
        "sample",
        TINY,
        "--out",
        out,
        "--objective",
        "edm",
        "--steps",
        "1",
        "--count",
        "2",
        "--no-progress",
    ],
    ("train", "--out"): _train_args,
}
NOT_EXERCISED = {  # every one of these writes through ditkit.files.atomic_path
    ("demo", "--out"): "a full demo run (minutes)",
    ("demo", "--samples"): "as demo --out",
    ("convert", "--out"): "needs a foreign checkpoint; _atomic_save / atomic_path",
    ("sample", "--npz"): "npz parts and settings through atomic_path (tests/runtime/test_npz)",
    ("export", "--out"): "onnx export (tens of seconds); graph_io writes through atomic_path",
    ("evaluate", "--grid"): "needs a trained checkpoint; save_png is atomic",
    ("encode", "--out"): "needs an autoencoder folder; shards through atomic_path",
    ("shards", "--out"): "needs an image folder; write_shard through atomic_path",
    ("extrapolate", "--out"): "a report of many samples (minutes); results/report/plots "
    "through atomic_path",
    ("extrapolate", "--samples"): "as extrapolate --out",
}


def test_every_output_option_is_in_the_symlink_battery():
    from ditkit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    found = {
        (name, opt)
        for name, p in sub.choices.items()
        for a in p._actions
        for opt in a.option_strings
        if opt in OUTPUT_OPTIONS
    }
    assert found == set(WRITERS) | set(NOT_EXERCISED), (
        f"new output options: {found - set(WRITERS) - set(NOT_EXERCISED)}; add them to WRITERS"
    )


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("case", sorted(WRITERS), ids=lambda c: f"{c[0]}{c[1]}")
def test_no_write_follows_a_planted_symlink(tmp_path, capsys, case):
    """Run the command once to learn what it writes; run it again with a symlink planted at
    every one of those paths and at the fixed temporary names ditkit used to use
    (``.NAME.tmp``): every link target is untouched, every output a regular file."""
    pytest.importorskip("matplotlib")
    make = WRITERS[case]
    suffix = (
        ".svg"
        if case[1] == "--diagram"
        else ".png"
        if case[0] == "sample"
        else (".json" if case[0] == "schema" else "")
    )
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    code, err = cli(capsys, *make(tmp_path, first / f"out{suffix}"))
    assert code == 0, err
    out = first / f"out{suffix}"
    written = _files(out) if out.is_dir() else [Path(out.name)]
    # checkpoints: fresh folders (mkdtemp) renamed into place; the lock: a planted link there
    # is refused outright (tests/training/test_preemption.py)
    written = [p for p in written if "checkpoints" not in p.parts and p.name != ".lock"]
    assert written
    victims = tmp_path / "victims"
    victims.mkdir()
    target = second / f"out{suffix}"
    base = target if out.is_dir() else second
    for i, rel in enumerate(written):
        for path in (base / rel, (base / rel).with_name(f".{rel.name}.tmp")):
            victim = victims / f"{i}-{path.name}"
            victim.write_text("precious\n")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(victim)
    code, err = cli(capsys, *make(tmp_path, target))
    assert code == 0, err
    assert all(v.read_text() == "precious\n" for v in victims.iterdir())
    for rel in written:
        assert (base / rel).is_file() and not (base / rel).is_symlink(), rel


def test_resume_does_not_write_through_a_symlinked_run_experiment(tmp_path, capsys):
    """Issue 27: RUN/experiment.yaml was rewritten in place on --resume, so a link there
    rewrote the user's own experiment file."""
    run = tmp_path / "run"
    args = _train_args(tmp_path, run)
    assert cli(capsys, *args)[0] == 0
    mine = tmp_path / "mine.yaml"
    mine.write_text((run / "experiment.yaml").read_text() + "# my notes\n")
    (run / "experiment.yaml").unlink()
    (run / "experiment.yaml").symlink_to(mine)
    before = mine.read_text()
    assert cli(capsys, *args, "--resume", "--steps", "3")[0] == 0
    assert mine.read_text() == before
    assert not (run / "experiment.yaml").is_symlink()


class NoHang:
    """A hang fails loudly (traceback, process exit) instead of blocking the suite forever."""

    def __enter__(self):
        import faulthandler
        import sys

        faulthandler.dump_traceback_later(120, exit=True, file=sys.__stderr__)

    def __exit__(self, *exc):
        import faulthandler

        faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def fifo(tmp_path):
    def make(name: str) -> Path:
        path = tmp_path / name
        os.mkfifo(path)
        return path

    return make


FIFO_READERS = [  # (arguments with {fifo}, the fifo's name)
    (["validate", "{fifo}"], "spec.yaml"),
    (["describe", "{fifo}"], "spec.yaml"),
    (["diff", "{fifo}", str(TINY)], "spec.yaml"),
    (["sample", "{fifo}", "--out", "{tmp}/g.png"], "spec.yaml"),
    (["sample", "{fifo}", "--out", "{tmp}/g.png"], "model.safetensors"),
    (["describe", "{fifo}"], "model.safetensors"),
    (["export", "{fifo}", "--out", "{tmp}/m.onnx"], "spec.yaml"),
    (["train", "{fifo}", "--out", "{tmp}/run"], "exp.yaml"),
    (["validate", "{fifo}"], "exp.yaml"),
    (["validate", "{fifo}"], "no-suffix"),
]


@pytest.mark.parametrize("args, name", FIFO_READERS, ids=lambda v: str(v))
def test_a_named_pipe_is_refused_not_read(tmp_path, capsys, fifo, args, name):
    """Issue 27: a FIFO given as a spec/experiment/checkpoint hung forever."""
    path = fifo(name)
    with NoHang():
        code, err = cli(capsys, *[a.format(fifo=path, tmp=tmp_path) for a in args])
    assert code == 2 and "named pipe" in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("command", ["train", "validate"])
def test_an_experiments_model_that_is_a_named_pipe(tmp_path, capsys, fifo, command):
    fifo("model.yaml")
    data = tiny_experiment_data(steps=2)
    data["model"] = "model.yaml"
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    with NoHang():
        code, err = cli(
            capsys,
            command,
            tmp_path / "exp.yaml",
            *(["--out", tmp_path / "run"] if command == "train" else []),
        )
    assert code == 2 and "model" in err and "named pipe" in err, err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_folder_whose_state_is_a_named_pipe(run_dir, tmp_path, capsys, fifo):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    step = C.latest_checkpoint(run / "checkpoints")[1]
    (step / C.STATE_TENSORS).unlink()
    os.mkfifo(step / C.STATE_TENSORS)
    with NoHang():
        code, err = cli(capsys, "train", run, "--resume", "--steps", "3", "--no-progress")
    assert code == 2 and "named pipe" in err, err


@pytest.mark.parametrize("where", ["spec", "experiment", "model of an experiment"])
def test_duplicate_keys_are_an_error_naming_both_lines(tmp_path, capsys, where):
    spec_text = yaml.safe_dump(tiny_model(), sort_keys=False)
    if where == "spec":
        text = spec_text.replace("name: test-tiny\n", "name: test-tiny\nname: other\n")
        (tmp_path / "f.yaml").write_text(text)
        lines = (1, 2)
    else:
        data = tiny_experiment_data(steps=2)
        if where == "model of an experiment":
            (tmp_path / "model.yaml").write_text(spec_text + "patch: {size: 4}\n")
            data["model"] = "model.yaml"
            lines = (spec_text.splitlines().index("patch:") + 1, len(spec_text.splitlines()) + 1)
        text = yaml.safe_dump(data, sort_keys=False)
        if where == "experiment":
            text += "training: {steps: 3}\n"
            lines = (text.splitlines().index("training:") + 1, len(text.splitlines()))
        (tmp_path / "f.yaml").write_text(text)
    for command in (["validate"], ["train", "--out", tmp_path / "run"]):
        if command[0] == "train" and where == "spec":
            continue
        code, err = cli(capsys, command[0], tmp_path / "f.yaml", *command[1:])
        assert code == 2 and "duplicate key" in err, err
        assert f"lines {lines[0]} and {lines[1]}" in err, err
        if where != "model of an experiment":  # the field path of the key
            assert f"  {'name' if where == 'spec' else 'training'}: duplicate key" in err, err
    assert not (tmp_path / "run").exists()


def test_duplicate_keys_in_a_set_value_are_an_error(capsys):
    code, err = cli(capsys, "validate", TINY, "--set", "patch={size: 1, size: 2}")
    assert code == 2 and "duplicate key `size`" in err
