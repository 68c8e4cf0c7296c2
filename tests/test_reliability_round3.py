"""Issue 27, items 3, 5 and 6: run-time sizes are guarded before anything is allocated, every
hostile input ends in one line with exit 2 (or 1 for the machine), and nothing is silently
wrong. Each test names its case. Commands run in this process through ``ditkit.cli.main``."""

from __future__ import annotations

import errno
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build
from ditkit.cli import main
from ditkit.runtime.checkpoint import save_checkpoint
from ditkit.spec.limits import RunSizeError, check_sample_size, no_size_limits
from ditkit.training import checkpoints as C
from ditkit.training.loop import train

from .training.conftest import tiny_experiment

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny" / "tiny-hdit-digits.yaml"
TINY_DIT = ROOT / "examples" / "tiny" / "tiny-dit.yaml"
LIMITS = "DITKIT_NO_SIZE_LIMITS=1"
FAST = ("--steps", "1", "--objective", "edm", "--no-progress")


@pytest.fixture(autouse=True)
def _plain(monkeypatch):
    monkeypatch.delenv("DITKIT_DEBUG", raising=False)
    monkeypatch.delenv("DITKIT_NO_SIZE_LIMITS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(capsys, *args) -> tuple[int, str]:
    """``(exit status, stderr)``; asserts one clean line, no traceback."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(("error", "  "))]
    assert code == 0 or lines, err
    return code, err


def one_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny HDiT checkpoint (random weights, edm)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    spec = S.load(TINY)
    torch.manual_seed(0)
    save_checkpoint(path, build(spec).state_dict(), spec, objective=S.objective_of_kind("edm"))
    return path


# ------------------------------------------------------------------ 3. run-time sizes


@pytest.mark.parametrize(
    "flags, named",
    [
        (("--count", "100000000"), "--count 100000000"),
        (("--count", "2", "--cols", "1000000"), "--cols 1000000"),
        (("--count", "1", "--resolution", "2048"), "--resolution 2048x2048"),
    ],
)
def test_sample_sizes_are_refused_with_their_estimate(tmp_path, capsys, flags, named):
    code, err = cli(capsys, "sample", TINY, *flags, "--out", tmp_path / "g.png", *FAST)
    line = one_line(err)
    assert code == 2 and named in line and "GiB of memory" in line and LIMITS in line
    assert not (tmp_path / "g.png").exists()


def test_npz_count_and_batch_are_refused_before_the_labels_exist(tmp_path, capsys, ckpt):
    code, err = cli(
        capsys,
        "sample",
        ckpt,
        "--npz",
        tmp_path / "s.npz",
        "--count",
        "1000000000",
        "--classes",
        "1,2",
        *FAST,
    )
    assert code == 2 and "--count 1000000000" in one_line(err)
    code, err = cli(
        capsys,
        "sample",
        ckpt,
        "--npz",
        tmp_path / "s.npz",
        "--count",
        "64",
        "--batch",
        "64",
        "--resolution",
        "1024",
        *FAST,
    )
    assert code == 2 and "--batch 64: 64 sample(s) at 1024x1024" in one_line(err)
    assert not list(tmp_path.iterdir())


def test_the_size_override_lifts_the_run_time_limits():
    spec = S.load(TINY)
    with pytest.raises(RunSizeError, match="--count 100000000"):
        check_sample_size(spec, 10**8)
    with no_size_limits():
        check_sample_size(spec, 10**8)  # an estimate only: nothing is allocated
    check_sample_size(spec, 16, (64, 64))  # an ordinary request passes


def test_evaluate_count_is_refused_before_sampling(ckpt):
    from ditkit.runtime.checkpoint import load_model
    from ditkit.runtime.generate import sample_images
    from ditkit.spec.sampling import Sampling

    model, c = load_model(ckpt)
    with pytest.raises(RunSizeError, match=r"--count 1000000000: .* GiB"):
        sample_images(model, c.spec, c.objective, 10**9, Sampling.of(steps=1), "cpu")


def test_a_compressed_pt_is_refused_before_torch_load(tmp_path, capsys):
    torch.save({"w": torch.zeros(4)}, tmp_path / "ok.pt")
    with (
        zipfile.ZipFile(tmp_path / "ok.pt") as zin,
        zipfile.ZipFile(tmp_path / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as zout,
    ):
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        zout.writestr("ok/data/9", b"\0" * (100 * 2**20))  # 100 MiB in ~100 KB
    code, err = cli(
        capsys,
        "convert",
        tmp_path / "bomb.pt",
        "--from",
        "dit",
        "--out",
        tmp_path / "o.safetensors",
    )
    line = one_line(err)
    assert code == 2 and "100 MiB of memory" in line and "compressed" in line and LIMITS in line
    assert not (tmp_path / "o.safetensors").exists()


def test_an_image_decompression_bomb_is_a_data_error(tmp_path, monkeypatch):
    from PIL import Image

    from ditkit.data.datasets import ImageTooLarge, load_image
    from ditkit.evaluate.fid import FIDError, read_image

    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > twice the limit
    with pytest.raises(ImageTooLarge, match=r"4096 pixels.*DITKIT_NO_SIZE_LIMITS"):
        load_image(tmp_path / "big.png", (8, 8), 1)
    with pytest.raises(FIDError, match="4096 pixels"):
        read_image(tmp_path / "big.png")
    with no_size_limits():
        assert load_image(tmp_path / "big.png", (8, 8), 1).shape == (1, 8, 8)
    assert Image.MAX_IMAGE_PIXELS == 1000  # put back


def _npz_with_header(path: Path, shape: tuple, data: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf, zf.open("arr_0.npy", "w") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|u1", "fortran_order": False, "shape": shape}
        )
        f.write(data)


def test_npz_headers_are_checked_against_the_file(tmp_path):
    from ditkit.evaluate.npz import NpzError, iter_npz_images, read_npz

    _npz_with_header(tmp_path / "huge.npz", (2**20, 2**20, 2**11, 3), b"\0" * 100)  # 6 TiB
    with pytest.raises(
        NpzError,
        match=r"claims .* but the file holds \d+ bytes; the file is "
        r"damaged",
    ):
        read_npz(tmp_path / "huge.npz")
    with pytest.raises(NpzError, match="claims"):
        next(iter_npz_images(tmp_path / "huge.npz"))
    _npz_with_header(tmp_path / "empty.npz", (4, 0, 0, 3), b"")
    with pytest.raises(NpzError, match=r"\(4, 0, 0, 3\).*no pixels"):
        read_npz(tmp_path / "empty.npz")


# ------------------------------------------------------------------ 5. the error boundary


@pytest.mark.parametrize(
    "value", ["1" * 5000, "[" * 2000, "[" * 200 + "]" * 200, "{a: " * 100 + "1" + "}" * 100]
)
def test_set_values_with_huge_integers_or_deep_nesting(capsys, value):
    code, err = cli(capsys, "validate", TINY, "--set", f"levels.0.d_model={value}")
    assert code == 2 and "levels.0.d_model" in err and err.count("\n") <= 2


def test_spec_and_run_experiment_files_with_huge_integers_or_deep_nesting(tmp_path, capsys):
    (tmp_path / "long.yaml").write_text(
        TINY.read_text().replace("d_model: 64", "d_model: " + "9" * 5000)
    )
    code, err = cli(capsys, "validate", tmp_path / "long.yaml")
    assert code == 2 and "no spec field takes a number that long" in err
    (tmp_path / "deep.yaml").write_text("name: " + "[" * 100 + "]" * 100 + "\n")
    code, err = cli(capsys, "validate", tmp_path / "deep.yaml")
    assert code == 2 and "nested 65 levels deep" in err


@pytest.mark.parametrize(
    "policy", ["as_is:rope=[[", 'local_core:kernel_size="', "local_core:kernel_size=" + "1" * 5000]
)
def test_broken_yaml_in_policy(tmp_path, capsys, policy):
    code, err = cli(capsys, "sample", TINY, "--policy", policy, "--out", tmp_path / "g.png", *FAST)
    assert code == 2 and "--policy" in err and err.count("\n") <= 3


def _onnx(path: Path, meta: dict) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph)
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(path))


@pytest.mark.parametrize(
    "meta, says",
    [
        ({}, "not a ditkit checkpoint"),
        ({"ditkit.spec": "{not json"}, "not valid JSON"),
        ({"ditkit.spec": "[" * 5000 + "]" * 5000}, "not valid JSON"),
        ({"ditkit.spec": "1" * 5000}, "not valid JSON"),
    ],
)
def test_onnx_files_without_or_with_broken_metadata(tmp_path, capsys, meta, says):
    pytest.importorskip("onnxruntime")
    _onnx(tmp_path / "m.onnx", meta)
    code, err = cli(
        capsys,
        "sample",
        tmp_path / "m.onnx",
        "--out",
        tmp_path / "g.png",
        "--steps",
        "1",
        "--no-progress",
    )
    assert code == 2 and says in err


def test_a_damaged_resolution_rule_or_cfg_in_onnx_metadata(tmp_path):
    from ditkit.runtime.shape_rule import rules_from_metadata

    from ditkit.errors import UserError

    for text in ("{{", '{"height": 3}', "[" * 5000):
        with pytest.raises(UserError, match="ditkit.resolution_rule is damaged"):
            rules_from_metadata({"ditkit.resolution_rule": text})


def test_a_file_name_is_never_read_as_a_full_disk():
    from ditkit.files import environment_fault

    missing = FileNotFoundError(errno.ENOENT, "No such file", "No space left.onnx")
    assert environment_fault(missing, "No space left.onnx") is None
    odd = RuntimeError("cannot open No space left.onnx for writing")
    assert environment_fault(odd, "No space left.onnx") is None
    full = RuntimeError("[enforce fail] unexpected pos 64 vs 0")  # torch's full-disk text
    assert "disk is full" in str(environment_fault(full, "out.pt"))


def test_a_user_error_mentioning_no_space_is_exit_2(tmp_path, capsys):
    code, err = cli(
        capsys, "sample", tmp_path / "No space left on device.onnx", "--out", tmp_path / "g.png"
    )
    assert code == 2 and "disk is full" not in err


@pytest.mark.parametrize("where", ["folder", "below a file", "dangling link"])
def test_out_that_cannot_become_a_file(tmp_path, capsys, where):
    out = {
        "folder": tmp_path,
        "below a file": tmp_path / "f.txt" / "g.png",
        "dangling link": tmp_path / "link.png",
    }[where]
    (tmp_path / "f.txt").write_text("mine")
    (tmp_path / "link.png").symlink_to(tmp_path / "nowhere" / "g.png")
    code, err = cli(capsys, "sample", TINY, "--count", "1", "--out", out, *FAST)
    assert code == 2 and {
        "folder": "a folder",
        "below a file": "is a file, not a folder",
        "dangling link": "does not exist",
    }[where] in one_line(err)
    assert (tmp_path / "f.txt").read_text() == "mine"


def test_individual_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f.txt").write_text("mine")
    code, err = cli(
        capsys,
        "sample",
        TINY,
        "--count",
        "1",
        "--out",
        tmp_path / "g.png",
        "--individual",
        tmp_path / "f.txt",
        *FAST,
    )
    assert code == 2 and "is a file, not a folder" in one_line(err)
    assert (tmp_path / "f.txt").read_text() == "mine"


# ------------------------------------------------------------------ 6. no silent results


@pytest.mark.parametrize(
    "eta, says", [("nan", "finite"), ("-1", "greater than or equal to 0"), ("inf", "finite")]
)
def test_eta_is_range_checked(tmp_path, capsys, eta, says):
    code, err = cli(capsys, "sample", TINY, "--eta", eta, "--out", tmp_path / "g.png", *FAST)
    assert code == 2 and "--eta" in err and says in err
    assert not (tmp_path / "g.png").exists()


def test_a_part_file_of_another_run_is_refused(tmp_path, capsys, ckpt):
    out = tmp_path / "s.npz"
    parts = tmp_path / "s.npz.parts"
    parts.mkdir()
    with open(parts / "part-000000.npz", "wb") as f:  # a finished part of some other run
        np.savez(
            f, arr_0=np.zeros((2, 8, 8, 3), np.uint8), ditkit_run=np.frombuffer(b"0" * 64, np.uint8)
        )
    code, err = cli(capsys, "sample", ckpt, "--npz", out, "--count", "2", *FAST)
    assert code == 2 and "drawn by another run" in one_line(err) and "not merged" in err
    assert not out.exists()


def test_a_symlinked_parts_folder_is_refused(tmp_path, capsys, ckpt):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "s.npz.parts").symlink_to(tmp_path / "elsewhere")
    code, err = cli(capsys, "sample", ckpt, "--npz", tmp_path / "s.npz", "--count", "2", *FAST)
    assert code == 2 and "symbolic link" in one_line(err)
    assert not list((tmp_path / "elsewhere").iterdir())


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    """A DiT-layout .pt (plain state dict) of the tiny DiT."""
    folder = tmp_path_factory.mktemp("foreign")
    spec = S.load(TINY_DIT)
    torch.manual_seed(0)
    save_checkpoint(folder / "d.safetensors", build(spec).state_dict(), spec)
    assert (
        main(
            [
                "convert",
                str(folder / "d.safetensors"),
                "--to",
                "dit",
                "--out",
                str(folder / "src.pt"),
            ]
        )
        == 0
    )
    return folder / "src.pt"


def test_convert_of_nan_weights_leaves_nothing(tmp_path, capsys, foreign):
    state = torch.load(foreign, weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    code, err = cli(
        capsys,
        "convert",
        tmp_path / "nan.pt",
        "--from",
        "dit",
        "--heads",
        "4",
        "--out",
        tmp_path / "o.safetensors",
    )
    assert code == 2 and "NaN or infinite" in one_line(err) and "nothing was written" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_key_on_a_plain_state_dict_is_refused(tmp_path, capsys, foreign):
    code, err = cli(
        capsys,
        "convert",
        foreign,
        "--from",
        "dit",
        "--heads",
        "4",
        "--key",
        "ema",
        "--out",
        tmp_path / "o.safetensors",
    )
    assert code == 2 and "--key ema" in one_line(err) and "plain state dict" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_on_a_full_disk_exits_1(tmp_path, capsys, foreign, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    code, err = cli(
        capsys,
        "convert",
        foreign,
        "--from",
        "dit",
        "--heads",
        "4",
        "--out",
        tmp_path / "o.safetensors",
    )
    assert code == 1 and "the disk is full" in one_line(err)
    monkeypatch.undo()
    assert not list(tmp_path.iterdir())


@pytest.fixture
def stopped(tmp_path) -> tuple:
    exp = tiny_experiment(steps=2, checkpoint={"every": 2})
    train(exp, tmp_path / "run", progress=False)
    found = C.latest_checkpoint(tmp_path / "run" / "checkpoints")
    return exp, found[1]


@pytest.mark.parametrize(
    "field, value",
    [
        ("data_position", {"epoch": 0, "offset": -5}),
        ("data_position", {"epoch": "x", "offset": 0}),
        ("data_position", {"wrong": 1}),
        ("world", 0),
        ("step", "2"),
    ],
)
def test_damaged_training_state_fields_are_refused_on_read(stopped, field, value):
    _, folder = stopped
    data = json.loads((folder / "state.json").read_text())
    data["state"][field] = value
    (folder / "state.json").write_text(json.dumps(data))
    with pytest.raises(C.UnsafeStateError, match=f"state field {field} is"):
        C.read_state(folder)


def test_a_data_position_past_the_dataset_is_refused_on_resume(stopped, tmp_path):
    from ditkit.data.datasets import DataError

    exp, folder = stopped
    data = json.loads((folder / "state.json").read_text())
    data["state"]["data_position"] = {"epoch": 0, "offset": 10**9}
    (folder / "state.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="past the end of the dataset"):
        train(
            exp.model_copy(update={"training": exp.training.model_copy(update={"steps": 4})}),
            tmp_path / "run",
            progress=False,
            resume=True,
        )


def test_a_damaged_scalars_csv_on_resume_is_one_line(stopped, tmp_path):
    from ditkit.errors import UserError

    exp, _ = stopped
    (tmp_path / "run" / "scalars.csv").write_bytes(b"step,loss\n\xff\xfe,1\nnot-a-step,2\n")
    with pytest.raises(UserError, match=r"scalars\.csv: damaged .*move it aside"):
        train(
            exp.model_copy(update={"training": exp.training.model_copy(update={"steps": 4})}),
            tmp_path / "run",
            progress=False,
            resume=True,
        )


def test_nan_fid_weights_are_refused(tmp_path):
    from ditkit.evaluate.inception import FIDInception, load_fid_inception

    state = FIDInception().state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name][(0,) * state[name].ndim] = float("nan")
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=f"NaN or infinite values \\(first: {name}\\)"):
        load_fid_inception(tmp_path / "w.pth")


@pytest.mark.slow
def test_export_opset_1_prints_no_library_traceback(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    code, err = cli(
        capsys, "export", TINY, "--opset", "1", "--out", tmp_path / "m.onnx", "--objective", "edm"
    )
    assert code == 2 and "opset 1 has no" in one_line(err)
    assert "version conversion" not in err and not (tmp_path / "m.onnx").exists()
