"""What every command shares: the source resolver, the argument-type parsers and the error
boundary. Imports nothing heavy at module level (``ditkit --help`` must not import torch).

- :func:`resolve_source` decides once what a command-line reference is: a spec/experiment
  file, a preset name, a checkpoint (``.safetensors``), an exported ``.onnx`` or a run folder.
  :func:`load_spec`, :func:`checkpoint_path`, :func:`load_experiment_source` and
  :func:`load_model_source` are built on it.
- :func:`parse_resolution` and friends turn argument text into values or raise
  :class:`~ditkit.errors.UserError` naming the flag.
- :func:`run_command` is the one place errors become exit codes (see its docstring).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, overload

from ditkit.errors import EnvironmentFault, UserError

UsageError = UserError  # the name the command modules use

# --------------------------------------------------------------------------------- errors

EXIT_OK, EXIT_FAULT, EXIT_USAGE = 0, 1, 2
# OSErrors that are the machine's refusal, not a bug: reported in one line, exit 1
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT})


def debug_enabled(args=None) -> bool:
    """``--debug`` or ``DITKIT_DEBUG=1``: let tracebacks through."""
    return bool(getattr(args, "debug", False)) or os.environ.get("DITKIT_DEBUG", "") not in (
        "",
        "0",
    )


def run_command(func: Callable, args) -> int:
    """Run ``func(args)`` and map what it raises to an exit status, printing one line:

    - :class:`UserError` (bad input: ``SpecError``, ``ExportError``, ... subclass it) -> 2,
      ``error: <message>``;
    - :class:`EnvironmentFault`, or an ``OSError`` whose errno is in
      :data:`ENVIRONMENT_ERRNOS` (disk full, read-only, permission denied) -> 1;
    - ``KeyboardInterrupt`` -> 130.

    The mapping is by type, never by the words of a message: a library error that means bad
    input or a refusing machine (YAML, PIL, ONNX, safetensors on a full disk) is turned into
    a typed error where it arises. Anything else is a bug and keeps its traceback. With
    ``--debug`` / ``DITKIT_DEBUG=1`` the
    mapped errors print their traceback too (same exit status). Other modules extend the
    mapping here, in one place."""
    debug = debug_enabled(args)
    try:
        status = func(args)
        return EXIT_OK if status is None else int(status)
    except UserError as err:
        _report(err, debug)
        return EXIT_USAGE
    except OSError as err:
        if not isinstance(err, EnvironmentFault) and err.errno not in ENVIRONMENT_ERRNOS:
            raise
        _report(err, debug)
        return EXIT_FAULT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _report(err: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(err)
    text = str(err)
    if isinstance(err, OSError) and not isinstance(err, EnvironmentFault):
        where = f"{err.filename}: " if err.filename else ""
        text = (
            f"{where}{err.strerror or text}; the command stopped there, nothing written "
            "earlier was lost"
        )
    print(f"error: {text}", file=sys.stderr)


# --------------------------------------------------------------------------------- sources

SPEC_SUFFIXES = (".yaml", ".yml", ".json")
SOURCE_KINDS = ("file", "preset", "checkpoint", "onnx", "run")
_KIND_TEXT = {
    "file": "a spec file",
    "preset": "a preset name",
    "checkpoint": "a checkpoint (.safetensors)",
    "onnx": "an exported .onnx file",
    "run": "a run folder",
}


@dataclass(frozen=True)
class Source:
    """What a command-line reference names. ``kind`` is one of :data:`SOURCE_KINDS`."""

    kind: str
    ref: str
    path: Path | None = None


def resolve_source(
    ref: str, accept: tuple[str, ...] = ("file", "preset", "checkpoint"), what: str = ""
) -> Source:
    """Decide whether ``ref`` is a file, a preset, a checkpoint, an ONNX file or a run folder,
    by its suffix, then the file system, then the preset names; raise :class:`UserError`
    when it is none of them or not one ``accept`` allows. ``what`` prefixes messages (a flag).
    """
    from ditkit.spec.presets import PRESETS

    path = Path(ref)
    name = f"{what} {ref}" if what else ref
    if path.suffix == ".safetensors":
        kind = "checkpoint"
    elif path.suffix == ".onnx":
        kind = "onnx"
    elif path.suffix in SPEC_SUFFIXES:
        kind = "file"
    elif path.is_dir():
        kind = "run"
    elif path.exists():
        kind = "file"
    elif ref in PRESETS:
        kind = "preset"
    else:
        first = [k for k in accept if k in ("file", "preset")]
        rest = [k for k in accept if k not in first]
        wanted = " or ".join(_KIND_TEXT[k] for k in first) + (
            f", nor {_either(rest)}" if rest and first else _either(rest) if rest else ""
        )
        extra = f"; presets: {', '.join(PRESETS)}" if "preset" in accept else ""
        raise UsageError(f"{name}: not {wanted}{extra}")
    if kind not in accept:
        raise UsageError(f"{name}: {_KIND_TEXT[kind]}, but this takes {_either(accept)}")
    if kind == "preset":
        return Source(kind, ref)
    if kind in ("checkpoint", "onnx", "file"):  # a FIFO or device: refused, never opened
        from ditkit.spec.io import check_regular

        check_regular(
            path,
            {"checkpoint": "checkpoint", "onnx": "ONNX model", "file": "spec or experiment"}[kind],
        )
    if kind in ("checkpoint", "onnx") and not path.is_file():
        raise UsageError(f"{name}: no such {'checkpoint' if kind == 'checkpoint' else 'file'}")
    return Source(kind, ref, path)


def _either(kinds) -> str:
    texts = [_KIND_TEXT[k] for k in kinds]
    return texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " or " + texts[-1]


def checkpoint_path(ref: str, what: str = "") -> Path:
    """A checkpoint file, or the newest checkpoint's EMA weights in a run folder."""
    src = resolve_source(ref, ("checkpoint", "run"), what)
    assert src.path is not None  # resolve_source sets it for every kind but a preset
    if src.kind == "checkpoint":
        return src.path
    from ditkit.training.checkpoints import latest_checkpoint

    found = latest_checkpoint(src.path / "checkpoints") or latest_checkpoint(src.path)
    if found is None:
        raise UsageError(
            f"{src.path}: a directory with no checkpoints, so not a run folder "
            "(expected checkpoints/step-*/ema.safetensors); give a spec file "
            "(.yaml/.json), a checkpoint (.safetensors) or a run folder"
        )
    return found[1] / "ema.safetensors"


