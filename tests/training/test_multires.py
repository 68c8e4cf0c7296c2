"""Training-time extrapolation options: ``training.resolutions`` (bucketed multi-resolution
training) and ``rope.train_positions: random`` (randomised RoPE positions), and that a run
with both resumes exactly."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from ditkit import spec as S
from ditkit.builder import build, use_backend
from ditkit.builder.position import apply_rope, grid_positions, random_positions, rope_angles
from ditkit.data.datasets import (
    DataError,
    TensorImages,
    make_dataset,
    make_stream,
    resolution_at,
    resolution_schedule,
    write_shards,
)
from ditkit.spec.experiment import Training
from ditkit.training import checkpoints as C
from ditkit.training import objectives as O
from ditkit.training.loop import train

from ..perturb import perturb
from .conftest import tiny_experiment, tiny_experiment_data, tiny_model


def _random_rope_model(max_scale: float = 2.0, probability: float = 1.0, **rope) -> dict:
    m = tiny_model()
    m["block"]["rope"] = {
        "kind": "axial",
        **rope,
        "train_positions": {"kind": "random", "max_scale": max_scale, "probability": probability},
    }
    return m


# ------------------------------------------------------------------------------ spec


def test_resolutions_validate_against_the_model_with_the_field_and_the_fix():
    with pytest.raises(S.SpecError) as err:
        tiny_experiment(training={"resolutions": [8, 10]})
    text = str(err.value)
    assert "training.resolutions[1]" in text and "nearest valid: height 8 or 12" in text
    assert "training.resolutions[0]" not in text
    with pytest.raises(S.SpecError) as err:  # 4x4: a 2x2 grid under the 3x3 neighborhood
        tiny_experiment(training={"resolutions": [4, 16]})
    text = str(err.value)
    assert "training.resolutions[0]" in text and "levels[0].attention.kernel_size" in text
    assert "larger resolution" in text
    with pytest.raises(S.SpecError, match=r"resolution_weights: 1 weight\(s\) for 2"):
        tiny_experiment(training={"resolutions": [8, 16], "resolution_weights": [1.0]})
    with pytest.raises(S.SpecError, match="resolution_weights: weights only apply"):
        tiny_experiment(training={"resolution_weights": "pixels"})
    assert tiny_experiment(training={"resolution_weights": "uniform"}).training.resolutions is None
    exp = tiny_experiment(training={"resolutions": [8, [8, 16]]})
    assert exp.training.resolutions == ((8, 8), (8, 16))  # an integer is square
    assert exp.training.resolution_probabilities() == (0.5, 0.5)
    assert Training.model_validate(exp.training.model_dump()) == exp.training


def test_latent_data_refuses_training_resolutions():
    data = tiny_experiment_data(training={"resolutions": [8, 16]})
    data["data"] = {"kind": "latents", "path": "nowhere"}
    data["model"]["input"]["space"] = "latent"
    data["evaluation"] = {"enabled": False}
    from ditkit.spec.experiment import experiment_from_data

    with pytest.raises(S.SpecError) as err:
        experiment_from_data(data)
    assert "training.resolutions: latents data is stored at one resolution" in str(err.value)
    # and a dataset that cannot change resolution says so at the data layer too
    ds = TensorImages(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), None)
    with pytest.raises(DataError, match="training.resolutions: TensorImages data"):
        ds.set_resolution((16, 16))


def test_the_default_experiment_has_no_resolutions_and_dumps_unchanged():
    exp = tiny_experiment()
    assert exp.training.resolutions is None
    dumped = S.to_data(exp.training)
    assert "resolutions" not in dumped and "resolution_weights" not in dumped
    rope = S.to_data(S.AxialRope())
    assert "train_positions" not in rope  # existing specs and fixtures dump as before


# ------------------------------------------------------------------------------ schedule


def test_the_schedule_is_a_seeded_function_of_the_step():
    tr = Training(seed=3, resolutions=[8, 16, 24])
    first = resolution_schedule(tr, 0, 300)
    assert first == resolution_schedule(tr, 0, 300)  # deterministic
    assert resolution_schedule(tr, 150, 300) == first[150:]  # resumable: no state
    # the generator the docstring names, written out
    p = [1 / 3] * 3
    ref = [
        tr.resolutions[int(np.random.default_rng([3, 0x5EED, s]).choice(3, p=p))]
        for s in range(300)
    ]
    assert first == ref
    assert first != resolution_schedule(Training(seed=4, resolutions=[8, 16, 24]), 0, 300)
    counts = Counter(first)
    assert set(counts) == {(8, 8), (16, 16), (24, 24)}
    assert all(70 <= c <= 130 for c in counts.values())  # uniform: 100 each, +-6 sd


def test_pixel_weights_draw_by_pixel_count():
    tr = Training(resolutions=[8, 16], resolution_weights="pixels")
    assert tr.resolution_probabilities() == (64 / 320, 256 / 320)
    counts = Counter(resolution_schedule(tr, 0, 1000))
    assert 160 <= counts[(8, 8)] <= 240  # 200 expected, sd 12.6
    given = Training(resolutions=[8, 16], resolution_weights=[3, 1])
    assert given.resolution_probabilities() == (0.75, 0.25)
    with pytest.raises(ValueError):
        resolution_at(Training(), 0)


# ------------------------------------------------------------------------------ data


def _shapes_of(ds, res):
    ds.set_resolution(res)
    x, _ = make_stream(ds, 4, 0).next(4)
    return tuple(x.shape)


def test_digits_and_shapes_render_at_each_resolution():
    exp = tiny_experiment(training={"resolutions": [8, 16, [8, 16]]})
    ds = make_dataset(exp)
    for res in exp.training.resolutions:
        assert _shapes_of(ds, res) == (4, 1, *res)
    ds.set_resolution((16, 16))
    x16 = ds[0][0]
    ds.set_resolution((8, 8))
    # the same digit: its 16x16 rendering, area-averaged, is near its 8x8 and far from others
    pooled = torch.nn.functional.avg_pool2d(x16[None], 2)[0]
    same = (pooled - ds[0][0]).abs().mean()
    assert x16.shape == (1, 16, 16) and same < 0.5 * (pooled - ds[1][0]).abs().mean()
    shapes = tiny_experiment_data(training={"resolutions": [8, 16]})
    shapes["data"] = {"kind": "shapes", "count": 20}
    shapes["model"]["input"]["channels"] = 3
    from ditkit.spec.experiment import experiment_from_data

    assert _shapes_of(make_dataset(experiment_from_data(shapes)), (16, 8)) == (4, 3, 16, 8)


def test_image_folders_and_shards_are_resized_to_each_resolution(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (20, 20), 40 if cls == "a" else 200).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    folder = tiny_experiment(
        data={"kind": "image_folder", "path": str(tmp_path / "imgs")},
        training={"resolutions": [8, 16]},
    )
    ds = make_dataset(folder)
    assert _shapes_of(ds, (16, 16)) == (4, 1, 16, 16)
    assert _shapes_of(ds, (8, 16)) == (4, 1, 8, 16)
    samples = ((f"k{i}", Image.new("L", (20, 20), 30 * i), i % 2) for i in range(4))
    write_shards(samples, tmp_path / "wds", 4)
    shards = tiny_experiment(
        data={"kind": "webdataset", "shards": str(tmp_path / "wds/*.tar")},
        training={"resolutions": [8, 16]},
    )
    assert _shapes_of(make_dataset(shards), (16, 16)) == (4, 1, 16, 16)


def test_each_training_step_sees_its_scheduled_resolution(tmp_path, monkeypatch):
    seen = []
    real = O.DiffusionLoss.__call__

    def spy(self, model, x0, *a, **k):
        seen.append(tuple(x0.shape[-2:]))
        return real(self, model, x0, *a, **k)

    monkeypatch.setattr(O.DiffusionLoss, "__call__", spy)
    exp = tiny_experiment(
        steps=4,
        training={"batch_size": 4, "accumulate": 2, "resolutions": [8, 16], "seed": 1},
        checkpoint={"every": 100},
    )
    train(exp, tmp_path / "run", progress=False)
    want = resolution_schedule(exp.training, 0, 4)
    assert seen == [r for r in want for _ in range(2)]  # both micro-batches of a step
    assert len(set(want)) == 2  # (seed 1 draws both in 4 steps)


# ------------------------------------------------------------------------------ positions


def _reference_positions(n_h, n_w, kind, draw, s, p):
    """The RandomPositions formula, written out one sample and token at a time."""
    out = []
    for w, v_r, u_r, v_c, u_c in draw.tolist():
        grid = []
        for i in range(n_h):
            row = []
            for j in range(n_w):
                pos = []
                for k, (v, u, n) in enumerate(((v_r, u_r, n_h), (v_c, u_c, n_w))):
                    idx = (i, j)[k]
                    base = (2 * idx + 1) / n - 1 if kind == "normalized" else float(idx)
                    if w >= p:
                        pos.append(base)
                        continue
                    a = 1 + v * (s - 1)
                    off = u * (s - a) * n if kind == "integer" else (2 * u - 1) * (s - a)
                    pos.append(a * base + off)
                row.append(pos)
            grid.append(row)
        out.append(grid)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["integer", "normalized"])
def test_random_positions_follow_the_formula_and_stay_in_range(kind):
    g = torch.Generator().manual_seed(0)
    draw = torch.rand(64, 5, generator=g, dtype=torch.float64)
    pos = grid_positions(4, 6, kind, dtype=torch.float64)
    got = random_positions(pos, draw, kind, 3.0, 0.75)
    assert got.shape == (64, 4, 6, 2)
    ref = _reference_positions(4, 6, kind, draw, 3.0, 0.75)
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    if kind == "integer":
        assert got.min() >= 0 and (got[..., 0] < 3 * 4).all() and (got[..., 1] < 3 * 6).all()
    else:
        assert got.abs().max() < 3.0
    kept = draw[:, 0] >= 0.75
    assert 0 < int(kept.sum()) < 64 and torch.equal(
        got[kept], pos.expand(int(kept.sum()), -1, -1, -1)
    )
    spacing = got[~kept][:, 1:, 0, 0] - got[~kept][:, :-1, 0, 0]  # rows: evenly spaced, >= 1 step
    step = pos[1, 0, 0] - pos[0, 0, 0]
    assert (spacing >= step - 1e-12).all() and (spacing <= 3 * step + 1e-12).all()
    assert spacing.std(dim=1).max() < 1e-9


def _model_pair(**rope):
    data = tiny_model()
    data["block"]["rope"] = {"kind": "axial", **rope}
    base = S.validate(data, S.ModelSpec)
    rand = S.validate(_random_rope_model(**rope), S.ModelSpec)
    torch.manual_seed(0)
    m0 = perturb(build(base), 0.2, seed=1)
    torch.manual_seed(0)
    m1 = perturb(build(rand), 0.2, seed=1)
    return m0, m1


@pytest.mark.parametrize("positions", ["normalized", "integer"])
def test_sampling_is_bit_identical_and_training_draws_from_the_generator(positions):
    m0, m1 = _model_pair(positions=positions)
    x, sig, y = torch.randn(3, 1, 8, 8), torch.tensor([0.5, 1.0, 2.0]), torch.tensor([1, 2, 3])
    with use_backend("masked"), torch.no_grad():
        m0.eval(), m1.eval()
        assert torch.equal(m0(x, sig, y), m1(x, sig, y))  # eval: the ordinary positions
        m0.train(), m1.train()
        m1.position_generator = torch.Generator().manual_seed(5)
        a = m1(x, sig, y)
        assert not torch.allclose(a, m0(x, sig, y), atol=1e-3)  # training: random positions
        m1.position_generator = torch.Generator().manual_seed(5)
        assert torch.equal(m1(x, sig, y), a)  # the same seed: the same positions
        m1.position_generator = torch.Generator().manual_seed(6)
        assert not torch.equal(m1(x, sig, y), a)
        g = torch.Generator().manual_seed(5)
        m1.position_generator = g
        m1(x, sig, y)
        torch.rand((3, 5), generator=g)  # one (B, 5) draw per forward, nothing else
        ref = torch.Generator().manual_seed(5)
        torch.rand((3, 5), generator=ref), torch.rand((3, 5), generator=ref)
        assert torch.equal(g.get_state(), ref.get_state())


def test_attention_rotates_each_sample_by_its_own_positions():
    """The batched random-position RoPE equals the ordinary one-grid RoPE applied per sample
    at that sample's positions."""
    _, m1 = _model_pair(positions="integer")
    attn = m1.levels[0].encoder[0].attn
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 2, 4, 4, 16, generator=g).unbind(0)  # (B, heads, H, W, D)
    draw = torch.rand(2, 5, generator=g)
    q1, k1 = attn._rope(q, k, 4, 4, None, draw)
    pos = random_positions(grid_positions(4, 4, "integer"), draw, "integer", 2.0, 1.0)
    for b in range(2):
        theta = rope_angles(attn.rope_freqs.float(), pos[b])
        assert torch.allclose(q1[b], apply_rope(q[b], theta), atol=1e-6)
        assert torch.allclose(k1[b], apply_rope(k[b], theta), atol=1e-6)
    assert not torch.allclose(q1, attn._rope(q, k, 4, 4)[0], atol=1e-3)


