"""Training checkpoints: one folder per step, written atomically.

``run/checkpoints/step-000500/`` holds

* ``model.safetensors`` and ``ema.safetensors``: ditkit checkpoints
  (:func:`ditkit.runtime.checkpoint.save_checkpoint`: the spec and the objective in the
  metadata), so ``ditkit sample .../ema.safetensors`` needs nothing else;
* ``state.pt``: the optimizer, LR scheduler, every rank's RNG states and the data position;
* ``experiment.yaml``: the resolved experiment (model inlined).

The folder is first written as ``.step-000500.tmp`` and renamed when complete, so a crash at any
moment leaves either the previous checkpoints alone or a complete new one; the newest complete
folder is the one ``--resume`` uses. Older folders beyond ``keep_last`` are removed only after a
new one is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from ditkit.runtime.files import atomic_path
from ditkit.spec import dumps
from ditkit.spec.experiment import Experiment

STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "state.pt").is_file():
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


def write_checkpoint(root: Path, step: int, exp: Experiment, model_state: dict,
                     ema_state: dict, train_state: dict, keep_last: int,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write ``step-NNNNNN/`` atomically and prune to the newest ``keep_last``."""
    from ditkit.runtime.checkpoint import save_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        meta = {"ditkit.step": str(step), "ditkit.experiment": exp.name, **(metadata or {})}
        spec, obj = exp.model_spec, exp.objective
        save_checkpoint(tmp / "model.safetensors", model_state, spec, objective=obj,
                        metadata={**meta, "ditkit.weights": "model"})
        save_checkpoint(tmp / "ema.safetensors", ema_state, spec, objective=obj,
                        metadata={**meta, "ditkit.weights": "ema"})
        (tmp / "experiment.yaml").write_text(dumps(exp))
        with open(tmp / "state.pt", "wb") as f:
            torch.save(train_state, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # rewriting a step (a resumed run): swap, then drop the old one
            old = root / f".{final.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> dict:
    """The training state of a checkpoint folder (``state.pt``)."""
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def write_json(path: Path, data: dict) -> None:
    """Atomic JSON write."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")