def load_spec(ref: str, what: str = "", overrides: list[str] | tuple[str, ...] = ()):
    """The model spec of a spec file, a preset, a checkpoint (the spec it carries) or a run
    folder (its newest checkpoint's), with ``--set`` ``overrides`` applied and validated by
    the spec schema."""
    from ditkit import spec as S

    src = resolve_source(ref, ("file", "preset", "checkpoint", "run"), what)
    if src.kind == "preset":
        from ditkit.spec.presets import preset

        spec = preset(ref)
    elif src.kind == "file":
        assert src.path is not None  # resolve_source sets it for every kind but a preset
        spec = S.load(src.path)
    else:
        from ditkit.runtime.checkpoint import read_metadata, spec_from_metadata

        path = checkpoint_path(ref, what)
        spec = spec_from_metadata(read_metadata(path), str(path))[0]
    return override_spec(spec, overrides, ref)


def override_spec(spec, overrides, source: str = "spec"):
    """``spec`` with ``PATH=VALUE`` overrides applied, validated again (field-named errors)."""
    if not overrides:
        return spec
    from ditkit import spec as S
    from ditkit.spec.overrides import apply_overrides

    data = apply_overrides(S.to_data(spec, full=True), overrides)
    return S.validate(data, type(spec), f"{source} with --set {' '.join(overrides)}")


