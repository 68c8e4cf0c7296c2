"""Resumable training state is stored without pickle: a run folder somebody hands you cannot run
code when it is resumed (issue 13, item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ditkit.errors import UserError
from ditkit.training import checkpoints as C
from ditkit.training.logs import read_scalars
from ditkit.training.loop import train

from .conftest import tiny_experiment


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_scalars(run / "scalars.csv")]


def _stopped_run(tmp_path: Path):
    exp = tiny_experiment("edm", steps=6, checkpoint={"every": 2})
    train(exp, tmp_path / "run", progress=False, stop_after=3)  # checkpoint at 2
    return exp, tmp_path / "run" / "checkpoints" / "step-000002"


def test_a_pickle_payload_planted_in_the_state_never_runs_on_resume(tmp_path):
    exp, ckpt = _stopped_run(tmp_path)
    marker = tmp_path / "PWNED"
    # an old-format state file (as any run folder from before this change holds): the real
    # state plus one entry whose unpickling runs code
    state = C.read_state(ckpt)
    torch.save({**state, "note": _Payload(marker)}, ckpt / "state.pt")
    for name in ("state.json", "state.safetensors"):
        (ckpt / name).unlink(missing_ok=True)
    error = None
    try:
        train(exp, tmp_path / "run", progress=False, resume=True)
    except UserError as err:
        error = err
    assert not marker.exists(), "resuming ran code from the run folder"
    assert (
        error is not None
        and "an old-format training state that cannot be read safely" in str(error)
        and "never unpickles" in str(error)
    )
    assert (ckpt / "state.pt").is_file()  # refused, left as it was


def test_the_new_state_files_hold_no_pickle_and_a_stray_state_pt_is_ignored(tmp_path):
    exp, ckpt = _stopped_run(tmp_path)
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == [
        "ema.safetensors",
        "experiment.yaml",
        "model.safetensors",
        "state.json",
        "state.safetensors",
    ]
    data = json.loads((ckpt / "state.json").read_text())
    assert data["format"] == C.STATE_FORMAT and data["state"]["step"] == 2
    marker = tmp_path / "PWNED"
    torch.save({"x": _Payload(marker)}, ckpt / "state.pt")  # planted beside the real state
    result = train(exp, tmp_path / "run", progress=False, resume=True)
    assert result.step == 6 and not marker.exists()


def test_damaged_json_state_is_a_user_error_not_a_traceback(tmp_path):
    exp, ckpt = _stopped_run(tmp_path)
    (ckpt / "state.json").write_bytes(b"\x80\x04\x95 not json")
    with pytest.raises(
        C.UnsafeStateError,
        match=r"state\.json: the training state cannot be "
        r"read.*earlier one",
    ):
        train(exp, tmp_path / "run", progress=False, resume=True)
    (ckpt / "state.json").write_text(json.dumps({"format": "other", "state": {}}))
    with pytest.raises(C.UnsafeStateError, match="not a ditkit training state"):
        C.read_state(ckpt)


def test_an_old_state_pt_is_converted_once_and_resumes_exactly(tmp_path):
    exp = tiny_experiment("edm", steps=6, checkpoint={"every": 2})
    full = train(exp, tmp_path / "full", progress=False)
    _, ckpt = _stopped_run(tmp_path)
    state = C.read_state(ckpt)
    assert isinstance(state["optimizer"]["param_groups"][0]["betas"], tuple)  # tuples survive
    torch.save(state, ckpt / "state.pt")  # what the old code wrote
    (ckpt / "state.json").unlink()
    (ckpt / "state.safetensors").unlink()
    assert [s for s, _ in C.list_checkpoints(ckpt.parent)] == [2]
    again = C.read_state(ckpt)  # converted once ...
    assert not (ckpt / "state.pt").exists() and (ckpt / "state.json").is_file()
    assert torch.equal(again["generators"][0], state["generators"][0])
    resumed = train(exp, tmp_path / "run", progress=False, resume=True)
    assert resumed.step == 6
    assert _losses(tmp_path / "run") == _losses(tmp_path / "full") == pytest.approx(full.losses)


def test_state_round_trip_keeps_types():
    tensors: dict = {}
    state = {
        "a": (1, 2.5, None, "s", True),
        "b": {3: torch.arange(3)},
        "__c": [float("inf")],
        "g": [torch.zeros(2, dtype=torch.uint8)],
    }
    flat = C._flatten(state, tensors)
    back = C._unflatten(json.loads(json.dumps(flat)), tensors, "x")
    assert back["a"] == (1, 2.5, None, "s", True) and back["__c"] == [float("inf")]
    assert torch.equal(back["b"][3], torch.arange(3)) and back["g"][0].dtype == torch.uint8
    with pytest.raises(TypeError, match="without pickle"):
        C._flatten({"x": object()}, {})
