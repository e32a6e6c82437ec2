"""Fully sharded data parallelism with torch FSDP2 (`fully_shard`).

Parameters, gradients and AdamW state are sharded over the ranks (1/N each between steps);
parameters are all-gathered for compute and gradients reduce-scattered after the backward.

How the model is sharded depends on the stage:
- direct (`conservative=False`): each module the model names in `fsdp_units()` is its own
  FSDP unit (for ESEN the message-passing blocks), then the root takes the rest (embeddings,
  norms, heads). Only one block's parameters are gathered at a time.
- conservative (`conservative=True`): only the root is sharded, as one unit. The forces come
  from `autograd.grad(E, pos, create_graph=True)` inside the forward pass; with per-block units
  that inner gradient fires FSDP's post-backward hooks, which free the gathered block
  parameters before the outer backward needs them (a crash), or, with resharding after
  backward off, leave the optimizer stepping stale shards. With one root unit the parameters
  stay gathered from the start of the forward pass to the end of the outer backward. The cost:
  a rank holds the whole model's parameters and gradients unsharded during each step (as DDP
  does); between steps, and for the optimizer state, it still holds 1/N
  (see benchmarks/strategies.py for measured figures).

In a world of one process nothing is sharded (there is no process group), but the training
state is still a DCP checkpoint, so it loads on any number of ranks.
"""
from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves

from esen_train.engine import distributed
from esen_train.engine.distributed import DistInfo
from esen_train.engine.optim import OptimSettings, build_adamw
from esen_train.engine.safe_dcp import load_dcp, save_dcp
from esen_train.engine.strategies.base import Strategy

DCP_DIR = "dcp"


class FSDPStrategy(Strategy):
    name = "fsdp"
    reads_states_of = ("fsdp",)

    def __init__(self, dist: DistInfo, precision: str = "fp32", grad_accum_steps: int = 1) -> None:
        super().__init__(dist, precision, grad_accum_steps)
        self.sharded = dist.is_distributed

    def _wrap(self, model: nn.Module, optim: OptimSettings, conservative: bool) -> None:
        self.module = self.model = model
        if self.sharded:
            _broadcast_from_rank0(model)  # fully_shard keeps each rank's own slice: start from one model
            mesh = init_device_mesh(self.dist.device.type, (self.dist.world_size,))
            if not conservative:
                for unit in model.fsdp_units():
                    fully_shard(unit, mesh=mesh)
            fully_shard(model, mesh=mesh)
            model.register_forward_hook(_reshard_after_inference)
        self.optimizer = build_adamw(model, optim)  # over the sharded parameters

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate unsharded gradients locally; the last micro-step reduce-scatters them."""
        if not self.sharded:
            yield
            return
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        # FSDP2 computes with unsharded copies of the parameters and reduce-scatters their
        # gradients into the sharded `module.parameters()`, which autograd never reaches: the
        # base class's `inputs=` would leave every gradient empty.
        loss.backward()

    def _clip_grad_norm(self, max_grad_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_grad_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def full_state_dict(self, use_ema: bool) -> dict | None:
        if not self.sharded:
            return super().full_state_dict(use_ema)
        # Every rank takes part in each gather; rank 0 keeps the result.
        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if use_ema:
            for name, shard in self.ema.shadow.items():
                full = shard.full_tensor().cpu()
                if distributed.is_main():
                    state[name] = full
        return state if distributed.is_main() else None

    def _training_state(self) -> dict:
        """Model and optimizer as DCP wants them (sharded tensors keyed by parameter name)."""
        model_state, optimizer_state = get_state_dict(self.module, self.optimizer)
        # The EMA's shadow tensors are filled in place on load.
        return {"model": model_state, "optimizer": optimizer_state, "ema": self.ema.state_dict()}

    def _save_state(self, directory: Path) -> None:
        save_dcp(self._training_state(), directory / DCP_DIR)

    def _load_state(self, directory: Path, saved_world_size: int) -> None:
        # The fresh optimizer's state covers every parameter (get_state_dict initialises it);
        # the saved one lacks the parameters that never had a gradient (e.g. a direct stress
        # head on data without stress): those keep the fresh, zero state.
        state = self._training_state()
        load_dcp(state, directory / DCP_DIR, optional_prefixes=("optimizer.state.",))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        self.ema.load_state_dict(state["ema"])


def _reshard_after_inference(root: nn.Module, args, output) -> None:
    """FSDP2 keeps the root's parameters gathered after its forward pass, for the backward that
    usually follows. A forward whose outputs need no gradient (validation) has no backward:
    reshard at once, so the sharded parameters are registered again (where the EMA swaps its
    weights in and out) and the gathered copies are freed."""
    if not any(leaf.requires_grad for leaf in tree_leaves(output) if isinstance(leaf, torch.Tensor)):
        for module in root.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


@torch.no_grad()
def _broadcast_from_rank0(model: nn.Module) -> None:
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor, src=0)
