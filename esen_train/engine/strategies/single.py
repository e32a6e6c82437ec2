"""One process: the plain model and torch's AdamW (`single`).

The training state is one `state.pt` (torch.save of the model, optimizer and EMA state dicts:
tensors and primitives, read with weights_only=True). `ddp` writes the same file, so either
reads the other's, on any number of ranks.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from esen_train.engine.distributed import DistInfo
from esen_train.engine.optim import OptimSettings, build_adamw
from esen_train.engine.strategies.base import Strategy, read_torch_file

STATE_FILE = "state.pt"


class SingleStrategy(Strategy):
    name = "single"
    reads_states_of = ("single", "ddp")

    def __init__(self, dist: DistInfo, precision: str = "fp32", grad_accum_steps: int = 1) -> None:
        if dist.world_size > 1:
            raise ValueError(f"strategy 'single' runs one process, but the world has {dist.world_size}: use ddp, fsdp or deepspeed")
        super().__init__(dist, precision, grad_accum_steps)

    def _wrap(self, model: nn.Module, optim: OptimSettings, conservative: bool) -> None:
        self.module = self.model = model
        self.optimizer = build_adamw(model, optim)

    def _save_state(self, directory: Path) -> None:
        save_state_file(self, directory)

    def _load_state(self, directory: Path, saved_world_size: int) -> None:
        load_state_file(self, directory)


def save_state_file(strategy: Strategy, directory: Path) -> None:
    """Write `state.pt` (call it on one rank: the state is the same on every rank)."""
    state = {"model": strategy.module.state_dict(), "optimizer": strategy.optimizer.state_dict(),
             "ema": strategy.ema.state_dict()}
    torch.save(state, directory / STATE_FILE)


def load_state_file(strategy: Strategy, directory: Path) -> None:
    state = read_torch_file(directory / STATE_FILE, map_location=strategy.dist.device)
    strategy.module.load_state_dict(state["model"])
    strategy.optimizer.load_state_dict(state["optimizer"])
    strategy.ema.load_state_dict(state["ema"])
