"""Shared fixtures of the runtime tests: one ONNX export per tiny spec for the whole session
(each export costs 10-60 s of CPU)."""

import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build
from ditkit.runtime.checkpoint import model_hash
from ditkit.deploy.export import export_onnx
from tests.conftest import EXAMPLES
from tests.perturb import perturb

TINY = EXAMPLES / "tiny"


def perturbed(name: str, seed: int = 0):
    """A tiny model whose zero-initialised layers are not zero (so the output depends on every
    input); the fixed sin-cos table is left as it is."""
    torch.manual_seed(seed)
    return perturb(build(S.load(TINY / f"{name}.yaml")).eval(), skip=("position",))


@pytest.fixture(scope="session")
def hdit_export(tmp_path_factory):
    model = perturbed("tiny-hdit-neighborhood")
    path = tmp_path_factory.mktemp("onnx") / "hdit.onnx"
    h = model_hash(model.state_dict())
    result = export_onnx(model, S.EDMObjective(), path, checkpoint_hash=h)
    return model, result, h


@pytest.fixture(scope="session")
def dit_export(tmp_path_factory):
    model = perturbed("tiny-dit")
    path = tmp_path_factory.mktemp("onnx") / "dit.onnx"
    result = export_onnx(model, S.DDPMObjective(), path)
    return model, result
