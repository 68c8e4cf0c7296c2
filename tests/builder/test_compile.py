"""torch.compile: every model ditkit builds traces to one graph, forward and backward.

``torch._dynamo.explain`` reports the graphs Dynamo cut a call into; one graph and no break
means ``torch.compile(model, fullgraph=True)`` works. The backend switch is a guarded constant:
a call under another backend recompiles instead of replaying the old graph."""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from ditkit import spec as S
from ditkit.builder import build, kernels
from ditkit.spec.presets import preset
from tests.conftest import EXAMPLES, tiny_specs
from tests.perturb import perturb

#: one preset of each family and structure (the DiT sizes differ only in widths and depth)
PRESETS = [
    "dit-s-8",
    "hdit-imagenet-128",
    "hdit-imagenet-256",
    "hdit-ffhq-1024",
    "mdit-b",
    "mpdit-b",
    "mpdit-xl-3level",
]


def _inputs(spec, batch=2, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, spec.input.channels, *spec.input.resolution, generator=g).to(device)
    sigma = (torch.rand(batch, generator=g) + 0.5).to(device)
    if spec.conditioning.noise.kind == "sinusoidal":
        sigma = sigma * 100
    labels = (
        torch.arange(batch, device=device) % spec.conditioning.classes.count
        if spec.conditioning.classes
        else None
    )
    return x, sigma, labels


def _perturb(model):
    """Zero-initialised output layers would make every gradient but the head's zero."""
    perturb(model, seed=1)


def _explain(model, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(*args)


def _assert_one_graph(report):
    reasons = [
        f"{b.reason.splitlines()[0]} at {b.user_stack[-1] if b.user_stack else '?'}"
        for b in report.break_reasons
    ]
    assert (report.graph_count, report.graph_break_count) == (1, 0), reasons


#: one tiny model per family: the default suite's forward check (every tiny model: slow)
FAMILIES = ["tiny-dit", "tiny-hdit-neighborhood", "tiny-mdit", "tiny-mpdit"]


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_is_one_graph(name):
    spec = S.load(EXAMPLES / "tiny" / f"{name}.yaml")
    model = build(spec).eval()
    with torch.no_grad():
        _assert_one_graph(_explain(model, *_inputs(spec)))


@pytest.mark.slow
@pytest.mark.parametrize("path", tiny_specs(), ids=lambda p: p.stem)
def test_every_tiny_model_is_one_graph_in_eval_and_in_training(path):
    spec = S.load(path)
    model = build(spec).eval()
    x, sigma, labels = _inputs(spec)
    with torch.no_grad():
        _assert_one_graph(_explain(model, x, sigma, labels))
    model.train()  # dropout, conditioning dropout and autograd recording
    _assert_one_graph(_explain(model, x, sigma, labels))
    if spec.conditioning.classes is not None and spec.conditioning.classes.null_class:
        _assert_one_graph(_explain(model, x, sigma, None))  # the null-label path


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_family_is_one_graph(name):
    spec = preset(name)
    model = build(spec, device="meta", init=False).eval()
    with torch.no_grad():
        _assert_one_graph(_explain(model, *_inputs(spec, batch=1, device="meta")))


class _Counting:
    """An AOTAutograd backend that counts the forward and backward graphs it is handed."""

    def __init__(self):
        self.forward = self.backward = 0
        self.graphs: list[str] = []

        def fw(gm, example_inputs):
            self.forward += 1
            self.graphs.append(gm.code)
            return make_boxed_func(gm.forward)

        def bw(gm, example_inputs):
            self.backward += 1
            return make_boxed_func(gm.forward)

        self.backend = aot_autograd(fw_compiler=fw, bw_compiler=bw)


def _train_step_is_one_forward_and_one_backward_graph(path):
    spec = S.load(path)
    torch.manual_seed(0)
    model = build(spec).train()
    _perturb(model)
    x, sigma, labels = _inputs(spec)
    counting = _Counting()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=counting.backend)
    torch.manual_seed(2)  # same dropout masks in both runs
    compiled(x, sigma, labels).square().mean().backward()
    # frozen tensors (a sin-cos position table is a parameter with requires_grad=False, as in
    # DiT) get no gradient
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    got = {n: p.grad.clone() for n, p in trained}
    model.zero_grad()
    torch.manual_seed(2)
    model(x, sigma, labels).square().mean().backward()
    assert (counting.forward, counting.backward) == (1, 1)
    nonzero = 0
    for name, p in trained:
        torch.testing.assert_close(got[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
        nonzero += bool(p.grad.abs().sum() > 0)
    assert nonzero > len(got) // 2  # the comparison is not between zeros


def test_a_training_step_of_the_tiny_hdit_is_one_forward_and_one_backward_graph():
    _train_step_is_one_forward_and_one_backward_graph(
        EXAMPLES / "tiny" / "tiny-hdit-neighborhood.yaml"
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", tiny_specs(), ids=lambda p: p.stem)
def test_a_training_step_of_every_tiny_model_is_one_forward_and_one_backward_graph(path):
    _train_step_is_one_forward_and_one_backward_graph(path)


def test_switching_the_backend_between_compiled_calls_recompiles():
    spec = S.load(EXAMPLES / "tiny" / "tiny-hdit-neighborhood.yaml")
    torch.manual_seed(0)
    model = build(spec).eval()
    _perturb(model)
    x, sigma, labels = _inputs(spec)
    graphs: list[str] = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    sdpa = "scaled_dot_product_attention"
    outputs = {}
    with torch.no_grad():
        for name in ("gather", "gather", "tiled", "masked", "gather"):
            with kernels.use_backend(name):
                got = compiled(x, sigma, labels)
                expected = model(x, sigma, labels)  # eager under the same backend
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            outputs.setdefault(name, got)
    # gather, tiled and masked each compiled once; the repeated gather reused its graph
    assert len(graphs) == 3
    # gather computes neighborhood logits with matmul; tiled and masked call SDPA for them too
    assert graphs[0].count(sdpa) < graphs[1].count(sdpa)
    assert "arange" in graphs[2] and graphs[2] != graphs[1]
    torch.testing.assert_close(outputs["tiled"], outputs["gather"], atol=1e-5, rtol=1e-5)


def test_counting_mode_is_not_baked_into_a_compiled_graph():
    """A graph compiled outside ``count_attention`` is not reused inside it (the counting
    kernels return empty tensors), and the eager count is unchanged by an earlier compile."""
    spec = S.load(EXAMPLES / "tiny" / "tiny-dit.yaml")
    model = build(spec).eval()
    x, sigma, labels = _inputs(spec, batch=1)
    calls = []

    def backend(gm, example_inputs):
        calls.append(1)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        compiled(x, sigma, labels)
        with kernels.count_attention() as counts:
            compiled(x, sigma, labels)
    assert len(calls) == 2
    n = (spec.input.resolution[0] // S.pair(spec.patch.size)[0]) ** 2
    d_model, d_head = spec.levels[0].d_model, spec.block.d_head
    blocks = len(spec.stack(0, "middle"))
    assert counts == {"": 2 * (d_model // d_head) * n * n * d_head * blocks}
