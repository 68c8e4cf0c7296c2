"""Where the model lives during a run: one process, DDP replicas or FSDP2 shards.

The loop talks to a :class:`Placement` and never to DDP / FSDP directly:

* ``wrap`` -- DDP wraps the model in a module that averages gradients; FSDP2 shards the model
  in place with ``torch.distributed.fsdp.fully_shard``, first every transformer
  :class:`~ditkit.builder.model.Block` (a unit of all-gather / reduce-scatter), then the root
  (everything else: embeddings, mapping network, merges, head). The EMA copy is sharded the
  same way, so its update is a local elementwise ``lerp`` on each process's shard.
* ``full_state`` -- the *full* model, EMA and optimizer state dicts on rank 0 (empty dicts on
  the other ranks), gathered with ``torch.distributed.checkpoint.state_dict``
  (``full_state_dict=True, cpu_offload=True``). Every strategy goes through it, so a
  checkpoint is the same files whatever wrote it: plain-model keys in ``model.safetensors``
  and an optimizer state keyed by parameter name. ``load`` is the reverse (``set_*``), each
  process keeping its shard.
* ``sampling_model`` -- a whole EMA model on rank 0 for previews (FSDP2: gathered into a plain
  replica; collective, so every rank calls it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from ditkit.builder.model import Block
from ditkit.runtime.checkpoint import model_hash
from ditkit.spec.experiment import Experiment

FULL: dict[str, Any] = dict(full_state_dict=True, cpu_offload=True)


class Placement:
    """The strategy of one run: ``single`` (one process), ``ddp`` or ``fsdp2``."""

    def __init__(self, exp: Experiment, world: int, rank: int, device: torch.device):
        self.exp, self.world, self.rank, self.device = exp, world, rank, device
        self.strategy = "single" if world == 1 else exp.distributed.strategy
        self._replica: nn.Module | None = None

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp2"

    # ------------------------------------------------------------------ wrapping

    def wrap(self, model: nn.Module, ema_model: nn.Module) -> nn.Module:
        """The module the loss calls: ``model`` itself (one process, FSDP2 -- sharded in
        place, as is ``ema_model``) or a DDP wrapper around it."""
        if self.strategy == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(model, device_ids=ids)
        if self.strategy == "fsdp2":
            shard(model, **self.fsdp_options())
            shard(ema_model, **self.fsdp_options())
        return model

    def fsdp_options(self) -> dict:

        d = self.exp.distributed
        param = d.param_dtype
        if param == "auto":
            dtype = self.exp.precision.dtype
            bf16 = dtype == "bf16" or (dtype == "auto" and self.device.type == "cuda")
            param = "bf16" if bf16 else "fp32"
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        mp = MixedPrecisionPolicy(param_dtype=dtypes[param], reduce_dtype=dtypes[d.reduce_dtype])
        return {"mp_policy": mp, "reshard_after_forward": d.reshard_after_forward}

    def no_sync(self, net: nn.Module, last: bool):
        """Context for one micro-batch's backward: skip the gradient reduction unless it is
        the last micro-batch of the step (gradient accumulation)."""
        # DDP's and FSDP2's own methods, reached through nn.Module's (untyped) __getattr__
        if self.strategy == "ddp" and not last:
            return net.no_sync()  # type: ignore[operator]
        if self.strategy == "fsdp2":
            net.set_requires_gradient_sync(last)  # type: ignore[operator]
        return contextlib.nullcontext()

    def clip_gradients(self, model: nn.Module, max_norm: float | None) -> float:
        """Global gradient norm (over all shards), clipping to ``max_norm`` when given."""
        params = [p for p in model.parameters() if p.grad is not None]
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        return float(_full(norm))

    # ------------------------------------------------------------------ state dicts

    def full_state(
        self, model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict, dict, dict]:
        """``(model, ema, optimizer)`` full state dicts on CPU on rank 0, ``({}, {}, {})`` on
        the other ranks. Collective under FSDP2: every rank must call it."""

        opts = StateDictOptions(**FULL)  # ranks other than 0 receive empty dicts
        m = get_model_state_dict(model, options=opts)
        e = get_model_state_dict(ema_model, options=opts)
        o = get_optimizer_state_dict(model, optimizer, options=opts)
        if self.rank != 0:
            return {}, {}, {}
        return dict(m), dict(e), o

    def load(
        self,
        model: nn.Module,
        ema_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_state: dict,
        ema_state: dict,
        optimizer_state: dict,
    ) -> None:
        """Load full state dicts (as :meth:`full_state` returns them, on every rank); under
        FSDP2 each rank keeps its shard."""

        opts = StateDictOptions(full_state_dict=True, strict=True)
        set_model_state_dict(model, model_state, options=opts)
        set_model_state_dict(ema_model, ema_state, options=opts)
        optimizer_state = _named_optimizer_state(model, optimizer, optimizer_state)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=opts)

    def sampling_model(
        self, ema_model: nn.Module, factory: Callable[[], nn.Module]
    ) -> nn.Module | None:
        """A whole EMA model for sampling on rank 0 (``None`` elsewhere). FSDP2 gathers the
        shards into a plain replica made once with ``factory`` (collective: call it on every
        rank); otherwise it is ``ema_model`` itself."""
        if not self.sharded:
            return ema_model if self.rank == 0 else None

        state = get_model_state_dict(ema_model, options=StateDictOptions(**FULL))
        if self.rank != 0:
            return None
        if self._replica is None:
            with torch.random.fork_rng(devices=[]):  # building must not move the run's RNG
                self._replica = factory().to(self.device).requires_grad_(False)
        self._replica.load_state_dict(state)
        return self._replica

    def fingerprint(self, model: nn.Module) -> str:
        """sha256 of the full weights (collective under FSDP2)."""

        if not self.sharded:
            return model_hash(model.state_dict())

        # every rank gathers the whole state (no cpu_offload: not only rank 0)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        # a model state dict holds tensors (torch types its values as any state value)
        return model_hash({k: v.cpu() for k, v in state.items()})  # type: ignore[union-attr]


def shard(model: nn.Module, **options) -> nn.Module:
    """``fully_shard`` every transformer block (innermost first), then the root."""

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in reversed(blocks):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def _named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """Checkpoints written before the state was keyed by name hold ``optimizer.state_dict()``
    (parameters numbered in the order of ``optimizer.param_groups``): rename to names."""
    groups = state.get("param_groups", [])
    if not groups or not all(isinstance(i, int) for g in groups for i in g["params"]):
        return state
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {
        "state": {order[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in groups],
    }


def _full(t: torch.Tensor) -> torch.Tensor:

    return t.full_tensor() if isinstance(t, DTensor) else t


__all__ = ["Placement", "shard"]
