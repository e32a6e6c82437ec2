"""The Strategy interface: how one process wraps the model, steps the optimizer and writes
the training state. One Strategy object per process and stage; the trainer only talks to it.

    strategy = build_strategy(config.strategy, config.direct, dist)
    strategy.setup(model, OptimSettings(lr=4e-4, weight_decay=1e-3), conservative=False, ema_decay=0.999)
    result = strategy.optimizer_step(micro_batches, loss_fn, max_grad_norm)   # StepResult(grad_norm, skipped)

`loss_fn(strategy.model, batch)` returns this rank's loss for one micro-batch. Gradients are
averaged over ranks by every strategy, so that loss must be the rank's share of the global
mean: local_sum / global_count * world_size.

Implementations (one module each, named in esen_train/engine/strategies/__init__.py):
`SingleStrategy` (single.py), `DDPStrategy` (ddp.py), `FSDPStrategy` (fsdp.py), `ZeroStrategy`
(deepspeed ZeRO-1/2; zero.py). Each writes its training state in its own format into a
directory it is given (engine/checkpoint.py's CheckpointManager creates, publishes and prunes
the checkpoint directories):

    <directory>/strategy.json        strategy name and world size that wrote it
    <directory>/extra_rank<r>.pt     the trainer's extra dict of rank r (torch.save, weights_only)
    <directory>/state.pt | dcp/ | deepspeed/   model, optimizer and EMA in the strategy's format

Multi-node saves need a file system every rank sees (as DCP and DeepSpeed do).
"""
from __future__ import annotations

import json
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from esen_train.engine import distributed
from esen_train.engine.distributed import DistInfo
from esen_train.engine.ema import ExponentialMovingAverage
from esen_train.engine.optim import OptimSettings
from esen_train.model.model_file import CheckpointError

STRATEGY_FILE = "strategy.json"


@dataclass
class StepResult:
    grad_norm: float  # global norm before clipping; inf or nan when the step was skipped
    skipped: bool  # the gradient was not finite: no parameter, optimizer or EMA state changed


