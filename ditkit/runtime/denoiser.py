"""Every trained model as one denoiser ``D(x, sigma, ...) -> x0`` (the VE convention).

Samplers work in the variance-exploding convention ``x = x0 + sigma * eps`` only, so that any
sampler drives any model. How a model's objective scales the network's input, what noise level
it tells it and how its output becomes an ``x0`` estimate is the objective's business
(:mod:`ditkit.runtime.objectives`, one class per objective spec): :class:`Denoiser` only binds
a network to its objective and normalises ``sigma``. It also compiles.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ditkit import spec as S
from ditkit.errors import UserError
from ditkit.runtime.objectives import Objective, as_sigma, objective_of

# the schedule maps, importable from here as before (their home is ``runtime.schedules``)
from ditkit.runtime.schedules import (
    cosine_alpha_sigma,
    cosine_sigma_to_t,  # noqa: F401
    cosine_t_to_sigma,
    ddpm_alphas_cumprod,
    ddpm_betas,
    ddpm_sigma_to_t,
    ddpm_sigmas,
    ddpm_step_log_variance,
    ddpm_t_to_sigma,
    edm_scalings,
    flow_sigma_to_t,
    flow_t_to_sigma,
    v_scalings,
)
from ditkit.runtime.shape_rule import AxisRule

__all__ = [
    "Denoiser",
    "NoiseRange",
    "COMPILE_MODES",
    "compile_mode",
    "compile_network",
    "compile_denoiser",
    # re-exported from runtime.schedules
    "cosine_alpha_sigma",
    "cosine_sigma_to_t",
    "cosine_t_to_sigma",
    "ddpm_alphas_cumprod",
    "ddpm_betas",
    "ddpm_sigma_to_t",
    "ddpm_sigmas",
    "ddpm_step_log_variance",
    "ddpm_t_to_sigma",
    "edm_scalings",
    "flow_sigma_to_t",
    "flow_t_to_sigma",
    "v_scalings",
]

NoiseRange = Objective
"""The old name of what samplers read from a denoiser (``noise_range``): the objective itself,
which owns the noise range, ``sigma <-> t`` and the native schedule. ``NoiseRange.of(spec)``
is :func:`~ditkit.runtime.objectives.objective_of`."""

# -------------------------------------------------------------------------------- denoiser


#: the precisions an eager denoiser runs its network in (``bf16``: autocast, an approximation
#: that uses the CPU's bf16 units where it has them, and a GPU's tensor cores)
PRECISIONS = ("fp32", "bf16")


class DenoiserError(UserError):
    """A denoiser setting that cannot be used."""


class Denoiser(nn.Module):
    """``D(x, sigma, class_labels=None, **cond) -> x0`` for a model trained with ``objective``.

    ``x`` is ``(B, C, H, W)`` in the VE convention, ``sigma`` a number or ``(B,)`` tensor.
    ``objective`` is the objective spec (kept as :attr:`objective`, what exports record);
    :attr:`noise_range` is its :class:`~ditkit.runtime.objectives.Objective`, which does the
    work. ``null_class`` is the label that means "unconditional" (for classifier-free
    guidance), or ``None`` when the model has no class conditioning."""

    def __init__(
        self, model: nn.Module, objective, quantize: bool = False, precision: str = "fp32"
    ):
        super().__init__()
        if precision not in PRECISIONS:
            raise DenoiserError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        self.model = model
        self.precision = precision  # bf16: the network under autocast, x0 returned in fp32
        self.noise_range = objective_of(objective)
        self.objective = self.noise_range.spec
        self.quantize = quantize  # DDPM: round the timestep to the nearest trained one
        spec: S.ModelSpec | None = getattr(model, "spec", None)
        self.channels = spec.input.channels if spec is not None else None
        self.null_class = spec.null_label if spec is not None else None
        self.guides_inside = False  # see protocols
        self.cfg_channels: int | None = None
        self.rules: tuple[AxisRule, AxisRule] | None = None

    def at(self, resolution: tuple[int, int]) -> Denoiser:
        """The denoiser that samples ``resolution`` (multi-stage sampling asks at each stage):
        this one. :class:`AdaptingDenoiser` builds its network per resolution."""
        return self

    @property
    def sigma_min(self) -> float:
        return self.noise_range.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.noise_range.sigma_max

    @property
    def learned_variance(self) -> bool:
        spec = getattr(self.model, "spec", None)
        return spec is not None and self.noise_range.learned_variance(spec)

    def forward(
        self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, **cond: torch.Tensor
    ) -> torch.Tensor:
        return self.denoise(x, sigma, class_labels, **cond)[0]

    def guided(self, x, sigma, class_labels, scale, **cond):
        """Not in eager PyTorch: the sampler batches the two CFG passes itself."""
        raise ValueError("an eager Denoiser guides through the sampler (guides_inside is False)")

    def denoise(
        self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, **cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x0, var_values)``; ``var_values`` is the learned-sigma channels of a DDPM model
        (``(B, C, H, W)`` in [-1, 1]) or ``None``."""
        if self.precision == "fp32":
            return self.noise_range.denoise(
                self.model, x, as_sigma(sigma, x), class_labels, quantize=self.quantize, **cond
            )
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            x0, var = self.noise_range.denoise(
                self.model, x, as_sigma(sigma, x), class_labels, quantize=self.quantize, **cond
            )
        return x0.float(), None if var is None else var.float()


