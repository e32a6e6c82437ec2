"""Plain data parallelism with torch DistributedDataParallel (`ddp`).

Every rank holds the whole model, gradients and AdamW state; DDP averages the gradients
during the backward pass. This is correct with the double backward of conservative training
as long as the forces come from `torch.autograd.grad(..., create_graph=True)` inside the
forward pass (not `backward(create_graph=True)`): the inner gradient touches no parameter's
`.grad`, so DDP's hooks fire once, in the outer backward. (That is also why the search for
unused parameters, needed in the direct stage, must stay off in the conservative stage.)

The training state is single's `state.pt`, written by rank 0 and read on any number of ranks.
In a world of one process the model is not wrapped (there is no process group).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from esen_train.engine import distributed
from esen_train.engine.optim import OptimSettings, build_adamw
from esen_train.engine.strategies.base import Strategy
from esen_train.engine.strategies.single import load_state_file, save_state_file


class DDPStrategy(Strategy):
    name = "ddp"
    reads_states_of = ("single", "ddp")

    def _wrap(self, model: nn.Module, optim: OptimSettings, conservative: bool) -> None:
        self.module = model
        if self.dist.is_distributed:
            device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            # Direct stage: a head may go unused (direct stress on data without stress labels), so
            # DDP must look for unused parameters. Conservative stage: every parameter feeds the
            # energy, and the search would break the double backward ("marked ready twice").
            self.model = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=not conservative)
        else:
            self.model = model
        self.optimizer = build_adamw(model, optim)

    def no_sync(self) -> AbstractContextManager:
        return self.model.no_sync() if self.dist.is_distributed else nullcontext()

    def _save_state(self, directory: Path) -> None:
        if distributed.is_main():
            save_state_file(self, directory)

    def _load_state(self, directory: Path, saved_world_size: int) -> None:
        load_state_file(self, directory)