def load_experiment_source(ref: str, overrides: list[str] | tuple[str, ...] = ()):
    """``(experiment, run folder or None)`` from an experiment file or a run folder, with
    ``--set`` overrides applied before validation."""
    from ditkit.spec.experiment import load_experiment_or_run

    resolve_source(ref, ("file", "run"))
    return load_experiment_or_run(ref, overrides)


def default_objective(spec, objective=None):
    """``objective`` (a kind such as ``edm``, or an objective spec), or the spec's own default
    (``ModelSpec.default_objective``) with a note on stderr."""
    from ditkit import spec as S

    if objective is None:
        objective = spec.default_objective
        print(
            f"note: no objective recorded; using {objective.kind} (pass --objective to choose)",
            file=sys.stderr,
        )
    if isinstance(objective, str):
        if objective not in S.OBJECTIVE_KINDS:
            raise UsageError(
                f"objective {objective!r} (--objective): choose one of "
                f"{', '.join(S.OBJECTIVE_KINDS)}"
            )
        return S.objective_of_kind(objective)
    return objective


def load_model_source(
    ref: str, objective=None, device: str = "cpu", overrides: list[str] | tuple[str, ...] = ()
):
    """``(model, objective, metadata, checkpoint hash or None)`` from a checkpoint (or run
    folder) or from a spec / preset (random weights; ``overrides`` apply to it). ``objective``
    (a kind or an objective spec) applies where the source records none."""
    src = resolve_source(ref, ("file", "preset", "checkpoint", "run"))
    if src.kind in ("checkpoint", "run"):
        if overrides:
            raise UsageError(
                f"--set: {ref} is a checkpoint, whose weights fix the model; "
                "--set applies to spec files and presets"
            )
        from ditkit.runtime.checkpoint import load_model, model_hash

        path = checkpoint_path(ref)
        model, ckpt = load_model(path, device=device)  # CheckpointError / SpecError
        obj = ckpt.objective or default_objective(ckpt.spec, objective)
        return model, obj, ckpt.metadata, model_hash(ckpt.tensors)
    from ditkit.builder import build

    spec = load_spec(ref, overrides=overrides)
    return build(spec, device=device).eval(), default_objective(spec, objective), {}, None


# --------------------------------------------------------------------------------- arguments

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def numbers(text: str, kind: type = int) -> list | None:
    """The comma-separated numbers of ``text`` as ``kind`` (``int`` or ``float``; decimal
    notation only, so no ``inf`` or ``nan``), or ``None`` when an item is not one (argument
    text is checked by its form here, not by catching the errors of ``int()``)."""
    pattern = _INT if kind is int else _FLOAT
    items = [item.strip() for item in text.split(",")]
    if not all(pattern.fullmatch(item) for item in items):
        return None
    return [kind(item) for item in items]


@overload
def parse_resolution(text: str, flag: str = ...) -> tuple[int, int]: ...
@overload
def parse_resolution(text: None, flag: str = ...) -> None: ...
def parse_resolution(text: str | None, flag: str = "--resolution") -> tuple[int, int] | None:
    """``H`` or ``HxW`` (also ``H,W``) -> ``(H, W)``; ``None`` stays ``None``."""
    if text is None:
        return None
    parts = numbers(text.lower().replace("x", ",")) or []
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise UsageError(
            f"{flag} {text!r}: use H or HxW with positive integers, e.g. 256 or 256x512"
        )
    return (parts[0], parts[-1])


def parse_list(text: str | None) -> list[str]:
    """Comma-separated text -> its non-empty, stripped items."""
    if text is None:
        return []
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_interval(text: str | None, flag: str = "--cfg-interval"):
    """``LO,HI`` -> ``(lo, hi)`` with ``0 <= lo < hi``."""
    if text is None:
        return None
    values = numbers(text, float)
    if values is None or len(values) != 2:
        raise UsageError(f"{flag} {text!r}: use LO,HI (two sigmas), e.g. 0.3,5")
    lo, hi = values
    if not 0 <= lo < hi:
        raise UsageError(f"{flag} {text!r}: need 0 <= LO < HI")
    return lo, hi


