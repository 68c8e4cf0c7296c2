"""The ditkit checkpoint format: safetensors + spec (+ objective) in the metadata."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ditkit import spec as S
from ditkit.builder import build
from ditkit.runtime import checkpoint as C
from tests.conftest import EXAMPLES
from tests.perturb import perturb


@pytest.fixture(scope="module")
def hdit_spec() -> S.ModelSpec:
    return S.load(EXAMPLES / "tiny" / "tiny-hdit-neighborhood.yaml")


@pytest.fixture(scope="module")
def hdit_model(hdit_spec):
    torch.manual_seed(0)
    model = build(hdit_spec)
    perturb(model)  # make zero-initialised outputs non-trivial
    return model.eval()


def test_round_trip_spec_objective_metadata_and_outputs(tmp_path, hdit_spec, hdit_model):
    path = tmp_path / "m.safetensors"
    objective = S.EDMObjective(sigma_data=0.5, weighting="soft_min_snr")
    C.save_checkpoint(
        path,
        hdit_model.state_dict(),
        hdit_spec,
        objective=objective,
        metadata={"run": "abc", "ditkit.cfg_channels": "3"},
    )
    ckpt = C.load_checkpoint(path)
    assert ckpt.spec == hdit_spec
    assert ckpt.objective == objective
    assert ckpt.metadata == {"run": "abc", "ditkit.cfg_channels": "3"}
    sd = hdit_model.state_dict()
    assert set(ckpt.tensors) == set(sd)
    assert all(torch.equal(ckpt.tensors[k], sd[k]) for k in sd)
    assert not any("rope_freqs" in k for k in ckpt.tensors)  # derived, not stored

    model, _ = C.load_model(path)
    assert not model.training
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hdit_model(x, torch.tensor([0.5, 3.0]), torch.tensor([1, 10]))
        out = model(x, torch.tensor([0.5, 3.0]), torch.tensor([1, 10]))
    assert ref.abs().max() > 1e-2
    assert torch.equal(out, ref)


def test_cfg_channels(tmp_path, hdit_spec, hdit_model):
    path = tmp_path / "m.safetensors"
    C.save_checkpoint(path, hdit_model.state_dict(), hdit_spec)
    assert C.load_checkpoint(path).cfg_channels is None
    C.save_checkpoint(
        path, hdit_model.state_dict(), hdit_spec, metadata={"ditkit.cfg_channels": "3"}
    )
    assert C.load_checkpoint(path).cfg_channels == 3
    C.save_checkpoint(
        path, hdit_model.state_dict(), hdit_spec, metadata={"ditkit.cfg_channels": "three"}
    )
    with pytest.raises(ValueError, match="ditkit.cfg_channels='three' is not an integer"):
        _ = C.load_checkpoint(path).cfg_channels


def test_metadata_layout_is_documented_json(tmp_path, hdit_spec, hdit_model):
    path = tmp_path / "m.safetensors"
    C.save_checkpoint(path, hdit_model.state_dict(), hdit_spec)
    meta = C.read_metadata(path)
    assert meta["ditkit.spec_version"] == "1"
    assert S.validate(json.loads(meta["ditkit.spec"])) == hdit_spec
    assert "ditkit.objective" not in meta
    assert C.load_checkpoint(path).objective is None


def test_load_model_dtype(tmp_path, hdit_spec, hdit_model):
    path = tmp_path / "m.safetensors"
    C.save_checkpoint(path, hdit_model.state_dict(), hdit_spec)
    model, _ = C.load_model(path, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_failed_save_leaves_existing_file_intact(tmp_path, monkeypatch, hdit_spec, hdit_model):
    path = tmp_path / "m.safetensors"
    C.save_checkpoint(path, hdit_model.state_dict(), hdit_spec, metadata={"v": "1"})
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(C, "save_file", broken_save)  # the use site
    with pytest.raises(OSError, match="disk full"):
        C.save_checkpoint(path, hdit_model.state_dict(), hdit_spec, metadata={"v": "2"})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temp file left behind
    assert C.load_checkpoint(path).metadata == {"v": "1"}


def test_bad_metadata_is_refused_before_writing(tmp_path, hdit_spec, hdit_model):
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match=r"metadata\['step'\].*strings only"):
        C.save_checkpoint(path, hdit_model.state_dict(), hdit_spec, metadata={"step": 3})
    with pytest.raises(ValueError, match=r"ditkit.spec.*written by save_checkpoint"):
        C.save_checkpoint(path, hdit_model.state_dict(), hdit_spec, metadata={"ditkit.spec": "{}"})
    assert not path.exists()


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        C.load_checkpoint(path)
    with pytest.raises(ValueError, match="no such file"):
        C.load_checkpoint(tmp_path / "missing.safetensors")


def test_plain_safetensors_is_not_a_ditkit_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=r"not a ditkit checkpoint.*ditkit convert"):
        C.load_checkpoint(path)
    save_file({"w": torch.zeros(2)}, str(path), metadata={"config": "{}"})
    with pytest.raises(ValueError, match="--from k-diffusion"):
        C.load_checkpoint(path)


def test_invalid_stored_spec_names_the_field(tmp_path, hdit_spec):
    data = S.to_data(hdit_spec, full=True)
    data["levels"][0]["d_model"] = 30  # d_head 16 does not divide it
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"ditkit.spec": json.dumps(data)})
    with pytest.raises(S.SpecError) as err:
        C.load_checkpoint(path)
    assert "d_head" in str(err.value) and "ditkit.spec" in str(err.value)


def test_newer_spec_version_is_refused(tmp_path, hdit_spec):
    data = S.to_data(hdit_spec, full=True)
    data["spec_version"] = 99
    path = tmp_path / "new.safetensors"
    save_file(
        {"w": torch.zeros(2)},
        str(path),
        metadata={"ditkit.spec": json.dumps(data), "ditkit.spec_version": "99"},
    )
    with pytest.raises(S.SpecError, match="newer than this ditkit.*upgrade"):
        C.load_checkpoint(path)


def test_stored_spec_goes_through_the_migration_hook(tmp_path, monkeypatch, hdit_spec, hdit_model):
    """Loading runs ``ditkit.spec.migrate`` on the stored data (where version N -> N+1
    migrations live); a spec stored without ``spec_version`` takes the metadata's."""
    import ditkit.spec.io as io

    seen = []
    real = io.migrate

    def spy(data):
        seen.append(dict(data))
        return real(data)

    monkeypatch.setattr(io, "migrate", spy)
    data = S.to_data(hdit_spec)
    del data["spec_version"]
    path = tmp_path / "old.safetensors"
    save_file(
        {k: v.contiguous() for k, v in hdit_model.state_dict().items()},
        str(path),
        metadata={"ditkit.spec": json.dumps(data), "ditkit.spec_version": "1"},
    )
    ckpt = C.load_checkpoint(path)
    assert ckpt.spec == hdit_spec
    assert seen and seen[-1]["spec_version"] == 1 and seen[-1]["name"] == hdit_spec.name