# -------------------------------------------------------------------------------- compile

#: ``torch.compile`` modes ditkit passes through; ``auto`` picks one per device and use
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


class AdaptingDenoiser(Denoiser):
    """A denoiser whose network is made per resolution by ``make(resolution)`` (and kept): a
    resolution policy applied to a trained model (``ditkit sample --policy``, the
    extrapolation report). In multi-stage sampling each stage then runs the model adapted to
    its own grid: a draft at the trained resolution runs the trained model itself (every policy
    but ``local_core`` is a no-op there), and only the stages at new resolutions run the
    adapted one. ``resolution`` is the output's: the network :attr:`model` samples it.
    A resolution ``make`` cannot reach is a :class:`DenoiserError` naming it."""

    def __init__(
        self,
        make: Callable[[tuple[int, int]], nn.Module],
        objective,
        resolution: tuple[int, int],
        **kwargs,
    ):
        res = (int(resolution[0]), int(resolution[1]))
        super().__init__(make(res), objective, **kwargs)
        self._make, self._kwargs = make, kwargs
        self._by_resolution: dict[tuple[int, int], Denoiser] = {res: self}

    def at(self, resolution: tuple[int, int]) -> Denoiser:
        res = (int(resolution[0]), int(resolution[1]))
        if res not in self._by_resolution:
            try:
                model = self._make(res)
            except UserError as err:
                raise DenoiserError(f"a stage at {res[0]}x{res[1]}: {err}") from None
            den = Denoiser(model, self.objective, **self._kwargs)
            den.rules, den.cfg_channels = self.rules, self.cfg_channels
            self._by_resolution[res] = den
        return self._by_resolution[res]


def compile_mode(mode: str, device: torch.device | str, training: bool) -> str:
    """The concrete mode of ``mode`` for a network on ``device``.

    ``auto``: on CUDA, ``reduce-overhead`` for sampling (CUDA graphs replay one captured step:
    a sampler calls the network with the same shapes every step) and
    ``max-autotune-no-cudagraphs`` for training (tuned kernels; no graphs, whose static
    buffers do not mix with a training step's changing autograd state); on CPU ``default``
    (CUDA graphs and Triton autotuning do not apply)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if mode != "auto":
        return mode
    if torch.device(device).type != "cuda":
        return "default"
    return "max-autotune-no-cudagraphs" if training else "reduce-overhead"


def _compile(
    fn,
    mode: str,
    device,
    training: bool,
    backend,
    fullgraph: bool = True,
    dynamic: bool | None = None,
):
    if backend is not None:  # a named Dynamo backend (tests, debugging): no mode applies
        return torch.compile(fn, fullgraph=fullgraph, backend=backend, dynamic=dynamic)
    return torch.compile(
        fn, fullgraph=fullgraph, mode=compile_mode(mode, device, training), dynamic=dynamic
    )


def compile_network(
    module: nn.Module,
    *,
    mode: str = "auto",
    device: torch.device | str = "cpu",
    training: bool = False,
    fullgraph: bool = True,
    backend=None,
) -> nn.Module:
    """``torch.compile(module, fullgraph=True)``: every ditkit model traces to one graph (the
    attention backend is a guarded constant, see ``builder.kernels``), so a graph break is a
    bug and fails loudly instead of silently splitting the model. ``fullgraph=False`` is for
    DDP, whose optimizer splits the graph at gradient buckets on purpose."""
    return _compile(module, mode, device, training, backend, fullgraph)


def compile_denoiser(
    denoiser: "Denoiser", mode: str = "auto", device: torch.device | str = "cpu", backend=None
) -> "Denoiser":
    """Compile ``denoiser.denoise`` (the objective's scalings and the network) into one graph
    per sampling step, in place; returns the denoiser. Shapes are static per call site (a CFG
    step doubles the batch and compiles once more). Under CUDA graphs (``reduce-overhead``)
    each step starts a new graph replay and its outputs are cloned, because a sampler keeps
    earlier steps' estimates (DPM-Solver++ history) that the next replay would overwrite."""
    resolved = compile_mode(mode, device, training=False) if backend is None else backend
    compiled = _compile(denoiser.denoise, mode, device, False, backend, dynamic=False)
    if resolved not in ("reduce-overhead", "max-autotune"):
        # the compiled callable replaces this instance's method, on purpose
        denoiser.denoise = compiled  # type: ignore[method-assign]
        return denoiser

    def denoise(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        x0, var = compiled(*args, **kwargs)
        return x0.clone(), (var.clone() if var is not None else None)

    denoiser.denoise = denoise  # type: ignore[method-assign]
    return denoiser
