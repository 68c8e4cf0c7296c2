"""onnxruntime engines that the samplers drive exactly like the eager denoiser.

:class:`OrtDenoiser` opens an ONNX file written by ``ditkit export`` and reads everything it
needs from the file's ``metadata_props`` (the spec, the objective, the resolution rule), so
``sample(OrtDenoiser("model.onnx"), ...)`` needs no other file. On CUDA it uses IO binding:
inputs and outputs stay on the GPU as torch tensors and the sampling loop never copies through
the host (that path has not been executed here: these machines have no GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ditkit import spec as S
from ditkit.deploy.graph_io import (
    ExportError,
    aux_inputs,
    check_shape,
    graph_feeds,
    onnx_error,
    ort_session,
    rules_from_metadata,
)
from ditkit.deploy.ort_providers import ProviderError, check_provider
from ditkit.errors import require
from ditkit.runtime.checkpoint import spec_from_metadata
from ditkit.runtime.denoiser import NoiseRange

_TORCH_TO_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def default_providers(device: str | torch.device = "cpu") -> list[str]:
    """CUDA (then CPU) on a CUDA device when onnxruntime has it; CPU otherwise."""

    ort = require("onnxruntime", "running an exported .onnx file")
    available = ort.get_available_providers()
    if torch.device(device).type == "cuda":
        order = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        chosen = [p for p in order if p in available]
        if not chosen:
            raise RuntimeError(
                "device cuda asked for, but this onnxruntime has no CUDA "
                "provider; install onnxruntime-gpu (`pip install ditkit[gpu]`)"
            )
        return chosen + ["CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtDenoiser:
    """A ``ditkit export`` ONNX file as a sampler denoiser: ``denoise(x, sigma, labels) ->
    (x0, var_values | None)``, plus ``noise_range`` and ``null_class`` from its metadata.

    ``device``: where the torch tensors the sampler passes live (``cpu`` or ``cuda[:i]``).
    ``ort_provider``: on the CPU, which execution provider runs the graph (``cpu``,
    ``openvino``, ``openvino-bf16``: :mod:`ditkit.deploy.ort_providers`)."""

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        providers: list | None = None,
        threads: int | None = None,
        ort_provider: str = "cpu",
    ):

        self.path = Path(path)
        self.device = torch.device(device)
        self.ort_provider = check_provider(ort_provider)
        if ort_provider != "cpu" and (providers or self.device.type != "cpu"):
            raise ProviderError(
                f"--ort-provider {ort_provider} runs the graph on the CPU; "
                f"drop it or use --device cpu (got {self.device})"
            )
        if not providers and self.device.type != "cpu":
            providers = default_providers(self.device)
        self.session = ort_session(self.path, providers, threads, cpu_provider=ort_provider)
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        spec, objective = spec_from_metadata(meta, str(self.path))
        if objective is None:
            raise ExportError(
                f"{self.path}: no ditkit.objective in its metadata_props; "
                "re-export it with `ditkit export`"
            )
        self.spec: S.ModelSpec = spec
        self.objective = objective
        self.metadata = meta
        self.noise_range = NoiseRange.of(objective)
        self.null_class = spec.null_label
        try:
            self.rules = rules_from_metadata(meta)
            cfg = json.loads(meta.get("ditkit.cfg", "{}"))
            if not isinstance(cfg, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as err:  # UserError is a ValueError
            raise ExportError(
                f"{self.path}: damaged ditkit metadata ({err}); re-export it with `ditkit export`"
            ) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # auxiliary conditioning inputs (name -> dims), as the graph declares them
        self.aux = aux_inputs((i.name, i.shape) for i in self.session.get_inputs())
        # a graph exported with --cfg batches both passes itself (see samplers.Guided)
        self.guides_inside = "cfg_scale" in self.input_names
        self.cfg_channels = cfg.get("channels")
        self.calls = 0

    @property
    def learned_variance(self) -> bool:
        return "var_values" in self.output_names

    def __call__(self, x, sigma, class_labels=None, **cond):
        return self.denoise(x, sigma, class_labels, **cond)[0]

    def denoise(
        self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, **cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x0, var_values | None)``; a ``--cfg`` graph runs with ``cfg_scale = 1`` (the
        conditional output)."""
        return self._run(x, sigma, class_labels, None, cond)

    def guided(
        self, x: torch.Tensor, sigma, class_labels: torch.Tensor, scale, **cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Classifier-free guidance inside a graph exported with ``--cfg``: one call, both
        passes batched in the graph. ``scale``: a number or ``(B,)``."""
        if not self.guides_inside:
            raise ExportError(f"{self.path} was exported without --cfg (no cfg_scale input)")
        if class_labels is None:
            raise ExportError("classifier-free guidance needs class_labels")
        return self._run(x, sigma, class_labels, scale, cond)

    def _run(self, x, sigma, class_labels, scale, cond):
        check_shape(self.spec, tuple(x.shape), self.rules, "x")
        feeds = graph_feeds(
            x,
            sigma,
            class_labels,
            scale,
            cond,
            names=self.input_names,
            null_class=self.null_class,
            aux=self.aux,
        )
        self.calls += 1
        if x.device.type == "cuda":
            outs = self._run_bound(feeds, x)
        else:
            try:
                raw = self.session.run(
                    self.output_names, {k: v.contiguous().cpu().numpy() for k, v in feeds.items()}
                )
            except Exception as err:  # noqa: BLE001 - e.g. NOT_IMPLEMENTED bf16 kernels
                raise onnx_error(self.path, err, self.session.get_providers()) from None
            outs = [torch.from_numpy(r).to(x.dtype) for r in raw]
        return outs[0], (outs[1] if len(outs) > 1 else None)

    def _run_bound(self, feeds: dict, x: torch.Tensor) -> list[torch.Tensor]:
        """IO binding: bind torch CUDA buffers as inputs and preallocated outputs."""
        binding = self.session.io_binding()
        keep = []
        for name, t in feeds.items():
            t = t.contiguous()
            keep.append(t)
            binding.bind_input(
                name,
                "cuda",
                t.device.index or 0,
                _TORCH_TO_NP[t.dtype],
                tuple(t.shape),
                t.data_ptr(),
            )
        outs = []
        for name in self.output_names:
            o = torch.empty(x.shape, dtype=torch.float32, device=x.device)
            binding.bind_output(
                name, "cuda", o.device.index or 0, np.float32, tuple(o.shape), o.data_ptr()
            )
            outs.append(o)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return [o.to(x.dtype) for o in outs]
