"""Run under ``torchrun --nproc_per_node=2`` by ``test_fsdp.py``: in one launch (one import of
torch per process), train the same experiment with DDP and with FSDP2, resume the FSDP2 run
from its middle checkpoint, and resume a DDP checkpoint under FSDP2. Rank 0 writes
``results.json``: each invocation's (all-reduced) losses and rank fingerprints.

usage: torchrun --standalone --nproc_per_node=2 fsdp_worker.py FOLDER
(FOLDER holds ddp.yaml and fsdp2.yaml; the runs are written beside them)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ditkit.spec.experiment import load_experiment
from ditkit.training.loop import train


def fork(src: Path, dst: Path, drop_step: int) -> None:
    """Copy a finished run and remove its last checkpoint (as if it had stopped there)."""
    if dist.get_rank() == 0:
        shutil.copytree(src, dst)
        shutil.rmtree(dst / "checkpoints" / f"step-{drop_step:06d}")
    dist.barrier()


def main(folder: Path) -> None:
    torch.set_num_threads(1)
    # the worker runs collectives of its own between the train() calls, so it owns the process
    # group (train() takes down only a group it created itself)
    dist.init_process_group("gloo")
    ddp, fsdp = load_experiment(folder / "ddp.yaml"), load_experiment(folder / "fsdp2.yaml")
    out = {}
    for name, exp in (("ddp", ddp), ("fsdp2", fsdp)):
        r = train(exp, folder / name, progress=False)
        out[name] = {"losses": r.losses, "fingerprints": r.fingerprints}
    steps = fsdp.training.steps
    fork(folder / "fsdp2", folder / "fsdp2_resumed", steps)
    r = train(fsdp, folder / "fsdp2_resumed", resume=True, progress=False)
    out["fsdp2_resumed"] = {"losses": r.losses, "fingerprints": r.fingerprints}
    fork(folder / "ddp", folder / "ddp_then_fsdp2", steps)
    r = train(fsdp, folder / "ddp_then_fsdp2", resume=True, progress=False)
    out["ddp_then_fsdp2"] = {"losses": r.losses, "fingerprints": r.fingerprints}
    if dist.get_rank() == 0:
        (folder / "results.json").write_text(json.dumps(out, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
