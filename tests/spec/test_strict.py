"""What ``validate`` accepts, ``build`` can build (issue 13, item 3): strict numbers, finite
numbers, size limits before anything is allocated, and one clear error for files that are not
specs (a folder, a binary file, a PyTorch checkpoint, non-UTF-8 text, an unreadable file)."""

from __future__ import annotations

import copy

import pytest
import torch

from ditkit import spec as S
from ditkit.errors import EnvironmentFault
from ditkit.spec import io as spec_io
from ditkit.spec.experiment import load_experiment
from ditkit.spec.limits import ENV, MAX_PARAMS, estimated_params, no_size_limits

from ..training.conftest import tiny_experiment_data, tiny_model


def issues_of(mutate) -> list[tuple[str, str]]:
    data = copy.deepcopy(tiny_model())
    mutate(data)
    with pytest.raises(S.SpecError) as info:
        S.validate(data)
    return info.value.issues


@pytest.mark.parametrize(
    "path, value",
    [
        (("levels", 0, "decoder"), False),  # built 0 blocks, "ok"
        (("conditioning", "classes", "count"), True),  # built 1 class, "ok"
        (("block", "d_head"), True),  # a misleading divisor error
        (("input", "resolution"), [True, 8]),
        (("conditioning", "mapping", "ratio"), True),
    ],
)
def test_a_yaml_boolean_is_not_a_number(path, value):
    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    issues = issues_of(mutate)
    field = ".".join(str(p) for p in path).replace(".0.", "[0].")
    assert issues == [(field, issues[0][1])], issues
    assert "true/false is not a number" in issues[0][1]


def test_booleans_still_work_where_a_boolean_is_meant():
    data = copy.deepcopy(tiny_model())
    data["conditioning"]["classes"]["null_class"] = False
    data["block"]["zero_init_out"] = False
    spec = S.validate(data)
    assert spec.conditioning.classes.null_class is False


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "inf", ".nan"])
def test_non_finite_numbers_are_refused(value):
    issues = issues_of(lambda d: d["conditioning"]["mapping"].__setitem__("ratio", value))
    assert issues[0][0] == "conditioning.mapping.ratio"
    assert "finite" in issues[0][1] or "valid number" in issues[0][1]


def test_yaml_inf_in_a_file_is_refused(tmp_path):
    import yaml

    text = yaml.safe_dump(tiny_model()).replace("ratio: 2.0", "ratio: .inf", 1)
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(S.SpecError, match=r"ratio: Input should be a finite number"):
        S.load(tmp_path / "m.yaml")


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["levels"][0].__setitem__("d_model", 10**12), "levels[0].d_model"),
        (lambda d: d["levels"][1].__setitem__("middle", 10**9), "levels"),
        (lambda d: d["input"].__setitem__("resolution", [2**20, 2**20]), "input.resolution"),
        (
            lambda d: d["conditioning"]["classes"].__setitem__("count", 10**9),
            "conditioning.classes.count",
        ),
        (
            lambda d: d["conditioning"]["mapping"].__setitem__("ratio", 1e30),
            "conditioning.mapping.ratio",
        ),
        (lambda d: d["levels"][1].__setitem__("d_model", 2**17), "levels[1].d_model"),  # ~170 B
    ],
)
def test_sizes_beyond_any_machine_are_refused_naming_the_field(mutate, field, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    issues = issues_of(mutate)
    assert [p for p, _ in issues] == [field], issues
    assert "DITKIT_NO_SIZE_LIMITS=1" in issues[0][1]


def test_the_size_check_is_quick_and_allocates_nothing():
    import time
    import tracemalloc

    data = copy.deepcopy(tiny_model())
    data["levels"][1]["middle"] = 10**12  # expanding this stack would need terabytes
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(S.SpecError):
        S.validate(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t < 2 and peak < 50 * 2**20


def test_the_override_lets_a_big_spec_validate(monkeypatch):
    data = copy.deepcopy(tiny_model())
    data["levels"][1]["d_model"] = 2**17
    with no_size_limits():
        spec = S.validate(data)
    assert estimated_params(spec) > MAX_PARAMS  # the estimate does not depend on the switch
    monkeypatch.setenv(ENV, "1")
    assert S.validate(data).levels[1].d_model == 2**17


def test_the_parameter_estimate_is_close_to_the_measured_count():
    from ditkit.builder import describe
    from ditkit.spec.presets import preset

    for name in ("dit-s-2", "hdit-imagenet-128", "mdit-b"):
        spec = preset(name)
        ratio = estimated_params(spec) / describe(spec).params
        assert 0.6 < ratio < 1.6, (name, ratio)


# ------------------------------------------------------------------------------ the files


def test_a_directory_given_as_a_spec_says_so(tmp_path):
    with pytest.raises(S.SpecError, match="is a directory, not a spec file"):
        S.load(tmp_path)


@pytest.mark.parametrize(
    "name, payload",
    [
        ("model.yaml", b"\xff\xfe\x00\x01binary\x00"),
        ("latin1.yaml", "name: caf\u00e9\n".encode("latin-1")),
        ("zeros.json", b"\x00" * 64),
    ],
)
def test_binary_and_non_utf8_files_are_clear_errors(tmp_path, name, payload):
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(S.SpecError, match="not a text file"):
        S.load(tmp_path / name)


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "model.ckpt", "model.bin"])
def test_a_pytorch_checkpoint_points_to_ditkit_convert(tmp_path, name):
    torch.save({"w": torch.zeros(2)}, tmp_path / name)
    with pytest.raises(S.SpecError, match=r"a PyTorch checkpoint .*`ditkit convert --from"):
        S.load(tmp_path / name)


def test_a_zip_pickle_without_suffix_is_named_too(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model")
    with pytest.raises(S.SpecError, match="PyTorch checkpoint"):
        S.load(tmp_path / "model")


def test_an_unreadable_spec_is_an_environment_fault(tmp_path, monkeypatch):
    (tmp_path / "m.yaml").write_text("name: x\n")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "m.yaml"))

    monkeypatch.setattr(spec_io, "open", denied, raising=False)
    with pytest.raises(EnvironmentFault, match=r"m\.yaml: permission denied"):
        S.load(tmp_path / "m.yaml")


def test_experiment_files_and_their_model_reference_get_the_same_checks(tmp_path):
    import yaml

    (tmp_path / "exp.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(S.SpecError, match="not a text file|an image"):
        load_experiment(tmp_path / "exp.yaml")
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.pt")
    data = tiny_experiment_data()
    data["model"] = "model.pt"
    (tmp_path / "exp2.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(S.SpecError, match=r"model.*PyTorch checkpoint"):
        load_experiment(tmp_path / "exp2.yaml")
    data["training"]["batch_size"] = True
    data["model"] = tiny_model()
    (tmp_path / "exp3.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(S.SpecError, match=r"training.batch_size: true/false is not a number"):
        load_experiment(tmp_path / "exp3.yaml")


def test_deeply_nested_yaml_is_an_error_not_a_crash():
    with pytest.raises(S.SpecError, match="YAML"):
        S.loads("[" * 5000 + "]" * 5000)


def test_a_huge_file_is_not_read_as_a_spec(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"# " + b"x" * (spec_io.MAX_SPEC_BYTES + 10) + b"\n")
    with pytest.raises(S.SpecError, match="too large for a spec file"):
        S.load(path)