def positive(value: int | None, flag: str, allow_zero: bool = False) -> int | None:
    """``value`` if it is positive (or zero with ``allow_zero``), else :class:`UserError`."""
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UsageError(f"{flag} {value}: must be {'0 or more' if allow_zero else 'positive'}")
    return value


def parse_labels(text: str | None, num: int | None, spec, seed: int, flag: str = "--classes"):
    """``(labels tensor or None, number of samples)`` from ``--classes``: comma-separated
    labels (repeated up to ``num``), ``random`` (seeded), or none (unconditional, 16)."""
    import torch

    classes = spec.conditioning.classes
    if text is None:
        return None, num or 16
    if classes is None:
        raise UsageError(f"{flag}: this model has no class conditioning (conditioning.classes)")
    if text == "random":
        n = num or 16
        g = torch.Generator().manual_seed(seed + 1)
        return torch.randint(0, classes.count, (n,), generator=g), n
    values = numbers(",".join(parse_list(text)))
    if values is None:
        raise UsageError(f"{flag} {text!r}: use comma-separated integers or 'random'")
    bad = [v for v in values if not 0 <= v < classes.count]
    if not values or bad:
        raise UsageError(f"{flag}: labels must be in [0, {classes.count}); got {bad or values}")
    n = num or len(values)
    return torch.tensor([values[i % len(values)] for i in range(n)]), n


# --------------------------------------------------------------------------------- vocabulary
# One name per thing in every command (and the YAML field it mirrors):
#   --cfg-scale  guidance scale (cfg_scale)      --count    number of samples (count)
#   --sampler    sampler name (sampler)          --steps    sampler steps (steps)
#   --seed       seed (seed)                     --device   cpu | cuda | cuda:N | auto
#   --threads    CPU threads                     --out      the file or folder written
#   --json       print one JSON object on stdout instead of the text report
#   --no-progress  no progress bar               --set PATH=VALUE  override a spec field
# Lists are comma-separated everywhere. Old spellings are hidden aliases that print one
# deprecation line (DEPRECATED_IN) and keep working until the next version.


