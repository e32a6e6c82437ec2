"""Plain data parallelism with torch DistributedDataParallel (`ddp`).

Every rank holds the whole model, gradients and AdamW state; DDP averages the gradients
during the backward pass. This is correct with the double backward of conservative training
as long as the forces come from `torch.autograd.grad(..., create_graph=True)` inside the
forward pass (not `backward(create_graph=True)`): the inner gradient touches no parameter's
`.grad`, so DDP's hooks fire once, in the outer backward. (That is also why DDP's search for
unused parameters must stay off: it breaks the double backward, "marked ready twice". Neither
stage needs it: every trainable parameter feeds the loss, since the trainer freezes the
direct stress head where the data has no stress.)

The training state is single's `state.pt`, written by rank 0 and read on any number of ranks.
In a world of one process the model is not wrapped (there is no process group).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
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
            _lay_out_gradients_like_parameters(model)
            self.model = DistributedDataParallel(model, device_ids=device_ids)
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


def _lay_out_gradients_like_parameters(model: nn.Module) -> None:
    """Copy a gradient whose strides differ from its parameter's into its parameter's layout.

    The double backward gives the energy head's [1, hidden] output weight a gradient with
    strides (1, 1) where the weight has (hidden, 1): the same elements in the same order (a
    dimension of size 1 has no stride that matters), but DDP compares strides literally and
    warns that the gradient layout may impair performance. Only parameters with a dimension of
    size 1 can get such a gradient; the copy is of their few elements."""
    def laid_out_like(parameter: nn.Parameter):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if grad.stride() == parameter.stride():
                return grad
            return grad.new_empty_strided(parameter.size(), parameter.stride()).copy_(grad)
        return hook

    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dim() > 1 and 1 in parameter.shape:
            parameter.register_hook(laid_out_like(parameter))
