"""The Denoiser protocol: every denoiser class the samplers drive implements all of it."""

import ast
import inspect
import textwrap

import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build
from ditkit.runtime import protocols
from ditkit.runtime.denoiser import Denoiser
from ditkit.deploy.engines import OrtDenoiser
from ditkit.deploy.tensorrt import TrtDenoiser
from tests.conftest import EXAMPLES

DATA = sorted(protocols.Denoiser.__annotations__)
METHODS = ["denoise", "guided", "learned_variance"]


def _assigned_in_init(cls) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    names = set()
    for node in ast.walk(tree):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else ([node.target] if isinstance(node, ast.AnnAssign) else [])
        )
        for t in targets:
            for e in t.elts if isinstance(t, ast.Tuple) else [t]:
                if (
                    isinstance(e, ast.Attribute)
                    and isinstance(e.value, ast.Name)
                    and e.value.id == "self"
                ):
                    names.add(e.attr)
    return names


@pytest.mark.parametrize("cls", [Denoiser, OrtDenoiser, TrtDenoiser], ids=lambda c: c.__name__)
def test_every_denoiser_class_defines_the_whole_protocol(cls):
    """Statically (TensorRT cannot be constructed without a GPU): ``__init__`` sets every data
    attribute and the class has every method."""
    assert DATA == ["cfg_channels", "guides_inside", "noise_range", "null_class", "rules"]
    assert set(DATA) <= _assigned_in_init(cls), set(DATA) - _assigned_in_init(cls)
    for name in METHODS:
        assert hasattr(cls, name), name


def test_eager_and_onnxruntime_denoisers_are_instances_of_the_protocol(dit_export):
    model, result = dit_export
    eager = Denoiser(model, S.DDPMObjective())
    ort = OrtDenoiser(result.path)
    for den in (eager, ort):
        assert isinstance(den, protocols.Denoiser)
        assert den.null_class == 10 and den.learned_variance
    assert (eager.guides_inside, eager.cfg_channels, eager.rules) == (False, None, None)
    with pytest.raises(ValueError, match="guides through the sampler"):
        eager.guided(torch.zeros(1, 4, 8, 8), torch.ones(1), torch.zeros(1, dtype=torch.long), 2)


def test_a_denoiser_missing_an_attribute_is_not_a_denoiser():
    class Partial:
        noise_range = null_class = cfg_channels = rules = None

        def denoise(self, x, sigma, class_labels=None, **cond):
            return x, None

    assert not isinstance(Partial(), protocols.Denoiser)  # no guides_inside, guided, ...


def test_null_label_and_embedding_rows_are_spec_helpers():
    spec = S.load(EXAMPLES / "tiny" / "tiny-hdit-neighborhood.yaml")  # 10 classes + null row
    assert (spec.null_label, spec.conditioning.classes.rows) == (10, 11)
    assert Denoiser(build(spec, device="meta"), S.EDMObjective()).null_class == 10
    no_null = spec.model_copy(
        update={
            "conditioning": spec.conditioning.model_copy(
                update={"classes": S.Classes(count=10, null_class=False)}
            )
        }
    )
    assert (no_null.null_label, no_null.conditioning.classes.rows) == (None, 10)
    unconditional = spec.model_copy(
        update={"conditioning": spec.conditioning.model_copy(update={"classes": None})}
    )
    assert unconditional.null_label is None
