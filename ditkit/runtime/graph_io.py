"""What an exported graph looks like from outside: its shape rule, its inputs, a session.

Shared by the exporter (``export``), the onnxruntime engine (``engines``) and the TensorRT
runner (``tensorrt``), so none of those imports another for these pieces (no import cycle):

- :class:`AxisRule` and :func:`check_shape`: the valid ``(B, C, H, W)`` of a graph;
  :func:`rules_from_metadata` reads the rule an exported file carries.
- :func:`graph_feeds` / :func:`aux_inputs`: the named inputs of a graph as torch tensors.
- :func:`ort_session`: an onnxruntime session with full graph optimisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ditkit import spec as S
from ditkit.errors import UserError

MAX_SIDE = 8192  # largest exported H / W (pixels or latents)


class ExportError(UserError):
    """An export that cannot be done or did not pass its checks (the message says which)."""


@dataclass(frozen=True)
class AxisRule:
    """Valid sizes of one axis: ``minimum + k * step`` for ``k >= 0`` (up to ``maximum``)."""

    minimum: int
    step: int
    maximum: int = MAX_SIDE

    def valid(self, n: int) -> bool:
        return self.minimum <= n <= self.maximum and (n - self.minimum) % self.step == 0

    def text(self) -> str:
        return (f"{self.minimum} + k*{self.step}" if self.minimum % self.step else
                f"multiple of {self.step}, >= {self.minimum}")


def check_shape(spec: S.ModelSpec, shape, rules: tuple[AxisRule, AxisRule] | None = None,
                where: str = "input") -> None:
    """Raise :class:`ExportError` naming the rule if ``(B, C, H, W)`` is not valid."""
    if len(shape) != 4 or shape[1] != spec.input.channels:
        raise ExportError(f"{where}: expected (batch, {spec.input.channels}, H, W), got "
                          f"{tuple(shape)}")
    issues = spec.check_resolution((int(shape[2]), int(shape[3])), where)
    if issues:
        raise ExportError("; ".join(f"{p}: {m}" for p, m in issues))
    if rules is not None:
        for n, rule, name in zip(shape[2:], rules, ("height", "width")):
            if not rule.valid(int(n)):
                raise ExportError(f"{where}: {name} {n} is outside this model's rule "
                                  f"({rule.text()}, <= {rule.maximum})")


def rules_from_metadata(meta: dict[str, str]) -> tuple[AxisRule, AxisRule] | None:
    """The ``(height, width)`` rule recorded in an exported file's ``ditkit.resolution_rule``
    metadata, or ``None`` when it records none."""
    rule = json.loads(meta.get("ditkit.resolution_rule", "{}"))
    if not rule:
        return None
    return tuple(AxisRule(rule[a]["min"], rule[a]["step"], rule[a]["max"])
                 for a in ("height", "width"))


def ort_session(path: str | Path, providers: list | None = None, threads: int | None = None):
    """An ``InferenceSession`` with full graph optimisation."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such ONNX file (write one with `ditkit export`)")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts,
                                providers=providers or ["CPUExecutionProvider"])


def graph_feeds(x: torch.Tensor, sigma, class_labels, scale, cond: dict, *, names: list[str],
                null_class: int | None, aux: dict[str, int]) -> dict[str, torch.Tensor]:
    """The inputs of an exported graph (named ``names``) as torch tensors on ``x``'s device:
    ``sigma`` expanded to ``(B,)``, the null class for missing labels, zeros for missing
    auxiliary inputs (as the model does), ``cfg_scale`` (1 = conditional) for a ``--cfg``
    graph. Shared by the onnxruntime and TensorRT runners."""
    unknown = sorted(set(cond) - set(aux))
    if unknown:
        raise ValueError(f"unknown auxiliary input(s) {unknown}; this graph takes "
                         f"{sorted(aux) or 'none'}")
    b = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(b)
    feeds = {"x": x.float(), "sigma": sigma.float()}
    if "class_labels" in names:
        if class_labels is None:
            if null_class is None:
                raise ValueError("this model needs class_labels (its spec has no null class)")
            class_labels = torch.full((b,), null_class, dtype=torch.long)
        feeds["class_labels"] = class_labels.to(x.device, torch.long)
    elif class_labels is not None:
        raise ValueError("class_labels given but the model has no class conditioning")
    for name, dims in aux.items():
        value = cond.get(name)
        value = (torch.zeros(b, dims, device=x.device) if value is None else
                 torch.as_tensor(value, device=x.device).float())
        if value.shape != (b, dims):
            raise ValueError(f"auxiliary input {name}: expected shape ({b}, {dims}), got "
                             f"{tuple(value.shape)}")
        feeds[name] = value
    if "cfg_scale" in names:
        w = torch.as_tensor(1.0 if scale is None else scale, dtype=torch.float32,
                            device=x.device)
        feeds["cfg_scale"] = w.expand(b) if w.ndim == 0 else w
    return {k: v.contiguous() for k, v in feeds.items()}


def aux_inputs(inputs) -> dict[str, int]:
    """``{name: dims}`` of the auxiliary conditioning inputs among a graph's ``(name, shape)``
    inputs (every input but x, sigma, class_labels and cfg_scale)."""
    return {name: int(shape[1]) for name, shape in inputs
            if name not in ("x", "sigma", "class_labels", "cfg_scale")}