DEPRECATED_IN = "0.3"  # the old spellings still work in 0.2.x (CHANGELOG.md)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (unless the help text already states one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            action.default in (None, False, [], argparse.SUPPRESS)
            or "%(default)" in text
            or "default" in text
            or action.option_strings == []
            or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` with :class:`HelpFormatter`; subcommand parsers inherit it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def deprecated(parser, old: str, new: str, **kwargs) -> None:
    """Accept ``old`` as a hidden alias of the option ``new`` (same ``dest``): it works and
    prints one line naming the new spelling."""
    dest = next(a.dest for a in parser._actions if new in a.option_strings)
    base = kwargs.pop("action", "store")

    class Alias(argparse.Action):
        def __call__(self, parser_, namespace, values, option_string=None):
            print(
                f"ditkit: {old} is deprecated, use {new} ({old} goes in ditkit {DEPRECATED_IN})",
                file=sys.stderr,
            )
            if base == "store_true":
                values = True
            setattr(namespace, dest, values)

    if base == "store_true":
        kwargs["nargs"] = 0
    parser.add_argument(
        old,
        dest=f"_deprecated_{old.strip('-').replace('-', '_')}",
        action=Alias,
        help=argparse.SUPPRESS,
        default=argparse.SUPPRESS,
        **kwargs,
    )


def add_device(p, default: str = "auto") -> None:
    p.add_argument(
        "--device",
        default=default,
        help="cpu, cuda, cuda:N or auto (auto: cuda when available, else cpu; under "
        "torchrun cuda means the local rank's GPU)",
    )


def add_threads(p) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: $OMP_NUM_THREADS, else half the CPUs this "
        "process may use, divided among local torchrun ranks, 1 to 8)",
    )


def add_progress(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_json(p, what: str = "print one JSON object instead of the text report") -> None:
    p.add_argument("--json", action="store_true", help=what)


def add_set(p, what: str = "spec") -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help=f"override a field of the {what} (repeatable), e.g. "
        "training.batch_size=8 or levels.0.d_model=256; validated by the schema",
    )


# --------------------------------------------------------------------------------- sampling
# Every command that samples takes the same flags, one per field of the Sampling spec, and
# builds its Sampling with sampling_from_args: a flag cannot be honoured by one code path and
# dropped by another.

SAMPLING_FLAGS = {
    "sampler": "--sampler",
    "steps": "--steps",
    "schedule": "--schedule",
    "eta": "--eta",
    "sigma_min": "--sigma-min",
    "sigma_max": "--sigma-max",
    "rho": "--rho",
    "cfg_scale": "--cfg-scale",
    "cfg_interval": "--cfg-interval",
    "cfg_channels": "--cfg-channels",
    "seed": "--seed",
}
"""Sampling spec field -> its command-line flag (``dest`` is the field name)."""


def add_sampling(
    p,
    *,
    steps: int = 50,
    seed: int = 0,
    cfg_scale_help: str | None = None,
    cfg_channels_help: str | None = None,
) -> None:
    """The sampling flags (:data:`SAMPLING_FLAGS`) as one argument group. ``steps`` and
    ``seed`` are the command's defaults; the other defaults are the Sampling spec's.
    ``cfg_scale_help`` replaces the default help of ``--cfg-scale`` (and then its default is
    ``None``: the command decides)."""
    from ditkit.spec.sampling import SAMPLERS, SCHEDULES, Sampling

    field = Sampling.model_fields
    g = p.add_argument_group(
        "sampling", "how the samples are drawn (the fields of ditkit.spec.sampling.Sampling)"
    )
    g.add_argument("--sampler", default=field["sampler"].default, choices=SAMPLERS, help="sampler")
    g.add_argument("--steps", type=int, default=steps, help="sampler steps (noise levels)")
    g.add_argument(
        "--schedule",
        default=field["schedule"].default,
        choices=SCHEDULES,
        help="step schedule: native (the model family's), karras (EDM's "
        "rho-spaced sigmas) or uniform (in the objective's time)",
    )
    g.add_argument(
        "--eta",
        type=float,
        default=None,
        help="noise of the ancestral / SDE samplers (default 1; ddim and dpm_adaptive 0)",
    )
    g.add_argument(
        "--sigma-min",
        type=float,
        default=None,
        help="lowest non-zero noise level (default: the objective's, e.g. a "
        "converted k-diffusion config's sigma_min)",
    )
    g.add_argument(
        "--sigma-max",
        type=float,
        default=None,
        help="highest noise level (default: the objective's)",
    )
    g.add_argument(
        "--rho", type=float, default=field["rho"].default, help="exponent of the karras schedule"
    )
    if cfg_scale_help is None:
        g.add_argument(
            "--cfg-scale",
            type=float,
            default=field["cfg_scale"].default,
            help="classifier-free guidance scale (1 = the conditional model)",
        )
    else:
        g.add_argument("--cfg-scale", type=float, default=None, help=cfg_scale_help)
    g.add_argument(
        "--cfg-interval",
        default=None,
        metavar="LO,HI",
        help="guide only for sigma in [LO, HI] (default: every step)",
    )
    g.add_argument(
        "--cfg-channels",
        type=int,
        default=None,
        help=cfg_channels_help or "guide only the first N channels (DiT: 3; default: all)",
    )
    g.add_argument("--seed", type=int, default=seed, help="seed of the noise")


def sampling_from_args(args, **fixed):
    """The :class:`~ditkit.spec.sampling.Sampling` of the flags :func:`add_sampling` added,
    with ``fixed`` fields set by the command (e.g. one guidance scale of several). A value
    the spec refuses is a :class:`UserError` that names the flag."""
    from ditkit.spec import SpecError
    from ditkit.spec.sampling import Sampling

    data = {name: getattr(args, name) for name in SAMPLING_FLAGS}
    data["cfg_interval"] = parse_interval(args.cfg_interval)
    if isinstance(getattr(args, "stages", None), str):  # commands with add_stages(single=True)
        data["stages"] = parse_stages_flag(args.stages)
    data = {k: v for k, v in data.items() if v is not None}  # unset: the spec's default
    data.update(fixed)
    try:
        return Sampling.of(**data)
    except SpecError as err:
        path, message = err.issues[0]
        name = path.split(".")[0].split("[")[0]
        flag = {**SAMPLING_FLAGS, "stages": "--stages"}.get(name, name)
        given = getattr(args, name, None)
        if name == "stages":  # which stage and field: the path says it
            message = f"{path}: {message}"
        shown = f" {given}" if given is not None and name not in fixed else ""
        message = message.split(" (got ")[0]
        for field, other in SAMPLING_FLAGS.items():  # "below sigma_max 1.0" in flag words
            message = re.sub(rf"\b{field}\b", other, message)
        raise UsageError(f"{flag}{shown}: {message}") from None


STAGES_HELP = (
    "multi-stage sampling: comma-separated RES[:SIGMA[:STEPS]] stages, RES = N or "
    "HxW, e.g. 8,16:2.0,32:1.0:10 = draft at 8x8 from pure noise, enlarge "
    "(bicubic; add :nearest to a stage for nearest) and re-noise to sigma 2.0 at "
    "16x16, then to sigma 1.0 at 32x32 with 10 steps; the last stage is the output "
    "resolution (guide: Multi-stage sampling)"
)


def add_stages(p, *, single: bool = True) -> None:
    """``--stages``: one stage chain (``single``) or several, each its own report row."""
    if single:
        p.add_argument("--stages", default=None, metavar="STAGES", help=STAGES_HELP)
    else:
        p.add_argument(
            "--stages",
            nargs="+",
            default=None,
            metavar="STAGES",
            help=STAGES_HELP.replace(
                "multi-stage sampling:",
                "multi-stage rows, one per policy and space-separated chain:",
            ).replace(
                "the last stage is the output resolution",
                "a chain's last stage is its row's resolution, one of --resolutions",
            ),
        )


def parse_stages_flag(text: str | None, flag: str = "--stages"):
    """``--stages`` text as stage data (validated later by the Sampling spec); a malformed
    item is a :class:`ditkit.errors.UserError`."""
    from ditkit.spec.sampling import parse_stages

    return parse_stages(text, flag)


def setup_compute(args) -> str:
    """Apply ``--threads`` and resolve ``--device``; returns the device string
    (``ditkit.device``)."""
    from ditkit.device import pick_device, set_threads

    args.threads = set_threads(getattr(args, "threads", None))
    device = getattr(args, "device", None)
    if device is not None:
        args.device = str(pick_device(device))
    return getattr(args, "device", "cpu")


@overload
def list_arg(values: None, flag: str) -> None: ...
@overload
def list_arg(values: str | list[str] | tuple[str, ...], flag: str) -> list[str]: ...


def list_arg(values, flag: str) -> list[str] | None:
    """A comma-separated list option that used to take space-separated values (``nargs``):
    both forms are read, the old one with a deprecation line."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    if len(values) > 1:
        print(
            f"ditkit: space-separated {flag} values are deprecated, separate them with "
            f"commas ({flag} {','.join(values)}); the old form goes in ditkit "
            f"{DEPRECATED_IN}",
            file=sys.stderr,
        )
    return [item for v in values for item in parse_list(v)]
