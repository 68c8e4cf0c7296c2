"""Training checkpoints: one folder per step, written atomically.

``run/checkpoints/step-000500/`` holds

* ``model.safetensors`` and ``ema.safetensors``: ditkit checkpoints
  (:func:`ditkit.runtime.checkpoint.save_checkpoint`: the spec and the objective in the
  metadata), so ``ditkit sample .../ema.safetensors`` needs nothing else;
* ``state.json`` + ``state.safetensors``: the optimizer, LR scheduler, every rank's RNG states
  and the data position. The JSON holds the structure and every plain value; each tensor in it is
  a reference (``{"__tensor__": "t0"}``) into the safetensors file. Neither format can run code,
  so a run folder somebody hands you is safe to resume (nothing is unpickled);
* ``experiment.yaml``: the resolved experiment (model inlined).

Checkpoints written before this format hold ``state.pt`` (a torch pickle). :func:`read_state`
converts such a folder once, reading it with ``torch.load(weights_only=True)`` (tensors and plain
containers only; no code runs), and refuses one that needs anything else.

The folder is first written as ``.step-000500.<unique>.tmp`` (a fresh name per write, made with
``mkdtemp``, so two writers or a planted symlink cannot collide with it) and renamed when
complete, so a crash at any moment leaves either the previous checkpoints alone or a complete new
one; the newest complete folder is the one ``--resume`` uses. Older folders beyond ``keep_last``
are removed only after a new one is in place. Leftover temporary folders of a killed run are
removed by :func:`remove_stale_temporaries` (called while holding the run's lock).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ditkit.errors import UserError
from ditkit.files import atomic_path, current_umask, environment_fault, write_text
from ditkit.runtime.checkpoint import save_checkpoint
from ditkit.spec import dumps
from ditkit.spec.experiment import Experiment
from ditkit.spec.io import check_regular, open_regular

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_JSON, STATE_TENSORS, LEGACY_STATE = "state.json", "state.safetensors", "state.pt"
STATE_FORMAT = "ditkit.training-state/1"


class UnsafeStateError(UserError):
    """A checkpoint's training state cannot be read without trusting a pickle."""


