"""Multi-stage rows in the extrapolation report: one row per (policy, stage chain) beside the
single-pass rows, error rows for stages a model cannot take, the best of each kind named apart,
and the chains refused before anything is sampled."""

import json

import numpy as np
import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build
from ditkit.errors import UserError
from ditkit.evaluate.report import PerSample, Scores, parse_chains, run
from ditkit.evaluate.stats import FrechetToReference
from ditkit.spec.sampling import Sampling, Stage
from tests.conftest import ROOT
from tests.evaluate.test_report_html import check_report_html
from tests.perturb import perturb

DIGITS = ROOT / "examples/tiny/tiny-hdit-digits.yaml"  # the demo's model: 8x8 grey, 10 classes


class Recorder:
    """A Scorer that keeps every batch it scores: a sample is "correct" when its mean is above
    zero, its features are its first three pixels."""

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []
        ref = np.random.default_rng(0).normal(size=(200, 3))
        self.fd = FrechetToReference(ref.mean(0), np.cov(ref, rowvar=False))

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> Scores:
        self.images.append(images.clone())
        correct = images.flatten(1).mean(1).numpy() > 0
        feats = images.flatten(1)[:, :3].double().numpy()
        return Scores(
            accuracy=float(correct.mean()),
            frechet=self.fd(feats),
            frechet_real=0.1,
            real_accuracy=0.9,
            count=len(labels),
            per_sample=PerSample(correct=correct, features=feats, frechet=self.fd),
        )


def digits_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # perturbed: no zero-initialised layer hides the input
    return perturb(build(S.load(DIGITS)), skip=("position",)).state_dict()


def run_two_policies(out, scorer, weights, **kwargs):
    """The report of the digits model under ``as_is`` and ``add_levels`` at 16x16: 2 steps,
    grids of 2, no timing; ``kwargs`` are the rest of :func:`run`'s settings."""
    return run(
        S.load(DIGITS),
        weights,
        S.EDMObjective(),
        [S.AsIs(), S.AddLevels()],
        [(16, 16)],
        out,
        steps=2,
        samples=2,
        measure=False,
        scorer=scorer,
        **kwargs,
    )


def test_chains_add_multi_stage_rows_and_the_best_of_each_kind(tmp_path, capsys):
    spec, rec, weights = S.load(DIGITS), Recorder(), digits_weights()
    rows = run_two_policies(
        tmp_path,
        rec,
        weights,
        eval_count=12,
        bootstrap=20,
        chains=["8,16:2.0:1", "16", "9,16:2.0:1"],
    )
    bars = capsys.readouterr().err  # one progress bar per stage, as ditkit sample shows them
    assert "sampling (dpmpp_2m, stage 1/2 8x8)" in bars
    assert "sampling (dpmpp_2m, stage 2/2 16x16)" in bars
    assert "sampling (dpmpp_2m, stage 1/1 16x16)" in bars
    assert [(r.policy, r.kind, r.stages) for r in rows] == [
        ("as_is", "single-pass", None),
        ("add_levels", "single-pass", None),
        ("as_is + stages 8,16:2:1", "multi-stage", "8,16:2:1"),
        ("as_is + stages 16", "multi-stage", "16"),
        ("as_is + stages 9,16:2:1", "multi-stage", "9,16:2:1"),
        ("add_levels + stages 8,16:2:1", "multi-stage", "8,16:2:1"),
        ("add_levels + stages 16", "multi-stage", "16"),
        ("add_levels + stages 9,16:2:1", "multi-stage", "9,16:2:1"),
    ]
    assert all(r.resolution == (16, 16) for r in rows)
    # a 9x9 draft does not fit the model's 2x2 merge: an error row naming it, not a crash
    for failed in (rows[4], rows[7]):
        assert "9" in failed.error and failed.grid is None and failed.metrics == {}
    assert all(r.error is None for i, r in enumerate(rows) if i not in (4, 7))
    # add_levels' 8x8 draft runs the trained model (the policy is a no-op at the trained
    # resolution), so its chain is scored too: 6 rows in all
    assert len(rec.images) == 6 and all(x.shape == (12, 1, 16, 16) for x in rec.images)
    # a one-stage chain is plain sampling, bit for bit (same seed, same labels, same model)
    assert torch.equal(rec.images[3], rec.images[0]) and torch.equal(rec.images[5], rec.images[1])
    assert not torch.equal(rec.images[2], rec.images[0])  # the draft changes the samples
    # the front door draws the same row: the policy's model for 16x16, then the chain
    import ditkit
    from ditkit.runtime.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "m.safetensors", weights, spec, objective=S.EDMObjective())
    model = ditkit.adapt(ditkit.load(tmp_path / "m.safetensors"), 16, "as_is")
    x = ditkit.sample(model, labels=[i % 10 for i in range(12)], steps=2, stages="8,16:2.0:1")
    assert torch.equal(x, rec.images[2])
    grids = tmp_path / "grids"
    assert (grids / "as_is_16x16.png").read_bytes() == (
        grids / "as_is_stages_16_16x16.png"
    ).read_bytes()

    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["kind"] for r in results["rows"]] == [r.kind for r in rows]
    comp = {c["scope"]: c for c in results["comparisons"]}
    assert [c["scope"] for c in results["comparisons"]] == ["all", "single-pass", "multi-stage"]

    def best(kind):
        scored = [r for r in rows if r.metrics and r.kind == kind]
        acc = max(scored, key=lambda r: (r.metrics["accuracy"], -r.metrics["frechet"]))
        fd = min(scored, key=lambda r: (r.metrics["frechet"], -r.metrics["accuracy"]))
        return acc.policy, fd.policy

    for kind, others in (("single-pass", 1), ("multi-stage", 3)):
        assert (comp[kind]["best_accuracy"], comp[kind]["best_frechet"]) == best(kind)
        tested = {t["policy"] for t in comp[kind]["accuracy_tests"]}
        assert len(tested) == others and all(rows_kind(rows, p) == kind for p in tested)
    assert len(comp["all"]["accuracy_tests"]) == 5  # every scored row against the overall best
    for r in rows:
        if r.metrics:
            lo, hi = r.metrics["accuracy_ci"]
            assert lo <= r.metrics["accuracy"] <= hi

    report = (tmp_path / "report.md").read_text()
    assert "Rows named `POLICY + stages CHAIN` are **multi-stage**" in report
    assert f"- **16x16, single-pass only, accuracy:** best `{best('single-pass')[0]}`" in report
    assert f"- **16x16, multi-stage only, Fréchet:** best `{best('multi-stage')[1]}`" in report
    assert "| `add_levels + stages 8,16:2:1` | 16x16 |" in report
    assert "grids/as_is_stages_8_16_2_1_16x16.png" in report
    check_report_html(tmp_path)


