"""Plain data parallelism: one process (`single`) or torch DistributedDataParallel (`ddp`).

Every rank holds the whole model, gradients and AdamW state; DDP averages the gradients
during the backward pass. This is correct with the double backward of conservative training
as long as the forces come from `torch.autograd.grad(..., create_graph=True)` inside the
forward pass (not `backward(create_graph=True)`): the inner gradient touches no parameter's
`.grad`, so DDP's hooks fire once, in the outer backward. (That is also why the search for
unused parameters, needed in the direct stage, must stay off in the conservative stage.)

The training state is one `state.pt` (torch.save of tensors and primitives, written by
rank 0, read with weights_only=True on any number of ranks).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from esen_train.engine import distributed
from esen_train.engine.distributed import DistInfo
from esen_train.engine.optim import OptimSettings, build_adamw
from esen_train.engine.strategy import Strategy, read_torch_file

STATE_FILE = "state.pt"


class DataParallelStrategy(Strategy):
    def __init__(self, dist: DistInfo, name: str = "ddp", precision: str = "fp32", grad_accum_steps: int = 1) -> None:
        super().__init__(dist, precision, grad_accum_steps)
        self.name = name

    def setup(self, model: nn.Module, optim: OptimSettings, conservative: bool) -> None:
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
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
            torch.save(state, directory / STATE_FILE)

    def _load_state(self, directory: Path, saved_world_size: int) -> None:
        state = read_torch_file(directory / STATE_FILE, map_location=self.dist.device)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if "ema" not in state:
                raise KeyError(f"{directory / STATE_FILE}: no EMA state, but an EMA is attached")
            self.ema.load_state_dict(state["ema"])