def has_state(path: Path) -> bool:
    return (path / STATE_JSON).is_file() or (path / LEGACY_STATE).is_file()


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and has_state(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(
    root: Path,
    step: int,
    exp: Experiment,
    model_state: dict,
    ema_state: dict,
    train_state: dict,
    keep_last: int,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``step-NNNNNN/`` atomically and prune to the newest ``keep_last``."""

    final = step_dir(root, step)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700
    except OSError as err:
        raise _checkpoint_fault(err, final) from None
    try:
        meta = {"ditkit.step": str(step), "ditkit.experiment": exp.name, **(metadata or {})}
        spec, obj = exp.model_spec, exp.objective
        save_checkpoint(
            tmp / "model.safetensors",
            model_state,
            spec,
            objective=obj,
            metadata={**meta, "ditkit.weights": "model"},
        )
        save_checkpoint(
            tmp / "ema.safetensors",
            ema_state,
            spec,
            objective=obj,
            metadata={**meta, "ditkit.weights": "ema"},
        )
        write_text(tmp / "experiment.yaml", dumps(exp))
        _write_state(tmp, train_state)
        _fsync_dir(tmp)
        if final.exists():  # rewriting a step (a resumed run): swap, then drop the old one
            old = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".old"))
            os.replace(final, old)  # onto the fresh empty folder
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception):
            raise _checkpoint_fault(err, final) from None
        raise
    for _, old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoint_fault(err: Exception, final: Path) -> Exception:
    """A disk/permission failure while writing a checkpoint as one clear EnvironmentFault."""

    return (
        environment_fault(
            err,
            f"checkpoint {final}",
            "the earlier checkpoints are intact (resume from the newest with --resume)",
        )
        or err
    )


# ------------------------------------------------------------------ training state, no pickle


def _flatten(obj, tensors: dict[str, torch.Tensor]):
    """``obj`` as JSON-ready data; tensors go to ``tensors`` and are replaced by references.
    Tuples and dicts with non-string keys are tagged so they come back as they were."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _flatten(v, tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"training state: dict key {k!r} is not a str or int")
            items.append([k, _flatten(v, tensors)])
        return {"__items__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"training state: cannot store a {type(obj).__name__} without pickle")


def _unflatten(obj, tensors: dict[str, torch.Tensor], where: str):
    if isinstance(obj, list):
        return [_unflatten(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        key = obj["__tensor__"]
        if key not in tensors:
            raise UnsafeStateError(
                f"{where}: tensor {key!r} is missing from {STATE_TENSORS}; "
                "the checkpoint is damaged, resume from an earlier one"
            )
        return tensors[key]
    if set(obj) == {"__tuple__"}:
        return tuple(_unflatten(v, tensors, where) for v in obj["__tuple__"])
    if set(obj) == {"__items__"}:
        return {k: _unflatten(v, tensors, where) for k, v in obj["__items__"]}
    return {k: _unflatten(v, tensors, where) for k, v in obj.items()}


def _write_state(folder: Path, train_state: dict) -> None:

    tensors: dict[str, torch.Tensor] = {}
    data = {"format": STATE_FORMAT, "state": _flatten(train_state, tensors)}
    with atomic_path(folder / STATE_TENSORS) as tmp:  # synced, mode fixed (safetensors: 0600)
        save_file(tensors, tmp)
    write_text(folder / STATE_JSON, json.dumps(data) + "\n")


def _read_new_state(path: Path) -> dict:

    where = str(path / STATE_JSON)
    check_regular(path / STATE_TENSORS, "training state")
    try:
        with open_regular(path / STATE_JSON, "training state") as f:
            data = json.loads(f.read().decode("utf-8"))
        tensors = load_file(str(path / STATE_TENSORS))
    except (ValueError, SafetensorError, FileNotFoundError) as err:
        raise UnsafeStateError(
            f"{where}: the training state cannot be read ({err}); the "
            "checkpoint is damaged, resume from an earlier one"
        ) from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise UnsafeStateError(
            f"{where}: not a ditkit training state (format "
            f"{data.get('format') if isinstance(data, dict) else None!r}, "
            f"expected {STATE_FORMAT!r})"
        )
    if "state" not in data:
        raise UnsafeStateError(
            f"{where}: no 'state' entry; the checkpoint is damaged, resume from an earlier one"
        )
    state = _unflatten(data["state"], tensors, where)
    if not isinstance(state, dict):
        raise UnsafeStateError(f"{where}: the training state is not a mapping")
    check_state(state, where)
    return state


def _count(value, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_state(state: dict, where: str) -> None:
    """Refuse a training state whose fields a resumed run would misread: each must be there
    with its type and range (a damaged ``data_position`` would silently draw other batches)."""

    def bad(field: str, want: str):
        return UnsafeStateError(
            f"{where}: state field {field} is {state.get(field)!r}, expected "
            f"{want}; the checkpoint is damaged, resume from an earlier one"
        )

    if not _count(state.get("step")):
        raise bad("step", "a step number (0 or more)")
    if not _count(state.get("world"), 1):
        raise bad("world", "a process count (1 or more)")
    for name in ("generators", "torch_rng", "position_generators"):
        if name == "position_generators" and name not in state:  # only with random positions
            continue
        value = state.get(name)
        if not (
            isinstance(value, list)
            and len(value) == state["world"]
            and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in value)
        ):
            raise bad(name, f"one uint8 RNG state per process ({state['world']})")
    if not isinstance(state.get("optimizer"), dict):
        raise bad("optimizer", "the optimizer's state (a mapping)")
    position = state.get("data_position")
    layouts = ({"epoch", "offset"}, {"samples"})
    if not (
        isinstance(position, dict)
        and set(position) in layouts
        and all(_count(v) for v in position.values())
    ):
        raise bad("data_position", "{epoch, offset} or {samples}, counts of 0 or more")
    lr = state.get("lr_factor")
    if lr is not None and not (
        isinstance(lr, (int, float))
        and not isinstance(lr, bool)
        and lr == lr
        and abs(lr) != float("inf")
    ):
        raise bad("lr_factor", "a finite number")


def convert_legacy_state(path: Path) -> dict:
    """Rewrite an old ``state.pt`` as ``state.json`` + ``state.safetensors`` (once), reading it
    with ``torch.load(weights_only=True)``: only tensors and plain containers load, nothing
    runs. A pickle that needs anything else is refused and left untouched."""
    legacy = path / LEGACY_STATE
    try:
        state = torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means we will not trust it
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeStateError(
            f"{legacy}: an old-format training state that cannot be read safely ({first[:200]}); "
            "ditkit never unpickles arbitrary objects, so this checkpoint cannot be resumed. "
            "Its weights (model.safetensors, ema.safetensors) are still usable, e.g. as "
            "finetune.checkpoint of a new run"
        ) from None
    if not isinstance(state, dict):
        raise UnsafeStateError(f"{legacy}: the training state is not a mapping; cannot resume")
    tmp = Path(tempfile.mkdtemp(dir=path, prefix=f".{STATE_JSON}.", suffix=".convert"))
    try:
        _write_state(tmp, state)
        os.replace(tmp / STATE_TENSORS, path / STATE_TENSORS)
        os.replace(tmp / STATE_JSON, path / STATE_JSON)  # last: its presence marks success
        _fsync_dir(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    legacy.unlink()
    return state


def read_state(path: Path) -> dict:
    """The training state of a checkpoint folder (``state.json`` + ``state.safetensors``; an old
    ``state.pt`` is converted once, see :func:`convert_legacy_state`). Never unpickles."""
    if (path / STATE_JSON).is_file():
        return _read_new_state(path)
    if (path / LEGACY_STATE).is_file():
        return convert_legacy_state(path)
    raise UnsafeStateError(f"{path}: no training state ({STATE_JSON}) in this checkpoint")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:

    check_regular(path, "checkpoint")
    return load_file(str(path))


def write_json(path: Path, data: dict) -> None:
    """Atomic JSON write."""
    write_text(path, json.dumps(data, indent=2) + "\n")


TEMPORARY = re.compile(r"^\.step-\d{6,}(\..+)?\.(tmp|old)$")  # old fixed names too


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Remove the half-written ``.step-*.tmp`` / ``.old`` folders a killed run left under
    ``root``; only safe while holding the run's lock (no other writer). Returns them."""
    if not root.is_dir():
        return []
    gone = [
        p for p in root.iterdir() if TEMPORARY.match(p.name) and p.is_dir() and not p.is_symlink()
    ]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