# ------------------------------------------------------------------------------ resume


def test_a_run_with_both_options_resumes_bit_identically(tmp_path):
    data = tiny_experiment_data(
        "edm",
        4,
        training={"batch_size": 4, "resolutions": [8, 16], "resolution_weights": "pixels"},
        checkpoint={"every": 2},
    )
    data["model"] = _random_rope_model(max_scale=2.0, probability=0.5)
    from ditkit.spec.experiment import experiment_from_data

    exp = experiment_from_data(data)
    full = train(exp, tmp_path / "full", progress=False)
    train(exp, tmp_path / "part", progress=False, stop_after=3)  # checkpoint at step 2
    resumed = train(exp, tmp_path / "part", progress=False, resume=True)
    assert resumed.step == 4 and resumed.losses == full.losses[2:]
    assert len(set(full.losses)) == 4 and all(math.isfinite(v) for v in full.losses)
    state = C.read_state(tmp_path / "part/checkpoints/step-000002")
    assert len(state["position_generators"]) == 1
    for name in ("model.safetensors", "ema.safetensors"):
        a = C.read_tensors(tmp_path / "full/checkpoints/step-000004" / name)
        b = C.read_tensors(tmp_path / "part/checkpoints/step-000004" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_torchrun_two_processes_with_both_options_agree_and_resume_exactly(tmp_path):
    """Under torchrun (DDP, gloo) a run with both options ends with identical weights on both
    ranks, each rank draws its own positions (its own saved generator), and a resumed launch
    ends with the weights of an uninterrupted one."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    data = tiny_experiment_data(
        "edm",
        4,
        training={"batch_size": 8, "resolutions": [8, 16]},
        checkpoint={"every": 2, "keep_last": 3},
    )
    data["model"] = _random_rope_model()
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(*args: str) -> None:
        cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "ditkit.cli", "train"]
        proc = subprocess.run(
            [*cmd, *args, "--no-progress"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch("exp.yaml", "--out", "full")
    summary = json.loads((tmp_path / "full/summary.json").read_text())
    assert summary["world"] == 2 and summary["ranks_identical"]
    state = C.read_state(tmp_path / "full/checkpoints/step-000002")
    gens = state["position_generators"]
    assert len(gens) == 2 and not torch.equal(gens[0], gens[1])
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    shutil.rmtree(tmp_path / "part/checkpoints/step-000004")
    (tmp_path / "part/summary.json").unlink()
    launch("exp.yaml", "--out", "part", "--resume")
    for name in ("model.safetensors", "ema.safetensors"):
        a = C.read_tensors(tmp_path / "full/checkpoints/step-000004" / name)
        b = C.read_tensors(tmp_path / "part/checkpoints/step-000004" / name)
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_the_memory_check_counts_the_largest_training_resolution(monkeypatch):
    """The pre-run memory estimate takes the largest bucket's activations: a machine that holds
    the model's own 8x8 batches but not 64x64 ones refuses the multi-resolution run up front."""
    from ditkit.training import guards

    monkeypatch.setattr(guards, "limits_enabled", lambda: True)
    single = tiny_experiment(training={"batch_size": 64})
    multi = tiny_experiment(training={"batch_size": 64, "resolutions": [8, 64]})
    spec = single.model_spec
    weights = 0.6 * guards.estimated_params(spec) * 20
    acts = 64 * guards.activation_bytes_per_sample(spec)
    # room for the 8x8 run with a margin, far less than 64x the activations
    monkeypatch.setattr(guards, "available_bytes", lambda device: int(weights + 4 * acts))
    cpu = torch.device("cpu")
    assert guards.memory_issues(single, 1, cpu) == []
    issues = guards.memory_issues(multi, 1, cpu)
    assert issues and issues[0][0] == "training.batch_size"


def test_compile_with_random_positions_is_refused_naming_both_fields():
    """The random draw happens inside the forward, which torch.compile cannot trace (dynamo:
    'UserDefinedObjectVariable(Generator)'): refused when the experiment loads, not mid-run."""
    data = tiny_experiment_data(precision={"compile": True})
    data["model"]["block"]["rope"] = {"kind": "axial", "train_positions": {"kind": "random"}}
    from ditkit.spec.experiment import experiment_from_data

    with pytest.raises(S.SpecError) as err:
        experiment_from_data(data)
    assert err.value.issues[0][0] == "precision.compile"
    assert "rope.train_positions" in err.value.issues[0][1]
    data["precision"] = {"compile": False}
    assert experiment_from_data(data).precision.compile is False


def test_random_positions_round_trip_through_yaml_and_json():
    """``rope.train_positions`` survives dump -> load (YAML and JSON) and keeps its values."""
    spec = S.validate(_random_rope_model(max_scale=3.0, probability=0.5), S.ModelSpec)
    tp = spec.block.rope.train_positions
    assert (tp.kind, tp.max_scale, tp.probability) == ("random", 3.0, 0.5)
    assert S.ModelSpec.model_validate_json(spec.model_dump_json()) == spec
    assert S.validate(spec.model_dump(mode="json"), S.ModelSpec) == spec
