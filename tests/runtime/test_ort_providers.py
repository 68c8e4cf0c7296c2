"""onnxruntime's execution provider on the CPU (``--ort-provider cpu|openvino|openvino-bf16``):
the OpenVINO plugin runs the same exported file, exactly in f32 and within the bf16 tolerance
in bf16; names, a missing plugin, a CPU without bf16 and misuse are clear errors."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ditkit import spec as S  # noqa: E402
from ditkit.deploy import ort_providers as P  # noqa: E402
from ditkit.deploy.engines import OrtDenoiser  # noqa: E402

from .conftest import TINY  # noqa: E402


def openvino_missing() -> str | None:
    """Why the OpenVINO provider cannot run here, or ``None`` when it can: the plugin is not
    installed, or it finds no CPU device it supports (seen on an AVX2-only AMD EPYC)."""
    try:
        import onnxruntime_ep_openvino  # noqa: F401
    except ImportError:
        return "onnxruntime-ep-openvino is not installed (ditkit[openvino])"
    try:
        P.openvino_cpu_device()
    except P.ProviderError as err:
        return f"OpenVINO cannot run on this machine: {err}"
    return None


needs_openvino = pytest.mark.skipif(openvino_missing() is not None, reason=str(openvino_missing()))


def reference(model, shape=(2, 16, 20), seed=3):
    from ditkit.deploy.export import ExportGraph, example_inputs

    graph = ExportGraph(model, S.EDMObjective())
    x, sigma, labels, aux = example_inputs(graph, shape[0], shape[1:], seed=seed)
    with torch.no_grad():
        return (x, sigma, labels, aux), graph(x, sigma, labels, aux)


@needs_openvino
def test_openvino_runs_the_same_file_exactly_in_f32_and_within_tolerance_in_bf16(hdit_export):
    model, result, _ = hdit_export
    (x, sigma, labels, aux), ref = reference(model)
    scale = max(1.0, float(ref.abs().max()))

    f32 = OrtDenoiser(result.path, threads=1, ort_provider="openvino")
    assert f32.session.get_providers()[0] == "OpenVINOExecutionProvider"
    got = f32(x, sigma, labels, aug_cond=aux)
    assert float((got - ref).abs().max()) <= 1e-4 * scale  # the fp32 export tolerance

    device = P.openvino_cpu_device()
    if "BF16" not in device.ep_metadata.get("OPTIMIZATION_CAPABILITIES", "").split():
        with pytest.raises(P.ProviderError, match="no bf16 support"):
            OrtDenoiser(result.path, threads=1, ort_provider="openvino-bf16")
        return
    bf16 = OrtDenoiser(result.path, threads=1, ort_provider="openvino-bf16")
    got = bf16(x, sigma, labels, aug_cond=aux)
    diff = float((got - ref).abs().max())
    # really computed in bf16 (not f32), and within the stated tolerance of the output scale
    assert 1e-4 * scale < diff <= P.BF16_TOLERANCE * scale
    assert np.isfinite(got.numpy()).all()


@needs_openvino
def test_registering_the_plugin_twice_is_harmless(monkeypatch):
    first = P.openvino_cpu_device()  # registered now (or before, by another test)
    real, calls = P._cpu_devices, []  # noqa: SLF001

    def not_seen_at_first(name):  # as if another library had registered it meanwhile
        calls.append(name)
        return [] if len(calls) == 1 else real(name)

    monkeypatch.setattr(P, "_cpu_devices", not_seen_at_first)
    second = P.openvino_cpu_device()  # registers again: "already registered" is not an error
    assert len(calls) == 2
    assert first.ep_name == second.ep_name == "OpenVINOExecutionProvider"


def test_provider_names_and_devices_are_checked(hdit_export):
    path = hdit_export[1].path
    with pytest.raises(P.ProviderError, match="choose one of cpu, openvino, openvino-bf16"):
        OrtDenoiser(path, ort_provider="mkl")
    with pytest.raises(P.ProviderError, match="runs the graph on the CPU"):
        OrtDenoiser(path, device="cuda", ort_provider="openvino")
    assert P.approximate("openvino-bf16") and not P.approximate("openvino")
    assert OrtDenoiser(path, ort_provider="cpu").session.get_providers() == ["CPUExecutionProvider"]


def test_a_missing_plugin_names_the_package(hdit_export, monkeypatch, capsys, tmp_path):
    from ditkit.cli import main

    monkeypatch.setitem(sys.modules, "onnxruntime_ep_openvino", None)  # import fails
    with pytest.raises(P.ProviderError, match=r"pip install 'ditkit\[openvino\]'"):
        OrtDenoiser(hdit_export[1].path, ort_provider="openvino")
    code = main(
        [
            "sample",
            str(hdit_export[1].path),
            "--ort-provider",
            "openvino",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "g.png"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'ditkit[openvino]'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists()


def test_a_cpu_without_bf16_is_refused_with_the_f32_alternative():
    device = types.SimpleNamespace(ep_metadata={"OPTIMIZATION_CAPABILITIES": "FP32 INT8"})
    with pytest.raises(P.ProviderError, match="use --ort-provider openvino"):
        P.openvino_config("openvino-bf16", device, 1)
    cfg = P.openvino_config("openvino", device, 2)
    assert '"INFERENCE_PRECISION_HINT": "f32"' in cfg["load_config"]
    assert '"INFERENCE_NUM_THREADS": "2"' in cfg["load_config"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ort-provider", "tensorrt"], "--ort-provider 'tensorrt': choose one of"),
        (["--ort-provider", "openvino"], "is not one (export it with `ditkit export`"),
    ],
)
def test_the_command_line_refuses_bad_providers_in_one_line(tmp_path, capsys, argv, message):
    from ditkit.cli import main

    code = main(
        [
            "sample",
            str(TINY / "tiny-hdit-neighborhood.yaml"),
            "--steps",
            "2",
            "--out",
            str(tmp_path / "g.png"),
            *argv,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


@needs_openvino
def test_bench_sample_times_the_openvino_and_bf16_engines_beside_eager():
    from ditkit.builder import build
    from ditkit.deploy.bench import bench_sample

    torch.manual_seed(0)
    model = build(S.load(TINY / "tiny-hdit-neighborhood.yaml")).eval()
    engines = ("eager", "eager-bf16", "onnxruntime-openvino", "onnxruntime-openvino-bf16")
    rows = bench_sample(model, S.EDMObjective(), [(16, 16)], engines=engines, repeats=1, threads=1)
    assert [r["engine"] for r in rows] == list(engines)
    for row in rows:
        assert row["ms_per_step"] > 0 and row["cpu_ms_per_step"] > 0, row
        assert row["vs_eager"] is not None and not row["note"], row


def test_bench_sample_reports_a_missing_plugin_as_a_row(monkeypatch):
    from ditkit.builder import build
    from ditkit.deploy.bench import bench_sample

    monkeypatch.setitem(sys.modules, "onnxruntime_ep_openvino", None)
    torch.manual_seed(0)
    model = build(S.load(TINY / "tiny-hdit-neighborhood.yaml")).eval()
    rows = bench_sample(
        model,
        S.EDMObjective(),
        [(16, 16)],
        engines=("eager", "onnxruntime-openvino"),
        repeats=1,
        threads=1,
    )
    eager, ov = rows
    assert eager["ms_per_step"] > 0
    assert ov["ms_per_step"] is None and "pip install 'ditkit[openvino]'" in ov["note"]


@needs_openvino
def test_sample_records_the_provider_and_an_npz_resume_must_use_the_same_one(
    hdit_export, tmp_path, capsys, monkeypatch
):
    import json

    from ditkit.cli import main

    onnx = str(hdit_export[1].path)
    code = main(
        [
            "sample",
            onnx,
            "--ort-provider",
            "openvino",
            "--steps",
            "2",
            "--count",
            "2",
            "--out",
            str(tmp_path / "g.png"),
            "--json",
            "--no-progress",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["ort_provider"] == "openvino" and (tmp_path / "g.png").is_file()

    import ditkit.runtime.samplers as samplers

    npz = str(tmp_path / "s.npz")
    base = [
        "sample",
        onnx,
        "--npz",
        npz,
        "--count",
        "4",
        "--batch",
        "2",
        "--steps",
        "2",
        "--no-progress",
    ]
    real, calls = samplers.sample, []

    def stop_in_the_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(samplers, "sample", stop_in_the_second_chunk)
    try:
        main([*base, "--ort-provider", "openvino-bf16"])
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(samplers, "sample", real)
    assert len(calls) == 2  # stopped in its second chunk: one part is on disk
    capsys.readouterr()
    # the interrupted bf16 run is not continued in f32: the draws would differ
    code = main([*base, "--ort-provider", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "ort_provider: 'openvino-bf16' -> None" in err
    assert "Traceback" not in err
    assert main([*base, "--ort-provider", "openvino-bf16"]) == 0
    assert "2 of them drawn by an earlier run" in capsys.readouterr().out
