"""What an exported graph looks like from outside: its shape rule, its inputs, a session.

Shared by the exporter (``export``), the onnxruntime engine (``engines``) and the TensorRT
runner (``tensorrt``), so none of those imports another for these pieces (no import cycle):

- :class:`AxisRule` and :func:`check_shape` (from :mod:`ditkit.runtime.shape_rule`): the valid
  ``(B, C, H, W)`` of a graph; :func:`rules_from_metadata` reads the rule a file carries.
- :func:`graph_feeds` / :func:`aux_inputs`: the named inputs of a graph as torch tensors.
- :func:`ort_session`: an onnxruntime session with full graph optimisation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ditkit.deploy.ort_providers import add_provider
from ditkit.errors import UserError, require

# the shape rule lives on the runtime floor (the samplers' denoiser contract names it)
from ditkit.runtime.shape_rule import (  # noqa: F401,E402
    MAX_SIDE,
    AxisRule,
    ExportError,
    check_shape,
    rules_from_metadata,
)


def ort_session(
    path: str | Path,
    providers: list | None = None,
    threads: int | None = None,
    cpu_provider: str = "cpu",
):
    """An ``InferenceSession`` with full graph optimisation. ``cpu_provider`` (when
    ``providers`` is not given): ``cpu``, ``openvino`` or ``openvino-bf16``
    (:mod:`ditkit.deploy.ort_providers`)."""

    ort = require("onnxruntime", "running an exported .onnx file")

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file (write one with `ditkit export`)")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if not providers:
        providers = add_provider(opts, cpu_provider, threads)
    try:
        if providers is None:  # the options carry the provider (a plugin EP)
            return ort.InferenceSession(str(path), sess_options=opts)
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as err:  # noqa: BLE001 - onnxruntime's own exception classes
        raise onnx_error(path, err, providers or [cpu_provider]) from None


class OnnxModelError(UserError):
    """An ONNX file that onnxruntime cannot load or run here."""


def onnx_error(path: Path, err: Exception, providers: list) -> OnnxModelError:
    """A one-line explanation of an onnxruntime failure to load/run ``path``."""
    text = str(err)
    kind = type(err).__name__
    names = [p if isinstance(p, str) else p[0] for p in providers]
    if kind == "InvalidProtobuf" or "Protobuf parsing failed" in text:
        return OnnxModelError(
            f"{path}: not an ONNX model (the file does not parse as one); "
            "`ditkit export` writes ONNX files, `ditkit sample` also takes "
            "a .safetensors checkpoint"
        )
    if kind == "NotImplemented" or "NOT_IMPLEMENTED" in text:
        first = text.strip().splitlines()[0][:200] if text.strip() else kind
        if _uses_bf16(path):
            hint = (
                "it is a bf16 graph, and onnxruntime's CPU provider has no bf16 kernels: "
                "run it with onnxruntime CUDA (--device cuda, onnxruntime-gpu) or TensorRT, "
                "or export a graph for onnxruntime CPU with --precision fp32"
            )
        else:
            hint = "export it with --precision fp32, or run it where that provider has the op"
        return OnnxModelError(
            f"{path}: onnxruntime ({', '.join(names)}) cannot run an "
            f"operation of this graph ({first}); {hint}"
        )
    first = text.strip().splitlines()[0][:300] if text.strip() else kind
    return OnnxModelError(f"{path}: onnxruntime cannot load this model ({kind}: {first})")


def graph_feeds(
    x: torch.Tensor,
    sigma,
    class_labels,
    scale,
    cond: dict,
    *,
    names: list[str],
    null_class: int | None,
    aux: dict[str, int],
) -> dict[str, torch.Tensor]:
    """The inputs of an exported graph (named ``names``) as torch tensors on ``x``'s device:
    ``sigma`` expanded to ``(B,)``, the null class for missing labels, zeros for missing
    auxiliary inputs (as the model does), ``cfg_scale`` (1 = conditional) for a ``--cfg``
    graph. Shared by the onnxruntime and TensorRT runners."""
    unknown = sorted(set(cond) - set(aux))
    if unknown:
        raise ExportError(
            f"unknown auxiliary input(s) {unknown}; this graph takes {sorted(aux) or 'none'}"
        )
    b = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(b)
    feeds = {"x": x.float(), "sigma": sigma.float()}
    if "class_labels" in names:
        if class_labels is None:
            if null_class is None:
                raise ExportError("this model needs class_labels (its spec has no null class)")
            class_labels = torch.full((b,), null_class, dtype=torch.long)
        feeds["class_labels"] = class_labels.to(x.device, torch.long)
    elif class_labels is not None:
        raise ExportError("class_labels given but the model has no class conditioning")
    for name, dims in aux.items():
        value = cond.get(name)
        value = (
            torch.zeros(b, dims, device=x.device)
            if value is None
            else torch.as_tensor(value, device=x.device).float()
        )
        if value.shape != (b, dims):
            raise ExportError(
                f"auxiliary input {name}: expected shape ({b}, {dims}), got {tuple(value.shape)}"
            )
        feeds[name] = value
    if "cfg_scale" in names:
        w = torch.as_tensor(1.0 if scale is None else scale, dtype=torch.float32, device=x.device)
        feeds["cfg_scale"] = w.expand(b) if w.ndim == 0 else w
    return {k: v.contiguous() for k, v in feeds.items()}


def aux_inputs(inputs) -> dict[str, int]:
    """``{name: dims}`` of the auxiliary conditioning inputs among a graph's ``(name, shape)``
    inputs (every input but x, sigma, class_labels and cfg_scale)."""
    return {
        name: int(shape[1])
        for name, shape in inputs
        if name not in ("x", "sigma", "class_labels", "cfg_scale")
    }


def _uses_bf16(path: Path) -> bool:
    """Whether the ONNX file's metadata or tensors say bfloat16."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - only a hint for a message
        return False
    if any(p.key == "ditkit.precision" and p.value == "bf16" for p in model.metadata_props):
        return True
    bf16 = onnx.TensorProto.BFLOAT16
    g = model.graph
    return any(t.data_type == bf16 for t in g.initializer) or any(
        v.type.tensor_type.elem_type == bf16
        for v in list(g.input) + list(g.output) + list(g.value_info)
    )