def test_load_model_refuses_missing_tensors(tmp_path, hdit_spec, hdit_model):
    sd = dict(hdit_model.state_dict())
    del sd["head.proj.weight"]
    path = tmp_path / "m.safetensors"
    C.save_checkpoint(path, sd, hdit_spec)
    with pytest.raises(ValueError, match=r"missing: head\.proj\.weight"):
        C.load_model(path)


def test_model_hash(tmp_path, hdit_spec, hdit_model):
    sd = hdit_model.state_dict()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    C.save_checkpoint(a, sd, hdit_spec, metadata={"x": "1"})
    C.save_checkpoint(b, sd, hdit_spec, metadata={"x": "2"})
    h = C.model_hash(sd)
    assert len(h) == 64 and int(h, 16) >= 0
    assert C.model_hash(a) == C.model_hash(b) == h  # metadata does not enter it
    changed = {k: v.clone() for k, v in sd.items()}
    changed["head.norm.scale"][0] += 1e-3
    assert C.model_hash(changed) != h
    assert C.model_hash({k: v.double() for k, v in sd.items()}) != h
    renamed = dict(sd)
    renamed["other"] = renamed.pop("head.norm.scale")
    assert C.model_hash(renamed) != h


def test_shared_storage_is_saved(tmp_path, hdit_spec):
    t = torch.randn(4)
    path = tmp_path / "s.safetensors"
    C.save_checkpoint(path, {"a": t, "b": t}, hdit_spec)
    loaded = load_file(str(path))
    assert torch.equal(loaded["a"], t) and torch.equal(loaded["b"], t)


def test_cli_reads_the_spec_of_a_checkpoint(tmp_path, capsys, hdit_spec, hdit_model):
    """``ditkit describe`` / ``validate`` accept a ditkit checkpoint in place of a spec file."""
    from ditkit.cli import main

    path = tmp_path / "m.safetensors"
    C.save_checkpoint(path, hdit_model.state_dict(), hdit_spec)
    assert main(["describe", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["name"] == hdit_spec.name
    assert main(["validate", str(path)]) == 0
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    assert main(["describe", str(plain)]) == 2
    err = capsys.readouterr().err
    assert "not a ditkit checkpoint" in err and "Traceback" not in err
