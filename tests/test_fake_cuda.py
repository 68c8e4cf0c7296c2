"""ditkit's GPU paths on a fake CUDA device (``tests/fake_cuda.py``; guide:
``docs/guides/fake-cuda.md``): every tiny example spec trains a step and samples an ``--npz``
chunk with classifier-free guidance on ``cuda:0`` without a GPU; a CPU tensor in a GPU path,
a host synchronisation inside ``forward``, a backward graph that leaves the device or an
autocast region not in bf16 fails here.

The harness changes process-wide state of PyTorch that cannot be undone (a CUDA device guard
on a CPU-only build), so it runs once, in a child process, and every check is one test here.
About 35 s of CPU time in all on a loaded 2-core machine (most of it the fake tensors'
bookkeeping: about 1 ms per operator)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny_specs

# a module fixture builds every engine / runs the whole harness (30-40 s on 2 cores): run by
# .ci/run's slow line, outside the default suite
pytestmark = pytest.mark.slow

# the ids the harness must report (kept in step with tests/fake_cuda.py's all_checks)
SAMPLERS = (
    "euler",
    "heun",
    "ddim",
    "ddpm",
    "dpmpp_2m",
    "dpmpp_3m_sde",
    "euler_ancestral",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_2m_sde",
    "unipc",
    "dpm_adaptive",
)
CANARIES = ("cpu_tensor", "host_sync", "cpu_round_trip", "fp32_in_autocast")
IDS = (
    [f"{kind}/{p.stem}" for p in tiny_specs() for kind in ("train", "npz")]
    + [f"train/tiny-dit/{o}" for o in ("edm", "x0", "flow", "accumulate2", "fp32", "checkpointing")]
    + [f"sample/tiny-dit/{s}" for s in SAMPLERS]
    + ["hooks/tiny-dit"]
    + [f"canary/{c}" for c in CANARIES]
    + ["distributed/ddp-plan", "distributed/fsdp2-plan"]
)


@pytest.fixture(scope="module")
def results() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "tests.fake_cuda", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"the harness printed no results (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    out = json.loads(lines[-1])
    if "_unavailable" in out:
        pytest.skip(out["_unavailable"])
    return out


def test_the_harness_runs_every_check(results):
    assert sorted(results) == sorted(IDS)


def test_the_sampler_list_is_current():
    from ditkit.spec.sampling import SAMPLERS as current

    assert tuple(current) == SAMPLERS


@pytest.mark.parametrize("check", IDS)
def test_on_fake_cuda(results, check):
    r = results.get(check)
    assert r is not None, f"{check}: not run"
    assert r["ok"], f"{check}:\n{r['error']}"