class Strategy(ABC):
    """What every strategy shares. Subclasses implement `_wrap`, `_save_state`, `_load_state`
    and, where the parameters are not replicated or the optimizer is not torch's, the rest."""

    name: str
    # The strategies whose training state this one reads (single and ddp share one format).
    reads_states_of: tuple[str, ...]

    def __init__(self, dist: DistInfo, precision: str = "fp32", grad_accum_steps: int = 1) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        if precision == "bf16" and dist.device.type != "cuda":
            warnings.warn("bf16 autocast is applied on GPUs only; this run on the CPU stays in float32", stacklevel=2)
        self.dist = dist
        self.precision = precision
        self.grad_accum_steps = grad_accum_steps
        self.model: nn.Module | None = None  # call this for the forward pass
        self.module: nn.Module | None = None  # the plain model inside any wrapper
        self.optimizer: torch.optim.Optimizer | None = None
        self.ema: ExponentialMovingAverage | None = None  # saved, loaded and exported with the model

    # ----- set-up ------------------------------------------------------------------
    def setup(self, model: nn.Module, optim: OptimSettings, conservative: bool, ema_decay: float) -> None:
        """Wrap `model` (already on `dist.device`), build the optimizer and the EMA of the
        trainable parameters. `conservative` says the forward pass differentiates through
        itself (double backward)."""
        self._wrap(model, optim, conservative)
        self.ema = ExponentialMovingAverage(self.module, ema_decay)

    @abstractmethod
    def _wrap(self, model: nn.Module, optim: OptimSettings, conservative: bool) -> None:
        """Set `model`, `module` and `optimizer`."""

    # ----- one optimizer step ------------------------------------------------------
    def optimizer_step(self, micro_batches: Iterable, loss_fn: Callable[[nn.Module, object], torch.Tensor],
                       max_grad_norm: float) -> StepResult:
        """One optimizer step over `grad_accum_steps` micro-batches (taken from `micro_batches`
        one at a time, as the step needs them). Each runs forward and backward under autocast,
        its loss `loss_fn(self.model, batch)` divided by `grad_accum_steps`; gradients are
        synchronised on the last only. Then clip to `max_grad_norm`, step unless the global
        gradient norm is not finite (the same decision on every rank), zero the gradients and,
        after an applied step, update the EMA."""
        last = self.grad_accum_steps - 1
        done = 0
        for micro, batch in zip(range(self.grad_accum_steps), micro_batches):
            with (self.no_sync() if micro < last else nullcontext()), self.autocast():
                self.backward(loss_fn(self.model, batch) / self.grad_accum_steps)
            done += 1
        if done < self.grad_accum_steps:
            raise ValueError(f"optimizer_step needs grad_accum_steps={self.grad_accum_steps} micro-batches, got {done}")
        result = self._step(max_grad_norm)
        if not result.skipped:
            self.ema.update()
        return result

    def autocast(self) -> AbstractContextManager:
        if self.precision == "bf16" and self.dist.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def no_sync(self) -> AbstractContextManager:
        """Wraps the forward and backward of every micro-step but the last of an accumulation."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of the trainable parameters alone. A conservative loss also reaches the
        positions and the strain through the forces' graph; their gradients would be thrown
        away, and leaving them out skips that part of the double backward (benchmarks/README.md,
        "The parameters' gradients alone")."""
        loss.backward(inputs=[parameter for parameter in self.module.parameters() if parameter.requires_grad])

    def _step(self, max_grad_norm: float) -> StepResult:
        """Clip, step unless the global gradient norm is non-finite, and zero the gradients."""
        norm = self._clip_grad_norm(max_grad_norm)
        skipped = not math.isfinite(norm)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm=norm, skipped=skipped)

    def _clip_grad_norm(self, max_grad_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_grad_norm))

    @property
    def lr(self) -> float:
        """The step's learning rate (groups with an lr_scale run at this times their scale)."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state tensors this rank holds: its shard under FSDP and ZeRO,
        which is what sharding saves (scalars such as the step count left out)."""
        total = 0
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    local = value.to_local() if hasattr(value, "to_local") else value
                    total += local.numel() * local.element_size()
        return total

    # ----- weights for inference ---------------------------------------------------
    def full_state_dict(self, use_ema: bool) -> dict | None:
        """Full, unsharded weights (buffers included; the EMA's parameters if `use_ema`) on the
        CPU of rank 0, None on the other ranks. Collective: call it on every rank."""
        if not distributed.is_main():
            return None
        state = dict(self.module.state_dict())
        if use_ema:
            state.update(self.ema.shadow)
        return {name: value.detach().cpu().clone() for name, value in state.items()}

    # ----- full training state -----------------------------------------------------
    def save_into(self, directory: Path, extra: dict) -> None:
        """Write model, optimizer, EMA and `extra` (this rank's trainer state: tensors and
        primitives only) into `directory`, which exists and every rank sees. Collective; the
        caller waits for every rank (a barrier) before it treats the directory as complete."""
        torch.save(extra, directory / f"extra_rank{self.dist.rank}.pt")
        self._save_state(directory)
        if distributed.is_main():
            (directory / STRATEGY_FILE).write_text(json.dumps({"strategy": self.name, "world_size": self.dist.world_size}))

    def load_from(self, directory: Path) -> dict:
        """Restore model, optimizer and EMA from `directory`; returns this rank's extra dict
        (rank 0's when the state was written by fewer ranks). Collective. A file that
        cannot be read raises CheckpointError naming it."""
        written = self._read_strategy_file(directory)
        extra_file = directory / f"extra_rank{self.dist.rank}.pt"
        if not extra_file.is_file():
            extra_file = directory / "extra_rank0.pt"
        extra = read_torch_file(extra_file, map_location="cpu")
        if not isinstance(extra, dict):
            raise CheckpointError(f"{extra_file}: expected the trainer's dict, found {type(extra).__name__}")
        try:
            self._load_state(directory, saved_world_size=written["world_size"])
        except CheckpointError:
            raise
        except Exception as error:  # a state that does not fit this model or optimizer
            raise CheckpointError(f"{directory}: the training state cannot be loaded ({type(error).__name__}: {error})") from error
        return extra

    def _read_strategy_file(self, directory: Path) -> dict:
        path = directory / STRATEGY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a training-state directory: {STRATEGY_FILE} is missing")
        try:
            record = json.loads(path.read_text())
            written = {"strategy": str(record["strategy"]), "world_size": int(record["world_size"])}
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{path}: not a valid strategy record ({type(error).__name__}: {error})") from None
        if written["strategy"] not in self.reads_states_of:
            raise CheckpointError(
                f"{path}: this training state was written by strategy {written['strategy']!r}, whose format "
                f"strategy {self.name!r} cannot read; resume with strategy.name={written['strategy']}, or start "
                f"from the checkpoint's model.pt instead"
            )
        return written

    @abstractmethod
    def _save_state(self, directory: Path) -> None:
        """Write model, optimizer and EMA into `directory`. Collective."""

    @abstractmethod
    def _load_state(self, directory: Path, saved_world_size: int) -> None:
        """Read what `_save_state` wrote, possibly by another number of ranks. Collective."""


def read_torch_file(path: Path, map_location) -> object:
    """torch.load with weights_only=True; a missing or unreadable file raises CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"{path}: not a readable torch file ({type(error).__name__}: {reason})") from None
