"""Property-based battery (hypothesis): mutated specs, experiment files and command-line
arguments -- wrong types, non-finite numbers, huge values, unicode, binary -- end in exit 0 or 2
with no traceback, in bounded time and memory; a spec that validates builds (issue 13, item 7).

The default run is small (a few dozen examples per property, well under a minute in all); the
``slow`` tests run the same properties with many more examples: ``pytest -m slow
tests/test_fuzz.py``. Failing examples are printed by hypothesis and can be replayed with
``@example``."""

from __future__ import annotations

import copy
import math
import resource
import time

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ditkit import spec as S  # noqa: E402
from ditkit.spec.experiment import experiment_from_data  # noqa: E402

from .training.conftest import tiny_experiment_data, tiny_model  # noqa: E402

import ditkit.builder  # noqa: E402,F401  (imported once here, not timed inside a property)

FAST = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SLOW = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# values a careless or hostile file may hold
BAD_VALUES = st.one_of(
    st.booleans(),
    st.none(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 10**12, 2**63, 2**64 + 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("inf"), float("nan"), -0.0, 1e308, 5e-324]),
    st.text(max_size=20),
    st.sampled_from(["inf", "nan", "1e999", "true", "\u202e", "\x00", "🦄" * 5]),
    st.lists(st.integers(-3, 10**9), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(data, prefix=()):
    """Every path to a leaf or a container in nested dicts/lists."""
    out = [prefix] if prefix else []
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, prefix + (i,))
    return out


def _set(data, path, value):
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


@st.composite
def mutated(draw, base):
    data = copy.deepcopy(base)
    paths = _paths(data)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        try:
            _set(data, path, draw(BAD_VALUES))
        except (TypeError, KeyError, IndexError):  # an earlier mutation replaced a parent
            pass
    return data


class Bounded:
    """CPU time (not wall time: the test machine is shared) and peak memory of a block."""

    def __init__(self, seconds: float, mib: float):
        self.seconds, self.mib = seconds, mib

    def __enter__(self):
        self.t = time.process_time()
        self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        took = time.process_time() - self.t
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.rss) / 1024
        assert took < self.seconds, f"took {took:.1f} s"
        assert grew < self.mib, f"peak memory grew by {grew:.0f} MiB"
        return False


def _check_model_spec(data) -> None:
    with Bounded(20, 1024):
        try:
            spec = S.validate(data)
        except S.SpecError as err:
            assert err.issues and all(isinstance(p, str) for p, _ in err.issues)
            return
        from ditkit.builder import build

        build(spec, device="meta")  # what validate accepts, build can build
        assert S.loads(S.dumps(spec)) == spec


def _check_experiment(data) -> None:
    with Bounded(20, 1024):
        try:
            exp = experiment_from_data(data)
        except S.SpecError as err:
            assert err.issues
            return
        for name in ("lr", "eps", "weight_decay"):
            assert math.isfinite(getattr(exp.optimizer, name))


@FAST
@given(mutated(tiny_model()))
def test_mutated_model_specs_validate_or_fail_cleanly(data):
    _check_model_spec(data)


@FAST
@given(mutated(tiny_experiment_data("edm", 10)))
def test_mutated_experiments_validate_or_fail_cleanly(data):
    _check_experiment(data)


@FAST
@given(
    st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        mutated(tiny_model()).map(lambda d: yaml.safe_dump(d).encode()),
    )
)
def test_any_bytes_as_a_spec_file_exit_0_or_2(tmp_path_factory, payload):
    from ditkit.cli import main

    path = tmp_path_factory.mktemp("f") / "spec.yaml"
    path.write_bytes(payload)
    with Bounded(20, 1024):
        assert main(["validate", str(path)]) in (0, 2)


@pytest.fixture(scope="module")
def tiny_spec_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_model()))
    return path


NUMBERS = st.one_of(
    st.sampled_from(
        [
            "0",
            "-3",
            "1",
            "2",
            "nan",
            "inf",
            "-inf",
            "1e999",
            "100000000",
            "2.5",
            "",
            "x",
            "🦄",
            "0x10",
        ]
    ),
    st.integers(-5, 3).map(str),
)