def rows_kind(rows, policy):
    return next(r.kind for r in rows if r.policy == policy)


TARGETS = [(16, 16), (32, 32)]


@pytest.mark.parametrize(
    "chains,message",
    [
        (
            ["8,24:2"],
            "chains 8,24:2: ends at 24x24, which is not one of the report's "
            "resolutions (16x16, 32x32)",
        ),
        (["8:1"], "chains 8:1: stages[0].sigma: the first stage starts from pure noise"),
        (["8,16"], "chains 8,16: stages[1].sigma"),
        (["32,16:1"], "chains 32,16:1: stages[1].resolution"),
        (["8,x"], "chains: write comma-separated RES[:SIGMA[:STEPS]] items"),
        (["8,16:1e6"], "chains 8,16:1e6: sigma 1e+06 is above the model's highest noise level"),
        (["8,16:2", "8,16:2.0"], "chains 8,16:2.0: given twice"),
        ([[{"resolution": 8, "sigma": 1.0}]], "chains[0]: stages[0].sigma"),
        ([[]], "chains[0]: an empty chain"),
    ],
)
def test_parse_chains_refuses_nonsense_with_one_message(chains, message):
    with pytest.raises(UserError) as err:
        parse_chains(chains, TARGETS, objective=S.EDMObjective())
    assert str(err.value).startswith(message), str(err.value)


def test_parse_chains_reads_text_stages_and_mappings():
    got = parse_chains(
        ["8,16:2.0", [Stage(resolution=8), {"resolution": 32, "sigma": 1.5, "steps": 3}]],
        TARGETS,
        objective=S.EDMObjective(),
        flag="--stages",
    )
    assert got == [
        (Stage(resolution=(8, 8)), Stage(resolution=(16, 16), sigma=2.0)),
        (Stage(resolution=(8, 8)), Stage(resolution=(32, 32), sigma=1.5, steps=3)),
    ]
    with pytest.raises(UserError, match=r"^--stages: multi-stage rows compare samples"):
        parse_chains(["8,16:2"], TARGETS, samples=False, flag="--stages")


def test_run_refuses_stages_on_the_single_pass_sampling(tmp_path):
    staged = Sampling.of(stages=[{"resolution": 8}, {"resolution": 16, "sigma": 2.0}])
    with pytest.raises(UserError, match=r"sampling\.stages: .* chains="):
        run(S.load(DIGITS), None, None, [S.AsIs()], [(16, 16)], tmp_path, staged)


