"""The frozen ``Sampling`` spec (issue 26, item 2): validated fields, the experiment's preview and
evaluation embedding it (older flat files still load), and one command-line group that every
sampling command builds it from."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from ditkit import spec as S
from ditkit.errors import UserError
from ditkit.spec.experiment import Evaluation, Preview, load_experiment
from ditkit.spec.sampling import Sampling

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_a_round_trip():
    s = Sampling()
    assert (
        s.sampler,
        s.steps,
        s.schedule,
        s.eta,
        s.sigma_min,
        s.sigma_max,
        s.rho,
        s.cfg_scale,
        s.cfg_interval,
        s.cfg_channels,
        s.seed,
    ) == ("dpmpp_2m", 50, "native", None, None, None, 7.0, 1.0, None, None, 0)
    full = Sampling(
        sampler="heun",
        steps=7,
        schedule="karras",
        eta=0.3,
        sigma_min=0.01,
        sigma_max=80.0,
        rho=5.0,
        cfg_scale=4.0,
        cfg_interval=(0.3, 5.0),
        cfg_channels=3,
        seed=9,
    )
    assert S.loads(S.dumps(full), Sampling) == full
    assert Sampling.of(full, steps=3) == full.model_copy(update={"steps": 3})
    with pytest.raises(ValidationError):
        full.steps = 2  # frozen


@pytest.mark.parametrize(
    "fields, path, needle",
    [
        ({"sampler": "plms"}, "sampler", "unknown sampler 'plms'; choose one of euler"),
        ({"schedule": "cosine"}, "schedule", "choose one of native, karras, uniform"),
        ({"eta": -0.1}, "eta", "greater than or equal to 0"),
        ({"eta": float("inf")}, "eta", "finite"),
        ({"steps": 0}, "steps", "greater than 0"),
        ({"sigma_min": 0.0}, "sigma_min", "use a positive, finite noise level"),
        ({"sigma_max": float("inf")}, "sigma_max", "use a positive, finite noise level"),
        ({"sigma_min": 3.0, "sigma_max": 2.0}, "sigma_min", "must be below sigma_max 2.0"),
        ({"cfg_scale": float("nan")}, "cfg_scale", "must be a finite number (1 = no guidance)"),
        ({"cfg_interval": (5.0, 1.0)}, "cfg_interval", "0 <= lo < hi"),
        ({"cfg_channels": 0}, "cfg_channels", "greater than 0"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"steps": True}, "steps", "not a number"),
        ({"step": 3}, "step", "did you mean `steps`"),
    ],
)
def test_bad_settings_name_the_field(fields, path, needle):
    with pytest.raises(S.SpecError) as err:
        Sampling.of(**fields)
    assert [p for p, _ in err.value.issues] == [path]
    assert needle in err.value.issues[0][1]
    assert isinstance(err.value, UserError)


def test_flat_preview_and_evaluation_keys_of_older_files_migrate():
    old = {"every": 5, "count": 4, "steps": 10, "sampler": "heun", "cfg_scale": 2.0}
    new = {"every": 5, "count": 4, "sampling": {"steps": 10, "sampler": "heun", "cfg_scale": 2.0}}
    assert S.validate(old, Preview) == S.validate(new, Preview)
    # keys left out take the section's own defaults (20 steps; seed 0 / 1), not Sampling's
    assert S.validate({"sampling": {"sampler": "euler"}}, Preview).sampling == Sampling(
        sampler="euler", steps=20, seed=0
    )
    assert S.validate({"seed": 4}, Evaluation).sampling == Sampling(steps=20, seed=4)
    assert Evaluation().sampling == Sampling(steps=20, seed=1)
    with pytest.raises(S.SpecError, match="write the sampling settings once"):
        S.validate({"steps": 3, "sampling": {"steps": 4}}, Preview)
    with pytest.raises(S.SpecError, match="sampler: unknown sampler 'nope'"):
        S.validate({"sampler": "nope"}, Evaluation)  # checked by the spec, not the trainer


def test_example_experiments_load_unchanged():
    seen = 0
    for path in sorted((ROOT / "examples/experiments").glob("*.yaml")):
        exp = load_experiment(path)
        assert isinstance(exp.preview.sampling, Sampling)
        seen += 1
    assert seen >= 5
    demo = load_experiment(ROOT / "examples/experiments/demo-digits.yaml")
    assert demo.evaluation.sampling == Sampling(steps=20, cfg_scale=3.0, seed=1)


@pytest.mark.parametrize("override", ["preview.steps=5", "preview.sampling.steps=5"])
def test_set_overrides_reach_the_sampling_in_either_spelling(override, tmp_path):
    old = ROOT / "examples/experiments/demo-digits.yaml"  # the flat form
    new = tmp_path / "new.yaml"
    text = old.read_text().replace("../tiny/", f"{ROOT}/examples/tiny/")
    new.write_text(
        "\n".join(
            "preview: {every: 500, count: 40, sampling: {cfg_scale: 3.0}}"
            if line.startswith("preview:")
            else line
            for line in text.splitlines()
        )
    )
    for path in (old, new):
        exp = load_experiment(path, [override])
        assert exp.preview.sampling == Sampling(steps=5, cfg_scale=3.0, seed=0), path


# -------------------------------------------------------------------------------- command line


def _parsers():
    from ditkit.cli import build_parser

    def walk(parser, name):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    yield from walk(p, f"{name} {sub}")

    return dict(walk(build_parser(), "ditkit"))


def test_every_sampling_command_has_the_whole_group():
    from ditkit.cli.common import SAMPLING_FLAGS

    parsers = _parsers()
    with_group = {
        name
        for name, p in parsers.items()
        if any("--sampler" in a.option_strings for a in p._actions)
    }
    assert with_group == {
        "ditkit sample",
        "ditkit evaluate",
        "ditkit extrapolate",
        "ditkit bench sample",
    }
    for name in with_group:
        dests = {a.dest for a in parsers[name]._actions}
        assert set(SAMPLING_FLAGS) <= dests, (name, set(SAMPLING_FLAGS) - dests)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--steps", "0"], "--steps 0: Input should be greater than 0"),
        (["--eta", "-1"], "--eta -1.0: Input should be greater than or equal to 0"),
        (
            ["--sigma-min", "2", "--sigma-max", "1"],
            "--sigma-min 2.0: must be below --sigma-max 1.0",
        ),
        (["--sigma-max", "nan"], "--sigma-max nan: use a positive, finite noise level"),
        (["--cfg-interval", "5"], "--cfg-interval '5': use LO,HI"),
        (["--seed", "-3"], "--seed -3:"),
    ],
)
def test_a_refused_flag_is_named(argv, needle):
    from ditkit.cli.common import sampling_from_args

    args = _parsers()["ditkit sample"].parse_args(["model.safetensors", *argv])
    with pytest.raises(UserError) as err:
        sampling_from_args(args)
    assert str(err.value).startswith(needle) and "\n" not in str(err.value)


def test_flags_build_the_sampling():
    from ditkit.cli.common import sampling_from_args

    p = _parsers()["ditkit sample"]
    args = p.parse_args(
        [
            "m.safetensors",
            "--sampler",
            "heun",
            "--steps",
            "7",
            "--schedule",
            "karras",
            "--eta",
            "0.2",
            "--sigma-min",
            "0.1",
            "--sigma-max",
            "9",
            "--rho",
            "5",
            "--cfg-scale",
            "3",
            "--cfg-interval",
            "0.5,4",
            "--cfg-channels",
            "3",
            "--seed",
            "11",
        ]
    )
    assert sampling_from_args(args) == Sampling(
        sampler="heun",
        steps=7,
        schedule="karras",
        eta=0.2,
        sigma_min=0.1,
        sigma_max=9.0,
        rho=5.0,
        cfg_scale=3.0,
        cfg_interval=(0.5, 4.0),
        cfg_channels=3,
        seed=11,
    )
    assert sampling_from_args(p.parse_args(["m.safetensors"])) == Sampling()
    # each command keeps its own step / seed defaults
    ev = _parsers()["ditkit evaluate"].parse_args([])
    assert sampling_from_args(ev, cfg_scale=2.0) == Sampling(steps=20, seed=1, cfg_scale=2.0)


def test_no_command_translates_value_errors():
    """Library code raises UserError subclasses; cli/ no longer turns ValueError into usage
    errors (issue 26, item 4)."""
    offenders = [
        f"{path.name}:{i}"
        for path in sorted((ROOT / "ditkit/cli").glob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "except ValueError" in line or "except (ValueError" in line
    ]
    assert offenders == []