@FAST
@given(
    num=NUMBERS,
    steps=NUMBERS,
    cfg=NUMBERS,
    classes=st.sampled_from([None, "1", "0,1", "random", "99", "a"]),
)
def test_sample_arguments_exit_0_or_2(
    tiny_spec_file, tmp_path_factory, capsys, num, steps, cfg, classes
):
    from ditkit.cli import main

    out = tmp_path_factory.mktemp("s") / "g.png"
    args = [
        "sample",
        str(tiny_spec_file),
        "--out",
        str(out),
        "--objective",
        "edm",
        "--no-progress",
        "--count",
        num,
        "--steps",
        steps,
        "--cfg-scale",
        cfg,
    ]
    if classes is not None:
        args += ["--classes", classes]
    with Bounded(30, 1024):
        try:
            code = main(args)
        except SystemExit as stop:  # argparse: a value of the wrong type
            code = stop.code
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 0:
        assert out.stat().st_size > 0


# ------------------------------------------------------------------------------ bigger runs


@pytest.mark.slow
@SLOW
@given(mutated(tiny_model()))
def test_many_mutated_model_specs(data):
    _check_model_spec(data)


@pytest.mark.slow
@SLOW
@given(mutated(tiny_experiment_data("edm", 10)))
def test_many_mutated_experiments(data):
    _check_experiment(data)


# ------------------------------------------------------------------ issue 27: hostile files


def _scalar_key_lines(text: str) -> list[int]:
    """Indices of ``key: scalar`` lines (not list items): duplicating one keeps the YAML valid."""
    import re

    return [
        i for i, line in enumerate(text.splitlines()) if re.match(r"^\s*[A-Za-z_]\w*: \S", line)
    ]


@FAST
@given(st.sampled_from(["spec", "experiment"]), st.data())
def test_a_key_written_twice_anywhere_is_refused_naming_both_lines(
    tmp_path_factory, capsys, kind, data
):
    from ditkit.cli import main

    base = tiny_model() if kind == "spec" else tiny_experiment_data("edm", 10)
    lines = yaml.safe_dump(base, sort_keys=False, default_flow_style=False).splitlines()
    i = data.draw(st.sampled_from(_scalar_key_lines("\n".join(lines))))
    lines.insert(i + 1, lines[i])
    path = tmp_path_factory.mktemp("dup") / f"{kind}.yaml"
    path.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    with Bounded(20, 512):
        assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    key = lines[i].strip().split(":")[0]
    assert f"duplicate key `{key}` on lines {i + 1} and {i + 2}" in err, err


def _not_a_file(kind: str, folder) -> str:
    """A path of ``kind`` in ``folder``: what a hostile or careless user may pass as input."""
    import os
    import socket

    path = folder / "input.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(folder / "s.yaml"))
        s.close()
        path = folder / "s.yaml"
    elif kind == "device":
        return "/dev/zero"  # endless: reading it would never end
    elif kind == "link to fifo":
        os.mkfifo(folder / "fifo")
        path.symlink_to(folder / "fifo")
    elif kind == "folder":
        path.mkdir()
    return str(path)


@settings(FAST, max_examples=12)
@given(
    st.sampled_from(["fifo", "socket", "device", "link to fifo", "folder"]),
    st.sampled_from(["validate", "describe", "train", "sample", "export"]),
)
def test_inputs_that_are_not_regular_files_exit_2_without_blocking(
    tmp_path_factory, capsys, kind, command
):
    import faulthandler
    import sys

    from ditkit.cli import main

    folder = tmp_path_factory.mktemp("nf")
    path = _not_a_file(kind, folder)
    extra = {
        "train": ["--out", str(folder / "run")],
        "sample": ["--out", str(folder / "g.png")],
        "export": ["--out", str(folder / "m.onnx")],
    }.get(command, [])
    capsys.readouterr()
    faulthandler.dump_traceback_later(120, exit=True, file=sys.__stderr__)  # never forever
    try:
        with Bounded(20, 512):
            code = main([command, path, *extra])
    finally:
        faulthandler.cancel_dump_traceback_later()
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert (
        ("directory" in err or "folder" in err)
        if kind == "folder"
        else ("not a regular file" in err)
    ), err
    assert not (folder / "run").exists() and not (folder / "g.png").exists()