def test_each_stage_runs_the_model_adapted_to_its_own_grid():
    """An AdaptingDenoiser (``ditkit sample --policy``, the report's multi-stage rows) makes a
    model per stage: the 8x8 draft of an NTK-scaled policy runs the trained model, bit for bit
    the same draft as plain sampling at 8x8, and only the 16x16 stage runs the adapted one."""
    from ditkit.runtime.denoiser import AdaptingDenoiser, Denoiser
    from ditkit.runtime.extrapolate import adapt_model
    from ditkit.runtime.multistage import sample_staged, stage_seed
    from ditkit.runtime.samplers import sample

    spec = S.load(DIGITS)
    trained = build(spec)
    trained.load_state_dict(digits_weights())
    trained.eval()
    policy = S.AsIs(rope_scaling=S.NtkScaling())
    asked: list[tuple[int, int]] = []

    def make(res):
        asked.append(res)
        return adapt_model(trained, policy, res)

    den = AdaptingDenoiser(make, S.EDMObjective(), (16, 16))
    assert den.model.spec != spec  # the output's model is adapted (scaled RoPE)
    sampling = Sampling(
        steps=2, seed=3, stages=(Stage(resolution=(8, 8)), Stage(resolution=(16, 16), sigma=2.0))
    )
    labels = torch.arange(4) % 10
    drafts = {}
    x = sample_staged(
        den,
        (4, 1, 16, 16),
        sampling,
        class_labels=labels,
        on_stage=lambda k, out: drafts.setdefault(k, out),
    )
    assert asked == [(16, 16), (8, 8)]  # the output's model, then the draft's
    assert den.at((8, 8)).model.spec == spec  # as_is + NTK at the trained grid: the trained spec
    plain = sample(
        Denoiser(trained, S.EDMObjective()),
        (4, 1, 8, 8),
        Sampling(steps=2, seed=stage_seed(3, 0)),
        class_labels=labels,
    )
    assert torch.equal(drafts[0], plain)
    # one model for every stage (the draft on the 16x16-adapted model) gives other samples
    single = sample_staged(
        Denoiser(den.model, S.EDMObjective()), (4, 1, 16, 16), sampling, class_labels=labels
    )
    assert not torch.equal(single, x)


def test_the_front_door_adapts_each_stage_like_the_report(tmp_path):
    """``ditkit.sample(ditkit.adapt(m, 16, policy), stages=...)``: the draft at the trained
    8x8 runs the trained network, as ``ditkit sample --policy --stages`` and the report do."""
    import ditkit
    from ditkit.runtime.checkpoint import save_checkpoint

    spec = S.load(DIGITS)
    save_checkpoint(tmp_path / "m.safetensors", digits_weights(), spec, objective=S.EDMObjective())
    m = ditkit.load(tmp_path / "m.safetensors")
    adapted = ditkit.adapt(m, 16, "as_is:rope_scaling=ntk")
    den = adapted.denoiser()
    assert den.at((16, 16)).model is adapted.network
    assert den.at((8, 8)).model.spec == m.spec  # the trained model's spec at the trained grid
    x = ditkit.sample(adapted, labels=[1, 2], steps=2, stages="8,16:2.0:1")
    y = ditkit.sample(adapted, labels=[1, 2], steps=2, stages="8,16:2.0:1")
    assert x.shape == (2, 1, 16, 16) and torch.equal(x, y)


def test_chain_policies_pick_which_policies_run_the_chains(tmp_path):
    rec = Recorder()
    rows = run_two_policies(
        tmp_path,
        rec,
        digits_weights(),
        eval_count=6,
        bootstrap=10,
        chains=["8,16:2.0:1"],
        chain_policies=["add_levels"],
    )
    assert [r.policy for r in rows] == ["as_is", "add_levels", "add_levels + stages 8,16:2:1"]
    assert len(rec.images) == 3  # as_is, add_levels (its own 16x16 model), one chain


@pytest.mark.parametrize(
    "chains,chain_policies,message",
    [
        (["8,16:2.0:1"], ["core_patch"], "chain_policies: core_patch is not one of the report's"),
        ([], ["as_is"], "chain_policies: no stage chains to run"),
    ],
)
def test_chain_policies_refused_before_anything_runs(tmp_path, chains, chain_policies, message):
    with pytest.raises(UserError, match=message):
        run(
            S.load(DIGITS),
            digits_weights(),
            S.EDMObjective(),
            [S.AsIs()],
            [(16, 16)],
            tmp_path / "r",
            steps=2,
            measure=False,
            chains=chains,
            chain_policies=chain_policies,
        )
    assert not (tmp_path / "r").exists()
