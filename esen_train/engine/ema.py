"""Exponential moving average of the trainable parameters, used for validation and saved.

The shadow copies live beside whatever the strategy made of the parameters: plain tensors for
one process, DDP and DeepSpeed ZeRO-1/2 (parameters are replicated on every rank), DTensor
shards under FSDP2 (each rank keeps the average of its own shard, so the EMA is sharded like
the model and costs 1/N of the weights per rank). Every rank updates its own copy after each
applied optimizer step; no communication is needed.

The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (as in torch_ema and
fairchem): early in training the average follows the weights instead of staying pinned to
the random initialisation.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class ExponentialMovingAverage:
    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = module
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: param.detach().clone() for name, param in self._parameters()
        }

    def _parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((name, param) for name, param in self.module.named_parameters() if param.requires_grad)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current parameters in; call once after every applied optimizer step."""
        weight = 1.0 - self.current_decay()
        for name, param in self._parameters():
            self.shadow[name].lerp_(param.detach(), weight)
        self.num_updates += 1

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Run the model with the EMA weights (e.g. for validation), then restore the trained ones.
        Under FSDP2 and ZeRO every rank must enter it, since the forward pass is collective."""
        with torch.no_grad():
            backup = {name: param.detach().clone() for name, param in self._parameters()}
            self._copy_into_parameters(self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                self._copy_into_parameters(backup)

    def _copy_into_parameters(self, values: dict[str, torch.Tensor]) -> None:
        for name, param in self._parameters():
            param.detach().copy_(values[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        saved = state["shadow"]
        missing = sorted(set(self.shadow) - set(saved))
        unexpected = sorted(set(saved) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {missing}, unexpected {unexpected}")
        for name, value in saved.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state for {name!r} has shape {tuple(value.shape)}, the model has {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
